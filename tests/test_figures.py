"""``bench figure maps|shots|roc`` on small hand-made stores (no CLIP, no run): what each
figure draws (rows, columns, colour limits, error bars, ROC areas), the files written and
every error the user can cause, through the library and through the CLI runner."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from rich.console import Console
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from bench.data import file_key
from bench.figures.cli import figure_app
from bench.figures.common import save_figure
from bench.figures.maps import draw_maps, pick_per_class
from bench.figures.roc import draw_roc
from bench.figures.shots import draw_shots
from bench.fileio import file_mode_from_umask
from bench.results import BackboneIdentity, CellOutput, CellRecord, MethodMeta, image_row, write_cell

RANDOM = BackboneIdentity("ViT-B-16", "random-init", 224, (3, 6, 9, 12))
PRETRAINED = BackboneIdentity("ViT-B-16", "openai", 224, (3, 6, 9, 12))
OTHER_MODEL = BackboneIdentity("ViT-L-14", "random-init", 224, (5, 11, 17, 23))
EVAL = 8
TARGET = "tgt"
LABELS = ["normal"] * 3 + ["benign"] * 3 + ["malignant"] * 3
IDS = [f"{label}_{i % 3}" for i, label in enumerate(LABELS)]
#: The benign image whose mask is unusable (kept out of pixel metrics, never picked).
UNUSABLE = "benign_2"
META = {
    "zs": MethodMeta("reference", 0),
    "fb": MethodMeta("anomaly", 0),
    "fa": MethodMeta("anomaly", 1),
    "cls": MethodMeta("classifier", 0),
}
#: Table order: group (reference, anomaly, classifier), then rank; not alphabetical.
ORDER = ["zs", "fb", "fa", "cls"]


@dataclass(frozen=True)
class DemoImages:
    folder: Path
    rows: list[dict[str, str]]
    masks: list[np.ndarray | None]

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.png"


def write_images(folder: Path) -> DemoImages:
    """Nine distinct 12x10 RGB test images (3 per class) and their masks at the eval size."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, masks = [], []
    for i, (image_id, label) in enumerate(zip(IDS, LABELS, strict=True)):
        path = folder / f"{image_id}.png"
        Image.fromarray(rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)).save(path)
        rows.append(image_row(image_id, "demo", file_key(path), str(path), {"device": "dev-a"}))
        mask = np.zeros((EVAL, EVAL), dtype=bool)
        if label != "normal":
            mask[1 + i % 4 : 4 + i % 4, 2:5] = True
        masks.append(None if image_id == UNUSABLE else mask)
    return DemoImages(folder, rows, masks)


def demo_maps(method: str, shots: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{method}:{shots}:{seed}".encode()))
    offset = {"zs": 0.0, "fb": 10.0, "fa": -3.0}.get(method, 0.0)
    return (offset + rng.random((len(IDS), EVAL, EVAL))).astype(np.float16)


def write_demo_cell(
    root: Path,
    images: DemoImages,
    method: str,
    shots: int = 0,
    seed: int = 0,
    *,
    run: str = "run",
    target: str = TARGET,
    identity: BackboneIdentity = RANDOM,
    maps: np.ndarray | None = None,
    save_maps: bool = True,
    metrics: dict[str, float] | None = None,
    created: str = "2025-01-01T00:00:00+00:00",
) -> CellRecord:
    """One finished cell as the runner would store it; scores have ties, ``image_auroc`` is
    computed from them (unless ``metrics`` says otherwise)."""
    uses_support = method != "zs"
    tasks = ("classify",) if method == "cls" else ("detect", "localize")
    rng = np.random.default_rng(zlib.crc32(f"scores:{method}:{shots}:{seed}".encode()))
    scores = np.round(rng.random(len(IDS)), 1)
    lesion = np.array([label != "normal" for label in LABELS])
    if metrics is None:
        metrics = (
            {"class_auroc": 0.5} if method == "cls" else {"image_auroc": float(roc_auc_score(lesion, scores))}
        )
    if maps is None and save_maps and method != "cls":
        maps = demo_maps(method, shots, seed)
    record = CellRecord(
        method=method,
        tasks=tasks,
        source="src",
        target=target,
        shots=shots,
        seed=seed,
        uses_support=uses_support,
        backbone=identity,
        metrics=metrics,
        n_images=len(IDS),
        n_pixel_images=len(IDS) - 1,
        eval_size=EVAL,
        created=created,
        method_meta=META.get(method),
    )
    write_cell(
        root / run / method / target / f"shots{shots}_seed{seed}",
        CellOutput(
            record=record,
            run_config={"eval_size": EVAL},
            image_ids=IDS,
            labels=LABELS,
            scores=scores,
            probs=np.full((len(IDS), 3), 1 / 3) if method == "cls" else None,
            maps=maps,
            support_ids={"normal": ["s"]} if uses_support else None,
            fit_seconds=0.0,
            predict_seconds=0.0,
            device="cpu",
            notes=[],
            excluded_from_pixel_metrics={UNUSABLE: "mask unusable"},
            method_options={},
            images=images.rows,
            masks=images.masks if maps is not None else None,
        ),
    )
    return record


def write_demo_store(root: Path, images: DemoImages) -> Path:
    """zs (zero-shot), fb and fa (few-shot with maps), cls (classifier, no maps) at 2 and 4
    shots, seeds 0 and 1, on one target."""
    write_demo_cell(root, images, "zs")
    for method in ("fa", "fb", "cls"):
        for shots in (2, 4):
            for seed in (0, 1):
                write_demo_cell(root, images, method, shots, seed)
    return root


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoImages]:
    """The demo store and its images, built once: tests that use it only read it."""
    folder = tmp_path_factory.mktemp("figures")
    images = write_images(folder / "data")
    return write_demo_store(folder / "results", images), images


