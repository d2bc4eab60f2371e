"""The grid runner end to end on tiny synthetic data with the tiny random-init CLIP.

Covers the result store layout, the one-encode-per-image guarantee of the feature cache,
resuming (no rewrite, partial recompute, interruption), sharding, and bad input / faulty
methods failing with messages that name the file, row or cell.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import (
    DAMAGES,
    EVAL_SIZE,
    SyntheticData,
    cell_dirs,
    register_methods,
    run_dir_of,
    snapshot,
    tiny_config,
)

from bench.breakdown import cell_metrics, whole_evaluations
from bench.config import RunConfig, load_config, shard_index
from bench.data import resolve_dataset, sample_support
from bench.errors import BenchError, ConfigError, DatasetError, MethodError
from bench.feature_cache import ENTRY_SUFFIX
from bench.method import Method, Prediction, SupportSet
from bench.registry import available_methods
from bench.results import METRIC_KEYS, MethodMeta, load_cells, task_metrics
from bench.runner import FitUnit, Runner, RunSummary, plan_grid, run_grid, shard_units
from bench.types import ImageItem, Task

IMAGE_KEYS = ("image_auroc",)
CLASS_KEYS = ("class_auroc", "class_accuracy", "class_balanced_accuracy")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_dice")
CELL_FILES = {"config.yaml", "predictions.csv", "images.csv", "timings.json", "cell.json"}


class PrototypeProbe(Method):
    """Test method: nearest class prototype on cached CLIP embeddings, patch distance maps."""

    name = "proto-test"
    description = "test only: class prototypes of frozen CLIP embeddings"
    tasks = frozenset({Task.DETECT, Task.CLASSIFY, Task.LOCALIZE})
    uses_support = True
    default_config: ClassVar[dict[str, Any]] = {"temperature": 10.0}
    #: Simulated crash: predict raises on any batch holding an id with this prefix.
    fail_on: ClassVar[str | None] = None

    def fit(self, support: SupportSet) -> None:
        features = self.ctx.backbone.image_features(support.items)
        embeds = F.normalize(features.embeds, dim=-1)
        labels = torch.from_numpy(support.labels)
        self.prototypes = torch.stack([F.normalize(embeds[labels == c].mean(0), dim=-1) for c in range(3)])
        # drawn from torch's global RNG: only reproducible because the runner seeds it per fit
        self.jitter = torch.rand(3, dtype=torch.float64) * 0.05
        normal_patches = features.patch_tokens[labels == 0][:, -1]  # (n, N, W)
        self.normal_patches = F.normalize(normal_patches.reshape(-1, normal_patches.shape[-1]), dim=-1)

    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        if self.fail_on is not None and any(item.id.startswith(self.fail_on) for item in items):
            raise RuntimeError("simulated crash in predict")
        features = self.ctx.backbone.image_features(items)
        embeds = F.normalize(features.embeds, dim=-1)
        logits = self.config["temperature"] * (embeds @ self.prototypes.T).double() + self.jitter
        probs = torch.softmax(logits, dim=1)
        patches = F.normalize(features.patch_tokens[:, -1], dim=-1)  # (B, N, W)
        distance = 1.0 - (patches @ self.normal_patches.T).max(dim=-1).values
        grid_h, grid_w = self.ctx.backbone.grid
        size = self.ctx.eval_size
        maps = F.interpolate(distance.reshape(-1, 1, grid_h, grid_w), size=(size, size), mode="bilinear")
        return Prediction(
            scores=(1.0 - probs[:, 0]).numpy(),
            probs=probs.numpy(),
            maps=maps[:, 0].numpy().astype(np.float32),
        )


GRID_METHODS = "proto-test,zeroshot,intensity"
GRID_SHOTS = (2, 3)
GRID_SEEDS = (0, 1)


@dataclass
class GridRun:
    base: Path
    config: RunConfig
    runner: Runner
    summary: RunSummary
    data: SyntheticData
    cache: Path


def expected_cells(data: SyntheticData) -> set[str]:
    cells = set()
    for target in data.targets:
        cells |= {f"proto-test/{target.name}/shots{k}_seed{s}" for k in GRID_SHOTS for s in GRID_SEEDS}
        cells |= {f"zeroshot/{target.name}/shots0_seed0", f"intensity/{target.name}/shots0_seed0"}
    return cells


def grid_config(base: Path, data: SyntheticData, cache: Path, **overrides: Any) -> RunConfig:
    values = {"methods": GRID_METHODS, "shots": "2,3", "seeds": "0,1", **overrides}
    return tiny_config(base, data, cache, **values)


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory: pytest.TempPathFactory, shared_data: SyntheticData) -> GridRun:
    """The reference grid (3 methods, shots 2/3, seeds 0/1, two targets), run once per module."""
    base = tmp_path_factory.mktemp("full-grid")
    cache = base / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_CACHE_DIR", str(cache))
        register_methods(mp, PrototypeProbe)
        config = grid_config(base, shared_data, cache)
        runner = Runner(config, show_progress=False)
        summary = runner.run()
    return GridRun(base, config, runner, summary, shared_data, cache)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def metrics_of(run_dir: Path) -> dict[str, dict[str, float]]:
    return {cell: read_json(run_dir / cell / "cell.json")["metrics"] for cell in cell_dirs(run_dir)}


# --------------------------------------------------------------------------- the grid


def test_grid_plan_and_summary(full_grid: GridRun, method_registry: Callable[..., None]) -> None:
    method_registry(PrototypeProbe)
    units = plan_grid(full_grid.config)
    assert [(u.method, u.shots, u.seed) for u in units] == [
        ("proto-test", 2, 0),
        ("proto-test", 2, 1),
        ("proto-test", 3, 0),
        ("proto-test", 3, 1),
        ("zeroshot", 0, 0),  # methods that ignore the support set: one unit per grid
        ("intensity", 0, 0),
    ]
    summary = full_grid.summary
    assert summary.run_dir == Path(full_grid.config.out) / "grid"
    assert len(summary.cells_done) == 12 and summary.cells_skipped == []
    assert {
        f"{c.unit.method}/{c.target}/shots{c.unit.shots}_seed{c.unit.seed}" for c in summary.cells_done
    } == (expected_cells(full_grid.data))
    assert summary.backbone is not None and summary.backbone.random_init
    assert summary.backbone.model == "bench-tiny-vit"


def test_grid_cell_folders_and_files(full_grid: GridRun) -> None:
    run_dir = full_grid.summary.run_dir
    assert cell_dirs(run_dir) == expected_cells(full_grid.data)
    for cell in expected_cells(full_grid.data):
        files = {p.name for p in (run_dir / cell).iterdir()}
        few_shot = cell.startswith("proto-test/")
        assert files == (CELL_FILES | {"support.json"} if few_shot else CELL_FILES), cell
    assert len(load_cells(run_dir)) == 12


def test_support_json_holds_the_drawn_ids(full_grid: GridRun) -> None:
    run_dir = full_grid.summary.run_dir
    source = resolve_dataset(str(full_grid.data.source.folder), run_dir)
    for shots in GRID_SHOTS:
        for seed in GRID_SEEDS:
            expected = sample_support(source, shots, seed).to_json()
            assert set(expected) == {"normal", "benign", "malignant"}
            assert all(len(ids) == shots for ids in expected.values())
            for label, ids in expected.items():
                assert set(ids) <= set(full_grid.data.source.ids[label])
            for target in full_grid.data.targets:
                stored = read_json(run_dir / f"proto-test/{target.name}/shots{shots}_seed{seed}/support.json")
                assert stored == {"source": full_grid.config.source, "ids": expected}


def test_predictions_have_one_row_per_image(full_grid: GridRun) -> None:
    run_dir = full_grid.summary.run_dir
    for cell in expected_cells(full_grid.data):
        method, target_name = cell.split("/")[:2]
        target = next(t for t in full_grid.data.targets if t.name == target_name)
        rows = read_predictions(run_dir / cell / "predictions.csv")
        assert [r["id"] for r in rows] == target.all_ids, cell
        assert [r["label"] for r in rows] == [label for label, ids in target.ids.items() for _ in ids]
        classifies = method in ("proto-test", "zeroshot")
        expected_header = ["id", "label", "score"] + (
            ["p_normal", "p_benign", "p_malignant"] if classifies else []
        )
        assert list(rows[0]) == expected_header
        assert all(np.isfinite(float(r["score"])) for r in rows)
        if classifies:
            sums = [sum(float(r[k]) for k in expected_header[3:]) for r in rows]
            np.testing.assert_allclose(sums, 1.0, atol=1e-6)


def test_cell_json_has_metrics_for_exactly_the_declared_tasks(full_grid: GridRun) -> None:
    run_dir = full_grid.summary.run_dir
    expected_keys = {
        "proto-test": set(IMAGE_KEYS + CLASS_KEYS + PIXEL_KEYS),
        "zeroshot": set(IMAGE_KEYS + CLASS_KEYS + PIXEL_KEYS),
        "intensity": set(IMAGE_KEYS + PIXEL_KEYS),
    }
    expected_tasks = {
        "proto-test": ["classify", "detect", "localize"],
        "zeroshot": ["classify", "detect", "localize"],
        "intensity": ["detect", "localize"],
    }
    classes = {**available_methods(), PrototypeProbe.name: PrototypeProbe}
    for cell in expected_cells(full_grid.data):
        method, target, shots_seed = cell.split("/")
        record = read_json(run_dir / cell / "cell.json")
        assert set(record["metrics"]) == expected_keys[method], cell
        assert set(record["metrics"]) == task_metrics(record["tasks"])
        cls = classes[method]  # the table metadata of the method's class, for the tables
        assert record["method_meta"] == {
            "table_group": cls.table_group,
            "table_rank": cls.table_rank,
            "ablation_of": cls.ablation_of,
        }
        assert load_cells(run_dir / cell)[0].method_meta == MethodMeta.of(cls)
        assert set(record["metrics"]) <= set(METRIC_KEYS)
        assert all(0.0 <= v <= 1.0 for v in record["metrics"].values()), record["metrics"]
        assert record["tasks"] == expected_tasks[method]
        assert (record["method"], record["target"]) == (method, target)
        assert f"shots{record['shots']}_seed{record['seed']}" == shots_seed
        assert record["uses_support"] is (method == "proto-test")
        assert record["source"] == full_grid.config.source
        assert record["backbone"]["weights"] == "random-init"
        assert record["backbone"]["model"] == "bench-tiny-vit"
        assert (record["n_images"], record["n_pixel_images"], record["eval_size"]) == (9, 9, EVAL_SIZE)


def test_zero_shot_methods_have_one_unit_per_target(full_grid: GridRun) -> None:
    run_dir = full_grid.summary.run_dir
    for method in ("zeroshot", "intensity"):
        for target in full_grid.data.targets:
            assert [p.name for p in (run_dir / method / target.name).iterdir()] == ["shots0_seed0"]


def test_config_yaml_and_timings(full_grid: GridRun) -> None:
    run_dir = full_grid.summary.run_dir
    for cell in expected_cells(full_grid.data):
        method = cell.split("/")[0]
        stored = yaml.safe_load((run_dir / cell / "config.yaml").read_text())
        assert stored["shots"] == list(GRID_SHOTS) and stored["seeds"] == list(GRID_SEEDS)
        assert stored["backbone"] == "bench-tiny-vit" and stored["eval_size"] == EVAL_SIZE
        # the method's section, defaults merged, is recorded with the cell
        defaults = {**available_methods(), "proto-test": PrototypeProbe}[method].default_config
        assert stored["method_config"] == {method: dict(defaults)}
        timings = read_json(run_dir / cell / "timings.json")
        assert set(timings) == {"fit_seconds", "predict_seconds", "predict_seconds_per_image", "device"}
        assert timings["device"] == "cpu" and timings["predict_seconds"] >= 0


# --------------------------------------------------------------------------- the feature cache


def distinct_images(data: SyntheticData) -> int:
    source = resolve_dataset(str(data.source.folder), data.root)
    support = {i for k in GRID_SHOTS for s in GRID_SEEDS for i in sample_support(source, k, s).all_ids()}
    assert len(support) > 3 * max(GRID_SHOTS)  # the draws differ, so the count is informative
    return len(support) + sum(len(t.all_ids) for t in data.targets)


def test_each_image_goes_through_the_backbone_once(full_grid: GridRun) -> None:
    expected = distinct_images(full_grid.data)
    assert full_grid.runner.backbone.n_encoded == expected
    assert full_grid.summary.images_encoded == expected
    assert full_grid.summary.cache_misses == expected
    assert full_grid.summary.cache_hits > 0  # zeroshot re-reads what proto-test encoded
    stored = [p for p in full_grid.cache.rglob(f"*{ENTRY_SUFFIX}")]
    assert len(stored) == expected


def test_second_run_on_the_same_cache_encodes_nothing(
    full_grid: GridRun, tmp_path: Path, method_registry: Callable[..., None]
) -> None:
    method_registry(PrototypeProbe)
    config = grid_config(tmp_path, full_grid.data, full_grid.cache, out=str(tmp_path / "again"))
    runner = Runner(config, show_progress=False)
    summary = runner.run()
    assert len(summary.cells_done) == 12
    assert runner.backbone.n_encoded == 0 and summary.images_encoded == 0
    assert summary.cache_misses == 0 and summary.cache_hits > 0
    # features read back from the cache give the very same results
    assert metrics_of(summary.run_dir) == metrics_of(full_grid.summary.run_dir)


# --------------------------------------------------------------------------- resuming


def copy_run(full_grid: GridRun, tmp_path: Path) -> RunConfig:
    """A copy of the reference grid's results (mtimes kept) and a config pointing at it."""
    out = tmp_path / "results"
    shutil.copytree(full_grid.summary.run_dir, out / "grid")
    return grid_config(tmp_path, full_grid.data, full_grid.cache, out=str(out))


