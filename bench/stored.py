"""The read side of the result store's per-image files: predictions, image facts, maps, masks.

:mod:`bench.results` writes a cell's files; this module reads them back for everything that
works per image after a run (subgroup tables, confidence intervals, paired comparisons,
figures), so none of those ever re-reads the dataset or re-runs a method. Every damaged or
missing file is a :class:`~bench.errors.ResultsError` naming the file and the fix.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.errors import ResultsError
from bench.results import (
    IMAGE_COLUMNS,
    IMAGES_FILE,
    MAPS_FILE,
    MASKS_FILE,
    PREDICTIONS_FILE,
    CellRecord,
)
from bench.types import CLASSES

__all__ = ["StoredPredictions", "load_predictions"]

_CLASS_INDEX = {label.value: i for i, label in enumerate(CLASSES)}


@dataclass
class StoredPredictions:
    """One finished cell's per-image data, in the order the cell stored it.

    ``labels`` are class indices into :data:`~bench.types.CLASSES`; ``probs`` is (n, 3) or
    None; ``images`` maps each ``images.csv`` column to one string per image (None for cells
    written before the store kept it). Maps and masks are read on first use (see
    :meth:`maps` and :meth:`masks`).
    """

    record: CellRecord
    ids: tuple[str, ...]
    labels: np.ndarray
    scores: np.ndarray
    probs: np.ndarray | None
    images: dict[str, list[str]] | None
    _maps: np.ndarray | None = field(default=None, init=False, repr=False)
    _masks: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    @property
    def directory(self) -> Path:
        assert self.record.path is not None
        return self.record.path

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def has_maps(self) -> bool:
        """True when the run stored this cell's maps and masks (``--save-maps``)."""
        return (self.directory / MAPS_FILE).exists() and (self.directory / MASKS_FILE).exists()

    def metadata_columns(self) -> list[str]:
        """The columns of ``images.csv`` that describe images (everything but id, key, path)."""
        if self.images is None:
            return []
        return [c for c in self.images if c not in ("id", "key", "path")]

    def column(self, name: str) -> list[str]:
        """One ``images.csv`` column, one value per image; a clear error when it is absent."""
        if self.images is None:
            raise ResultsError(
                f"{self.directory / IMAGES_FILE} is missing: this cell was stored before the store kept "
                "per-image metadata; re-run it (delete the cell folder) to break it down by a column"
            )
        if name not in self.images:
            known = ", ".join(self.metadata_columns()) or "none"
            raise ResultsError(
                f"column {name!r} is not in {self.directory / IMAGES_FILE} (columns there: {known})"
            )
        return self.images[name]

    def maps(self) -> np.ndarray:
        """(n, S, S) maps as stored (float32 or float16), memory-mapped; a clear error naming the
        run flag when the run stored none."""
        if self._maps is None:
            path = self.directory / MAPS_FILE
            if not path.exists():
                raise ResultsError(
                    f"{path} is missing: cell {self.describe()} stored no maps; re-run it with "
                    "`bench run --save-maps` (finished cells must be deleted first to be recomputed)"
                )
            try:
                maps = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ResultsError(f"{path} is unreadable ({exc}); delete the cell folder, re-run") from exc
            if maps.ndim != 3 or maps.shape[0] != self.n:
                raise ResultsError(
                    f"{path} holds maps of shape {maps.shape} for {self.n} images; delete the cell "
                    "folder and re-run it"
                )
            self._maps = maps
        return self._maps

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(masks (n, S, S) bool, valid (n,) bool): the evaluation masks the maps were scored
        against; ``valid`` is False for images kept out of pixel metrics."""
        if self._masks is None:
            path = self.directory / MASKS_FILE
            if not path.exists():
                raise ResultsError(
                    f"{path} is missing: cell {self.describe()} stored no masks; re-run it with "
                    "`bench run --save-maps` (finished cells must be deleted first to be recomputed)"
                )
            try:
                with np.load(path) as data:
                    packed, valid, size = data["packed"], data["valid"].astype(bool), int(data["size"])
                masks = np.unpackbits(packed, axis=-1, count=size).astype(bool)
            except (OSError, ValueError, KeyError) as exc:
                raise ResultsError(f"{path} is unreadable ({exc}); delete the cell folder, re-run") from exc
            if masks.shape != (self.n, size, size) or valid.shape != (self.n,):
                raise ResultsError(f"{path} does not match the {self.n} images of the cell; re-run it")
            self._masks = (masks, valid)
        return self._masks

    def describe(self) -> str:
        r = self.record
        return f"{r.method} / {r.target} / {r.shots}-shot / seed {r.seed}"


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ResultsError(f"{path} is unreadable ({exc}); delete the cell folder and re-run it") from exc


def load_predictions(record: CellRecord) -> StoredPredictions:
    """Read the per-image files of the finished cell ``record`` (loaded by
    :func:`bench.results.load_cells`, so its ``path`` is set)."""
    if record.path is None:
        raise ValueError("load_predictions needs a record loaded from disk (record.path is None)")
    path = record.path / PREDICTIONS_FILE
    if not path.exists():
        raise ResultsError(f"{path} is missing; delete the cell folder {record.path} and re-run it")
    rows = _read_csv(path)
    try:
        ids = tuple(row["id"] for row in rows)
        labels = np.array([_CLASS_INDEX[row["label"]] for row in rows], dtype=np.int64)
        scores = np.array([float(row["score"]) for row in rows], dtype=np.float64)
        prob_columns = [f"p_{c}" for c in CLASSES]
        probs = (
            np.array([[float(row[c]) for c in prob_columns] for row in rows], dtype=np.float64)
            if rows and prob_columns[0] in rows[0]
            else None
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ResultsError(f"{path} is damaged ({exc!r}); delete the cell folder and re-run it") from exc
    if len(ids) != record.n_images:
        raise ResultsError(
            f"{path} holds {len(ids)} images but {record.path / 'cell.json'} says {record.n_images}; "
            "delete the cell folder and re-run it"
        )
    images = _read_images(record.path / IMAGES_FILE, ids)
    return StoredPredictions(record, ids, labels, scores, probs, images)


def _read_images(path: Path, ids: Sequence[str]) -> dict[str, list[str]] | None:
    if not path.exists():
        return None
    rows = _read_csv(path)
    if [row.get("id") for row in rows] != list(ids):
        raise ResultsError(f"{path} does not list the cell's images in order; delete the cell folder")
    columns = list(rows[0]) if rows else list(IMAGE_COLUMNS)
    return {column: [row[column] or "" for row in rows] for column in columns}

