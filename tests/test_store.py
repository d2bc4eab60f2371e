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
    finished_cell,
    json_options,
    load_cells,
    predictions_csv,
    task_metrics,
    write_cell,
)
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


def test_finished_cell(tmp_path: Path) -> None:
    options = json_options({"k": 1, "path": Path("/x")})
    assert not finished_cell(tmp_path, IDENTITY, 32, "demo", options)
    write_cell(tmp_path, output())
    assert finished_cell(tmp_path, IDENTITY, 32, "demo", options)
    stored = json.loads((tmp_path / CELL_FILE).read_text())
    del stored["method_meta"]  # a cell of an older store is still finished
    (tmp_path / CELL_FILE).write_text(json.dumps(stored))
    assert finished_cell(tmp_path, IDENTITY, 32, "demo", options)
    with pytest.raises(ResultsError, match="another backbone or evaluation size"):
        finished_cell(tmp_path, IDENTITY, 48, "demo", options)
    with pytest.raises(ResultsError, match="another backbone or evaluation size"):
        finished_cell(tmp_path, replace(IDENTITY, weights="openai"), 32, "demo", options)
    with pytest.raises(ResultsError, match=r"other options of method 'demo' \(changed: k\)"):
        finished_cell(tmp_path, IDENTITY, 32, "demo", {**options, "k": 2})
    (tmp_path / CELL_FILE).write_text("{not json")
    with pytest.raises(ResultsError, match="is unreadable"):
        finished_cell(tmp_path, IDENTITY, 32, "demo", options)