def test_rerun_computes_nothing_and_touches_nothing(
    full_grid: GridRun, tmp_path: Path, method_registry: Callable[..., None]
) -> None:
    method_registry(PrototypeProbe)
    config = copy_run(full_grid, tmp_path)
    before = snapshot(run_dir_of(config))
    runner = Runner(config, show_progress=False)
    summary = runner.run()
    assert summary.cells_done == []
    assert len(summary.cells_skipped) == 12
    assert runner.backbone.n_encoded == 0
    assert snapshot(run_dir_of(config)) == before


def test_deleted_cell_is_recomputed_alone_and_identically(
    full_grid: GridRun, tmp_path: Path, method_registry: Callable[..., None]
) -> None:
    method_registry(PrototypeProbe)
    config = copy_run(full_grid, tmp_path)
    victim = f"proto-test/{full_grid.data.target_b.name}/shots3_seed1"
    original = run_dir_of(config) / victim
    old_record = read_json(original / "cell.json")
    old_predictions = (original / "predictions.csv").read_bytes()
    old_support = (original / "support.json").read_bytes()
    (original / "cell.json").unlink()
    before = {k: v for k, v in snapshot(run_dir_of(config)).items() if not k.startswith(victim + "/")}

    summary = run_grid(config, show_progress=False)

    assert [str(c) for c in summary.cells_done] == [
        f"proto-test / {full_grid.data.target_b.name} / 3-shot / seed 1"
    ]
    assert len(summary.cells_skipped) == 11
    after = snapshot(run_dir_of(config))
    assert {k: v for k, v in after.items() if not k.startswith(victim + "/")} == before
    new_record = read_json(original / "cell.json")
    assert new_record["metrics"] == old_record["metrics"]  # same seed, same result
    assert (original / "predictions.csv").read_bytes() == old_predictions
    assert (original / "support.json").read_bytes() == old_support


