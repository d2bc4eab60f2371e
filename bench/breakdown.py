"""Metrics recomputed from stored per-image predictions: per subgroup of a metadata column.

``bench table --by device`` splits every finished cell into one row of numbers per value of an
``images.csv`` column (device, BI-RADS, patient, a manifest's extra column, the phantom's
device ...), and recomputes each metric on that subset with the same functions the run used
(:func:`bench.metrics.image_metrics`, :class:`bench.metrics.PixelMetricAccumulator`). Pixel
metrics need the maps and masks a ``--save-maps`` run stores; without them a subgroup has no
pixel metric and a note says why. Nothing here reads the dataset: the store holds all of it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bench.errors import ResultsError
from bench.metrics import MetricResult, PixelMetricAccumulator, image_metrics
from bench.results import CellRecord, task_metrics
from bench.stored import StoredPredictions, load_predictions
from bench.tables.cells import dedupe_cells, group_key
from bench.types import Task

__all__ = [
    "Evaluation",
    "cell_metrics",
    "deduplicated",
    "subgroup_evaluations",
    "subgroup_label",
    "subgroup_rows",
    "whole_evaluations",
]

#: Why a recomputed cell has no pixel metric (part of its note).
NO_MAPS_NOTE = "left out: the run stored no maps"
#: Images per batch when pooling stored maps (keeps the float32 copy small).
_PIXEL_BATCH = 64


def _natural_key(text: str) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def subgroup_label(target: str, column: str, value: str) -> str:
    """The column heading of one subgroup of ``target``, e.g. ``busi [device=GE Logiq 7]``."""
    return f"{target} [{column}={value or '(empty)'}]"


def subgroup_rows(stored: StoredPredictions, column: str) -> dict[str, np.ndarray]:
    """Row indices of each value of ``column`` (natural order of the values)."""
    values = stored.column(column)
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        groups.setdefault(value, []).append(i)
    return {v: np.asarray(groups[v], dtype=np.int64) for v in sorted(groups, key=_natural_key)}


def cell_metrics(stored: StoredPredictions, rows: np.ndarray | None = None) -> MetricResult:
    """Every metric of the cell's tasks on images ``rows`` (default: all; repeated rows count
    again, as a bootstrap resample wants). Pixel metrics need stored maps; without them they are
    left out with a note."""
    tasks = {Task(t) for t in stored.record.tasks}
    rows = np.arange(stored.n) if rows is None else np.asarray(rows, dtype=np.int64)
    labels = stored.labels[rows]
    result = image_metrics(
        labels,
        stored.scores[rows] if Task.DETECT in tasks else None,
        stored.probs[rows] if Task.CLASSIFY in tasks and stored.probs is not None else None,
    )
    wanted = task_metrics(tasks)
    result = MetricResult(
        values={k: v for k, v in result.values.items() if k in wanted}, notes=list(result.notes)
    )
    if Task.LOCALIZE in tasks:
        result = result.merge(_pixel_metrics(stored, rows))
    return result


def _pixel_metrics(stored: StoredPredictions, rows: np.ndarray) -> MetricResult:
    if not stored.has_maps:
        return MetricResult(
            notes=[
                f"pixel metrics of {stored.describe()} {NO_MAPS_NOTE} "
                "(re-run with `bench run --save-maps` to break pixel metrics down)"
            ]
        )
    maps = stored.maps()
    masks, valid = stored.masks()
    used = rows[valid[rows]]
    accumulator = PixelMetricAccumulator(expected_images=len(used))
    for start in range(0, len(used), _PIXEL_BATCH):
        chunk = used[start : start + _PIXEL_BATCH]
        accumulator.add(np.asarray(maps[chunk], dtype=np.float32), masks[chunk])
    return accumulator.result()


@dataclass(frozen=True)
class Evaluation:
    """One table cell's source data: the record as shown (for a subgroup: renamed target and
    recomputed metrics), the stored predictions and the images it covers (None = all)."""

    record: CellRecord
    stored: StoredPredictions
    rows: np.ndarray | None = None


def deduplicated(cells: Iterable[CellRecord]) -> list[CellRecord]:
    """The cells the tables show: duplicates dropped per backbone group, as the tables do."""
    groups: dict[object, list[CellRecord]] = {}
    for cell in cells:
        groups.setdefault(group_key(cell), []).append(cell)
    return [kept for records in groups.values() for kept in dedupe_cells(records)[0]]


def whole_evaluations(cells: Iterable[CellRecord]) -> list[Evaluation]:
    """Every (deduplicated) cell over all of its images."""
    return [Evaluation(record, load_predictions(record)) for record in deduplicated(cells)]


def subgroup_evaluations(cells: Iterable[CellRecord], column: str) -> tuple[list[Evaluation], list[str]]:
    """Each finished cell split by the values of ``column``: one evaluation per (cell, value)
    with the subgroup's metrics and image counts, its target renamed by :func:`subgroup_label`.

    Duplicated cells are dropped first (as the tables do). Returns the evaluations and the
    notes to print once (e.g. why pixel metrics are missing).
    """
    out: list[Evaluation] = []
    notes: dict[str, None] = {}
    without_column: list[StoredPredictions] = []
    for record in deduplicated(cells):
        stored = load_predictions(record)
        if stored.images is not None and column not in stored.images:
            without_column.append(stored)
            continue
        for value, rows in subgroup_rows(stored, column).items():
            result = cell_metrics(stored, rows)
            if any(NO_MAPS_NOTE in note for note in result.notes):
                notes["pixel metrics per subgroup need the maps: re-run with `bench run --save-maps`"] = None
            shown = _subgroup_record(record, stored, column, value, rows, result)
            out.append(Evaluation(shown, stored, rows))
    if without_column and not out:
        known = sorted({c for stored in without_column for c in stored.metadata_columns()})
        raise ResultsError(
            f"no stored cell has an images.csv column {column!r}; "
            f"columns present: {', '.join(known) or 'none'}"
        )
    missing: dict[str, int] = {}
    for stored in without_column:
        missing[stored.record.target] = missing.get(stored.record.target, 0) + 1
    for target, n in sorted(missing.items()):
        notes[f"target {target}: its images have no column {column!r}; its {n} cell(s) are left out"] = None
    return out, list(notes)


def _subgroup_record(
    record: CellRecord,
    stored: StoredPredictions,
    column: str,
    value: str,
    rows: Sequence[int],
    result: MetricResult,
) -> CellRecord:
    n_pixel = 0
    if stored.has_maps:
        _, valid = stored.masks()
        n_pixel = int(valid[np.asarray(rows)].sum())
    return dataclasses.replace(
        record,
        target=subgroup_label(record.target, column, value),
        metrics=dict(result.values),
        n_images=len(rows),
        n_pixel_images=n_pixel,
    )
