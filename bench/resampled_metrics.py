"""The table metrics on many bootstrap resamples at once, from per-image resample counts.

A bootstrap resample of n images is a count vector ``c`` (how often each image was drawn).
Every metric of the tables is a function of the images' scores weighted by ``c``, so a whole
batch of R resamples is a matrix ``counts`` (R, n) and each metric is computed for all rows
in one vectorised pass, with no copy of the resampled data:

* :func:`weighted_auroc`: exact ROC AUC of the resampled (duplicated) data, ties 1/2; equal
  to ``sklearn.metrics.roc_auc_score`` on the explicitly repeated arrays.
* :func:`weighted_macro_auroc`: the 3-class macro one-vs-rest AUROC over the classes present.
* :class:`PixelHistograms`: pooled pixel AUROC and step-wise AP of resampled images. Pooling
  all pixels of all images exactly would cost a sort of tens of millions of pixels per
  resample, so each image's lesion and background scores are counted in ``bins`` bins whose
  edges are quantiles of the pooled scores (each bin holds about 1/bins of the pixels). Within
  a bin, scores count as tied, which changes the AUROC by at most the pair mass of a bin; the
  exact full-set value is kept as the estimate and :attr:`PixelHistograms.binning_error`
  reports the full-set difference so a reader can judge it (about 1e-4 at 4096 bins).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "DEFAULT_PIXEL_BINS",
    "PixelHistograms",
    "resample_counts",
    "weighted_auroc",
    "weighted_macro_auroc",
]

#: Quantile bins per pixel histogram (see the module docstring for the error it allows).
DEFAULT_PIXEL_BINS = 4096


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(R, n) draw counts of each image in each resample, from resample indices (R, m)."""
    indices = np.asarray(indices, dtype=np.int64)
    rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
    counts = np.zeros((indices.shape[0], n), dtype=np.float64)
    np.add.at(counts, (rows, indices.ravel()), 1.0)
    return counts


def _tie_groups(sorted_scores: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in an ascending array."""
    starts = np.flatnonzero(np.diff(sorted_scores)) + 1
    return np.concatenate(([0], starts))


def _auroc_from_group_weights(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC per row from (R, G) positive and negative weights per ascending tie group."""
    neg_below = np.cumsum(neg, axis=1) - neg
    total_pos = pos.sum(axis=1)
    total_neg = neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (total_pos * total_neg)
    auc[(total_pos == 0) | (total_neg == 0)] = np.nan
    return auc


def weighted_auroc(positive: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` for ``positive`` under each row of ``counts`` (R, n); NaN where a
    resample holds only one class."""
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(scores, kind="stable")
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    starts = _tie_groups(sorted_scores)
    weights = np.atleast_2d(counts)[:, order]
    pos_sorted = positive[order]
    pos = np.add.reduceat(weights * pos_sorted, starts, axis=1)
    neg = np.add.reduceat(weights * ~pos_sorted, starts, axis=1)
    return _auroc_from_group_weights(pos, neg)


def weighted_macro_auroc(labels: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUROC over the classes present in the full set, per resample (as
    :func:`bench.metrics.image_metrics` computes ``class_auroc``)."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        return np.full(np.atleast_2d(counts).shape[0], np.nan)
    per_class = [weighted_auroc(labels == k, probs[:, k], counts) for k in present]
    return np.mean(per_class, axis=0)


class PixelHistograms:
    """Per-image histograms of lesion and background pixel scores on shared quantile bins.

    ``maps`` (n, S, S) and ``masks`` (n, S, S) bool; ``valid`` (n,) marks the images in pixel
    metrics (others contribute nothing). Images are read one at a time, so ``maps`` may be a
    memory map.
    """

    def __init__(
        self,
        maps: np.ndarray,
        masks: np.ndarray,
        valid: np.ndarray,
        bins: int = DEFAULT_PIXEL_BINS,
        sample_for_edges: int = 2_000_000,
        seed: int = 0,
    ) -> None:
        n = len(maps)
        used = np.flatnonzero(valid)
        self.n = n
        self.bins = bins
        rng = np.random.default_rng(seed)
        per_image = max(1, sample_for_edges // max(len(used), 1))
        sample = [
            rng.choice(np.asarray(maps[i], dtype=np.float32).ravel(), size=per_image, replace=True)
            for i in used
        ]
        pooled = np.concatenate(sample) if sample else np.zeros(1, dtype=np.float32)
        self.edges = np.unique(np.quantile(pooled, np.linspace(0, 1, bins + 1)[1:-1]))
        n_bins = len(self.edges) + 1
        self.pos = np.zeros((n, n_bins), dtype=np.float64)
        self.neg = np.zeros((n, n_bins), dtype=np.float64)
        for i in used:
            scores = np.asarray(maps[i], dtype=np.float32).ravel()
            which = np.searchsorted(self.edges, scores, side="right")
            lesion = np.asarray(masks[i]).ravel().astype(bool)
            self.pos[i] = np.bincount(which[lesion], minlength=n_bins)
            self.neg[i] = np.bincount(which[~lesion], minlength=n_bins)

    def auroc(self, counts: np.ndarray) -> np.ndarray:
        """Pooled pixel AUROC per resample (ties within a bin count 1/2)."""
        counts = np.atleast_2d(counts)
        return _auroc_from_group_weights(counts @ self.pos, counts @ self.neg)

    def average_precision(self, counts: np.ndarray) -> np.ndarray:
        """Step-wise pooled pixel AP per resample (a bin is one threshold)."""
        counts = np.atleast_2d(counts)
        pos = (counts @ self.pos)[:, ::-1]  # descending thresholds
        neg = (counts @ self.neg)[:, ::-1]
        tp = np.cumsum(pos, axis=1)
        fp = np.cumsum(neg, axis=1)
        total = tp[:, -1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            ap = (pos / total * precision).sum(axis=1)
        ap[total[:, 0] == 0] = np.nan
        return ap

    def metric(self, name: str, counts: np.ndarray) -> np.ndarray:
        """``pixel_auroc`` or ``pixel_ap`` per resample."""
        if name == "pixel_auroc":
            return self.auroc(counts)
        if name == "pixel_ap":
            return self.average_precision(counts)
        raise KeyError(f"no resampled pixel metric {name!r} (pixel_auroc, pixel_ap)")

    def binning_error(self, exact: dict[str, float], names: Sequence[str]) -> dict[str, float]:
        """Full-set binned value minus the exact one, per metric in ``names``."""
        full = np.ones((1, self.n))
        return {m: float(self.metric(m, full)[0] - exact[m]) for m in names if m in exact}