@pytest.fixture
def store(shared: tuple[Path, DemoImages]) -> Path:
    return shared[0]


@pytest.fixture
def store_copy(shared: tuple[Path, DemoImages], tmp_path: Path) -> Path:
    """A private copy of the demo store (same images) for tests that add cells or figures."""
    return Path(shutil.copytree(shared[0], tmp_path / "results"))


@pytest.fixture
def images(tmp_path: Path) -> DemoImages:
    """Private images for tests that build their own store (or damage the images)."""
    return write_images(tmp_path / "data")


@pytest.fixture
def own_store(tmp_path: Path, images: DemoImages) -> Path:
    """A small store on private images: zs and fa at 2 shots, seed 0."""
    root = tmp_path / "own"
    write_demo_cell(root, images, "zs")
    write_demo_cell(root, images, "fa", 2, 0)
    return root


@pytest.fixture(scope="module")
def no_maps_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("no-maps")
    root = folder / "results"
    write_demo_cell(root, write_images(folder / "data"), "fa", 2, 0, save_maps=False)
    return root


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.cli_support as cli_support

    monkeypatch.setattr(cli_support, "console", Console(width=2000))
    monkeypatch.setattr(cli_support, "err_console", Console(stderr=True, width=2000))


def figure_cli(*args: str | Path) -> tuple[int, str, str]:
    """``bench figure ARGS`` on an app that registers the figure sub-app the way bench/cli.py will."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.add_typer(figure_app, name="figure")
    result = CliRunner().invoke(app, ["figure", *(str(a) for a in args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def flat(text: str) -> str:
    return " ".join(text.split())


def titles(figure: object) -> list[str]:
    return [ax.get_title() for ax in figure.axes]  # type: ignore[attr-defined]


def suptitle(figure: object) -> str:
    return flat(figure.get_suptitle())  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- maps


def test_maps_layout_rows_columns_and_table_order(store: Path) -> None:
    result = draw_maps(store, shots=2, seed=1, per_class=1)
    figure = result.figure
    methods = ["zs", "fb", "fa"]  # cls stores no maps; fb before fa by rank, not by name
    assert result.data["methods"] == methods
    n_rows, n_cols = 3, 2 + len(methods)
    assert len(figure.axes) == n_rows * n_cols + 1  # + the one colour bar
    assert titles(figure)[:n_cols] == ["image", "ground truth", "zs (zero-shot)", "fb", "fa"]
    assert result.data["labels"] == ["normal", "benign", "malignant"]
    first_column = [figure.axes[r * n_cols] for r in range(n_rows)]
    assert [ax.get_ylabel().split("\n") for ax in first_column] == [
        [label, image_id] for label, image_id in zip(result.data["labels"], result.data["ids"], strict=True)
    ]
    assert any("not shown (no stored maps): cls" in note for note in result.notes)
    assert result.name == "maps_tgt_2shot_seed1"


def test_maps_show_the_stored_cell_of_the_chosen_point(store: Path) -> None:
    result = draw_maps(store, shots=4, seed=1, ids=["malignant_1"])
    row = IDS.index("malignant_1")
    fa = result.figure.axes[4].images[-1].get_array()
    stored = demo_maps("fa", 4, 1).astype(np.float64)
    expected = (stored[row] - stored.min()) / (stored.max() - stored.min())
    np.testing.assert_allclose(fa, expected, rtol=0, atol=1e-12)
    zero_shot = result.figure.axes[2].images[-1].get_array()
    stored_zs = demo_maps("zs", 0, 0).astype(np.float64)
    np.testing.assert_allclose(
        zero_shot, (stored_zs[row] - stored_zs.min()) / (stored_zs.max() - stored_zs.min()), atol=1e-12
    )


def test_maps_per_method_scale_uses_the_whole_target(tmp_path: Path, images: DemoImages) -> None:
    """Each method's maps are scaled by its min/max over ALL target images, not the shown ones."""
    root = tmp_path / "results"
    maps = np.full((len(IDS), EVAL, EVAL), 5.0, dtype=np.float16)
    shown = IDS.index("benign_1")
    maps[shown, 0, 0] = 7.0
    maps[IDS.index("normal_0"), 3, 3] = 1.0  # the method's minimum, in a row not shown
    maps[IDS.index("malignant_2"), 4, 4] = 9.0  # its maximum, not shown either
    write_demo_cell(root, images, "fa", 2, 0, maps=maps)
    write_demo_cell(root, images, "zs", maps=np.full((len(IDS), EVAL, EVAL), 3.0, dtype=np.float16))

    result = draw_maps(root, ids=["benign_1"])
    fa_image = result.figure.axes[3].images[-1]
    assert fa_image.get_clim() == (0.0, 1.0)
    shown_values = fa_image.get_array()
    assert shown_values[0, 0] == (7.0 - 1.0) / (9.0 - 1.0)
    assert shown_values[1, 1] == (5.0 - 1.0) / (9.0 - 1.0)
    assert np.all(result.figure.axes[2].images[-1].get_array() == 0.0)  # a constant map becomes 0
    assert result.data["ranges"] == {"zs": (3.0, 3.0), "fa": (1.0, 9.0)}

    shared = draw_maps(root, ids=["benign_1"], scale="shared")
    overlays = [ax.images[-1] for ax in shared.figure.axes[2:4]]
    assert [image.get_clim() for image in overlays] == [(1.0, 9.0), (1.0, 9.0)]
    assert overlays[1].get_array()[0, 0] == 7.0 and overlays[0].get_array()[0, 0] == 3.0


