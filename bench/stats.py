"""Uncertainty of the stored per-image results and paired comparisons of two methods.

Pure numpy/scipy on in-memory arrays; nothing here reads or writes files.

* :func:`delong_auroc` / :func:`delong_test`: the AUROC, its DeLong variance and the paired
  two-sided DeLong test of two scorers on the same images, computed from midranks (Sun & Xu
  2014, "Fast implementation of DeLong's algorithm for comparing the areas under correlated
  receiver operating characteristic curves"). Ties between a positive and a negative count 1/2.
* :func:`stratified_bootstrap_indices`: resamples of image positions drawn with replacement
  *within* each class, so every resample keeps the class counts (an AUROC defined on the test
  set is defined on every resample).
* :func:`bootstrap_ci`: percentile interval of any ``statistic(indices)``;
  :func:`paired_bootstrap`: interval and two-sided p-value of the difference of two
  statistics evaluated on the *same* resamples. :func:`interval_from_resamples` and
  :func:`paired_from_resamples` give the same results from precomputed resample values.
* :func:`seed_mean_statistic`: the mean of several replicates (the support seeds of one method,
  all predicted on the same test images), evaluated on the same resample indices for every
  replicate, so the interval is that of the seed-mean the tables show.
* :func:`image_statistic` / :func:`pixel_statistic` (and the one-shot :func:`image_metric_on` /
  :func:`pixel_metric_on`): the protocol's metrics of :mod:`bench.metrics` on a resample.

Typical use (a method's ``image_auroc`` over three seeds with a 95% interval, and a comparison)::

    labels = ...  # (n,) class indices of the test images, same order for every seed
    stat_a = seed_mean_statistic([image_statistic("image_auroc", labels, scores=s) for s in seeds_a])
    stat_b = seed_mean_statistic([image_statistic("image_auroc", labels, scores=s) for s in seeds_b])
    interval = bootstrap_ci(labels, stat_a, n_resamples=1000, seed=0)
    comparison = paired_bootstrap(labels, stat_a, stat_b, n_resamples=1000, seed=0)

Cost (measured on 2 CPU cores, 800 images): :func:`image_statistic` takes about 0.2 ms
(``image_auroc``) to 0.5 ms (``class_auroc``) per resample, so 1000 resamples of a three-seed mean
take 0.5-1.5 s. Pixel metrics re-pool every pixel of the resample, about 0.03 s per million
pixels: ~1.5-2 s per resample and seed of a 780-image 256x256 test set (~51M pixels), i.e. about
half an hour for 1000 resamples. Pick fewer resamples for pixel intervals (e.g. 200; the first
resamples do not depend on ``n_resamples``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm, rankdata

from bench.errors import BenchError
from bench.metrics import PixelMetricAccumulator, image_metrics
from bench.results import TASK_METRICS
from bench.types import CLASSES, Task

__all__ = [
    "IMAGE_METRIC_KEYS",
    "PIXEL_METRIC_KEYS",
    "DeLongResult",
    "Interval",
    "PairedResult",
    "Statistic",
    "StatsError",
    "bootstrap_ci",
    "delong_auroc",
    "delong_test",
    "image_metric_on",
    "image_statistic",
    "interval_from_resamples",
    "paired_bootstrap",
    "paired_from_resamples",
    "pixel_metric_on",
    "pixel_statistic",
    "seed_mean_statistic",
    "stratified_bootstrap_indices",
]

#: A metric on a resample: image positions (duplicates allowed) -> value, or ``None`` (or NaN)
#: where the metric is undefined on that resample.
Statistic = Callable[[NDArray[np.int64]], float | None]

#: Image-level metric keys (see :func:`bench.metrics.image_metrics`).
IMAGE_METRIC_KEYS: tuple[str, ...] = TASK_METRICS[Task.DETECT] + TASK_METRICS[Task.CLASSIFY]

#: Pixel-level metric keys (see :class:`bench.metrics.PixelMetricAccumulator`).
PIXEL_METRIC_KEYS: tuple[str, ...] = TASK_METRICS[Task.LOCALIZE]

# Images handed to the pixel accumulator per batch (bounds the stacked copy to a few dozen maps).
_PIXEL_BATCH = 32


class StatsError(BenchError, ValueError):
    """Input that a statistical procedure cannot use (one class only, mismatched lengths, ...)."""


@dataclass(frozen=True)
class DeLongResult:
    """Paired DeLong test of two AUROCs on the same images (``difference = auc_a - auc_b``).

    ``z = difference / sqrt(variance_of_difference)`` and ``p_value = 2 * (1 - Phi(|z|))``.
    When the variance of the difference is 0, ``z`` is 0 and ``p_value`` 1 if the AUROCs are
    equal, else ``z`` is +-inf and ``p_value`` 0.
    """

    auc_a: float
    auc_b: float
    difference: float
    variance_of_difference: float
    z: float
    p_value: float


@dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval ``[low, high]`` around the full-sample ``estimate``.

    ``n_valid`` of the ``n_resamples`` resamples had a defined statistic; the interval is taken
    over those.
    """

    low: float
    high: float
    estimate: float
    n_resamples: int
    n_valid: int
    level: float


