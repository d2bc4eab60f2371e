"""Per-subgroup tables (`bench table --by`), confidence intervals (`--ci`) and `bench compare`,
all recomputed from the result store."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import ConfigFactory, bench, build_dataset, flat

from bench.breakdown import cell_metrics, subgroup_evaluations, subgroup_label, whole_evaluations
from bench.compare import compare_methods
from bench.intervals import table_intervals
from bench.results import load_cells
from bench.runner import run_grid
from bench.stored import load_predictions

COUNTS = {"normal": 4, "benign": 4, "malignant": 4}


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "mask", "label", "device"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def devices_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One target with a device column (scanner-a / scanner-b alternating), the same images
    as two single-device targets, and a tiny-model run over all three with maps saved."""
    base = tmp_path_factory.mktemp("by-device")
    data = build_dataset(base / "multi", COUNTS, tag="multi")
    with data.manifest.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):
        row["device"] = "scanner-a" if i % 2 == 0 else "scanner-b"
    _write_manifest(data.folder / "manifest.csv", rows)
    for device in ("scanner-a", "scanner-b"):
        folder = base / device
        folder.mkdir()
        own = [r for r in rows if r["device"] == device]
        # The same files (same content keys, same ids) listed by a manifest of one device only.
        _write_manifest(
            folder / "manifest.csv",
            [
                {**r, "image": f"../multi/{r['image']}", "mask": f"../multi/{r['mask']}" if r["mask"] else ""}
                for r in own
            ],
        )
    return {"base": base, "multi": data.folder, "a": base / "scanner-a", "b": base / "scanner-b"}