def test_interrupted_run_resumes_where_it_stopped(
    make_config: Callable[..., RunConfig],
    method_registry: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    method_registry(PrototypeProbe)
    config = make_config(methods="intensity,proto-test", shots="2", seeds="0,1")
    monkeypatch.setattr(PrototypeProbe, "fail_on", "tgtb")
    with pytest.raises(RuntimeError, match="simulated crash") as info:
        run_grid(config, show_progress=False)
    assert "while predicting cell proto-test / tgtb / 2-shot / seed 0" in getattr(info.value, "__notes__", [])

    finished = {"intensity/tgta/shots0_seed0", "intensity/tgtb/shots0_seed0", "proto-test/tgta/shots2_seed0"}
    assert cell_dirs(run_dir_of(config)) == finished
    assert not (run_dir_of(config) / "proto-test/tgtb/shots2_seed0/cell.json").exists()
    for cell in finished:
        record = read_json(run_dir_of(config) / cell / "cell.json")
        assert record["metrics"] and record["n_images"] == 9
    before = snapshot(run_dir_of(config))

    monkeypatch.setattr(PrototypeProbe, "fail_on", None)  # the bug is gone
    summary = run_grid(config, show_progress=False)
    assert {str(c) for c in summary.cells_done} == {
        "proto-test / tgtb / 2-shot / seed 0",
        "proto-test / tgta / 2-shot / seed 1",
        "proto-test / tgtb / 2-shot / seed 1",
    }
    assert len(summary.cells_skipped) == 3
    after = snapshot(run_dir_of(config))
    assert {k: after[k] for k in before} == before  # finished cells untouched
    assert len(cell_dirs(run_dir_of(config))) == 6


# --------------------------------------------------------------------------- sharding


def test_shards_partition_the_grid(
    full_grid: GridRun, tmp_path: Path, method_registry: Callable[..., None]
) -> None:
    method_registry(PrototypeProbe)
    summaries = []
    for shard in ("1/2", "2/2"):
        config = grid_config(
            tmp_path, full_grid.data, full_grid.cache, out=str(tmp_path / "sharded"), shard=shard
        )
        summaries.append(run_grid(config, show_progress=False))
    done = [{str(c) for c in s.cells_done} for s in summaries]
    assert done[0] and done[1] and not done[0] & done[1]
    units = [{c.unit for c in s.cells_done} for s in summaries]
    assert not units[0] & units[1]  # no fit unit is fitted by both shards
    assert len(done[0] | done[1]) == 12
    run_dir = summaries[0].run_dir
    assert cell_dirs(run_dir) == expected_cells(full_grid.data)
    assert metrics_of(run_dir) == metrics_of(full_grid.summary.run_dir)
    for cell in expected_cells(full_grid.data):
        assert (run_dir / cell / "predictions.csv").read_bytes() == (
            full_grid.summary.run_dir / cell / "predictions.csv"
        ).read_bytes()


def test_shard_units_cover_every_unit_once() -> None:
    units = [FitUnit(f"m{i % 3}", i, i) for i in range(1, 8)]
    for n in (1, 2, 3, 8):
        slices = [shard_units(units, f"{i}/{n}") for i in range(1, n + 1)]
        flat = [u for s in slices for u in s]
        assert len(flat) == len(units) and set(flat) == set(units)
        assert [shard_units(units, f"{i}/{n}") for i in range(1, n + 1)] == slices  # deterministic


@pytest.mark.parametrize("shard", ["0/2", "3/2", "x", "1/0", "", "1/2/3", "-1/2"])
def test_bad_shard_strings_are_config_errors(shard: str, make_config: Callable[..., RunConfig]) -> None:
    with pytest.raises(ConfigError, match=r"--shard must look like I/N"):
        shard_index(shard)
    with pytest.raises(ConfigError, match=r"--shard"):
        make_config(shard=shard)


# --------------------------------------------------------------------------- faulty methods


class BadOutput(Method):
    """A method whose output is broken in a configurable way (``mode``)."""

    name = "bad-output"
    description = "test only: malformed output"
    tasks = frozenset({Task.DETECT, Task.CLASSIFY, Task.LOCALIZE})
    uses_support = False
    uses_backbone = False
    mode: ClassVar[str] = "ok"

    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        b, size = len(items), self.ctx.eval_size
        scores = np.linspace(0.1, 0.9, b)
        probs = np.full((b, 3), 1 / 3)
        maps = np.zeros((b, size, size), dtype=np.float32)
        if self.mode == "nan-score":
            scores[1] = np.nan
        elif self.mode == "inf-map":
            maps[2, 3, 4] = np.inf
        elif self.mode == "map-shape":
            maps = np.zeros((b, size + 1, size), dtype=np.float32)
        elif self.mode == "no-maps":
            maps = None
        elif self.mode == "probs-sum":
            probs = np.full((b, 3), 0.3)
        elif self.mode == "probs-shape":
            probs = np.full((b, 2), 0.5)
        elif self.mode == "score-shape":
            scores = scores[:-1]
        elif self.mode == "huge-map":
            maps[min(2, b - 1), 3, 4] = 70000.0
        return Prediction(scores=scores, probs=probs, maps=maps)


def run_then_fail(
    make_config: Callable[..., RunConfig], bad: dict[str, Any], error: type[Exception]
) -> Exception:
    """Run a good grid, then a bad one into the same run folder: returns the error of the bad one.

    Checks that the bad run left every finished cell byte for byte (and mtime) intact.
    """
    good = make_config()
    run_grid(good, show_progress=False)
    before = snapshot(run_dir_of(good))
    assert before
    with pytest.raises(error) as info:
        run_grid(make_config(**bad), show_progress=False)
    after = snapshot(run_dir_of(good))
    assert {k: after[k] for k in before} == before
    assert cell_dirs(run_dir_of(good)) == {"intensity/tgta/shots0_seed0", "intensity/tgtb/shots0_seed0"}
    return info.value


@pytest.mark.parametrize(
    ("mode", "fragments"),
    [
        ("nan-score", ["a NaN or infinite score", "first bad image: tgta_normal_001"]),
        ("inf-map", ["NaN or infinite map values", "first bad image: tgta_normal_002"]),
        (
            "map-shape",
            [f"maps of shape (8, {EVAL_SIZE + 1}, {EVAL_SIZE})", f"expected (8, {EVAL_SIZE}, {EVAL_SIZE})"],
        ),
        ("no-maps", ["maps of shape None"]),
        ("probs-sum", ["probabilities that are negative or do not sum to 1"]),
        ("probs-shape", ["probabilities of shape (8, 2)"]),
        ("score-shape", ["scores of shape (7,) for a batch of 8 images"]),
    ],
)
def test_malformed_method_output_is_a_method_error_naming_the_cell(
    mode: str,
    fragments: list[str],
    make_config: Callable[..., RunConfig],
    method_registry: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    method_registry(BadOutput)
    monkeypatch.setattr(BadOutput, "mode", mode)
    error = run_then_fail(make_config, {"methods": "intensity,bad-output"}, MethodError)
    message = str(error)
    assert "cell bad-output / tgta / 0-shot / seed 0" in message
    assert "nothing was written for this cell" in message
    for fragment in fragments:
        assert fragment in message
    assert not (run_dir_of(make_config()) / "bad-output").exists()


def test_unknown_method_lists_the_known_names(make_config: Callable[..., RunConfig]) -> None:
    with pytest.raises(MethodError) as info:
        run_grid(make_config(methods="intensity,nosuch"), show_progress=False)
    message = str(info.value)
    assert "unknown method 'nosuch'" in message
    assert "intensity" in message and "zeroshot" in message and "bench methods" in message


def test_unknown_option_in_a_method_section(make_config: Callable[..., RunConfig]) -> None:
    error = run_then_fail(
        make_config,
        {"methods": "intensity,zeroshot", "method_config": {"zeroshot": {"logit_scael": 50}}},
        MethodError,
    )
    message = str(error)
    assert "method 'zeroshot'" in message and "logit_scael" in message
    assert "logit_scale" in message  # lists the known options


# --------------------------------------------------------------------------- bad datasets


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_bad_dataset_is_a_dataset_error_naming_the_file(
    damage: str, data: SyntheticData, tmp_path: Path, isolated_env: Path
) -> None:
    def config(**overrides: Any) -> RunConfig:
        return tiny_config(tmp_path, data, isolated_env, **overrides)

    good = config(targets=str(data.target_a.folder))
    run_grid(good, show_progress=False)
    before = snapshot(run_dir_of(good))
    DAMAGES[damage][0](data)
    with pytest.raises(DatasetError) as info:
        run_grid(config(), show_progress=False)
    for fragment in DAMAGES[damage][1](data):
        assert fragment in str(info.value)
    assert snapshot(run_dir_of(good)) == before
    assert cell_dirs(run_dir_of(good)) == {"intensity/tgta/shots0_seed0"}


def test_unknown_dataset_name_lists_the_names(make_config: Callable[..., RunConfig]) -> None:
    with pytest.raises(DatasetError) as info:
        run_grid(make_config(targets="no-such-set"), show_progress=False)
    message = str(info.value)
    assert "'no-such-set'" in message
    for name in ("bus-uclm", "busi", "udiat", "breast"):
        assert name in message


def test_missing_named_dataset_points_at_data_root(
    make_config: Callable[..., RunConfig], tmp_path: Path
) -> None:
    with pytest.raises(DatasetError) as info:
        run_grid(make_config(targets="busi", data_root=str(tmp_path / "empty-root")), show_progress=False)
    message = str(info.value)
    assert "--data-root" in message and "BENCH_DATA_ROOT" in message
    assert str(tmp_path / "empty-root" / "Dataset_BUSI_with_GT") in message


def test_too_few_support_images_names_the_class(
    make_config: Callable[..., RunConfig], method_registry: Callable[..., None]
) -> None:
    method_registry(PrototypeProbe)
    config = make_config(methods="intensity,proto-test", shots="2,7")
    with pytest.raises(DatasetError, match=r"class normal has 6 image\(s\);.*shots=7") as info:
        run_grid(config, show_progress=False)
    assert "lacking a mask" not in str(info.value)  # every source image here is usable
    # Checked before any cell runs: not even the zero-shot method's cells, listed first, exist.
    assert not run_dir_of(config).exists() or not list(run_dir_of(config).rglob("cell.json"))


# --------------------------------------------------------------------------- configuration


def test_yaml_config_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "methods: [zeroshot, intensity]\nshots: [4, 8]\nseeds: [0, 1, 2]\ntargets: [a, b]\n"
        "method_config:\n  zeroshot: {logit_scale: 50}\n"
    )
    cfg = load_config(path, seeds="5", targets=None)
    assert cfg.methods == ["zeroshot", "intensity"] and cfg.shots == [4, 8]
    assert cfg.seeds == [5] and cfg.targets == ["a", "b"]
    assert cfg.method_config == {"zeroshot": {"logit_scale": 50}}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("shots: [4, 4]\n", "more than once"),
        ("shots: [0]\n", "shots must be positive"),
        ("eval_size: 4\n", "eval_size 4 is too small"),
        ("bogus_key: 1\n", "unknown option(s) ['bogus_key']"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("shots: [4\n", "is not valid YAML"),
        ("method_config: {zeroshot: 3}\n", "method_config must map"),
        ("shots: four\n", "cannot read 'four' as a list of int"),
    ],
)
def test_bad_yaml_config_is_a_config_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value)


