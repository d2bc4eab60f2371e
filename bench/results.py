"""The result store: one directory per grid cell, every file written atomically.

A cell is (method, source, target, shots, seed) under one backbone. Its directory holds::

    config.yaml        the resolved run configuration the cell was made with
    support.json       the support ids per class (absent for methods that ignore support)
    predictions.csv    per-image id, label, score and class probabilities
    maps.npy           pixel maps (fp16), only when the run asked for them
    timings.json       seconds spent fitting and predicting
    cell.json          identity, backbone, metrics, the method's table metadata
                       (``method_meta``): written LAST, so its presence marks a finished
                       cell and a re-run skips it

The format is written here and nowhere else: the runner hands a finished cell to
:func:`write_cell` and asks :func:`finished_cell` whether a stored cell can be reused.
``bench table`` reads only ``cell.json`` files (see :func:`load_cells`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from bench.errors import ResultsError
from bench.types import CLASSES, Task

if TYPE_CHECKING:
    from bench.method import Method

CELL_FILE = "cell.json"

#: Metric keys stored in ``cell.json`` (values in [0, 1]; absent when the task is not done).
METRIC_KEYS = (
    "image_auroc",
    "class_auroc",
    "class_accuracy",
    "class_balanced_accuracy",
    "pixel_auroc",
    "pixel_ap",
    "pixel_aupro",
    "pixel_dice",
)

#: The metrics each task produces (a cell stores exactly those of its method's tasks).
TASK_METRICS: dict[Task, tuple[str, ...]] = {
    Task.DETECT: ("image_auroc",),
    Task.CLASSIFY: ("class_auroc", "class_accuracy", "class_balanced_accuracy"),
    Task.LOCALIZE: ("pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_dice"),
}

#: The task a metric belongs to (the inverse of :data:`TASK_METRICS`).
METRIC_TASK: dict[str, Task] = {metric: task for task, metrics in TASK_METRICS.items() for metric in metrics}


def task_metrics(tasks: Iterable[Task | str]) -> set[str]:
    """The metric keys of ``tasks``."""
    return {metric for task in tasks for metric in TASK_METRICS[Task(task)]}


@dataclass(frozen=True)
class BackboneIdentity:
    """Which frozen CLIP made a result. Results with different identities are never pooled."""

    model: str
    weights: str
    input_size: int
    layers: tuple[int, ...]

    @property
    def random_init(self) -> bool:
        return self.weights.startswith("random-init")

    @property
    def label(self) -> str:
        """Human title, e.g. ``ViT-B-16 @224px, weights: random-init (NOT pretrained)``."""
        warning = " (NOT pretrained: numbers are meaningless for CLIP methods)" if self.random_init else ""
        return f"{self.model} @{self.input_size}px, weights: {self.weights}{warning}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneIdentity:
        return cls(
            model=str(data["model"]),
            weights=str(data["weights"]),
            input_size=int(data["input_size"]),
            layers=tuple(int(x) for x in data["layers"]),
        )


@dataclass(frozen=True)
class MethodMeta:
    """Where a method's rows go in the tables (the class attributes of the same names on
    :class:`~bench.method.Method`), stored in ``cell.json`` under ``method_meta``."""

    table_group: str = "other"
    table_rank: int = 100
    ablation_of: str | None = None

    @classmethod
    def of(cls, method: type[Method]) -> MethodMeta:
        return cls(
            table_group=str(method.table_group),
            table_rank=int(method.table_rank),
            ablation_of=None if method.ablation_of is None else str(method.ablation_of),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodMeta:
        ablation_of = data.get("ablation_of")
        return cls(
            table_group=str(data["table_group"]),
            table_rank=int(data["table_rank"]),
            ablation_of=None if ablation_of is None else str(ablation_of),
        )


@dataclass(frozen=True)
class CellRecord:
    """The content of one finished cell's ``cell.json``."""

    method: str
    tasks: tuple[str, ...]
    source: str
    target: str
    shots: int
    seed: int
    uses_support: bool
    backbone: BackboneIdentity
    metrics: Mapping[str, float]
    n_images: int
    n_pixel_images: int
    eval_size: int
    created: str
    #: None for records written before the metadata was stored (tables then ask the registry).
    method_meta: MethodMeta | None = None
    path: Path | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        if self.method_meta is None:
            data.pop("method_meta")
        data["tasks"] = list(self.tasks)
        data["backbone"]["layers"] = list(self.backbone.layers)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path | None = None) -> CellRecord:
        return cls(
            method=str(data["method"]),
            tasks=tuple(data["tasks"]),
            source=str(data["source"]),
            target=str(data["target"]),
            shots=int(data["shots"]),
            seed=int(data["seed"]),
            uses_support=bool(data["uses_support"]),
            backbone=BackboneIdentity.from_dict(data["backbone"]),
            metrics={str(k): float(v) for k, v in data["metrics"].items()},
            n_images=int(data["n_images"]),
            n_pixel_images=int(data["n_pixel_images"]),
            eval_size=int(data["eval_size"]),
            created=str(data["created"]),
            method_meta=MethodMeta.from_dict(data["method_meta"]) if data.get("method_meta") else None,
            path=path,
        )


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class CellOutput:
    """Everything stored for one finished cell, as :func:`write_cell` takes it.

    ``labels`` are class names (see :data:`~bench.types.CLASSES`), one per image id; ``probs``
    is (n, 3) for classifying methods; ``maps`` (n, S, S) only when the run saves maps;
    ``support_ids`` is None for methods that ignore the support set.
    """

    record: CellRecord
    run_config: Mapping[str, Any]
    image_ids: Sequence[str]
    labels: Sequence[str]
    scores: np.ndarray
    probs: np.ndarray | None
    maps: np.ndarray | None
    support_ids: Mapping[str, list[str]] | None
    fit_seconds: float
    predict_seconds: float
    device: str
    notes: Sequence[str]
    excluded_from_pixel_metrics: Mapping[str, str]
    method_options: Mapping[str, Any]


