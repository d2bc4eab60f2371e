"""Metrics on bootstrap resamples from draw counts (bench.resampled_metrics) against the
explicitly repeated data scored by scikit-learn and the harness's exact pixel metrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench.metrics import image_metrics, pixel_metrics
from bench.resampled_metrics import (
    PixelHistograms,
    resample_counts,
    weighted_auroc,
    weighted_macro_auroc,
)


def test_resample_counts_counts_every_draw() -> None:
    counts = resample_counts(np.array([[0, 0, 2], [1, 2, 2]]), 4)
    np.testing.assert_array_equal(counts, [[2, 0, 1, 0], [0, 1, 2, 0]])


def test_weighted_auroc_hand_computed_with_a_tie() -> None:
    # Positives 0.9 and 0.5, negatives 0.5 and 0.1; weights 2, 1, 1, 3.
    # Pairs (pos, neg): (0.9 beats both: 2*(1+3) = 8), (0.5 ties 0.5: 1*1*0.5, beats 0.1: 1*3) = 3.5
    # AUC = 11.5 / (3 * 4) = 0.958333...
    positive = np.array([True, True, False, False])
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    counts = np.array([[2.0, 1.0, 1.0, 3.0]])
    assert weighted_auroc(positive, scores, counts)[0] == pytest.approx(11.5 / 12.0)


def test_weighted_auroc_equals_sklearn_on_the_repeated_data() -> None:
    rng = np.random.default_rng(0)
    n = 60
    positive = rng.random(n) < 0.4
    scores = np.round(rng.normal(size=n) + positive, 1)  # rounding makes ties
    indices = rng.integers(0, n, size=(25, n))
    got = weighted_auroc(positive, scores, resample_counts(indices, n))
    for row, value in zip(indices, got, strict=True):
        if positive[row].all() or not positive[row].any():
            assert np.isnan(value)
        else:
            assert value == pytest.approx(roc_auc_score(positive[row], scores[row]), abs=1e-12)


def test_weighted_macro_auroc_equals_the_harness_class_auroc() -> None:
    rng = np.random.default_rng(1)
    n = 45
    labels = np.repeat([0, 1, 2], 15)
    probs = rng.dirichlet([1, 1, 1], size=n)
    indices = np.stack([np.concatenate([rng.choice(np.flatnonzero(labels == k), 15) for k in range(3)])])
    got = weighted_macro_auroc(labels, probs, resample_counts(indices, n))[0]
    row = indices[0]
    expected = image_metrics(labels[row], None, probs[row]).values["class_auroc"]
    assert got == pytest.approx(expected, abs=1e-12)


def _maps_and_masks(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(0, n, 2):
        masks[i, 2:6, 3:7] = True
    maps = rng.random((n, size, size)).astype(np.float32) + masks * 0.4
    return maps, masks


def test_pixel_histograms_are_exact_when_every_distinct_score_has_its_own_bin() -> None:
    maps, masks = _maps_and_masks(6, 8, 2)
    maps = np.round(maps * 20) / 20  # few distinct values, each below its own bin edge
    valid = np.ones(6, dtype=bool)
    hist = PixelHistograms(maps, masks, valid, bins=4096)
    rng = np.random.default_rng(3)
    indices = rng.integers(0, 6, size=(8, 6))
    counts = resample_counts(indices, 6)
    auroc, ap = hist.auroc(counts), hist.average_precision(counts)
    for r, row in enumerate(indices):
        exact = pixel_metrics(maps[row], masks[row]).values
        assert auroc[r] == pytest.approx(exact["pixel_auroc"], abs=1e-12)
        assert ap[r] == pytest.approx(exact["pixel_ap"], abs=1e-12)


def test_pixel_histograms_leave_out_invalid_images_and_stay_close_with_few_bins() -> None:
    maps, masks = _maps_and_masks(8, 16, 4)
    valid = np.array([True] * 6 + [False] * 2)
    maps[6:] = 100.0  # would wreck the metrics if counted
    hist = PixelHistograms(maps, masks, valid, bins=256)
    exact = pixel_metrics(maps[:6], masks[:6]).values
    full = np.ones((1, 8))
    assert hist.auroc(full)[0] == pytest.approx(exact["pixel_auroc"], abs=5e-3)
    assert hist.average_precision(full)[0] == pytest.approx(exact["pixel_ap"], abs=2e-2)
    error = hist.binning_error(exact, ["pixel_auroc"])["pixel_auroc"]
    assert error == pytest.approx(hist.auroc(full)[0] - exact["pixel_auroc"])