def test_scalar_yaml_list_value_is_read_or_refused_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "scalar.yaml"
    path.write_text("shots: 4\nseeds: 0\n")
    try:
        cfg = load_config(path)
    except ConfigError:
        return
    assert cfg.shots == [4] and cfg.seeds == [0]


def test_two_targets_with_the_same_folder_name_do_not_collide(
    data: SyntheticData, tmp_path: Path, isolated_env: Path
) -> None:
    folder = data.target_a.folder
    shutil.copy(data.target_b.manifest, folder / "other.csv")
    for path in data.target_b.folder.glob("*.png"):
        shutil.copy(path, folder / path.name)
    first, second = folder / "manifest.csv", folder / "other.csv"
    config = tiny_config(tmp_path, data, isolated_env, targets=f"{first},{second}")
    try:
        summary = run_grid(config, show_progress=False)
    except (ConfigError, DatasetError):
        return  # refusing clearly is an acceptable fix
    assert len({c.target for c in summary.cells_done}) == 2
    assert len(cell_dirs(run_dir_of(config))) == 2


def test_resume_never_mixes_cells_of_another_protocol(make_config: Callable[..., RunConfig]) -> None:
    """Re-running into the same run folder with another eval size must not report stale cells."""
    first = run_grid(make_config(), show_progress=False)
    assert len(first.cells_done) == 2
    before = snapshot(first.run_dir)
    try:
        second = run_grid(make_config(eval_size=40), show_progress=False)
    except BenchError as exc:  # refusing to mix protocols in one run folder
        assert "eval" in str(exc) and "--name" in str(exc)
        assert snapshot(first.run_dir) == before
        return
    assert len(second.cells_done) == 2  # or recomputing them
    for cell in cell_dirs(second.run_dir):
        assert read_json(second.run_dir / cell / "cell.json")["eval_size"] == 40