@pytest.fixture(scope="module")
def run_root(devices_store: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_synthetic_data, tiny_config

    base = tmp_path_factory.mktemp("by-run")
    data = build_synthetic_data(base / "data")
    config = tiny_config(
        base,
        data,
        base / "cache",
        methods="intensity,zeroshot",
        targets=",".join(str(devices_store[k]) for k in ("multi", "a", "b")),
        save_maps=True,
    )
    run_grid(config, show_progress=False)
    return Path(config.out)


def _cells_by_target(root: Path) -> dict[tuple[str, str], object]:
    return {(c.method, c.target): c for c in load_cells(root)}


def test_store_keeps_image_metadata_and_masks(run_root: Path) -> None:
    cells = _cells_by_target(run_root)
    stored = load_predictions(cells[("zeroshot", "multi")])  # type: ignore[arg-type]
    assert stored.column("device")[:4] == ["scanner-a", "scanner-b", "scanner-a", "scanner-b"]
    assert set(stored.metadata_columns()) == {"dataset", "device"}
    masks, valid = stored.masks()
    assert valid.all()  # normal images count, as all-zero masks
    lesion = stored.labels > 0
    assert masks[~lesion].sum() == 0 and all(m.any() for m in masks[lesion])
    assert masks.shape == stored.maps().shape


def test_subgroup_metrics_equal_the_metrics_of_the_subgroup_run_on_its_own(run_root: Path) -> None:
    cells = load_cells(run_root)
    evaluations, notes = subgroup_evaluations([c for c in cells if c.target == "multi"], "device")
    assert notes == []
    by_target = _cells_by_target(run_root)
    assert len(evaluations) == 4
    for evaluation in evaluations:
        method = evaluation.record.method
        device = evaluation.record.target.split("device=")[1].rstrip("]")
        alone = by_target[(method, device)]
        assert evaluation.record.n_images == alone.n_images == 6  # type: ignore[attr-defined]
        assert evaluation.record.metrics.keys() == alone.metrics.keys()  # type: ignore[attr-defined]
        for key, value in alone.metrics.items():  # type: ignore[attr-defined]
            assert evaluation.record.metrics[key] == pytest.approx(value, abs=1e-12), (method, device, key)


def test_whole_cell_recomputed_from_the_store_equals_the_run(run_root: Path) -> None:
    for evaluation in whole_evaluations(load_cells(run_root)):
        recomputed = cell_metrics(evaluation.stored).values
        assert recomputed == pytest.approx(dict(evaluation.record.metrics), abs=1e-12)


def test_subgroup_label_names_target_column_and_value() -> None:
    assert subgroup_label("busi", "device", "GE") == "busi [device=GE]"
    assert subgroup_label("busi", "birads", "") == "busi [birads=(empty)]"


def test_table_by_device_prints_each_subgroup_and_unknown_column_fails(run_root: Path) -> None:
    code, out, err = bench("table", run_root, "--by", "device", "--format", "csv")
    assert code == 0, err
    targets = {row["target"] for row in csv.DictReader(out.splitlines())}
    assert {"multi [device=scanner-a]", "multi [device=scanner-b]"} <= targets
    code, _, err = bench("table", run_root, "--by", "birads")
    assert code == 2
    assert "birads" in flat(err) and "columns present: dataset, device" in flat(err)


def test_pixel_breakdown_without_maps_says_which_flag(make_config: ConfigFactory, devices_store) -> None:
    config = make_config(methods="intensity", targets=str(devices_store["multi"]))
    run_grid(config, show_progress=False)
    evaluations, notes = subgroup_evaluations(load_cells(Path(config.out)), "device")
    assert all("pixel_auroc" not in e.record.metrics for e in evaluations)
    assert all("image_auroc" in e.record.metrics for e in evaluations)
    assert any("--save-maps" in note for note in notes)


def test_intervals_bracket_the_estimate_and_are_shared_by_seeds(run_root: Path) -> None:
    evaluations = whole_evaluations(load_cells(run_root))
    result = table_intervals(evaluations, n_resamples=200, seed=0)
    keys = {(k[1], k[3], k[5]) for k in result.intervals}
    assert ("zeroshot", "multi", "class_auroc") in keys and ("intensity", "multi", "pixel_ap") in keys
    for interval in result.intervals.values():
        assert interval.low <= interval.high
        assert interval.n_valid == 200
        assert interval.low - 0.02 <= interval.estimate <= interval.high + 0.02
    again = table_intervals(evaluations, n_resamples=200, seed=0)
    assert again.intervals == result.intervals  # deterministic for a seed
    other = table_intervals(evaluations, n_resamples=200, seed=1)
    assert other.intervals != result.intervals


def test_table_ci_shows_intervals_and_legend(run_root: Path) -> None:
    code, out, err = bench("table", run_root, "--ci", "--ci-resamples", "100", "--format", "markdown")
    assert code == 0, err
    assert "95% confidence interval of the seed mean" in out
    line = next(row for row in out.splitlines() if row.startswith("| zeroshot"))
    assert "[" in line and "]" in line
    code, out, _ = bench("table", run_root, "--ci", "--ci-resamples", "100", "--format", "csv")
    rows = [r for r in csv.DictReader(out.splitlines()) if r["status"] == "ok"]
    assert rows and all(float(r["ci_low"]) <= float(r["mean"]) + 5 for r in rows)


def test_compare_pairs_the_methods_on_the_same_images(run_root: Path) -> None:
    cells = [c for c in load_cells(run_root) if c.target == "multi"]
    lines = compare_methods(cells, "zeroshot", "intensity", n_resamples=200)
    metrics = {line.metric: line for line in lines}
    assert set(metrics) == {"image_auroc", "pixel_auroc", "pixel_ap"}  # intensity does not classify
    detection = metrics["image_auroc"]
    assert detection.test == "DeLong"
    assert detection.value_a == pytest.approx(_metric(cells, "zeroshot", "image_auroc"), abs=1e-12)
    assert detection.difference == pytest.approx(detection.value_a - detection.value_b, abs=1e-12)
    assert 0.0 <= detection.p_value <= 1.0
    assert metrics["pixel_auroc"].test == "paired bootstrap"
    same = compare_methods(cells + [c for c in cells], "zeroshot", "intensity", n_resamples=200)
    assert same == lines  # duplicates are dropped, nothing counted twice


def _metric(cells: list, method: str, metric: str) -> float:
    return next(c.metrics[metric] for c in cells if c.method == method)


def test_compare_cli_and_errors(run_root: Path) -> None:
    code, out, err = bench("compare", run_root, "zeroshot", "intensity", "--resamples", "50", "-f", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(out.splitlines()))
    assert {r["test"] for r in rows} == {"DeLong", "paired bootstrap"}
    assert all(r["random_init"] == "True" for r in rows)
    code, _, err = bench("compare", run_root, "zeroshot", "nosuch")
    assert code == 2 and "nosuch" in flat(err)
    code, _, err = bench("compare", run_root, "zeroshot", "intensity", "--metric", "dice")
    assert code == 2 and "dice" in flat(err)


def test_images_csv_keeps_clashing_metadata_under_a_prefix(tmp_path: Path) -> None:
    from bench.results import image_row, images_csv

    row = image_row("x", "ds", "k", "/p.png", {"path": "orig", "device": "GE"})
    text = images_csv([row])
    header, values = text.splitlines()
    assert header == "id,dataset,key,path,device,meta_path"
    assert values == "x,ds,k,/p.png,GE,orig"


def test_a_bootstrap_p_of_zero_is_printed_as_its_resolution() -> None:
    from bench.cli import _p_text

    assert _p_text(0.0, "paired bootstrap", 1000) == "<0.002"
    assert _p_text(0.0, "DeLong", 1000) == "<1e-16"
    assert _p_text(0.0123456, "DeLong", 1000) == "0.0123"
