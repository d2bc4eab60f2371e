"""The result store: one directory per grid cell, every file written atomically.

A cell is (method, source, target, shots, seed) under one backbone. Its directory holds::

    config.yaml        the resolved run configuration the cell was made with
    support.json       the support ids per class (absent for methods that ignore support)
    predictions.csv    per-image id, label, score and class probabilities
    images.csv         per-image dataset, content key, file path and every metadata column of
                       the dataset (device, patient, BI-RADS, ...): what ``bench table --by``
                       and the figures need, so that they never re-read the dataset
    maps.npy           pixel maps (float32, or float16 with --maps-dtype), only when asked for
    masks.npz          the evaluation masks the maps were scored against (bit-packed, with a
                       flag for images kept out of pixel metrics), written with ``maps.npy``
    timings.json       seconds spent fitting and predicting
    cell.json          identity, backbone, metrics, the method's table metadata
                       (``method_meta``): written LAST, so its presence marks a finished
                       cell and a re-run skips it

The format is written here and nowhere else: the runner hands a finished cell to
:func:`write_cell`, and :mod:`bench.resume` decides whether a stored cell can be reused.
``bench table`` reads only ``cell.json`` files (see :func:`load_cells`); the per-image files
are read back by :mod:`bench.stored`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from bench.errors import ResultsError
from bench.fileio import atomic_write_bytes, atomic_write_text
from bench.types import CLASSES, Task

if TYPE_CHECKING:
    from bench.method import Method

CELL_FILE = "cell.json"
PREDICTIONS_FILE = "predictions.csv"
IMAGES_FILE = "images.csv"
MAPS_FILE = "maps.npy"
MASKS_FILE = "masks.npz"
#: The fixed leading columns of ``images.csv``; metadata columns follow, sorted by name.
IMAGE_COLUMNS = ("id", "dataset", "key", "path")

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
    #: What data the cell was made on (:mod:`bench.fingerprints`): the source's support pool
    #: (None for methods that ignore it) and the target set; both None in records written
    #: before the store kept them.
    source_fingerprint: str | None = None
    target_fingerprint: str | None = None
    path: Path | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        if self.method_meta is None:
            data.pop("method_meta")
        if self.target_fingerprint is None:
            data.pop("source_fingerprint")
            data.pop("target_fingerprint")
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
            source_fingerprint=_optional_str(data.get("source_fingerprint")),
            target_fingerprint=_optional_str(data.get("target_fingerprint")),
            path=path,
        )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically and with the user's umask."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class CellOutput:
    """Everything stored for one finished cell, as :func:`write_cell` takes it.

    ``labels`` are class names (see :data:`~bench.types.CLASSES`), one per image id; ``probs``
    is (n, 3) for classifying methods; ``maps`` (n, S, S) only when the run saves maps, and
    then ``masks`` too (one (S, S) mask per image, None for images kept out of pixel metrics);
    ``support_ids`` is None for methods that ignore the support set. ``images`` holds one row per
    image: the :data:`IMAGE_COLUMNS` plus the dataset's metadata (see :func:`images_csv`).
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
    images: Sequence[Mapping[str, str]] = ()
    masks: Sequence[np.ndarray | None] | None = None


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


def images_csv(rows: Sequence[Mapping[str, str]]) -> str:
    """Per-image facts: the :data:`IMAGE_COLUMNS`, then the union of the metadata columns
    (sorted; empty where an image lacks one). See :func:`image_row`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    extra = sorted({k for row in rows for k in row if k not in IMAGE_COLUMNS})
    writer.writerow([*IMAGE_COLUMNS, *extra])
    for row in rows:
        writer.writerow([row.get(column, "") for column in (*IMAGE_COLUMNS, *extra)])
    return out.getvalue()


def image_row(
    image_id: str, dataset: str, key: str, path: str, metadata: Mapping[str, str]
) -> dict[str, str]:
    """One ``images.csv`` row; a metadata key that clashes with a fixed column is stored as
    ``meta_<key>`` so that nothing is lost."""
    row = {f"meta_{k}" if k in IMAGE_COLUMNS else k: str(v) for k, v in metadata.items()}
    row.update(id=image_id, dataset=dataset, key=key, path=path)
    return row


def masks_npz(masks: Sequence[np.ndarray | None], size: int) -> bytes:
    """The evaluation masks, bit-packed along rows; ``valid`` is False for images kept out of
    pixel metrics (their rows are all zero)."""
    packed = np.zeros((len(masks), size, (size + 7) // 8), dtype=np.uint8)
    valid = np.zeros(len(masks), dtype=bool)
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        if mask.shape != (size, size):
            raise ValueError(f"mask {i} has shape {mask.shape}, expected ({size}, {size})")
        packed[i] = np.packbits(mask.astype(bool), axis=-1)
        valid[i] = True
    buffer = io.BytesIO()
    np.savez(buffer, packed=packed, valid=valid, size=np.int64(size))
    return buffer.getvalue()


def write_cell(directory: Path, cell: CellOutput) -> None:
    """Write one finished cell into ``directory``, all or nothing: the files go into a hidden
    sibling folder that is renamed to ``directory`` once complete, so an interrupted or failed
    write (``kill -9``, a full disk) leaves no cell folder at all, and a re-run recomputes it.

    A leftover unfinished ``directory`` (no ``cell.json``, e.g. from an older version) is
    replaced; a finished one is never overwritten (:class:`ResultsError`).
    """
    if (directory / CELL_FILE).exists():
        raise ResultsError(f"{directory} already holds a finished cell; it is never overwritten")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.writing-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # the umask's mode, unlike tempfile.mkdtemp's 0700
    try:
        _write_cell_files(staging, cell)
        if directory.exists():
            stale = directory.parent / f".{directory.name}.stale-{uuid.uuid4().hex[:12]}"
            os.replace(directory, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_cell_files(directory: Path, cell: CellOutput) -> None:
    record = cell.record
    atomic_write_text(directory / "config.yaml", yaml.safe_dump(dict(cell.run_config), sort_keys=True))
    if cell.support_ids is not None:
        atomic_write_json(directory / "support.json", {"source": record.source, "ids": cell.support_ids})
    atomic_write_text(
        directory / PREDICTIONS_FILE, predictions_csv(cell.image_ids, cell.labels, cell.scores, cell.probs)
    )
    if cell.images:
        ids = [row.get("id") for row in cell.images]
        if ids != list(cell.image_ids):
            raise ValueError("CellOutput.images must hold one row per image id, in the same order")
        atomic_write_text(directory / IMAGES_FILE, images_csv(cell.images))
    if cell.maps is not None:
        buffer = io.BytesIO()
        np.save(buffer, cell.maps)
        atomic_write_bytes(directory / MAPS_FILE, buffer.getvalue())
        if cell.masks is not None:
            atomic_write_bytes(directory / MASKS_FILE, masks_npz(cell.masks, int(cell.maps.shape[-1])))
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


def iter_cell_files(root: Path) -> Iterator[Path]:
    """Every ``cell.json`` under ``root`` (recursively, sorted for determinism), leaving out
    hidden folders: a cell being written or replaced lives in one until it is complete."""
    for path in sorted(root.rglob(CELL_FILE)):
        if not any(part.startswith(".") for part in path.relative_to(root).parts[:-1]):
            yield path


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
