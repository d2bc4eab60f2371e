"""Bootstrap confidence intervals of the table cells (``bench table --ci``).

A table cell is the mean of one metric over support seeds, all evaluated on the same test
images. Its interval is a stratified bootstrap over those images (class counts kept, see
:func:`bench.stats.stratified_bootstrap_indices`): each resample draws the images once and
every seed's metric is computed on that same draw, so the interval is that of the seed mean
and the seed-to-seed spread is not counted twice. The draws depend only on the target's
labels and the ``seed``, so every method on one target sees the same resamples.

Image metrics are exact on each resample (:mod:`bench.resampled_metrics`); pixel metrics
use per-image score histograms on shared quantile bins, whose full-set difference from the
exact metric is reported as a note when it exceeds 0.1 percentage point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bench.breakdown import Evaluation
from bench.errors import ResultsError
from bench.resampled_metrics import PixelHistograms, resample_counts, weighted_auroc, weighted_macro_auroc
from bench.stats import Interval, interval_from_resamples, stratified_bootstrap_indices
from bench.tables.cells import GroupKey, group_key

__all__ = ["CI_METRICS", "CellKey", "IntervalResult", "cell_key", "resampled_values", "table_intervals"]

#: The metrics the tables show, which get intervals.
CI_METRICS = ("image_auroc", "class_auroc", "pixel_auroc", "pixel_ap")

#: (backbone group, method, zero-shot, target, shots, metric): one table cell's interval.
CellKey = tuple[GroupKey, str, bool, str, int, str]

#: Full-set binning error (metric units) above which a pixel interval gets a note.
_BINNING_NOTE_THRESHOLD = 1e-3


def cell_key(evaluation: Evaluation, metric: str) -> CellKey:
    r = evaluation.record
    zero_shot = not r.uses_support
    return (group_key(r), r.method, zero_shot, r.target, 0 if zero_shot else r.shots, metric)


@dataclass
class IntervalResult:
    """Intervals per table cell, and notes to print once."""

    intervals: dict[CellKey, Interval]
    notes: list[str]


def _rows(evaluation: Evaluation) -> np.ndarray:
    return np.arange(evaluation.stored.n) if evaluation.rows is None else np.asarray(evaluation.rows)


def resampled_values(
    evaluation: Evaluation, metrics: Sequence[str], counts: np.ndarray, notes: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Each of ``metrics`` of one cell on each resample (rows of ``counts``: draw counts per
    image of the evaluation); NaN where undefined. The pixel histograms are built once for all
    pixel metrics, and a note goes to ``notes`` when binning moves a full-set value by more
    than 0.1 point."""
    stored = evaluation.stored
    rows = _rows(evaluation)
    labels = stored.labels[rows]
    histograms: PixelHistograms | None = None
    out: dict[str, np.ndarray] = {}
    for metric in metrics:
        if metric == "image_auroc":
            out[metric] = weighted_auroc(labels > 0, stored.scores[rows], counts)
            continue
        if metric == "class_auroc":
            assert stored.probs is not None
            out[metric] = weighted_macro_auroc(labels, stored.probs[rows], counts)
            continue
        if histograms is None:
            masks, valid = stored.masks()
            histograms = PixelHistograms(_Rows(stored.maps(), rows), _Rows(masks, rows), valid[rows])
        error = histograms.binning_error(dict(evaluation.record.metrics), [metric])[metric]
        if notes is not None and abs(error) > _BINNING_NOTE_THRESHOLD:
            notes.append(
                f"{stored.describe()}: the binned {metric} differs from the exact value by "
                f"{100 * error:+.2f} points on the full set; its interval is shown as computed"
            )
        out[metric] = histograms.metric(metric, counts)
    return out


class _Rows:
    """Rows ``rows`` of an array, read lazily one index at a time (keeps memory maps mapped)."""

    def __init__(self, array: np.ndarray, rows: np.ndarray) -> None:
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[int(self.rows[i])]


def _check_same_images(evaluations: Sequence[Evaluation]) -> None:
    first = evaluations[0]
    ids = [first.stored.ids[i] for i in _rows(first)]
    for other in evaluations[1:]:
        if [other.stored.ids[i] for i in _rows(other)] != ids:
            raise ResultsError(
                f"{first.stored.directory} and {other.stored.directory} hold different test images "
                "for the same table cell; their seeds cannot share bootstrap resamples (re-run one)"
            )


def table_intervals(
    evaluations: Iterable[Evaluation],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    progress: Callable[[Iterable[object], str, int], Iterable[object]] | None = None,
) -> IntervalResult:
    """Percentile intervals of every table cell (seed mean) of ``evaluations``, per metric in
    :data:`CI_METRICS` that the cell recorded. Pixel metrics need stored maps; cells without
    them get no pixel interval (a note says so)."""
    cells: dict[tuple[object, ...], list[Evaluation]] = {}
    for evaluation in evaluations:
        key = cell_key(evaluation, "")[:-1]
        cells.setdefault(key, []).append(evaluation)
    intervals: dict[CellKey, Interval] = {}
    notes: list[str] = []
    counts_by_labels: dict[bytes, np.ndarray] = {}
    groups = list(cells.values())
    iterator: Iterable[object] = groups if progress is None else progress(groups, "intervals", len(groups))
    for group in iterator:
        assert isinstance(group, list)
        _check_same_images(group)
        first = group[0]
        labels = first.stored.labels[_rows(first)]
        token = labels.tobytes()
        if token not in counts_by_labels:
            indices = stratified_bootstrap_indices(labels, n_resamples, seed)
            counts_by_labels[token] = resample_counts(indices, len(labels))
        counts = counts_by_labels[token]
        metrics = [m for m in CI_METRICS if all(m in e.record.metrics for e in group)]
        if any(m.startswith("pixel_") for m in metrics) and not all(e.stored.has_maps for e in group):
            notes.append("pixel-metric intervals need the maps: re-run with `bench run --save-maps`")
            metrics = [m for m in metrics if not m.startswith("pixel_")]
        per_seed = [resampled_values(e, metrics, counts, notes) for e in group]
        for metric in metrics:
            mean = np.mean([values[metric] for values in per_seed], axis=0)
            if not np.isfinite(mean).any():
                continue
            estimate = float(np.mean([e.record.metrics[metric] for e in group]))
            intervals[cell_key(first, metric)] = interval_from_resamples(estimate, mean, level)
    return IntervalResult(intervals, list(dict.fromkeys(notes)))
