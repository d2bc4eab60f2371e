"""Row order and ablation rows come from method metadata (table_group, table_rank, ablation_of).

Stored records carry the metadata (``cell.json`` ``method_meta``); older records without it
fall back to the registered class, unknown methods to group "other", and paper-only rows to
their position in the paper's row order within group "anomaly" (or "classifier").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from conftest import bench
from test_tables import cell

from bench.method import TABLE_GROUPS, Method, Prediction
from bench.results import CellRecord, MethodMeta, atomic_write_json, load_cells
from bench.tables import build_tables, render_tables
from bench.tables.placement import DEFAULT_META, Placement
from bench.types import ImageItem, Task

DETECT = ("detect",)


class _TestMethod(Method):
    description = "test only"
    tasks = frozenset({Task.DETECT})

    def predict(self, items: Sequence[ImageItem]) -> Prediction:  # pragma: no cover - never run
        raise NotImplementedError


class EarlyReference(_TestMethod):
    """Sorts last by name and would sit in "other" without its metadata."""

    name = "zz-reference"
    table_group = "reference"
    table_rank = 5


class ExtraAblation(_TestMethod):
    name = "ultraad-test-variant"
    table_group = "ours"
    table_rank = 50
    ablation_of = "ultraad"


def detection_rows(cells: list[CellRecord], **kwargs: object) -> list[str]:
    (block,) = build_tables(cells, **kwargs)  # type: ignore[arg-type]
    return [r.label for r in block.table("detection").rows]


def test_registered_reference_method_sits_above_the_anomaly_rows(
    method_registry: Callable[..., None],
) -> None:
    method_registry(EarlyReference)
    cells = [cell(method=m, tasks=DETECT) for m in ("winclip", "ultraad", "zz-reference")]
    assert detection_rows(cells) == ["zz-reference", "winclip", "ultraad"]
    assert Placement(cells).meta("zz-reference") == MethodMeta("reference", 5, None)  # from the class


def test_unregistered_method_goes_to_other_before_ours() -> None:
    cells = [cell(method=m, tasks=DETECT) for m in ("ultraad", "aaa-plugin", "lpp", "winclip", "intensity")]
    assert Placement(cells).meta("aaa-plugin") == DEFAULT_META == MethodMeta("other", 100, None)
    assert detection_rows(cells) == ["intensity", "winclip", "lpp", "aaa-plugin", "ultraad"]


def test_stored_metadata_wins_over_the_registry_and_unknown_groups_are_other() -> None:
    moved = MethodMeta("reference", 0, None)
    cells = [
        cell(method="ultraad", tasks=DETECT),
        cell(method="winclip", tasks=DETECT),
        replace(cell(method="lpp", tasks=DETECT), method_meta=moved),
        replace(cell(method="gone-plugin", tasks=DETECT), method_meta=MethodMeta("no-such-group", 0, None)),
    ]
    assert detection_rows(cells) == ["lpp", "winclip", "gone-plugin", "ultraad"]
    (block,) = build_tables(cells)
    groups = {r.label: r.group for r in block.table("detection").rows}
    assert groups == {"lpp": "reference", "winclip": "anomaly", "gone-plugin": "other", "ultraad": "ours"}
    assert Placement(cells).group("gone-plugin") == "other"


def test_groups_are_printed_in_table_groups_order() -> None:
    assert TABLE_GROUPS == ("reference", "anomaly", "classifier", "other", "ours")
    cells = [
        replace(cell(method=f"m-{group}", tasks=DETECT), method_meta=MethodMeta(group, 0, None))
        for group in reversed(TABLE_GROUPS)
    ]
    assert detection_rows(cells) == [f"m-{group}" for group in TABLE_GROUPS]


def test_paper_only_rows_keep_the_papers_order() -> None:
    (block,) = build_tables([cell()], compare="paper")
    detection = [r.label for r in block.table("detection").rows]
    assert detection == [
        "winclip (zero-shot) [paper only]",
        "adaclip [paper only]",
        "anomalyclip [paper only]",
        "vcpclip [paper only]",
        "mvfa [paper only]",
        "ultraad",
        "ultraad [paper]",
    ]
    classification = [r.label for r in block.table("classification").rows]
    assert classification == [
        "lpp [paper only]",
        "clipadapter [paper only]",
        "tipadapter [paper only]",
        "coop [paper only]",
        "ultraad",
        "ultraad [paper]",
    ]


def test_registered_variant_appears_in_the_ablation_table(method_registry: Callable[..., None]) -> None:
    method_registry(ExtraAblation)
    cells = [cell(method="ultraad", target="udiat", metrics={"image_auroc": 0.8, "pixel_auroc": 0.9})]
    (block,) = build_tables(cells, ablation=True)
    rows = [r.label for r in block.tables[0].rows]
    assert rows == [
        "ultraad",
        "ultraad-us-unaware",
        "ultraad-no-joint",
        "ultraad-no-pif",
        "ultraad-test-variant",
    ]
    # a result of the variant alone is enough to make the block
    only = [cell(method="ultraad-test-variant", target="udiat", tasks=DETECT)]
    (block,) = build_tables(only, ablation=True)
    assert "ultraad-test-variant" in [r.label for r in block.tables[0].rows]
    assert "ultraad-test-variant" in render_tables(only, "markdown", None, True)


def test_stored_ablation_of_puts_an_unregistered_method_in_the_ablation_table() -> None:
    variant = replace(
        cell(method="ultraad-old-variant", target="udiat", tasks=DETECT),
        method_meta=MethodMeta("ours", 9, "ultraad"),
    )
    (block,) = build_tables([variant], ablation=True)
    assert [r.label for r in block.tables[0].rows][-1] == "ultraad-old-variant"
    assert build_tables([cell(method="ultraad-old-variant", tasks=DETECT)], ablation=True) == []


def _write_record(root: Path, record: CellRecord, drop_meta: bool) -> None:
    data = record.to_json()
    if drop_meta:
        data.pop("method_meta", None)
    atomic_write_json(root / record.method / record.target / "shots4_seed0" / "cell.json", data)


def test_cell_json_without_method_meta_sorts_by_the_registry(
    tmp_path: Path, method_registry: Callable[..., None], wide_consoles: None
) -> None:
    method_registry(EarlyReference)
    records = [
        cell(method=m, tasks=DETECT, metrics={"image_auroc": 0.7})
        for m in ("ultraad", "coop", "winclip", "zz-reference")
    ]
    for record in records:
        _write_record(tmp_path, replace(record, method_meta=MethodMeta("ours", 0, None)), drop_meta=True)
    loaded = load_cells(tmp_path)
    assert all(r.method_meta is None for r in loaded)
    assert json.loads(next(tmp_path.rglob("cell.json")).read_text()).get("method_meta") is None
    assert detection_rows(loaded) == ["zz-reference", "winclip", "coop", "ultraad"]
    code, out, err = bench("table", tmp_path, "--format", "markdown")
    assert code == 0, err
    detection = out.split("### ")[1]
    positions = [detection.index(f"| {m} |") for m in ("zz-reference", "winclip", "coop", "ultraad")]
    assert positions == sorted(positions)


def test_cell_json_with_method_meta_round_trips_and_is_used(tmp_path: Path, wide_consoles: None) -> None:
    record = replace(cell(method="later-plugin", tasks=DETECT), method_meta=MethodMeta("reference", 3, None))
    _write_record(tmp_path, record, drop_meta=False)
    _write_record(tmp_path, cell(method="winclip", tasks=DETECT), drop_meta=True)
    loaded = {r.method: r for r in load_cells(tmp_path)}
    assert loaded["later-plugin"].method_meta == MethodMeta("reference", 3, None)
    code, out, err = bench("table", tmp_path, "--format", "markdown")
    assert code == 0, err
    assert out.index("| later-plugin |") < out.index("| winclip |")


def test_our_anomalyclip_sits_in_the_papers_row_and_shows_the_published_numbers() -> None:
    """A registered paper baseline interleaves with the paper-only rows in the paper's order, and
    `--compare paper` prints the published AnomalyCLIP numbers right below ours."""
    cells = [
        cell(method="anomalyclip", target="busi", tasks=("detect", "localize"), metrics={"image_auroc": 0.7}),
        cell(method="ultraad", target="busi"),
    ]
    (block,) = build_tables(cells, compare="paper")
    detection = [r.label for r in block.table("detection").rows]
    assert detection[:6] == [
        "winclip (zero-shot) [paper only]",
        "adaclip [paper only]",
        "anomalyclip",
        "anomalyclip [paper]",
        "vcpclip [paper only]",
        "mvfa [paper only]",
    ]
    detection_table = block.table("detection")
    published = detection_table.data[detection_table.data["row"] == "anomalyclip [paper]"]
    assert (published["status"] == "ok").any(), "the published AnomalyCLIP numbers are shown"
    assert set(published.loc[published["status"] == "ok", "text"]) >= {"62.9", "81.9", "85.6"}  # BUSI 4/8/16