def predictions_csv(
    image_ids: Sequence[str], labels: Sequence[str], scores: np.ndarray, probs: np.ndarray | None
) -> str:
    """Per-image predictions: id, label, score and (if any) the three class probabilities."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["id", "label", "score"] + ([f"p_{c}" for c in CLASSES] if probs is not None else [])
    writer.writerow(header)
    for i, (image_id, label) in enumerate(zip(image_ids, labels, strict=True)):
        row: list[Any] = [image_id, label, repr(float(scores[i]))]
        if probs is not None:
            row.extend(repr(float(p)) for p in probs[i])
        writer.writerow(row)
    return out.getvalue()


def write_cell(directory: Path, cell: CellOutput) -> None:
    """Write one finished cell's files into ``directory``; ``cell.json`` last (it marks the
    cell finished, so an interrupted write leaves a cell that a re-run recomputes)."""
    directory.mkdir(parents=True, exist_ok=True)
    record = cell.record
    atomic_write_text(directory / "config.yaml", yaml.safe_dump(dict(cell.run_config), sort_keys=True))
    if cell.support_ids is not None:
        atomic_write_json(directory / "support.json", {"source": record.source, "ids": cell.support_ids})
    atomic_write_text(
        directory / "predictions.csv", predictions_csv(cell.image_ids, cell.labels, cell.scores, cell.probs)
    )
    if cell.maps is not None:
        buffer = io.BytesIO()
        np.save(buffer, cell.maps)
        atomic_write_bytes(directory / "maps.npy", buffer.getvalue())
    n = len(cell.image_ids)
    atomic_write_json(
        directory / "timings.json",
        {
            "fit_seconds": cell.fit_seconds,
            "predict_seconds": cell.predict_seconds,
            "predict_seconds_per_image": cell.predict_seconds / max(n, 1),
            "device": cell.device,
        },
    )
    payload = record.to_json() | {
        "notes": list(cell.notes),
        "excluded_from_pixel_metrics": dict(cell.excluded_from_pixel_metrics),
        "method_options": json_options(cell.method_options),
    }
    atomic_write_json(directory / CELL_FILE, payload)


def json_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Method options in the JSON form ``cell.json`` stores (and :func:`finished_cell` compares)."""
    return json.loads(json.dumps(dict(options), sort_keys=True, default=str))


def finished_cell(
    directory: Path,
    identity: BackboneIdentity,
    eval_size: int,
    method: str,
    options: Mapping[str, Any],
) -> bool:
    """True when ``directory`` holds a finished cell made with this backbone, evaluation size
    and method options (``options`` in JSON form, see :func:`json_options`); a cell made
    differently raises :class:`ResultsError`, it is never silently reused."""
    path = directory / CELL_FILE
    if not path.exists():
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        same = BackboneIdentity.from_dict(stored["backbone"]) == identity
        same_eval = int(stored["eval_size"]) == eval_size
        stored_options = stored.get("method_options", options)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(
            f"{path} is unreadable ({exc}); delete that cell directory to recompute it"
        ) from exc
    if not (same and same_eval):
        raise ResultsError(
            f"{path} was made with another backbone or evaluation size "
            f"({stored['backbone']}, eval {stored['eval_size']}) than this run ({identity}, eval "
            f"{eval_size}); use another --name or --out so results never mix"
        )
    if stored_options != options:
        changed = sorted(
            k for k in set(options) | set(stored_options) if options.get(k) != stored_options.get(k)
        )
        raise ResultsError(
            f"{path} was made with other options of method {method!r} (changed: "
            f"{', '.join(changed)}); use another --name or --out, or delete those cells to recompute them"
        )
    return True


def iter_cell_files(root: Path) -> Iterator[Path]:
    """Every ``cell.json`` under ``root`` (recursively, sorted for determinism)."""
    yield from sorted(root.rglob(CELL_FILE))


def load_cells(root: Path) -> list[CellRecord]:
    """All finished cells under ``root``, from any number of runs and shards."""
    root = Path(root)
    if not root.exists():
        raise ResultsError(f"results directory {root} does not exist; run `bench run --out {root}` first")
    cells = []
    for path in iter_cell_files(root):
        try:
            cells.append(CellRecord.from_json(json.loads(path.read_text(encoding="utf-8")), path=path.parent))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ResultsError(
                f"{path} is not a valid cell record ({exc}); "
                "delete that cell directory and re-run to recompute it"
            ) from exc
    return cells
