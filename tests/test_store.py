"""The result store's own interface (bench.results): writing a cell, the resume check, the
task -> metric mapping. The runner end to end is covered by test_runner.py."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.errors import ResultsError
from bench.results import (
    CELL_FILE,
    METRIC_KEYS,
    METRIC_TASK,
    TASK_METRICS,
    BackboneIdentity,
    CellOutput,
    CellRecord,
    MethodMeta,
    json_options,
    load_cells,
    predictions_csv,
    task_metrics,
    write_cell,
)
from bench.resume import CellExpectation, finished_cell
from bench.types import Task

IDENTITY = BackboneIdentity("ViT-B-16", "random-init", 224, (3, 6, 9, 12))


def record(**overrides: object) -> CellRecord:
    values: dict[str, object] = {
        "method": "demo",
        "tasks": ("classify", "detect"),
        "source": "bus-uclm",
        "target": "busi",
        "shots": 4,
        "seed": 1,
        "uses_support": True,
        "backbone": IDENTITY,
        "metrics": {"image_auroc": 0.75, "class_auroc": 0.5},
        "n_images": 2,
        "n_pixel_images": 1,
        "eval_size": 32,
        "created": "2025-01-01T00:00:00+00:00",
        "method_meta": MethodMeta("classifier", 2, None),
    }
    values.update(overrides)
    return CellRecord(**values)  # type: ignore[arg-type]


def output(**overrides: object) -> CellOutput:
    values: dict[str, object] = {
        "record": record(),
        "run_config": {"eval_size": 32, "method_config": {"demo": {"k": 1}}},
        "image_ids": ["a", "b"],
        "labels": ["normal", "malignant"],
        "scores": np.array([0.25, 0.5]),
        "probs": np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]),
        "maps": None,
        "support_ids": {"normal": ["n1"], "benign": ["b1"], "malignant": ["m1"]},
        "fit_seconds": 2.0,
        "predict_seconds": 1.0,
        "device": "cpu",
        "notes": ["a note"],
        "excluded_from_pixel_metrics": {"a": "no lesion mask"},
        "method_options": {"k": 1, "path": Path("/x")},
    }
    values.update(overrides)
    return CellOutput(**values)  # type: ignore[arg-type]


def test_task_metrics_cover_every_metric_key_once() -> None:
    assert set(TASK_METRICS) == set(Task)
    flat = [m for metrics in TASK_METRICS.values() for m in metrics]
    assert sorted(flat) == sorted(METRIC_KEYS) and len(flat) == len(set(flat))
    assert METRIC_TASK["pixel_ap"] is Task.LOCALIZE
    assert task_metrics({Task.DETECT}) == {"image_auroc"}
    assert task_metrics(["classify"]) == {"class_auroc", "class_accuracy", "class_balanced_accuracy"}


def test_write_cell_writes_every_file(tmp_path: Path) -> None:
    maps = np.zeros((2, 4, 4), dtype=np.float16)
    write_cell(tmp_path / "cell", output(maps=maps))
    directory = tmp_path / "cell"
    names = {p.name for p in directory.iterdir()}
    assert names == {"config.yaml", "support.json", "predictions.csv", "maps.npy", "timings.json", CELL_FILE}
    assert yaml.safe_load((directory / "config.yaml").read_text())["method_config"] == {"demo": {"k": 1}}
    support = json.loads((directory / "support.json").read_text())
    assert support == {"source": "bus-uclm", "ids": {"normal": ["n1"], "benign": ["b1"], "malignant": ["m1"]}}
    rows = list(csv.DictReader(io.StringIO((directory / "predictions.csv").read_text())))
    assert list(rows[0]) == ["id", "label", "score", "p_normal", "p_benign", "p_malignant"]
    assert (rows[1]["id"], rows[1]["label"], rows[1]["score"], rows[1]["p_malignant"]) == (
        "b",
        "malignant",
        "0.5",
        "0.7",
    )
    assert np.load(directory / "maps.npy").dtype == np.float16
    timings = json.loads((directory / "timings.json").read_text())
    assert timings == {
        "fit_seconds": 2.0,
        "predict_seconds": 1.0,
        "predict_seconds_per_image": 0.5,
        "device": "cpu",
    }
    stored = json.loads((directory / CELL_FILE).read_text())
    assert stored["method_meta"] == {"table_group": "classifier", "table_rank": 2, "ablation_of": None}
    assert stored["notes"] == ["a note"]
    assert stored["excluded_from_pixel_metrics"] == {"a": "no lesion mask"}
    assert stored["method_options"] == {"k": 1, "path": "/x"}
    (loaded,) = load_cells(tmp_path)
    assert loaded == record()


def test_write_cell_without_support_probs_or_maps(tmp_path: Path) -> None:
    write_cell(tmp_path, output(support_ids=None, probs=None))
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.yaml",
        "predictions.csv",
        "timings.json",
        CELL_FILE,
    }
    assert (tmp_path / "predictions.csv").read_text().splitlines()[0] == "id,label,score"


def test_predictions_csv_keeps_full_float_precision() -> None:
    text = predictions_csv(["x"], ["benign"], np.array([1 / 3]), None)
    assert text == f"id,label,score\nx,benign,{1 / 3!r}\n"


def test_record_without_method_meta_round_trips() -> None:
    old = record(method_meta=None)
    data = old.to_json()
    assert "method_meta" not in data
    assert CellRecord.from_json(data) == old
    assert CellRecord.from_json(record().to_json()).method_meta == MethodMeta("classifier", 2, None)


def expect(**overrides: object) -> CellExpectation:
    values: dict[str, object] = {
        "identity": IDENTITY,
        "eval_size": 32,
        "method": "demo",
        "options": json_options({"k": 1, "path": Path("/x")}),
        "source": "bus-uclm",
        "source_fingerprint": "src-fp",
        "target_fingerprint": "tgt-fp",
        "target_ids": ["a", "b"],
    }
    values.update(overrides)
    return CellExpectation(**values)  # type: ignore[arg-type]


def test_finished_cell(tmp_path: Path) -> None:
    cell = tmp_path / "cell"
    assert not finished_cell(cell, expect())
    write_cell(cell, output(record=record(source_fingerprint="src-fp", target_fingerprint="tgt-fp")))
    assert finished_cell(cell, expect())
    stored = json.loads((cell / CELL_FILE).read_text())
    del stored["method_meta"]  # a cell of an older store is still finished
    (cell / CELL_FILE).write_text(json.dumps(stored))
    assert finished_cell(cell, expect())
    with pytest.raises(ResultsError, match="another backbone or evaluation size"):
        finished_cell(cell, expect(eval_size=48))
    with pytest.raises(ResultsError, match="another backbone or evaluation size"):
        finished_cell(cell, expect(identity=replace(IDENTITY, weights="openai")))
    with pytest.raises(ResultsError, match=r"other options of method 'demo' \(changed: k\)"):
        finished_cell(cell, expect(options={**expect().options, "k": 2}))
    with pytest.raises(ResultsError, match="another target set"):
        finished_cell(cell, expect(target_fingerprint="other"))
    with pytest.raises(ResultsError, match="support drawn from other source data"):
        finished_cell(cell, expect(source_fingerprint="other"))
    assert finished_cell(cell, expect(source_fingerprint=None))  # a zero-shot method ignores the source
    (cell / CELL_FILE).write_text("{not json")
    with pytest.raises(ResultsError, match="is unreadable"):
        finished_cell(cell, expect())


def test_cells_stored_before_fingerprints_are_checked_by_ids_and_source_name(tmp_path: Path) -> None:
    cell = tmp_path / "cell"
    write_cell(cell, output())  # no fingerprints, as an older store wrote
    assert "target_fingerprint" not in json.loads((cell / CELL_FILE).read_text())
    assert finished_cell(cell, expect())
    with pytest.raises(ResultsError, match="lists other images than this run's target"):
        finished_cell(cell, expect(target_ids=["a", "c"]))
    with pytest.raises(ResultsError, match=r"made with support from 'bus-uclm'.*from 'busi'"):
        finished_cell(cell, expect(source="busi"))


def test_write_cell_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import bench.results as results

    calls = {"n": 0}
    real = results.atomic_write_text

    def fill_disk_on_third_write(path: Path, text: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(results, "atomic_write_text", fill_disk_on_third_write)
    with pytest.raises(OSError, match="No space left"):
        write_cell(tmp_path / "cell", output())
    assert list(tmp_path.iterdir()) == []  # no cell folder, no staging folder left
    monkeypatch.undo()
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "config.yaml").write_text("left by an interrupted older version")
    write_cell(tmp_path / "cell", output())
    assert (tmp_path / "cell" / CELL_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell"]
    with pytest.raises(ResultsError, match="never overwritten"):
        write_cell(tmp_path / "cell", output())


def test_cell_files_get_the_umask_mode(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        write_cell(tmp_path / "shared", output())
        os.umask(0o077)
        write_cell(tmp_path / "private", output())
    finally:
        os.umask(old)
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "shared").iterdir()} == {0o644}
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "private").iterdir()} == {0o600}


def test_cells_being_written_are_not_listed(tmp_path: Path) -> None:
    write_cell(tmp_path / "m" / "t" / "shots4_seed1", output())
    staging = tmp_path / "m" / "t" / ".shots4_seed2.writing-abc"
    write_cell(staging, output(record=record(seed=2)))  # as if caught before its rename
    assert [c.seed for c in load_cells(tmp_path)] == [1]