@dataclass(frozen=True)
class PairedResult:
    """Paired bootstrap comparison of two statistics on the same resamples.

    ``difference = estimate_a - estimate_b`` on the full sample; ``[low, high]`` is the
    percentile interval of the resampled differences; ``p_value`` is the two-sided bootstrap
    p-value (see :func:`paired_bootstrap`). ``n_valid`` resamples had both statistics defined.
    """

    estimate_a: float
    estimate_b: float
    difference: float
    low: float
    high: float
    p_value: float
    n_resamples: int
    n_valid: int
    level: float


# --------------------------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------------------------


def _binary_labels(labels_binary: ArrayLike) -> NDArray[np.bool_]:
    arr = np.asarray(labels_binary)
    if arr.ndim != 1:
        raise StatsError(f"labels_binary must be a 1-D array, got shape {arr.shape}")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise StatsError(f"labels_binary must be boolean or 0/1, got dtype {arr.dtype}")
        binary = (arr == 0) | (arr == 1)
        if not binary.all():
            i = int(np.flatnonzero(~binary)[0])
            raise StatsError(
                f"labels_binary must be boolean or 0/1; found {arr[i]!r} at index {i} "
                "(for class indices, pass labels > 0 for normal vs lesion)"
            )
        arr = arr == 1
    n_pos = int(arr.sum())
    n_neg = arr.size - n_pos
    if n_pos < 2 or n_neg < 2:
        raise StatsError(
            f"DeLong AUROC needs at least 2 positives and 2 negatives, got {n_pos} positive(s) and "
            f"{n_neg} negative(s); the AUROC (or its variance) is undefined with a single class"
        )
    return arr