def test_resume_refuses_cells_made_with_other_method_options(make_config: Callable[..., RunConfig]) -> None:
    first = run_grid(make_config(methods="intensity"), show_progress=False)
    before = snapshot(first.run_dir)
    stored = read_json(first.run_dir / "intensity" / "tgta" / "shots0_seed0" / "cell.json")
    assert stored["method_options"] == {"quantile": 0.99, "sigma": 4.0}
    changed = make_config(methods="intensity", method_config={"intensity": {"sigma": 2.0}})
    with pytest.raises(BenchError, match=r"other options of method 'intensity' \(changed: sigma\)"):
        run_grid(changed, show_progress=False)
    assert snapshot(first.run_dir) == before
    # The same options given explicitly are the same protocol: nothing to recompute.
    same = make_config(methods="intensity", method_config={"intensity": {"sigma": 4.0}})
    assert run_grid(same, show_progress=False).cells_done == []


def test_save_maps_stores_the_scored_maps_and_masks(make_config: Callable[..., RunConfig]) -> None:
    config = make_config(methods="intensity", save_maps=True)
    run_grid(config, show_progress=False)
    for target in ("tgta", "tgtb"):
        cell = run_dir_of(config) / "intensity" / target / "shots0_seed0"
        maps = np.load(cell / "maps.npy")
        assert maps.shape == (9, EVAL_SIZE, EVAL_SIZE) and maps.dtype == np.float32
        with np.load(cell / "masks.npz") as masks:
            assert masks["valid"].all() and int(masks["size"]) == EVAL_SIZE
    # Float32 maps hold exactly what the pixel metrics were computed from.
    for evaluation in whole_evaluations(load_cells(run_dir_of(config))):
        assert cell_metrics(evaluation.stored).values == dict(evaluation.record.metrics)


