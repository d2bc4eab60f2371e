"""The result store: one directory per grid cell, every file written atomically.

A cell is (method, source, target, shots, seed) under one backbone. Its directory holds::

    config.yaml        the resolved run configuration the cell was made with
    support.json       the support ids per class (absent for methods that ignore support)
    predictions.csv    per-image id, label, score and class probabilities
    maps.npy           pixel maps (fp16), only when the run asked for them
    timings.json       seconds spent fitting and predicting
    cell.json          identity, backbone, metrics: written LAST, so its presence marks
                       a finished cell and a re-run skips it

``bench table`` reads only ``cell.json`` files (see :func:`load_cells`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import ResultsError

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
    path: Path | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
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
