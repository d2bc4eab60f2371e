"""Tests of bench.tables (result tables) and results/paper.yaml (the paper's numbers)."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import flat
from rich.console import Console

from bench.errors import ConfigError
from bench.method import TABLE_GROUPS
from bench.results import BackboneIdentity, CellRecord
from bench.tables import (
    CSV_COLUMNS,
    DEFAULT_PAPER_YAML,
    FORMATS,
    GROUP_HEADINGS,
    MARK_MISSING,
    MARK_NOT_APPLICABLE,
    STD_DDOF,
    build_tables,
    load_paper,
    render_tables,
    to_rich,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER_DOC = REPO_ROOT.parent / "shared" / "docs" / "ultraad.md"

ALL_TASKS = ("detect", "classify", "localize")
PRETRAINED = BackboneIdentity("ViT-L-14-336-quickgelu", "openai", 336, (6, 12, 18, 24))
RANDOM = BackboneIdentity("ViT-B-16", "random-init", 224, (3, 6, 9, 12))


def cell(
    method: str = "ultraad",
    target: str = "busi",
    shots: int = 4,
    seed: int = 0,
    metrics: dict[str, float] | None = None,
    *,
    tasks: tuple[str, ...] = ALL_TASKS,
    uses_support: bool = True,
    backbone: BackboneIdentity = PRETRAINED,
    source: str = "bus-uclm",
    created: str = "2025-01-01T00:00:00+00:00",
    path: str | None = None,
) -> CellRecord:
    return CellRecord(
        method=method,
        tasks=tasks,
        source=source,
        target=target,
        shots=shots,
        seed=seed,
        uses_support=uses_support,
        backbone=backbone,
        metrics=metrics if metrics is not None else {"image_auroc": 0.5},
        n_images=10,
        n_pixel_images=5,
        eval_size=336,
        created=created,
        path=Path(path) if path else None,
    )


def seeds(values: list[float], **kwargs) -> list[CellRecord]:
    """One cell per seed with image_auroc = value."""
    return [cell(seed=i, metrics={"image_auroc": v}, **kwargs) for i, v in enumerate(values)]


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def test_mean_and_sample_std_over_seeds() -> None:
    assert STD_DDOF == 1
    (block,) = build_tables(seeds([0.70, 0.80, 0.90]))
    table = block.table("detection")
    got = table.cell("ultraad", "busi", 4)
    assert got["mean"] == pytest.approx(80.0)
    assert got["std"] == pytest.approx(10.0)  # ddof=1; ddof=0 would give 8.2
    assert got["n"] == 3
    assert table.text("ultraad", "busi", 4) == "80.0 ± 10.0"
    assert not table.show_n
    assert any("n=3 seed(s) in every cell" in line for line in table.legend)


def test_single_seed_shows_mean_only() -> None:
    (block,) = build_tables(seeds([0.7234]))
    assert block.table("detection").text("ultraad", "busi", 4) == "72.3"


def test_n_shown_when_seed_counts_differ() -> None:
    cells = seeds([0.70, 0.80, 0.90]) + seeds([0.60, 0.70], shots=8)
    (block,) = build_tables(cells)
    table = block.table("detection")
    assert table.show_n
    assert table.text("ultraad", "busi", 4) == "80.0 ± 10.0 (n=3)"
    assert table.text("ultraad", "busi", 8) == "65.0 ± 7.1 (n=2)"
    assert any("differs between cells" in line for line in table.legend)


def test_nan_metric_is_ignored_and_missing_metric_is_marked() -> None:
    cells = [
        cell(seed=0, metrics={"image_auroc": 0.8}),
        cell(seed=1, metrics={"image_auroc": math.nan}),
        cell(method="other", metrics={"class_auroc": 0.6}),  # does localize, but no pixel metric
    ]
    (block,) = build_tables(cells)
    assert block.table("detection").cell("ultraad", "busi", 4)["n"] == 1
    assert block.table("localization").text("other", "busi", 4, "pixel_ap") == "n/a"


# --------------------------------------------------------------------------------------------
# Groups, identity, duplicates
# --------------------------------------------------------------------------------------------


def test_two_backbones_are_never_averaged() -> None:
    cells = seeds([0.9, 0.9]) + seeds([0.5, 0.5], backbone=RANDOM)
    blocks = build_tables(cells)
    assert len(blocks) == 2
    titles = [b.title for b in blocks]
    assert len(set(titles)) == 2
    by_weights = {b.identity.weights: b for b in blocks}
    assert by_weights["openai"].table("detection").cell("ultraad", "busi", 4)["mean"] == pytest.approx(90.0)
    assert by_weights["random-init"].table("detection").cell("ultraad", "busi", 4)["mean"] == pytest.approx(
        50.0
    )
    assert (
        "random-init" in by_weights["random-init"].title
        and "NOT pretrained" in by_weights["random-init"].title
    )
    assert "random-init" not in by_weights["openai"].title


def test_different_source_or_eval_size_are_separate_blocks() -> None:
    cells = [cell(), cell(source="udiat")]
    assert len(build_tables(cells)) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_identity_and_random_init_warning_in_every_format(fmt: str) -> None:
    cells = seeds([0.7, 0.8], backbone=RANDOM) + seeds([0.7, 0.8])
    out = render_tables(cells, fmt, None, False)
    assert "ViT-B-16" in out and "ViT-L-14-336-quickgelu" in out
    assert "random-init" in out
    assert "NOT pretrained" in out
    if fmt != "csv":
        assert "WARNING" in out


def test_duplicates_counted_once_newest_kept_with_warning() -> None:
    cells = [
        cell(seed=0, metrics={"image_auroc": 0.6}, created="2025-01-01T00:00:00+00:00", path="/runs/a/cell0"),
        cell(seed=0, metrics={"image_auroc": 0.8}, created="2025-03-01T00:00:00+00:00", path="/runs/b/cell0"),
        cell(seed=1, metrics={"image_auroc": 0.9}, path="/runs/a/cell1"),
    ]
    (block,) = build_tables(cells)
    got = block.table("detection").cell("ultraad", "busi", 4)
    assert got["n"] == 2
    assert got["mean"] == pytest.approx(85.0)  # the newer 0.8 kept, not 0.6; not 3 seeds
    assert len(block.warnings) == 1
    assert "/runs/a/cell0" in block.warnings[0] and "/runs/b/cell0" in block.warnings[0]
    for fmt in ("markdown", "rich", "latex"):
        assert "/runs/a/cell0" in render_tables(cells, fmt, None, False)
    seen: list[str] = []
    csv_text = render_tables(cells, "csv", None, False, on_warning=seen.append)
    assert len(seen) == 1 and "duplicate" in seen[0]
    assert "duplicate" not in csv_text
    with pytest.warns(UserWarning, match="duplicate"):
        render_tables(cells, "csv", None, False)


# --------------------------------------------------------------------------------------------
# Markers, zero-shot
# --------------------------------------------------------------------------------------------


def test_not_applicable_vs_missing_markers_and_legend() -> None:
    cells = [
        cell(method="mvfa", tasks=("localize",), metrics={"pixel_auroc": 0.6}),
        cell(method="ultraad", target="busi", metrics={"image_auroc": 0.8}),
        cell(method="ultraad", target="udiat", shots=8, metrics={"image_auroc": 0.8}),
    ]
    (block,) = build_tables(cells, compare="paper")
    det = block.table("detection")
    # The paper reports mvfa's detection: its rows stay, ours marked as not doing the task.
    assert det.text("mvfa", "busi", 4) == MARK_NOT_APPLICABLE == "-"
    assert det.text("mvfa [paper]", "busi", 4) == "78.4"
    assert det.text("ultraad", "busi", 8) == MARK_MISSING  # not run yet
    assert det.text("ultraad", "udiat", 4) == MARK_MISSING
    assert block.table("localization").text("mvfa", "busi", 4, "pixel_auroc") == "60.0"
    assert MARK_NOT_APPLICABLE != MARK_MISSING
    legend = " ".join(det.legend)
    assert "does not do this task" in legend and "not run yet" in legend
    md = render_tables(cells, "markdown", "paper", False)
    assert "| mvfa | - | - | - | - | - | - |" in md
    assert "does not do this task" in md and "not run yet" in md


def test_a_table_lists_only_the_methods_that_do_its_task() -> None:
    cells = [
        cell(method="lpp", tasks=("classify", "detect"), metrics={"image_auroc": 0.6, "class_auroc": 0.5}),
        cell(method="coop", tasks=("classify", "detect"), metrics={"image_auroc": 0.6, "class_auroc": 0.5}),
        cell(method="mvfa", tasks=("detect", "localize"), metrics={"image_auroc": 0.7, "pixel_auroc": 0.8}),
        cell(metrics={"image_auroc": 0.9, "class_auroc": 0.8, "pixel_auroc": 0.9}),
    ]
    (block,) = build_tables(cells)
    rows = {t.spec.key: [r.label for r in t.rows] for t in block.tables}
    assert rows == {
        "detection": ["mvfa", "lpp", "coop", "ultraad"],
        "classification": ["lpp", "coop", "ultraad"],
        "localization": ["mvfa", "ultraad"],  # no rows of "-" from the classifiers
    }
    assert MARK_NOT_APPLICABLE not in set(block.table("localization").data["text"])


def test_columns_come_from_the_tables_own_methods_and_empty_tables_are_left_out() -> None:
    cells = [
        cell(method="lpp", target="udiat", tasks=("classify", "detect"), metrics={"class_auroc": 0.5}),
        cell(
            method="mvfa", target="busi", shots=8, tasks=("detect", "localize"), metrics={"pixel_auroc": 0.8}
        ),
    ]
    (block,) = build_tables(cells)
    assert [t.spec.key for t in block.tables] == ["detection", "classification", "localization"]
    assert [c.label for c in block.table("classification").columns] == ["udiat 4-shot"]
    assert [c.label for c in block.table("localization").columns] == ["busi 8-shot"]
    assert {c.label for c in block.table("detection").columns} == {
        f"{t} {s}-shot" for t in ("busi", "udiat") for s in (4, 8)
    }
    (block,) = build_tables([cells[1]])
    assert [t.spec.key for t in block.tables] == ["detection", "localization"]
    with pytest.raises(KeyError):
        block.table("classification")


def test_zero_shot_row_fills_every_shots_column() -> None:
    cells = [
        cell(
            method="winclip",
            shots=0,
            uses_support=False,
            tasks=("detect", "localize"),
            metrics={"image_auroc": 0.797, "pixel_auroc": 0.8, "pixel_ap": 0.05},
        ),
        *[cell(shots=s, metrics={"image_auroc": 0.9}) for s in (4, 8, 16)],
    ]
    (block,) = build_tables(cells)
    det = block.table("detection")
    assert [c.shots for c in det.columns] == [4, 8, 16]
    for shots in (4, 8, 16):
        assert det.text("winclip (zero-shot)", "busi", shots) == "79.7"
    assert [r.label for r in block.table("classification").rows] == ["ultraad"]  # winclip does not classify
    assert any("zero-shot" in line for line in det.legend)


def test_only_zero_shot_results_get_a_zero_shot_column() -> None:
    cells = [cell(method="winclip", shots=0, uses_support=False, metrics={"image_auroc": 0.7})]
    (block,) = build_tables(cells)
    det = block.table("detection")
    assert [c.label for c in det.columns] == ["busi zero-shot"]
    assert det.text("winclip (zero-shot)", "busi", 0) == "70.0"


# --------------------------------------------------------------------------------------------
# --compare paper
# --------------------------------------------------------------------------------------------


def test_compare_paper_places_values_in_our_columns() -> None:
    cells = seeds([0.70, 0.80, 0.90])
    (block,) = build_tables(cells, compare="paper")
    det = block.table("detection")
    labels = [r.label for r in det.rows]
    assert labels.index("ultraad [paper]") == labels.index("ultraad") + 1
    assert det.text("ultraad [paper]", "busi", 4) == "87.0"
    assert det.text("ultraad [paper]", "busi", 8) == "90.7"
    assert det.text("ultraad [paper]", "busi", 16) == "91.4"
    # our 8/16-shot columns exist for the paper's numbers, ours are not run yet
    assert det.text("ultraad", "busi", 16) == MARK_MISSING
    # BUSZS has no target here: extra paper columns after ours
    assert det.columns[-1].group == "BUSZS [paper]"
    assert det.text("ultraad [paper]", "BUSZS [paper]", 4) == "95.9"
    assert det.text("ultraad", "BUSZS [paper]", 4) == ""
    # methods we did not run are shown, marked paper-only; zero-shot fills all shots
    assert det.text("adaclip [paper only]", "busi", 4) == "54.7"
    assert det.text("winclip (zero-shot) [paper only]", "busi", 16) == "79.7"
    assert det.text("winclip (zero-shot) [paper only]", "BUSZS [paper]", 8) == "59.3"
    # localization pairs and classification rows
    loc = block.table("localization")
    assert loc.text("ultraad [paper]", "busi", 4, "pixel_auroc") == "88.3"
    assert loc.text("ultraad [paper]", "busi", 4, "pixel_ap") == "48.7"
    cls = block.table("classification")
    assert cls.text("lpp [paper only]", "BUSZS [paper]", 16) == "62.2"
    assert "winclip (zero-shot) [paper only]" not in [r.label for r in cls.rows]


def test_compare_paper_with_stand_in_target() -> None:
    cells = seeds([0.8]) + seeds([0.7], target="udiat")
    (block,) = build_tables(cells, compare="paper", paper_targets={"udiat": "BUSZS"})
    det = block.table("detection")
    assert det.text("ultraad [paper]", "udiat", 4) == "95.9"
    assert det.text("ultraad [paper]", "busi", 4) == "87.0"
    assert not any(c.target is None for c in det.columns)  # nothing left over: no extra columns
    assert "udiat vs paper BUSZS (stand-in, different data)." in det.legend
    md = render_tables(cells, "markdown", "paper", False, paper_targets={"udiat": "BUSZS"})
    assert "stand-in, different data" in md


def test_compare_rejects_unknown_reference_and_dataset() -> None:
    with pytest.raises(ConfigError):
        build_tables([cell()], compare="other")
    with pytest.raises(ConfigError):
        build_tables([cell()], compare="paper", paper_targets={"udiat": "NOPE"})
    with pytest.raises(ConfigError):
        render_tables([cell()], "html", None, False)


def test_paper_yaml_override(tmp_path: Path) -> None:
    raw = yaml.safe_load(DEFAULT_PAPER_YAML.read_text(encoding="utf-8"))
    raw["tables"]["detection"]["methods"]["ultraad"]["values"]["BUSI"][4]["image_auroc"] = 12.3
    custom = tmp_path / "paper.yaml"
    custom.write_text(yaml.safe_dump(raw), encoding="utf-8")
    (block,) = build_tables([cell()], compare="paper", paper_yaml=custom)
    assert block.table("detection").text("ultraad [paper]", "busi", 4) == "12.3"
    with pytest.raises(ConfigError):
        build_tables([cell()], compare="paper", paper_yaml=tmp_path / "missing.yaml")


# --------------------------------------------------------------------------------------------
# Ablation
# --------------------------------------------------------------------------------------------


def test_ablation_layout_and_paper_numbers() -> None:
    cells = [
        cell(method="ultraad", target="udiat", seed=s, metrics={"image_auroc": v, "pixel_auroc": 0.9})
        for s, v in enumerate([0.8, 0.9])
    ] + [
        cell(method="ultraad-no-joint", target="udiat", tasks=("localize",), metrics={"pixel_auroc": 0.85}),
        cell(method="winclip", target="udiat", shots=0, uses_support=False),
    ]
    (block,) = build_tables(cells, compare="paper", ablation=True, paper_targets={"udiat": "BUSZS"})
    assert [t.spec.key for t in block.tables] == ["ablation"]
    table = block.tables[0]
    assert table.metrics == ("image_auroc", "pixel_auroc")
    assert [r.label for r in table.rows] == [
        "ultraad",
        "ultraad [paper]",
        "ultraad-us-unaware",
        "ultraad-us-unaware [paper]",
        "ultraad-no-joint",
        "ultraad-no-joint [paper]",
        "ultraad-no-pif",
        "ultraad-no-pif [paper]",
    ]
    assert table.text("ultraad", "udiat", 4, "image_auroc") == "85.0 ± 7.1 (n=2)"
    assert table.text("ultraad [paper]", "udiat", 4, "image_auroc") == "82.3"
    assert table.text("ultraad [paper]", "udiat", 4, "pixel_auroc") == "93.4"
    assert table.text("ultraad-no-joint", "udiat", 4, "image_auroc") == "-"
    assert table.text("ultraad-no-joint [paper]", "udiat", 4, "image_auroc") == "-"
    assert table.text("ultraad-no-joint [paper]", "udiat", 4, "pixel_auroc") == "84.3"
    assert table.text("ultraad-no-pif", "udiat", 4, "pixel_auroc") == MARK_MISSING
    assert table.text("ultraad-no-pif [paper]", "udiat", 4, "image_auroc") == "71.2"
    assert table.text("ultraad-us-unaware [paper]", "udiat", 4, "pixel_auroc") == "88.6"
    md = render_tables(cells, "markdown", "paper", True, paper_targets={"udiat": "BUSZS"})
    assert "I-AUROC" in md and "P-AUROC" in md and "winclip" not in md.split("Legend")[0]


def test_ablation_without_variants_and_empty_input() -> None:
    assert build_tables([cell(method="winclip")], ablation=True) == []
    assert "No results for the ablation variants" in render_tables(
        [cell(method="winclip")], "markdown", None, True
    )
    assert "No finished cells" in render_tables([], "markdown", None, False)
    assert list(pd.read_csv(io.StringIO(render_tables([], "csv", None, False))).columns)[:2] == [
        "backbone",
        "model",
    ]


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def _fixture_cells() -> list[CellRecord]:
    """ultraad (2 seeds, all tasks), mvfa (3 seeds, no classification), winclip zero-shot."""
    full = {"image_auroc": 0.8, "class_auroc": 0.6, "pixel_auroc": 0.9, "pixel_ap": 0.4}
    return [
        *[cell(seed=s, metrics=full) for s in range(2)],
        *seeds([0.70, 0.80, 0.90], method="mvfa", tasks=("detect", "localize")),
        cell(
            method="winclip",
            shots=0,
            uses_support=False,
            tasks=("detect", "localize"),
            metrics={"image_auroc": 0.75, "pixel_auroc": 0.8, "pixel_ap": 0.05},
        ),
    ]


def test_csv_reads_back_with_the_right_numbers() -> None:
    text = render_tables(_fixture_cells(), "csv", "paper", False)
    frame = pd.read_csv(io.StringIO(text))
    mvfa = frame[(frame["table"] == "detection") & (frame["row"] == "mvfa") & (frame["shots"] == 4)]
    assert len(mvfa) == 1
    assert mvfa["mean"].iloc[0] == pytest.approx(80.0)
    assert mvfa["std"].iloc[0] == pytest.approx(10.0)
    assert mvfa["n"].iloc[0] == 3
    assert bool(mvfa["random_init"].iloc[0]) is False
    # zero-shot rows once, with shots 0
    winclip = frame[(frame["table"] == "detection") & (frame["row"] == "winclip (zero-shot)")]
    assert list(winclip["shots"]) == [0] and winclip["mean"].iloc[0] == pytest.approx(75.0)
    paper = frame[
        (frame["row"] == "ultraad [paper]") & (frame["table"] == "detection") & (frame["shots"] == 4)
    ]
    assert set(paper["mean"]) == {87.0, 95.9}
    assert set(frame["status"]) <= {"ok", "missing", "not_applicable", "no_metric"}
    assert (frame["backbone"] == PRETRAINED.label).all()


def test_markdown_tables_parse() -> None:
    md = render_tables(_fixture_cells(), "markdown", None, False)
    assert md.startswith("## ViT-L-14-336-quickgelu @336px, weights: openai")
    tables = [[line for line in chunk.splitlines() if line.startswith("|")] for chunk in md.split("### ")[1:]]
    assert len(tables) == 3
    for lines in tables:
        widths = {line.count(" | ") for line in lines}
        assert len(widths) == 1  # every row has as many cells as the header
    detection = tables[0]
    assert detection[0] == "| method | busi 4-shot |"
    assert "| mvfa | 80.0 ± 10.0 (n=3) |" in detection
    assert "| winclip (zero-shot) | 75.0 |" in detection
    assert "| busi 4-shot P-AUROC | busi 4-shot pixel AP |" in tables[2][0]


def test_latex_is_booktabs_and_balanced() -> None:
    tex = render_tables(_fixture_cells(), "latex", "paper", False)
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 3
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 3
    # one \midrule per row group: anomaly + ours (detection, localization), classifier + ours
    assert tex.count(r"\midrule") == 6
    assert r"80.0 $\pm$ 10.0 (n=3)" in tex
    assert r"\caption{Detection: I-AUROC (\%). Backbone: ViT-L-14-336-quickgelu" in tex
    for body in re.findall(r"\\toprule\n.*?\\midrule\n(.*?)\\bottomrule", tex, flags=re.S):
        lines = [
            line for line in body.strip().splitlines() if not line.startswith(("\\midrule", "\\multicolumn"))
        ]
        amps = {line.count("&") for line in lines}
        assert len(amps) == 1
    spec = re.search(r"\\begin\{tabular\}\{l(r+)\}", tex)
    assert spec is not None
    assert "_" not in tex.replace(r"\_", "").split(r"\begin{table}")[1].split(r"\end{table}")[0]


def test_rich_prints_to_console_and_returns_text() -> None:
    console = Console(file=io.StringIO(), width=250, record=True, color_system=None)
    text = render_tables(_fixture_cells(), "rich", "paper", False, console=console)
    assert "ultraad [paper]" in text  # not swallowed as rich markup
    assert "80.0 ± 10.0 (n=3)" in text
    assert "ultraad [paper]" in console.export_text()
    from rich.table import Table as RichTable

    assert sum(isinstance(r, RichTable) for r in to_rich(build_tables(_fixture_cells()))) == 3


# --------------------------------------------------------------------------------------------
# Row groups, and what is printed once per block
# --------------------------------------------------------------------------------------------


def _grouped_cells(backbone: BackboneIdentity = PRETRAINED) -> list[CellRecord]:
    """One method of each group but "other", given in scrambled order."""
    both = {"image_auroc": 0.6, "class_auroc": 0.5}
    return [
        cell(metrics={"image_auroc": 0.9, "class_auroc": 0.8}, backbone=backbone),
        cell(method="lpp", tasks=("classify", "detect"), metrics=both, backbone=backbone),
        cell(method="mvfa", tasks=("detect", "localize"), backbone=backbone),
        cell(
            method="intensity", shots=0, uses_support=False, tasks=("detect", "localize"), backbone=backbone
        ),
    ]


#: The detection table of :func:`_grouped_cells`: (group, row labels) in order.
GROUPED_DETECTION = [
    ("reference", ["intensity (zero-shot)"]),
    ("anomaly", ["mvfa"]),
    ("classifier", ["lpp"]),
    ("ours", ["ultraad"]),
]


def test_group_headings_cover_every_table_group() -> None:
    assert set(GROUP_HEADINGS) == set(TABLE_GROUPS)
    assert len(set(GROUP_HEADINGS.values())) == len(TABLE_GROUPS)


def test_rows_carry_their_group_in_the_model_and_the_csv() -> None:
    (block,) = build_tables(_grouped_cells())
    det = block.table("detection")
    assert [(g, [r.label for r in rows]) for g, rows in det.row_groups()] == GROUPED_DETECTION
    assert dict(zip(det.data["row"], det.data["group"], strict=True))["lpp"] == "classifier"
    frame = pd.read_csv(io.StringIO(render_tables(_grouped_cells(), "csv", None, False)))
    assert "group" in CSV_COLUMNS and list(frame.columns) == list(CSV_COLUMNS)
    assert dict(zip(frame["row"], frame["group"], strict=True)) == {
        "intensity (zero-shot)": "reference",
        "mvfa": "anomaly",
        "lpp": "classifier",
        "ultraad": "ours",
    }
    keys = ["table", "row", "column", "shots", "metric"]
    assert len(frame) == len(frame.drop_duplicates(keys)) and frame["row"].notna().all()  # no heading rows


def test_paper_rows_sit_in_their_methods_group() -> None:
    (block,) = build_tables([cell()], compare="paper")
    groups = {r.label: r.group for r in block.table("classification").rows}
    assert groups["coop [paper only]"] == "classifier"
    assert groups["ultraad [paper]"] == groups["ultraad"] == "ours"


def _in_order(text: str, fragments: list[str]) -> bool:
    positions = [text.index(f) for f in fragments]
    return positions == sorted(positions)


def test_markdown_opens_each_group_with_a_bold_heading_row() -> None:
    md = render_tables(_grouped_cells(), "markdown", None, False)
    detection = md.split("### ")[1]
    body = [line for line in detection.splitlines() if line.startswith("|")][2:]
    expected: list[str] = []
    for group, labels in GROUPED_DETECTION:
        expected.append(f"| **{GROUP_HEADINGS[group]}** |  |")
        expected.extend(f"| {label} | " for label in labels)
    assert len(body) == len(expected)
    for line, start in zip(body, expected, strict=True):
        assert line.startswith(start), (line, start)


def test_latex_opens_each_group_with_a_midrule_and_an_italic_heading() -> None:
    tex = render_tables(_grouped_cells(), "latex", None, False)
    detection = tex.split(r"\begin{table}")[1]
    pattern = r"\\midrule\n\\multicolumn\{2\}\{l\}\{\\textit\{(.*?)\}\} \\\\\n"
    assert re.findall(pattern, detection) == [GROUP_HEADINGS[g] for g, _ in GROUPED_DETECTION]
    assert detection.count(r"\midrule") == len(GROUPED_DETECTION)
    assert _in_order(
        detection, [r"\textit{training-free", "intensity (zero-shot) &", r"\textit{CLIP", "mvfa &"]
    )


def test_rich_opens_each_group_with_a_heading_row() -> None:
    text = render_tables(_grouped_cells(), "rich", None, False)
    detection = text.split("Detection: I-AUROC (%)")[1].split("Classification")[0]
    assert _in_order(detection, [f for g, labels in GROUPED_DETECTION for f in (GROUP_HEADINGS[g], *labels)])


def test_block_legend_is_every_tables_lines_once_in_order() -> None:
    (block,) = build_tables(_grouped_cells())
    tables = {t.spec.key: t for t in block.tables}
    assert len(tables) == 3
    legend = block.legend
    assert len(legend) == len(set(legend))
    # a line every table has is printed as it is, once
    markers = next(line for line in tables["detection"].legend if "does not do this task" in line)
    assert all(markers in t.legend for t in tables.values()) and legend.count(markers) == 1
    # a line only some tables have names them; the first table's lines come first
    zero_shot = next(line for line in tables["detection"].legend if line.startswith("'(zero-shot)'"))
    assert zero_shot not in tables["classification"].legend
    assert f"(Detection, Localization) {zero_shot}" in legend
    pixel_ap = next(line for line in tables["localization"].legend if line.startswith("pixel AP"))
    assert legend[-1] == f"(Localization) {pixel_ap}"
    assert legend.index(markers) < legend.index(f"(Detection, Localization) {zero_shot}")


@pytest.mark.parametrize("fmt", ["rich", "markdown"])
def test_identity_warning_and_legend_once_per_block(fmt: str) -> None:
    cells = _grouped_cells(RANDOM) + _grouped_cells()
    out = render_tables(cells, fmt, None, False)
    blocks = build_tables(cells)
    assert len(blocks) == 2 and sum(len(b.tables) for b in blocks) == 6
    assert out.count("WARNING: random-init weights") == 1  # one random-init block, one banner
    assert out.count("Legend:") == 2
    assert out.count("'-' = the method does not do this task") == 2
    assert flat(out).count("ViT-B-16 @224px") == 1  # the identity in the block header only
    for table in blocks[0].tables:
        assert flat(out).count(table.spec.title) == 2  # titled by the table alone, once per block
    # the legend follows the block's last table
    first, _ = out.split("ViT-L-14-336-quickgelu @336px")
    assert first.index("Localization: P-AUROC") < first.index("Legend:")


def test_latex_floats_stand_alone() -> None:
    tex = render_tables(_grouped_cells(RANDOM), "latex", None, False)
    floats = tex.split(r"\begin{table}")[1:]
    assert len(floats) == 3
    for body in floats:
        assert "Backbone: ViT-B-16 @224px" in body and "WARNING: random-init" in body
        assert "does not do this task" in body


# --------------------------------------------------------------------------------------------
# results/paper.yaml against shared/docs/ultraad.md
# --------------------------------------------------------------------------------------------

#: Caption line (start) before each results table of the doc -> table key in paper.yaml.
DOC_TABLES = {
    "Binary detection I-AUROC": "detection",
    "Fine-grained classification AUROC": "classification",
    "Localization (P-AUROC": "localization",
}


def _doc_tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """``{table: {method row: {dataset: cell text}}}`` from the doc's markdown tables."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    current: str | None = None
    header: list[str] = []
    for line in text.splitlines():
        for caption, key in DOC_TABLES.items():
            if line.startswith(caption):
                current, header = key, []
        if not line.startswith("|") or current is None:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells
            continue
        if set(cells[0]) <= {"-"}:
            continue
        out.setdefault(current, {})[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return out


def _doc_values(cell_text: str, metrics: tuple[str, ...]) -> list[dict[str, float]]:
    """One dict per shots setting: "54.7 / 78.7 / 86.5" or "(79.4, 32.7) (87.5, 51.5) ..."."""
    if len(metrics) == 1:
        return [{metrics[0]: float(v)} for v in cell_text.split("/")]
    pairs = re.findall(r"\(([\d.]+),\s*([\d.]+)\)", cell_text)
    return [dict(zip(metrics, map(float, pair), strict=True)) for pair in pairs]


@pytest.fixture(scope="module")
def paper_doc() -> str:
    if not PAPER_DOC.is_file():
        pytest.skip(f"{PAPER_DOC} not found (the shared docs are not checked out next to the repo)")
    return PAPER_DOC.read_text(encoding="utf-8")


def test_paper_yaml_matches_the_doc_tables(paper_doc: str) -> None:
    paper = load_paper()
    doc = _doc_tables(paper_doc)
    assert set(doc) == {"detection", "classification", "localization"}
    checked = 0
    for key, rows in doc.items():
        table = paper.tables[key]
        by_name = {m.paper_name: m for m in table.methods.values()}
        assert len(by_name) == len(rows), f"{key}: yaml has {sorted(by_name)}, doc has {sorted(rows)}"
        for row_name, by_dataset in rows.items():
            zero_shot = row_name.endswith("(zero-shot)")
            method = by_name[row_name.removesuffix("(zero-shot)").strip()]
            assert method.zero_shot == zero_shot
            for dataset, text in by_dataset.items():
                values = _doc_values(text, table.metrics)
                shot_list = [0] if zero_shot else list(paper.shots)
                assert len(values) == len(shot_list), (key, row_name, dataset, text)
                for shots, expected in zip(shot_list, values, strict=True):
                    for metric, value in expected.items():
                        assert method.values[(dataset, shots, metric)] == value, (
                            key,
                            row_name,
                            dataset,
                            shots,
                        )
                        checked += 1
                # nothing in the yaml that the doc does not print
                assert len([k for k in method.values if k[0] == dataset]) == sum(len(v) for v in values)
    assert checked == 2 * (6 * 3 - 2) + 2 * (5 * 3) + 2 * 2 * (6 * 3 - 2)  # every number of the doc


def test_paper_yaml_ablation_matches_the_doc(paper_doc: str) -> None:
    paper = load_paper()
    ablation = paper.tables["ablation"]
    section = paper_doc.split("## Ablations")[1].split("\n## ")[0]
    found = 0
    for line in section.splitlines():
        match = re.match(r"^- (.+): (\S+) / (\S+)$", line)
        if not match:
            continue
        name = match.group(1).split(" (")[0]
        (method,) = [m for m in ablation.methods.values() if m.paper_name == name]
        for metric, text in zip(("image_auroc", "pixel_auroc"), match.group(2, 3), strict=True):
            expected = None if text == "-" else float(text)
            assert method.values[("BUSZS", 4, metric)] == expected, (name, metric)
        found += 1
    assert found == 4 == len(ablation.methods)
    assert list(ablation.methods) == ["ultraad", "ultraad-us-unaware", "ultraad-no-joint", "ultraad-no-pif"]


def test_paper_yaml_structure() -> None:
    paper = load_paper()
    assert paper.shots == (4, 8, 16)
    assert set(paper.datasets) == {"BUSI", "BUSZS"}
    assert paper.public == {"BUSI": True, "BUSZS": False}
    assert "in-house" in paper.datasets["BUSZS"]
    assert list(paper.tables["detection"].methods) == [
        "winclip",
        "adaclip",
        "anomalyclip",
        "vcpclip",
        "mvfa",
        "ultraad",
    ]
    assert list(paper.tables["classification"].methods) == [
        "lpp",
        "clipadapter",
        "tipadapter",
        "coop",
        "ultraad",
    ]
    assert paper.tables["localization"].metrics == ("pixel_auroc", "pixel_ap")
    assert paper.tables["detection"].methods["ultraad"].values[("BUSI", 4, "image_auroc")] == 87.0
    assert paper.tables["localization"].methods["winclip"].values[("BUSZS", 0, "pixel_ap")] == 8.4