def test_records_without_placement_fall_back_to_the_tables_placement(
    tmp_path: Path, images: DemoImages, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record without method_meta (an older store) makes the order come from
    bench.tables.placement: here with an empty registry, fb falls back to ``other``/100 and
    goes after fa (``anomaly``/1), although its stored rank used to put it first."""
    import bench.tables.placement as placement

    monkeypatch.setattr(placement, "registered_meta", dict)
    monkeypatch.setitem(META, "fb", None)  # type: ignore[arg-type]
    root = tmp_path / "results"
    for method in ("zs", "fb", "fa"):
        write_demo_cell(root, images, method, 0 if method == "zs" else 2, 0, save_maps=False)
    assert draw_shots(root).data["methods"] == ["zs", "fa", "fb"]


def test_every_overlay_shares_one_colour_scale(store: Path) -> None:
    result = draw_maps(store, shots=2, seed=0, per_class=2)
    n_cols = 2 + len(result.data["methods"])
    overlays = [ax.images[-1] for i, ax in enumerate(result.figure.axes[:-1]) if i % n_cols >= 2]
    assert len(overlays) == 6 * 3
    assert {image.get_clim() for image in overlays} == {(0.0, 1.0)}
    shared = draw_maps(store, shots=2, seed=0, per_class=2, scale="shared")
    ranges = shared.data["ranges"]
    expected = (min(lo for lo, _ in ranges.values()), max(hi for _, hi in ranges.values()))
    assert expected[1] > 10  # fb's offset: the shared scale really spans the methods
    overlays = [ax.images[-1] for i, ax in enumerate(shared.figure.axes[:-1]) if i % n_cols >= 2]
    assert {image.get_clim() for image in overlays} == {expected}


def test_maps_image_and_outline_are_what_was_scored(shared: tuple[Path, DemoImages]) -> None:
    store, images = shared
    result = draw_maps(store, shots=2, seed=0, ids=["normal_0", "malignant_0", UNUSABLE])
    n_cols = 5
    axes = result.figure.axes
    original = Image.open(images.path("malignant_0")).convert("RGB")
    squashed = np.asarray(original.resize((EVAL, EVAL), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(axes[n_cols].images[0].get_array(), squashed)
    assert axes[n_cols].images[0].get_array().shape == (EVAL, EVAL, 3)
    # a contour on the lesion row only; the unusable mask says so instead
    assert len(axes[1].collections) == 0
    assert len(axes[n_cols + 1].collections) == 1
    assert len(axes[2 * n_cols + 1].collections) == 0
    assert [t.get_text() for t in axes[2 * n_cols + 1].texts] == ["no usable mask"]


def expected_picks(per_class: int, pick_seed: int) -> list[str]:
    """The documented rule, by hand: usable images of each class ranked by sha256."""
    picks = []
    for label in ("normal", "benign", "malignant"):
        usable = [i for i, lab in zip(IDS, LABELS, strict=True) if lab == label and i != UNUSABLE]
        ranked = sorted(
            usable, key=lambda i: hashlib.sha256(f"figure:{pick_seed}:{label}:{i}".encode()).hexdigest()
        )
        picks.extend(ranked[:per_class])
    return picks


def test_per_class_picks_are_reproducible(store: Path) -> None:
    one = draw_maps(store, shots=2, seed=0, per_class=1, pick_seed=3).data["ids"]
    assert one == expected_picks(1, 3)
    two = draw_maps(store, shots=4, seed=1, per_class=2, pick_seed=3).data["ids"]  # any shots and seed
    assert two == expected_picks(2, 3)
    assert [two[0], two[2], two[4]] == one  # more rows per class keep the earlier picks
    assert UNUSABLE not in two  # only images with a usable mask are picked
    labels = np.array([LABELS.index(label) // 3 for label in LABELS])
    usable = np.array([i != UNUSABLE for i in IDS])
    for pick_seed in range(8):
        rows, _ = pick_per_class(IDS, labels, usable, 2, pick_seed)
        assert [IDS[r] for r in rows] == expected_picks(2, pick_seed)
    assert len({tuple(expected_picks(1, s)) for s in range(8)}) > 1  # the pick seed matters
    no_normal = np.where(labels == 0, 1, labels)
    rows, notes = pick_per_class(IDS, no_normal, usable, 1, 0)
    assert [no_normal[r] for r in rows] == [1, 2]
    assert notes == ["the target has no normal image: no normal row"]


def test_maps_image_root_remaps_a_moved_dataset(own_store: Path, images: DemoImages, tmp_path: Path) -> None:
    store = own_store
    moved = tmp_path / "moved"
    images.folder.rename(moved)
    code, _, err = figure_cli("maps", store, "--shots", "2", "--seed", "0", "--out", tmp_path / "m.png")
    assert code == 2
    assert "file not found" in flat(err) and "--image-root OLD=NEW" in flat(err)
    code, _, err = figure_cli(
        "maps", store, "--shots", "2", "--seed", "0", "--image-root", f"{images.folder}={moved}",
        "--out", tmp_path / "m.png", "--dpi", "40",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "m.png").is_file()


def test_maps_refuses_a_changed_image(own_store: Path, images: DemoImages) -> None:
    store = own_store
    Image.new("RGB", (12, 10), (9, 9, 9)).save(images.path("benign_0"))
    code, out, err = figure_cli("maps", store, "--shots", "2", "--seed", "0", "--ids", "benign_0")
    assert code == 2 and "Traceback" not in out + err
    message = flat(err)
    assert "test image 'benign_0'" in message and "has changed since the run" in message
    assert not (store / "figures").exists()  # nothing half-written


# --------------------------------------------------------------------------- shots


def test_shots_error_bars_are_mean_and_sample_std_over_seeds(tmp_path: Path, images: DemoImages) -> None:
    root = tmp_path / "results"
    values = {(2, 0): 0.6, (2, 1): 0.7, (2, 2): 0.8, (4, 0): 0.5, (4, 1): 0.9}
    for (shots, seed), value in values.items():
        write_demo_cell(root, images, "fa", shots, seed, metrics={"image_auroc": value}, save_maps=False)
        write_demo_cell(root, images, "fa", shots, seed, target="other", metrics={"image_auroc": 0.5})
    write_demo_cell(root, images, "zs", metrics={"image_auroc": 0.55}, save_maps=False)

    result = draw_shots(root)
    figure = result.figure
    assert len(figure.axes) == 2 and titles(figure) == ["other", TARGET]
    ax = figure.axes[1]
    (container,) = ax.containers
    data_line, _, (bars,) = container
    # by hand: 60, 70, 80 -> mean 70, sample std 10; 50, 90 -> mean 70, sample std sqrt(800)
    np.testing.assert_array_equal(np.asarray(data_line.get_xdata(), dtype=float), [2.0, 4.0])
    np.testing.assert_allclose(np.asarray(data_line.get_ydata(), dtype=float), [70.0, 70.0], atol=1e-12)
    segments = np.array(bars.get_segments())
    np.testing.assert_allclose(segments[:, :, 1], [[60.0, 80.0], [70 - math.sqrt(800), 70 + math.sqrt(800)]])
    (zero_shot,) = [line for line in ax.lines if line.get_label() == "zs (zero-shot)"]
    np.testing.assert_allclose(zero_shot.get_ydata(), [55.0, 55.0])
    assert result.data["series"][(TARGET, "fa")]["n"] == [3, 2]
    assert any("fewer seeds" in note and "fa on tgt at 4 shots (n=2)" in note for note in result.notes)
    # one seed: no error bar, never a zero-width one
    only_seed0 = tmp_path / "one-seed"
    write_demo_cell(only_seed0, images, "fa", 2, 0, metrics={"image_auroc": 0.6}, save_maps=False)
    series = draw_shots(only_seed0).data["series"][(TARGET, "fa")]
    assert series["mean"] == [60.0] and math.isnan(series["std"][0])


def test_shots_leaves_out_methods_without_the_metric(store: Path) -> None:
    result = draw_shots(store, metric="class_auroc")
    assert result.data["methods"] == ["cls"]
    assert any("not shown (no class_auroc stored): zs, fb, fa" in note for note in result.notes)
    result = draw_shots(store)
    assert result.data["methods"] == ["zs", "fb", "fa"]
    assert result.name == "shots_image_auroc"


# --------------------------------------------------------------------------- roc


def test_roc_auroc_in_the_legend_equals_the_stored_metric(store: Path) -> None:
    result = draw_roc(store, shots=4, seed=1)
    ax = result.figure.axes[0]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert [label.split(",")[0] for label in legend] == ["zs (zero-shot)", "fb", "fa"]
    for method in ("zs", "fb", "fa"):
        shots, seed = (0, 0) if method == "zs" else (4, 1)
        stored = CellRecord.from_json(
            json.loads(
                (store / "run" / method / TARGET / f"shots{shots}_seed{seed}" / "cell.json").read_text()
            )
        ).metrics["image_auroc"]
        (line,) = [line for line in ax.lines if line.get_label().startswith(f"{method}")]
        area = float(np.trapezoid(line.get_ydata(), line.get_xdata()))  # under the curve as drawn
        assert abs(area - stored) <= 1e-12
        assert abs(result.data["curves"][method][2] - stored) <= 1e-12
        assert line.get_label().endswith(f"AUROC {stored:.3f}")
    assert any("no image_auroc stored): cls" in note for note in result.notes)


def test_roc_refuses_a_cell_whose_metric_disagrees_with_its_scores(
    tmp_path: Path, images: DemoImages
) -> None:
    root = tmp_path / "results"
    write_demo_cell(root, images, "fa", 2, 0, metrics={"image_auroc": 0.123}, save_maps=False)
    code, _, err = figure_cli("roc", root)
    assert code == 2
    assert "stores image_auroc 0.123" in flat(err) and "damaged" in flat(err)


# --------------------------------------------------------------------------- all figures


@pytest.mark.parametrize(
    ("identity", "warned"), [(RANDOM, True), (PRETRAINED, False)], ids=["random-init", "pretrained"]
)
def test_titles_say_random_init(
    tmp_path: Path, images: DemoImages, identity: BackboneIdentity, warned: bool
) -> None:
    root = tmp_path / "results"
    write_demo_cell(root, images, "fa", 2, 0, identity=identity)
    for result in (draw_maps(root), draw_shots(root), draw_roc(root)):
        title = suptitle(result.figure)
        assert identity.label in title
        assert ("weights: random-init (NOT pretrained" in title) is warned
        assert "support source: src" in title and f"evaluated at {EVAL}x{EVAL}" in title


def test_cli_writes_each_format_its_suffix_names(store_copy: Path, tmp_path: Path) -> None:
    store = store_copy
    magic = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}
    commands = [
        ("maps", ".pdf", ["--shots", "2", "--seed", "0"]),
        ("shots", ".svg", ["--metric", "image_auroc"]),
        ("roc", ".png", ["--shots", "4", "--seed", "1"]),
    ]
    for name, suffix, options in commands:
        out = tmp_path / "figs" / f"{name}{suffix}"
        code, stdout, err = figure_cli(name, store, *options, "--out", out, "--dpi", "40")
        assert code == 0, err
        assert flat(stdout) == f"wrote {out}"
        assert out.read_bytes().startswith(magic[suffix])
        assert out.stat().st_mode & 0o777 == file_mode_from_umask()  # shareable, not mkstemp's 0600
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["maps.pdf", "roc.png", "shots.svg"]
    # without --out: a PNG under RESULTS_DIR/figures, named after what it shows
    code, out, err = figure_cli("maps", store, "--shots", "2", "--seed", "1", "--dpi", "40")
    path = store / "figures" / "maps_tgt_2shot_seed1.png"
    assert code == 0, err
    assert flat(out) == f"wrote {path}" and path.read_bytes().startswith(magic[".png"])
    assert "note: not shown (no stored maps): cls" in flat(err)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_pdf_and_svg_files_are_reproducible(store: Path, tmp_path: Path) -> None:
    for suffix in (".pdf", ".svg"):  # no creation date, no random ids
        paths = [
            save_figure(draw_roc(store, shots=2, seed=0).figure, tmp_path / f"roc{i}{suffix}", dpi=40)
            for i in range(2)
        ]
        assert paths[0].read_bytes() == paths[1].read_bytes()


def test_duplicate_cells_are_counted_once_with_a_warning(
    store_copy: Path, shared: tuple[Path, DemoImages]
) -> None:
    newer = "2026-01-01T00:00:00+00:00"
    write_demo_cell(
        store_copy, shared[1], "fa", 2, 0, run="rerun", metrics={"image_auroc": 0.25}, created=newer
    )
    result = draw_shots(store_copy)
    assert any(note.startswith("warning: duplicate cell fa") and "rerun" in note for note in result.notes)
    series = result.data["series"][(TARGET, "fa")]
    assert series["n"] == [2, 2]
    seed1 = CellRecord.from_json(json.loads((store_copy / "run/fa/tgt/shots2_seed1/cell.json").read_text()))
    assert series["mean"][0] == pytest.approx(
        100 * (0.25 + seed1.metrics["image_auroc"]) / 2
    )  # the newer kept


def test_backbones_are_never_pooled(store_copy: Path, shared: tuple[Path, DemoImages]) -> None:
    write_demo_cell(store_copy, shared[1], "fa", 2, 0, run="large", identity=OTHER_MODEL)
    code, _, err = figure_cli("shots", store_copy)
    assert code == 2
    assert "never pooled" in flat(err) and "--backbone MODEL (ViT-B-16, ViT-L-14)" in flat(err)
    result = draw_shots(store_copy, backbone="ViT-L-14")
    assert result.data["series"][(TARGET, "fa")]["n"] == [1]
    assert "ViT-L-14" in suptitle(result.figure)


def test_cli_import_stays_light() -> None:
    code = (
        "import sys, bench.figures.cli; "
        "print(sorted(m for m in ('matplotlib', 'pandas', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["maps", "{store}", "--shots", "2", "--seed", "0", "--methods", "fa,nosuch"],
         ["unknown method 'nosuch' for target 'tgt'", "zs, fb, fa, cls"]),
        (["maps", "{store}", "--shots", "2", "--seed", "0", "--methods", "cls"],
         ["maps.npy is missing", "stored no maps", "bench run --save-maps"]),
        (["maps", "{store}", "--target", "busi"], ["target 'busi' is not stored", "(stored: tgt)"]),
        (["maps", "{store}"], ["several shot counts are stored", "(2, 4)", "--shots"]),
        (["maps", "{store}", "--shots", "8"], ["shots 8 is not stored", "(stored: 2, 4)"]),
        (["maps", "{store}", "--shots", "2", "--seed", "5"], ["seed 5 is not stored", "(stored: 0, 1)"]),
        (["maps", "{store}", "--shots", "2", "--seed", "0", "--ids", "a,b", "--per-class", "1"],
         ["--ids and --per-class both choose the rows"]),
        (["maps", "{store}", "--shots", "2", "--seed", "0", "--ids", "normal_0,nope"],
         ["--ids: 'nope' not among the 9 test images", "normal_0"]),
        (["maps", "{store}", "--shots", "2", "--seed", "0", "--per-class", "3"],
         ["--per-class 3: the target has only 2 benign image(s) with a usable mask (3 in all)"]),
        (["maps", "{store}", "--shots", "2", "--seed", "0", "--per-class", "0"],
         ["--per-class must be at least 1, got 0"]),
        (["maps", "{store}", "--shots", "2", "--seed", "0", "--scale", "log"],
         ["unknown --scale 'log'", "per-method or shared"]),
        (["maps", "{store}", "--shots", "2", "--seed", "0", "--image-root", "nowhere"],
         ["--image-root must look like OLD=NEW"]),
        (["maps", "{store}", "--shots", "2", "--seed", "0", "--cmap", "nocmap"], ["unknown --cmap 'nocmap'"]),
        (["maps", "{no_maps}"], ["no cell for target 'tgt' at 2-shot, seed 0 stored maps", "--save-maps"]),
        (["shots", "{store}", "--metric", "dice"], ["unknown --metric 'dice'", "pixel_dice"]),
        (["shots", "{store}", "--metric", "pixel_aupro"],
         ["stores pixel_aupro", "metrics stored: class_auroc, image_auroc"]),
        (["shots", "{store}", "--methods", "cls"], ["method cls stores no image_auroc", "zs, fb, fa"]),
        (["shots", "{store}", "--targets", "tgt,busi"], ["unknown target 'busi'", "stored: tgt"]),
        (["shots", "{store}", "--backbone", "ViT-H-14"], ["--backbone 'ViT-H-14'", "(stored: ViT-B-16)"]),
        (["roc", "{store}", "--shots", "2", "--seed", "0", "--methods", "cls"],
         ["cls stored no image_auroc"]),
        (["roc", "{store}", "--shots", "2", "--seed", "0", "--methods", "fa,,fb"],
         ["--methods must be a comma-separated list"]),
        (["roc", "{store}", "--shots", "2", "--seed", "0", "--out", "x.jpg"],
         ["unknown figure format '.jpg'", ".png, .pdf, .svg"]),
        (["roc", "{store}", "--shots", "2", "--seed", "0", "--dpi", "0"], ["--dpi must be a positive"]),
        (["roc", "{store}", "--shots", "2", "--seed", "0", "--out", "{a_file}/roc.png"],
         ["cannot write the figure to", "choose another --out"]),
        (["roc", "{empty}"], ["no finished cells under", "bench run --out"]),
        (["roc", "{missing}"], ["does not exist"]),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line_and_exit_2(
    store: Path, no_maps_store: Path, tmp_path: Path, args: list[str], fragments: Sequence[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    places = {
        "a_file": tmp_path / "a-file",
        "store": store,
        "no_maps": no_maps_store,
        "empty": tmp_path / "empty",
        "missing": tmp_path / "missing",
    }
    code, out, err = figure_cli(*(a.format(**places) for a in args))
    assert code == 2, out + err
    assert "Traceback" not in out + err and err.count("error:") == 1
    assert err.strip().splitlines()[-1].startswith("error:")  # after any notes, one line
    for fragment in fragments:
        assert fragment in flat(err), (fragment, flat(err))
    assert not (store / "figures").exists()


def test_cli_lists_the_three_figures() -> None:
    code, out, _ = figure_cli("--help")
    assert code == 0
    for name in ("maps", "shots", "roc"):
        assert name in out