def test_float16_maps_are_stored_and_range_checked(
    make_config: Callable[..., RunConfig],
    method_registry: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(methods="intensity", save_maps=True, maps_dtype="float16")
    run_grid(config, show_progress=False)
    maps = np.load(run_dir_of(config) / "intensity" / "tgta" / "shots0_seed0" / "maps.npy")
    assert maps.dtype == np.float16
    method_registry(BadOutput)
    monkeypatch.setattr(BadOutput, "mode", "huge-map")
    with pytest.raises(ConfigError, match=r"map values up to 70000.*float16.*--maps-dtype float32") as info:
        run_grid(make_config(methods="bad-output", save_maps=True, maps_dtype="float16"), show_progress=False)
    assert "tgta_normal_002" in str(info.value)
    assert not (run_dir_of(config) / "bad-output").exists() or not list(
        (run_dir_of(config) / "bad-output").rglob("cell.json")
    )
    run_grid(make_config(methods="bad-output", save_maps=True), show_progress=False)  # float32 holds it


@pytest.mark.parametrize("repeat", ["methods", "targets"])
def test_repeated_methods_or_targets_are_not_computed_twice(
    repeat: str, make_config: Callable[..., RunConfig], shared_data: SyntheticData
) -> None:
    overrides = (
        {"methods": "intensity,intensity"}
        if repeat == "methods"
        else {"targets": f"{shared_data.target_a.folder},{shared_data.target_a.folder}"}
    )
    try:
        summary = run_grid(make_config(**overrides), show_progress=False)
    except ConfigError:
        return  # refusing repeated values, as for shots and seeds, is an acceptable fix
    done = [str(c) for c in summary.cells_done]
    assert len(done) == len(set(done))


def test_auto_weights_fallback_is_loud_and_recorded(make_config: Callable[..., RunConfig]) -> None:
    """`--pretrained auto` without weights: a warning panel, and random-init in every record."""
    from io import StringIO

    from rich.console import Console

    output = StringIO()
    config = make_config(pretrained="auto", name=None)  # the tiny model has no published weights at all
    summary = run_grid(config, console=Console(file=output, width=200), show_progress=False)
    text = output.getvalue()
    assert "FALLING BACK TO RANDOM INIT" in text and "RANDOM-INIT" in text
    assert summary.backbone is not None and summary.backbone.weights == "random-init"
    assert summary.run_dir.name.endswith("random-init")
    assert all(cell.backbone.random_init for cell in load_cells(summary.run_dir))