def _score_rows(name: str, scores: ArrayLike, n: int) -> NDArray[np.float64]:
    arr = np.asarray(scores)
    if arr.shape != (n,):
        raise StatsError(f"{name} must have shape ({n},) to match labels_binary, got {arr.shape}")
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise StatsError(f"{name} must be real-valued, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise StatsError(f"{name} contains non-finite values (NaN or inf), first at index {i}")
    return arr


def _delong_components(
    positive: NDArray[np.bool_], scores: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """AUROCs (k,), structural components V10 (k, m) and V01 (k, n) of k scorers (k, N).

    ``V10[i] = mean_j psi(X_i, Y_j)`` over the negatives and ``V01[j] = mean_i psi(X_i, Y_j)``
    over the positives, ``psi`` = 1, 1/2, 0 for ``X >, =, < Y``; both from midranks: with T_z
    the midrank in the pooled sample and T_x (T_y) the midrank among the positives (negatives),
    ``V10 = (T_z - T_x) / n`` and ``V01 = 1 - (T_z - T_y) / m``.
    """
    pos_scores = scores[:, positive]
    neg_scores = scores[:, ~positive]
    m = pos_scores.shape[1]
    n = neg_scores.shape[1]
    t_x = rankdata(pos_scores, axis=1)
    t_y = rankdata(neg_scores, axis=1)
    t_z = rankdata(np.concatenate([pos_scores, neg_scores], axis=1), axis=1)
    v10 = (t_z[:, :m] - t_x) / n
    v01 = 1.0 - (t_z[:, m:] - t_y) / m
    aucs = (t_z[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    return aucs, v10, v01


def delong_auroc(labels_binary: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """AUROC of ``scores`` for ``labels_binary`` and its DeLong variance.

    ``variance = S10 / m + S01 / n`` with S10 (S01) the sample variance (ddof 1) of the
    structural components over the m positives (n negatives).

    Args:
        labels_binary: (N,) boolean or 0/1; 1 = positive (for the protocol: ``labels > 0``,
            lesion vs normal).
        scores: (N,) finite real scores, higher = more likely positive.

    Raises:
        StatsError (a ValueError): fewer than 2 positives or 2 negatives (in particular a
            single class), wrong shapes or non-finite scores.
    """
    positive = _binary_labels(labels_binary)
    s = _score_rows("scores", scores, positive.size)
    aucs, v10, v01 = _delong_components(positive, s[None])
    variance = float(np.var(v10[0], ddof=1) / v10.shape[1] + np.var(v01[0], ddof=1) / v01.shape[1])
    return float(aucs[0]), variance


def delong_test(labels_binary: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike) -> DeLongResult:
    """Two-sided paired DeLong test of ``AUROC(scores_a) == AUROC(scores_b)`` on the same images.

    The variance of the difference is ``Var(V10_a - V10_b) / m + Var(V01_a - V01_b) / n``
    (equal to ``S_aa + S_bb - 2 S_ab`` of the DeLong covariance, but never negative by
    rounding).

    Raises:
        StatsError (a ValueError): as :func:`delong_auroc`.
    """
    positive = _binary_labels(labels_binary)
    a = _score_rows("scores_a", scores_a, positive.size)
    b = _score_rows("scores_b", scores_b, positive.size)
    aucs, v10, v01 = _delong_components(positive, np.stack([a, b]))
    difference = float(aucs[0] - aucs[1])
    variance = float(
        np.var(v10[0] - v10[1], ddof=1) / v10.shape[1] + np.var(v01[0] - v01[1], ddof=1) / v01.shape[1]
    )
    if variance > 0.0:
        z = difference / math.sqrt(variance)
        p_value = float(2.0 * norm.sf(abs(z)))
    elif difference == 0.0:
        z, p_value = 0.0, 1.0
    else:
        z, p_value = math.copysign(math.inf, difference), 0.0
    return DeLongResult(
        auc_a=float(aucs[0]),
        auc_b=float(aucs[1]),
        difference=difference,
        variance_of_difference=variance,
        z=z,
        p_value=min(1.0, p_value),
    )


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def _strata(labels: ArrayLike) -> NDArray[np.generic]:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise StatsError(f"labels must be a 1-D array (one class per image), got shape {arr.shape}")
    if arr.size == 0:
        raise StatsError("labels is empty: there are no images to resample")
    if arr.dtype.kind not in "biu" and not (arr.dtype.kind == "f" and np.isfinite(arr).all()):
        raise StatsError(f"labels must be integer or boolean class labels, got dtype {arr.dtype}")
    return arr


def _check_resampling(n_resamples: int, level: float | None = None) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int | np.integer) or n_resamples < 1:
        raise StatsError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if level is not None and not 0.0 < level < 1.0:
        raise StatsError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level!r}")


def stratified_bootstrap_indices(labels: ArrayLike, n_resamples: int, seed: int) -> NDArray[np.int64]:
    """Bootstrap resamples that keep every class's count: (n_resamples, n) image positions.

    Row ``r`` holds, at each position ``i``, a position drawn uniformly with replacement among
    the images of class ``labels[i]``, so ``labels[rows[r]] == labels`` for every resample.
    Draws come from ``numpy.random.default_rng(seed)`` (PCG64, the same on every machine for a
    given numpy version), resample by resample and within a resample class by class in sorted
    label order; the first ``k`` rows therefore do not depend on ``n_resamples``.

    Args:
        labels: (n,) class labels (integer or boolean) used as strata.
        n_resamples: number of resamples (>= 1).
        seed: seed of the generator.
    """
    strata = _strata(labels)
    _check_resampling(n_resamples)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == value) for value in np.unique(strata)]
    rows = np.empty((int(n_resamples), strata.size), dtype=np.int64)
    for row in rows:
        for members in groups:
            row[members] = members[rng.integers(0, members.size, size=members.size)]
    return rows


def _as_value(value: float | None) -> float:
    """A statistic's value as a float, NaN where undefined."""
    if value is None:
        return math.nan
    return float(value)


def _full_sample(statistic: Statistic, n: int, name: str) -> float:
    estimate = _as_value(statistic(np.arange(n, dtype=np.int64)))
    if math.isnan(estimate):
        raise StatsError(f"{name} is undefined on the full set of {n} images, so it has no interval")
    return estimate


def _percentile_interval(values: NDArray[np.float64], level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_ci(
    labels: ArrayLike,
    statistic: Statistic,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Stratified percentile bootstrap interval of ``statistic``.

    ``estimate`` is ``statistic`` on all images in order (``np.arange(n)``); ``low`` and
    ``high`` are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (linear
    interpolation, ``numpy.quantile``'s default) of ``statistic`` over the resamples of
    :func:`stratified_bootstrap_indices` ``(labels, n_resamples, seed)`` where it is defined.

    For several replicates on the same images (the support seeds of one method) pass
    :func:`seed_mean_statistic` of their statistics: every replicate then sees the same
    resample, and the interval is that of the seed-mean.

    Args:
        labels: (n,) class labels of the images, the strata of the resampling.
        statistic: image positions -> value, or ``None``/NaN when undefined on that resample.

    Raises:
        StatsError: the statistic is undefined on the full set or on every resample, or bad
            ``labels``, ``n_resamples`` or ``level``.
    """
    strata = _strata(labels)
    _check_resampling(n_resamples, level)
    estimate = _full_sample(statistic, strata.size, "the statistic")
    rows = stratified_bootstrap_indices(strata, n_resamples, seed)
    values = np.array([_as_value(statistic(row)) for row in rows], dtype=np.float64)
    return interval_from_resamples(estimate, values, level)


def interval_from_resamples(estimate: float, values: ArrayLike, level: float = 0.95) -> Interval:
    """The percentile :class:`Interval` of precomputed resample values (as :func:`bootstrap_ci`).

    For callers that evaluate a statistic on all resamples at once (vectorised). ``values``
    holds one value per resample, NaN where undefined (skipped and counted).

    Raises:
        StatsError: no value is defined, ``values`` is not 1-D or ``level`` is outside (0, 1).
    """
    resampled = np.asarray(values, dtype=np.float64)
    if resampled.ndim != 1 or resampled.size == 0:
        raise StatsError(f"values must be a non-empty 1-D array (one per resample), got {resampled.shape}")
    _check_resampling(resampled.size, level)
    valid = resampled[~np.isnan(resampled)]
    if valid.size == 0:
        raise StatsError(f"the statistic is undefined on all {resampled.size} bootstrap resamples")
    low, high = _percentile_interval(valid, level)
    return Interval(
        low=low,
        high=high,
        estimate=float(estimate),
        n_resamples=int(resampled.size),
        n_valid=int(valid.size),
        level=float(level),
    )


def paired_bootstrap(
    labels: ArrayLike,
    statistic_a: Statistic,
    statistic_b: Statistic,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedResult:
    """Paired stratified bootstrap of ``statistic_a - statistic_b`` (both on each same resample).

    ``[low, high]`` is the percentile interval (as in :func:`bootstrap_ci`) of the resampled
    differences ``d_r``. With ``d`` the full-sample difference, the two-sided p-value is

    * ``2 * #{r: d_r <= 0} / n_valid`` if ``d > 0``,
    * ``2 * #{r: d_r >= 0} / n_valid`` if ``d < 0``,
    * ``1`` if ``d == 0``,

    clipped to 1: twice the share of resampled differences on the other side of 0 (or at 0).
    Its resolution is ``2 / n_valid``; a value of 0 means ``p < 2 / n_valid``. Only resamples
    where both statistics are defined count.

    Raises:
        StatsError: as :func:`bootstrap_ci`.
    """
    strata = _strata(labels)
    _check_resampling(n_resamples, level)
    estimate_a = _full_sample(statistic_a, strata.size, "statistic_a")
    estimate_b = _full_sample(statistic_b, strata.size, "statistic_b")
    rows = stratified_bootstrap_indices(strata, n_resamples, seed)
    values_a = np.array([_as_value(statistic_a(row)) for row in rows], dtype=np.float64)
    values_b = np.array([_as_value(statistic_b(row)) for row in rows], dtype=np.float64)
    return paired_from_resamples(estimate_a, estimate_b, values_a, values_b, level)


def paired_from_resamples(
    estimate_a: float,
    estimate_b: float,
    values_a: ArrayLike,
    values_b: ArrayLike,
    level: float = 0.95,
) -> PairedResult:
    """The :class:`PairedResult` of precomputed paired resample values (as
    :func:`paired_bootstrap`, which defines the interval and the p-value).

    ``values_a[r]`` and ``values_b[r]`` must come from the same resample ``r``; NaN marks an
    undefined value, and a resample counts only where both are defined.

    Raises:
        StatsError: the arrays differ in shape, no resample has both values, or ``level`` is
            outside (0, 1).
    """
    resampled_a = np.asarray(values_a, dtype=np.float64)
    resampled_b = np.asarray(values_b, dtype=np.float64)
    if resampled_a.ndim != 1 or resampled_a.size == 0 or resampled_a.shape != resampled_b.shape:
        raise StatsError(
            "values_a and values_b must be non-empty 1-D arrays of the same resamples, got shapes "
            f"{resampled_a.shape} and {resampled_b.shape}"
        )
    _check_resampling(resampled_a.size, level)
    diffs = resampled_a - resampled_b
    valid = diffs[~np.isnan(diffs)]
    if valid.size == 0:
        raise StatsError(
            f"statistic_a and statistic_b are never both defined on the {diffs.size} bootstrap resamples"
        )
    low, high = _percentile_interval(valid, level)
    difference = float(estimate_a) - float(estimate_b)
    if difference > 0:
        p_value = 2.0 * float(np.mean(valid <= 0.0))
    elif difference < 0:
        p_value = 2.0 * float(np.mean(valid >= 0.0))
    else:
        p_value = 1.0
    return PairedResult(
        estimate_a=float(estimate_a),
        estimate_b=float(estimate_b),
        difference=difference,
        low=low,
        high=high,
        p_value=min(1.0, p_value),
        n_resamples=int(diffs.size),
        n_valid=int(valid.size),
        level=float(level),
    )


def seed_mean_statistic(statistics: Sequence[Statistic]) -> Statistic:
    """The mean of several replicates' statistics, each evaluated on the same resample.

    The replicates (e.g. support seeds 0, 1, 2 of one method) must describe the same images in
    the same order, so one set of positions means the same resample for all. The mean is
    undefined (``None``) on a resample where any replicate is undefined, so it always averages
    the same replicates.

    Raises:
        StatsError: no statistic is given.
    """
    replicates = list(statistics)
    if not replicates:
        raise StatsError("seed_mean_statistic needs at least one replicate statistic")

    def mean_over_seeds(indices: NDArray[np.int64]) -> float | None:
        total = 0.0
        for replicate in replicates:
            value = _as_value(replicate(indices))
            if math.isnan(value):
                return None
            total += value
        return total / len(replicates)

    return mean_over_seeds


# --------------------------------------------------------------------------------------------
# Metrics on a resample
# --------------------------------------------------------------------------------------------


def _check_indices(indices: ArrayLike, n: int) -> NDArray[np.int64]:
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise StatsError(
            f"indices must be a 1-D integer array of image positions, got {idx.dtype} {idx.shape}"
        )
    if idx.size == 0:
        raise StatsError("indices is empty: a resample needs at least one image")
    if idx.min() < 0 or idx.max() >= n:
        raise StatsError(f"indices must lie in [0, {n}), got values in [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64, copy=False)


def _image_inputs(
    metric: str, scores: ArrayLike | None, probs: ArrayLike | None
) -> tuple[ArrayLike | None, ArrayLike | None]:
    """The inputs ``metric`` needs (the other set to ``None``)."""
    if metric not in IMAGE_METRIC_KEYS:
        raise StatsError(f"unknown image metric {metric!r}; expected one of {IMAGE_METRIC_KEYS}")
    if metric == "image_auroc":
        if scores is None:
            raise StatsError("image_auroc needs the image scores, got scores=None")
        return scores, None
    if probs is None:
        raise StatsError(f"{metric} needs the class probabilities, got probs=None")
    return None, probs


def image_metric_on(
    indices: ArrayLike,
    metric: str,
    labels: ArrayLike,
    scores: ArrayLike | None = None,
    probs: ArrayLike | None = None,
) -> float | None:
    """``metric`` of :func:`bench.metrics.image_metrics` on the images at ``indices``
    (duplicates count as often as they appear), or ``None`` where it is undefined.

    The reference path (validates and calls scikit-learn on every call, ~3-9 ms for 800
    images); for bootstrapping use :func:`image_statistic`, which gives the same values.

    Args:
        indices: (k,) positions into ``labels``/``scores``/``probs``.
        metric: one of :data:`IMAGE_METRIC_KEYS`.
        labels: (n,) class indices (0 normal, 1 benign, 2 malignant).
        scores: (n,) image scores (needed for ``image_auroc``).
        probs: (n, 3) class probabilities (needed for the ``class_*`` metrics).

    Raises:
        StatsError: unknown metric, missing input, bad indices or input that
            :func:`bench.metrics.image_metrics` rejects.
    """
    y = np.asarray(labels)
    idx = _check_indices(indices, len(y) if y.ndim == 1 else 0)
    use_scores, use_probs = _image_inputs(metric, scores, probs)
    try:
        result = image_metrics(
            y[idx],
            None if use_scores is None else np.asarray(use_scores)[idx],
            None if use_probs is None else np.asarray(use_probs)[idx],
        )
    except ValueError as err:
        raise StatsError(f"cannot compute {metric} on the resample: {err}") from err
    return result.values.get(metric)


def _midranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks, tied values sharing their mean rank (``scipy.stats.rankdata``, ~3x faster
    on the few hundred values of a resample)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    n = values.size
    starts = np.empty(n + 1, dtype=bool)
    starts[0] = starts[-1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:-1])
    bounds = np.flatnonzero(starts)  # first position of each run of equal values, then n
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((bounds[:-1] + bounds[1:] + 1) / 2.0, np.diff(bounds))
    return ranks


def _midrank_auroc(positive: NDArray[np.bool_], scores: NDArray[np.float64]) -> float:
    """Mann-Whitney AUROC (ties 1/2) of a sample with both classes present."""
    m = int(positive.sum())
    n = positive.size - m
    ranks = _midranks(scores)
    return float((ranks[positive].sum() - m * (m + 1) / 2.0) / (m * n))


def image_statistic(
    metric: str,
    labels: ArrayLike,
    scores: ArrayLike | None = None,
    probs: ArrayLike | None = None,
) -> Statistic:
    """A fast :data:`Statistic` computing ``metric`` exactly as :func:`image_metric_on`.

    The inputs are validated once (by :func:`bench.metrics.image_metrics` on all images); each
    call then computes the metric of the resample with numpy: AUROCs from midranks (ties
    count 1/2, as ``roc_auc_score``), accuracy of ``argmax(probs)`` (first maximum wins),
    balanced accuracy and macro one-vs-rest AUROC over the classes present in the resample.
    Returns ``None`` where :func:`bench.metrics.image_metrics` omits the metric.

    Raises:
        StatsError: as :func:`image_metric_on`.
    """
    use_scores, use_probs = _image_inputs(metric, scores, probs)
    try:
        image_metrics(labels, use_scores, use_probs)
    except ValueError as err:
        raise StatsError(f"cannot compute {metric}: {err}") from err
    y = np.asarray(labels).astype(np.int64)
    n_classes = len(CLASSES)

    if metric == "image_auroc":
        s = np.asarray(use_scores, dtype=np.float64)

        def image_auroc(indices: NDArray[np.int64]) -> float | None:
            idx = _check_indices(indices, y.size)
            lesion = y[idx] > 0
            if lesion.all() or not lesion.any():
                return None
            return _midrank_auroc(lesion, s[idx])

        return image_auroc

    p = np.asarray(use_probs, dtype=np.float64)
    predicted = p.argmax(axis=1)

    def class_metric(indices: NDArray[np.int64]) -> float | None:
        idx = _check_indices(indices, y.size)
        y_r = y[idx]
        if metric == "class_accuracy":
            return float(np.mean(predicted[idx] == y_r))
        present = np.flatnonzero(np.bincount(y_r, minlength=n_classes))
        if metric == "class_balanced_accuracy":
            pred_r = predicted[idx]
            return float(np.mean([np.mean(pred_r[y_r == k] == k) for k in present]))
        if present.size < 2:
            return None
        p_r = p[idx]
        return float(np.mean([_midrank_auroc(y_r == k, p_r[:, k]) for k in present]))

    return class_metric


def _pixel_inputs(
    metric: str,
    maps: Sequence[ArrayLike | None] | NDArray[np.floating],
    masks: Sequence[ArrayLike | None] | NDArray[np.generic],
) -> None:
    if metric not in PIXEL_METRIC_KEYS:
        raise StatsError(f"unknown pixel metric {metric!r}; expected one of {PIXEL_METRIC_KEYS}")
    if len(maps) != len(masks):
        raise StatsError(f"maps hold {len(maps)} image(s) but masks {len(masks)}; give one per image")


def pixel_metric_on(
    indices: ArrayLike,
    metric: str,
    maps: Sequence[ArrayLike | None] | NDArray[np.floating],
    masks: Sequence[ArrayLike | None] | NDArray[np.generic],
) -> float | None:
    """Pooled ``metric`` of :class:`bench.metrics.PixelMetricAccumulator` over the images at
    ``indices`` (an image drawn twice counts twice), or ``None`` where it is undefined.

    Args:
        indices: (k,) positions into ``maps``/``masks``.
        metric: one of :data:`PIXEL_METRIC_KEYS`.
        maps: per-image (H, W) anomaly maps, a list or an (n, H, W) array.
        masks: per-image (H, W) binary masks, a list or an (n, H, W) array; a ``None`` entry
            excludes that image from the pixel metrics (its map is then not read and may be
            ``None``).

    Cost: re-pools every pixel of the resample, about 0.03 s per million pixels (the accumulator
    holds 4-8 bytes per pooled pixel).

    Raises:
        StatsError: unknown metric, mismatched lengths or shapes, bad indices, or maps/masks
            the accumulator rejects.
    """
    _pixel_inputs(metric, maps, masks)
    idx = _check_indices(indices, len(maps))
    used = [int(i) for i in idx if masks[i] is not None]
    accumulator = PixelMetricAccumulator(expected_images=len(used))
    try:
        for start in range(0, len(used), _PIXEL_BATCH):
            batch = used[start : start + _PIXEL_BATCH]
            batch_maps = [np.asarray(maps[i]) for i in batch]
            batch_masks = [np.asarray(masks[i]) for i in batch]
            for i, score_map, mask in zip(batch, batch_maps, batch_masks, strict=True):
                if score_map.ndim != 2 or score_map.shape != mask.shape:
                    raise StatsError(
                        f"image {i}: map shape {score_map.shape} and mask shape {mask.shape} must be "
                        "the same (H, W)"
                    )
            accumulator.add(np.stack(batch_maps), np.stack(batch_masks))
    except ValueError as err:
        if isinstance(err, StatsError):
            raise
        raise StatsError(f"cannot compute {metric} on the resample: {err}") from err
    return accumulator.result().values.get(metric)


def pixel_statistic(
    metric: str,
    maps: Sequence[ArrayLike | None] | NDArray[np.floating],
    masks: Sequence[ArrayLike | None] | NDArray[np.generic],
) -> Statistic:
    """A :data:`Statistic` of :func:`pixel_metric_on` with ``metric``, ``maps`` and ``masks``
    bound (checked once: metric name, lengths, and each used map's shape against its mask).

    Raises:
        StatsError: as :func:`pixel_metric_on`.
    """
    _pixel_inputs(metric, maps, masks)
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        score_map = maps[i]
        map_shape = None if score_map is None else np.shape(score_map)
        if map_shape is None or len(map_shape) != 2 or map_shape != np.shape(mask):
            raise StatsError(
                f"image {i}: map shape {map_shape} and mask shape {np.shape(mask)} must be the same (H, W)"
            )

    def pooled_pixel_metric(indices: NDArray[np.int64]) -> float | None:
        return pixel_metric_on(indices, metric, maps, masks)

    return pooled_pixel_metric
