"""Tests of bench.stats: DeLong against hand-computed cases, scikit-learn and the bootstrap;
the stratified bootstrap, its interval coverage, the paired comparison, and the metric
statistics against bench.metrics on explicitly resampled inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score

from bench.errors import BenchError
from bench.metrics import pixel_metrics
from bench.results import METRIC_KEYS
from bench.stats import (
    IMAGE_METRIC_KEYS,
    PIXEL_METRIC_KEYS,
    StatsError,
    bootstrap_ci,
    delong_auroc,
    delong_test,
    image_metric_on,
    image_statistic,
    interval_from_resamples,
    paired_bootstrap,
    paired_from_resamples,
    pixel_metric_on,
    pixel_statistic,
    seed_mean_statistic,
    stratified_bootstrap_indices,
)

# --------------------------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------------------------

# Positives X = (0.8, 0.6, 0.4) and negatives Y = (0.6, 0.2), interleaved. A scorer B on the
# same images: X = (0.7, 0.3, 0.5), Y = (0.4, 0.1).
HAND_LABELS = np.array([1, 0, 1, 1, 0])
HAND_SCORES_A = np.array([0.8, 0.6, 0.6, 0.4, 0.2])
HAND_SCORES_B = np.array([0.7, 0.4, 0.3, 0.5, 0.1])


def test_delong_auroc_hand_computed_with_a_tie() -> None:
    # psi(X_i, Y_j) (1 if X > Y, 1/2 if equal):  Y=0.6  Y=0.2
    #                                     X=0.8    1      1
    #                                     X=0.6   1/2     1
    #                                     X=0.4    0      1
    v10 = np.array([1.0, 0.75, 0.5])  # row means
    v01 = np.array([0.5, 1.0])  # column means
    auc = 0.75  # mean of v10 = mean of v01
    s10 = ((1.0 - auc) ** 2 + 0.0**2 + (0.5 - auc) ** 2) / 2  # 0.0625
    s01 = ((0.5 - auc) ** 2 + (1.0 - auc) ** 2) / 1  # 0.125
    variance = s10 / 3 + s01 / 2  # 1/12
    assert v10.mean() == v01.mean() == auc
    assert variance == pytest.approx(1 / 12)

    got_auc, got_variance = delong_auroc(HAND_LABELS, HAND_SCORES_A)
    assert got_auc == pytest.approx(auc, abs=1e-15)
    assert got_variance == pytest.approx(variance, abs=1e-15)
    # Boolean labels mean the same.
    assert delong_auroc(HAND_LABELS == 1, HAND_SCORES_A) == (got_auc, got_variance)


def test_delong_auroc_equals_sklearn_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        labels = rng.integers(0, 2, 97)
        scores = np.round(rng.normal(size=97) + 0.7 * labels, 1)  # many ties, across classes too
        auc, _ = delong_auroc(labels, scores)
        assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_delong_variance_agrees_with_the_bootstrap_variance() -> None:
    rng = np.random.default_rng(11)
    labels = np.repeat([1, 0], [90, 210])  # unbalanced: swapping m and n would show
    scores = rng.normal(size=labels.size) + 1.0 * labels
    _, variance = delong_auroc(labels, scores)

    rows = stratified_bootstrap_indices(labels, 3000, seed=5)
    resampled = scores[rows]  # rows keep every class at its positions: labels[rows] == labels
    ranks = rankdata(resampled, axis=1)
    m, n = 90, 210
    aucs = (ranks[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    assert variance == pytest.approx(np.var(aucs, ddof=1), rel=0.15)


def test_delong_test_hand_computed_z() -> None:
    # Components of B: psi rows X=0.7: (1, 1), X=0.3: (0, 1), X=0.5: (1, 1).
    v10_a, v01_a = np.array([1.0, 0.75, 0.5]), np.array([0.5, 1.0])
    v10_b, v01_b = np.array([1.0, 0.5, 1.0]), np.array([2 / 3, 1.0])
    auc_a, auc_b = 0.75, 5 / 6
    # D10 = (0, 1/4, -1/2), mean -1/12: sample variance 7/48; D01 = (-1/6, 0): 1/72.
    variance = (7 / 48) / 3 + (1 / 72) / 2  # = 1/18
    assert np.var(v10_a - v10_b, ddof=1) == pytest.approx(7 / 48)
    assert np.var(v01_a - v01_b, ddof=1) == pytest.approx(1 / 72)
    z = (auc_a - auc_b) / math.sqrt(variance)  # -1 / (2 sqrt 2)
    p_value = math.erfc(abs(z) / math.sqrt(2))

    result = delong_test(HAND_LABELS, HAND_SCORES_A, HAND_SCORES_B)
    assert result.auc_a == pytest.approx(auc_a, abs=1e-15)
    assert result.auc_b == pytest.approx(auc_b, abs=1e-15)
    assert result.difference == pytest.approx(-1 / 12, abs=1e-15)
    assert result.variance_of_difference == pytest.approx(1 / 18, abs=1e-15)
    assert result.z == pytest.approx(-1 / (2 * math.sqrt(2)), abs=1e-12)
    assert result.p_value == pytest.approx(p_value, abs=1e-12)
    assert result.p_value == pytest.approx(0.72367, abs=1e-5)


def test_delong_test_identical_and_rank_equivalent_scores() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = rng.normal(size=50) + labels
    for other in (scores, np.exp(scores)):  # same ranks: same components
        result = delong_test(labels, scores, other)
        assert result.difference == 0.0
        assert result.variance_of_difference == 0.0
        assert result.z == 0.0
        assert result.p_value == 1.0


def test_delong_test_detects_a_clearly_better_scorer() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 100)
    good = rng.normal(size=200) + 2.0 * labels
    poor = rng.normal(size=200) + 0.3 * labels
    result = delong_test(labels, good, poor)
    assert result.difference > 0.2
    assert result.z > 0
    assert result.p_value < 1e-3
    reverse = delong_test(labels, poor, good)
    assert reverse.difference == pytest.approx(-result.difference)
    assert reverse.p_value == pytest.approx(result.p_value)


def test_delong_test_p_values_are_calibrated_under_the_null() -> None:
    rng = np.random.default_rng(2024)
    labels = np.repeat([0, 1], 40)
    p_values = []
    for _ in range(300):
        signal = labels * 0.8 + rng.normal(size=80)  # shared image difficulty makes A, B correlated
        scores_a = signal + rng.normal(size=80)
        scores_b = signal + rng.normal(size=80)
        p_values.append(delong_test(labels, scores_a, scores_b).p_value)
    p_values = np.array(p_values)
    assert 0.01 <= np.mean(p_values < 0.05) <= 0.10
    assert 0.35 <= np.mean(p_values < 0.5) <= 0.65


@pytest.mark.parametrize(
    "labels",
    [np.ones(6, dtype=int), np.zeros(6, dtype=int), np.array([1, 0, 0, 0, 0, 0])],
    ids=["all-positive", "all-negative", "one-positive"],
)
def test_delong_rejects_a_single_class(labels: np.ndarray) -> None:
    scores = np.arange(6.0)
    with pytest.raises(StatsError, match="at least 2 positives and 2 negatives") as info:
        delong_auroc(labels, scores)
    assert isinstance(info.value, ValueError) and isinstance(info.value, BenchError)
    with pytest.raises(ValueError, match="single class"):
        delong_test(labels, scores, scores)


def test_delong_rejects_bad_input() -> None:
    with pytest.raises(StatsError, match="labels > 0"):
        delong_auroc(np.array([0, 1, 2, 0, 1]), np.arange(5.0))
    with pytest.raises(StatsError, match="shape"):
        delong_auroc(np.array([0, 1, 0, 1]), np.arange(5.0))
    with pytest.raises(StatsError, match="non-finite"):
        delong_test(np.array([0, 1, 0, 1]), np.arange(4.0), np.array([0, np.nan, 1, 2]))


# --------------------------------------------------------------------------------------------
# Stratified bootstrap
# --------------------------------------------------------------------------------------------


def test_stratified_indices_preserve_classes_and_are_seeded() -> None:
    labels = np.array([2, 0, 1, 1, 0, 2, 2, 0, 1, 1, 1, 0])
    rows = stratified_bootstrap_indices(labels, 200, seed=7)
    assert rows.shape == (200, labels.size) and rows.dtype == np.int64
    assert np.array_equal(labels[rows], np.broadcast_to(labels, rows.shape))
    # With replacement: some resample repeats an image, and every image gets drawn somewhere.
    assert any(np.unique(row).size < labels.size for row in rows)
    assert np.array_equal(np.unique(rows), np.arange(labels.size))

    assert np.array_equal(rows, stratified_bootstrap_indices(labels, 200, seed=7))
    assert not np.array_equal(rows, stratified_bootstrap_indices(labels, 200, seed=8))
    # The first resamples do not depend on how many are drawn.
    assert np.array_equal(rows[:50], stratified_bootstrap_indices(labels, 50, seed=7))


def test_stratified_indices_are_pinned_for_seed_zero() -> None:
    # The draw is part of the results' reproducibility: default_rng(0), resample by resample,
    # class by class in sorted order, rng.integers(0, count, size=count).
    labels = np.array([1, 0, 1, 0, 1])
    rng = np.random.default_rng(0)
    expected = np.empty((2, 5), dtype=np.int64)
    for row in expected:
        row[[1, 3]] = np.array([1, 3])[rng.integers(0, 2, size=2)]
        row[[0, 2, 4]] = np.array([0, 2, 4])[rng.integers(0, 3, size=3)]
    assert np.array_equal(stratified_bootstrap_indices(labels, 2, seed=0), expected)
    assert stratified_bootstrap_indices(labels, 2, seed=0).tolist() == [[2, 3, 0, 3, 0], [0, 1, 0, 1, 4]]


def test_stratified_indices_reject_bad_input() -> None:
    with pytest.raises(StatsError, match="1-D"):
        stratified_bootstrap_indices(np.zeros((2, 2), dtype=int), 10, 0)
    with pytest.raises(StatsError, match="empty"):
        stratified_bootstrap_indices(np.array([], dtype=int), 10, 0)
    with pytest.raises(StatsError, match="positive integer"):
        stratified_bootstrap_indices(np.array([0, 1]), 0, 0)


# --------------------------------------------------------------------------------------------
# Bootstrap intervals
# --------------------------------------------------------------------------------------------


def test_bootstrap_ci_is_the_percentile_interval_of_the_resamples() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 40)
    values = rng.normal(size=40)

    def mean_or_undefined(indices: np.ndarray) -> float | None:
        # Undefined on about a third of the resamples, defined on the full set (arange).
        return None if indices[0] % 3 == 1 else float(values[indices].mean())

    interval = bootstrap_ci(labels, mean_or_undefined, n_resamples=300, seed=9, level=0.9)
    rows = stratified_bootstrap_indices(labels, 300, seed=9)
    kept = np.array([values[row].mean() for row in rows if row[0] % 3 != 1])
    assert 0 < kept.size < 300
    assert interval.n_resamples == 300 and interval.n_valid == kept.size
    assert interval.estimate == values.mean()
    assert interval.low == pytest.approx(np.quantile(kept, 0.05), abs=1e-15)
    assert interval.high == pytest.approx(np.quantile(kept, 0.95), abs=1e-15)
    assert interval.level == 0.9

    wider = bootstrap_ci(labels, mean_or_undefined, n_resamples=300, seed=9, level=0.99)
    assert wider.low < interval.low and wider.high > interval.high


def test_bootstrap_ci_errors() -> None:
    labels = np.repeat([0, 1], 10)
    in_order = list(range(20))
    with pytest.raises(StatsError, match="undefined on the full set"):
        bootstrap_ci(labels, lambda indices: None, n_resamples=10)
    with pytest.raises(StatsError, match="undefined on all 10"):
        bootstrap_ci(labels, lambda indices: 1.0 if indices.tolist() == in_order else math.nan, 10)
    with pytest.raises(StatsError, match="level"):
        bootstrap_ci(labels, lambda indices: 1.0, n_resamples=10, level=95)


def test_bootstrap_ci_covers_a_known_population_auroc() -> None:
    # Normal (label 0) ~ N(0, 1), lesion (label 1) ~ N(d, 1): population AUROC = Phi(d / sqrt 2).
    d = 1.0
    true_auroc = float(norm.cdf(d / math.sqrt(2)))
    rng = np.random.default_rng(123)
    labels = np.repeat([0, 1], [50, 70])
    covered = 0
    n_datasets = 100
    for dataset in range(n_datasets):
        scores = rng.normal(size=labels.size) + d * labels
        statistic = image_statistic("image_auroc", labels, scores=scores)
        interval = bootstrap_ci(labels, statistic, n_resamples=300, seed=dataset)
        assert interval.n_valid == 300
        covered += interval.low <= true_auroc <= interval.high
    assert 88 <= covered <= 99


def test_seed_mean_statistic_uses_the_same_resample_for_every_seed() -> None:
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1], [30, 30])
    shared = rng.normal(size=60) + labels
    seeds = [shared + 0.3 * rng.normal(size=60) for _ in range(3)]
    statistics = [image_statistic("image_auroc", labels, scores=s) for s in seeds]
    mean_statistic = seed_mean_statistic(statistics)

    rows = stratified_bootstrap_indices(labels, 200, seed=1)
    for row in rows[:5]:
        expected = np.mean([roc_auc_score(labels[row] > 0, s[row]) for s in seeds])
        assert mean_statistic(row) == pytest.approx(expected, abs=1e-12)

    interval = bootstrap_ci(labels, mean_statistic, n_resamples=200, seed=1)
    paired_means = [np.mean([stat(row) for stat in statistics]) for row in rows]
    assert interval.estimate == pytest.approx(np.mean([roc_auc_score(labels, s) for s in seeds]))
    assert interval.low == pytest.approx(np.quantile(paired_means, 0.025), abs=1e-12)
    assert interval.high == pytest.approx(np.quantile(paired_means, 0.975), abs=1e-12)

    undefined_once = seed_mean_statistic([statistics[0], lambda indices: None])
    assert undefined_once(rows[0]) is None
    with pytest.raises(StatsError, match="at least one"):
        seed_mean_statistic([])


# --------------------------------------------------------------------------------------------
# Paired bootstrap
# --------------------------------------------------------------------------------------------


def test_paired_bootstrap_identical_statistics() -> None:
    rng = np.random.default_rng(6)
    labels = np.repeat([0, 1], 40)
    statistic = image_statistic("image_auroc", labels, scores=rng.normal(size=80) + labels)
    result = paired_bootstrap(labels, statistic, statistic, n_resamples=200, seed=0)
    assert result.difference == 0.0
    assert result.low == result.high == 0.0
    assert result.p_value == 1.0
    assert result.n_valid == 200


def test_paired_bootstrap_detects_a_clearly_better_method() -> None:
    rng = np.random.default_rng(7)
    labels = np.repeat([0, 1, 2], [60, 70, 70])
    good = image_statistic("image_auroc", labels, scores=rng.normal(size=200) + 2.0 * (labels > 0))
    poor = image_statistic("image_auroc", labels, scores=rng.normal(size=200) + 0.3 * (labels > 0))
    result = paired_bootstrap(labels, good, poor, n_resamples=500, seed=0)
    assert result.difference == pytest.approx(result.estimate_a - result.estimate_b)
    assert result.difference > 0.2 and result.low > 0.1
    assert result.p_value <= 0.004
    reverse = paired_bootstrap(labels, poor, good, n_resamples=500, seed=0)
    assert reverse.difference == pytest.approx(-result.difference)
    assert reverse.high < -0.1
    assert reverse.p_value == result.p_value


def test_paired_bootstrap_p_value_definition() -> None:
    rng = np.random.default_rng(8)
    labels = np.repeat([0, 1], [25, 15])
    values = rng.normal(size=40) + 0.25

    def mean(indices: np.ndarray) -> float:
        return float(values[indices].mean())

    def zero(indices: np.ndarray) -> float:
        return 0.0

    rows = stratified_bootstrap_indices(labels, 400, seed=3)
    diffs = np.array([values[row].mean() for row in rows])
    assert values.mean() > 0 and 0 < np.mean(diffs <= 0) < 0.5  # a p-value strictly inside (0, 1)

    result = paired_bootstrap(labels, mean, zero, n_resamples=400, seed=3, level=0.8)
    assert result.p_value == pytest.approx(2 * np.mean(diffs <= 0), abs=1e-15)
    assert result.low == pytest.approx(np.quantile(diffs, 0.1), abs=1e-15)
    assert result.high == pytest.approx(np.quantile(diffs, 0.9), abs=1e-15)
    flipped = paired_bootstrap(labels, zero, mean, n_resamples=400, seed=3, level=0.8)
    assert flipped.p_value == pytest.approx(2 * np.mean(-diffs >= 0), abs=1e-15)
    assert flipped.low == pytest.approx(-result.high, abs=1e-15)


def test_paired_bootstrap_counts_resampled_differences_at_zero_as_the_other_side() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    gains = np.array([2, -1, 0, 1, -1, 0])  # integer sums: resampled differences are often exactly 0

    def total(indices: np.ndarray) -> float:
        return float(gains[indices].sum())

    rows = stratified_bootstrap_indices(labels, 300, seed=4)
    diffs = gains[rows].sum(axis=1)
    assert gains.sum() > 0 and np.mean(diffs == 0) > 0.05 and np.mean(diffs <= 0) < 0.5
    result = paired_bootstrap(labels, total, lambda indices: 0.0, n_resamples=300, seed=4)
    assert result.p_value == pytest.approx(2 * np.mean(diffs <= 0), abs=1e-15)


# --------------------------------------------------------------------------------------------
# Metrics on resamples
# --------------------------------------------------------------------------------------------


def _image_inputs(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.round(rng.normal(size=labels.size) + (labels > 0), 1)  # ties
    logits = np.round(rng.normal(size=(labels.size, 3)) + np.eye(3)[labels], 1)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return scores, probs


def test_metric_keys_split_the_protocol_metrics() -> None:
    assert IMAGE_METRIC_KEYS == ("image_auroc", "class_auroc", "class_accuracy", "class_balanced_accuracy")
    assert PIXEL_METRIC_KEYS == ("pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_dice")
    assert sorted(IMAGE_METRIC_KEYS + PIXEL_METRIC_KEYS) == sorted(METRIC_KEYS)


@pytest.mark.parametrize("metric", IMAGE_METRIC_KEYS)
def test_image_statistic_equals_image_metrics_on_resamples(metric: str) -> None:
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 3, 90)
    scores, probs = _image_inputs(rng, labels)
    statistic = image_statistic(metric, labels, scores=scores, probs=probs)
    resamples = [*stratified_bootstrap_indices(labels, 10, seed=2), rng.integers(0, 90, 90)]
    resamples.append(np.flatnonzero(labels > 0))  # no normal image
    resamples.append(np.flatnonzero(labels == 2)[[0, 0, 1]])  # a single class
    for indices in resamples:
        expected = image_metric_on(indices, metric, labels, scores, probs)
        got = statistic(indices)
        if expected is None:
            assert got is None
        else:
            assert got == pytest.approx(expected, abs=1e-12)
    if metric in ("image_auroc", "class_auroc"):
        assert statistic(resamples[-1]) is None


def test_image_metric_on_counts_duplicates() -> None:
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.5, 0.4])
    # Drawing the misordered lesion (0.4) twice: negatives {0.1, 0.5}, positives {0.9, 0.4, 0.4}.
    indices = np.array([0, 1, 2, 3, 3])
    assert image_metric_on(indices, "image_auroc", labels, scores) == pytest.approx(4 / 6)
    assert image_statistic("image_auroc", labels, scores=scores)(indices) == pytest.approx(4 / 6)


def test_image_statistic_errors() -> None:
    labels = np.array([0, 1, 2, 1])
    with pytest.raises(StatsError, match="unknown image metric"):
        image_statistic("pixel_auroc", labels, scores=np.arange(4.0))
    with pytest.raises(StatsError, match="needs the image scores"):
        image_statistic("image_auroc", labels, probs=np.full((4, 3), 1 / 3))
    with pytest.raises(StatsError, match="needs the class probabilities"):
        image_metric_on(np.arange(4), "class_auroc", labels, scores=np.arange(4.0))
    with pytest.raises(StatsError, match="shape"):
        image_statistic("image_auroc", labels, scores=np.arange(3.0))
    with pytest.raises(StatsError, match=r"indices must lie in \[0, 4\)"):
        image_statistic("image_auroc", labels, scores=np.arange(4.0))(np.array([0, 4]))


def _pixel_inputs(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray | None], np.ndarray]:
    labels = np.repeat([0, 1, 2], 4)
    maps = rng.random((12, 10, 12)).astype(np.float32)
    masks: list[np.ndarray | None] = []
    for i, label in enumerate(labels):
        mask = np.zeros((10, 12), dtype=bool)
        if label > 0:
            mask[2 + i % 3 : 6 + i % 3, 3:8] = True
            mask[8, 10 - i % 4] = True  # a second, one-pixel region
            maps[i][mask] += 0.4 * label
        masks.append(None if i in (1, 6) else mask)  # two images excluded from pixel metrics
    return labels, masks, maps


@pytest.mark.parametrize("metric", PIXEL_METRIC_KEYS)
def test_pixel_metric_on_equals_pooling_the_explicit_resample(metric: str) -> None:
    rng = np.random.default_rng(10)
    labels, masks, maps = _pixel_inputs(rng)
    statistic = pixel_statistic(metric, list(maps), masks)
    for indices in stratified_bootstrap_indices(labels, 4, seed=0):
        used = [i for i in indices if masks[i] is not None]
        assert len(set(used)) < len(used)  # this resample repeats an image
        expected = pixel_metrics(np.stack([maps[i] for i in used]), np.stack([masks[i] for i in used]))
        assert statistic(indices) == pytest.approx(expected.values[metric], abs=1e-12)
        assert pixel_metric_on(indices, metric, maps, masks) == statistic(indices)
    duplicated = np.array([0, 2, 4, 4, 4, 9])
    expected = pixel_metrics(maps[[0, 2, 4, 4, 4, 9]], np.stack([masks[i] for i in duplicated]))
    assert pixel_metric_on(duplicated, metric, maps, masks) == pytest.approx(expected.values[metric])
    assert pixel_metric_on(duplicated, metric, maps, masks) != pytest.approx(
        pixel_metrics(maps[[0, 2, 4, 9]], np.stack([masks[i] for i in (0, 2, 4, 9)])).values[metric]
    )


def test_pixel_metric_undefined_and_errors() -> None:
    rng = np.random.default_rng(12)
    labels, masks, maps = _pixel_inputs(rng)
    normal_only = np.flatnonzero(labels == 0)
    assert pixel_metric_on(normal_only, "pixel_auroc", maps, masks) is None
    assert pixel_metric_on(np.array([1, 6]), "pixel_auroc", maps, masks) is None  # all excluded
    maps_with_gaps: list[np.ndarray | None] = [None if m is None else maps[i] for i, m in enumerate(masks)]
    assert pixel_statistic("pixel_ap", maps_with_gaps, masks)(np.arange(12)) == pytest.approx(
        pixel_metric_on(np.arange(12), "pixel_ap", maps, masks)
    )
    with pytest.raises(StatsError, match="unknown pixel metric"):
        pixel_statistic("image_auroc", maps, masks)
    with pytest.raises(StatsError, match="maps hold 11 image"):
        pixel_statistic("pixel_ap", maps[:11], masks)
    wrong_shape = list(maps)
    wrong_shape[3] = maps[3][:, :5]
    with pytest.raises(StatsError, match="image 3: map shape"):
        pixel_statistic("pixel_ap", wrong_shape, masks)
    with pytest.raises(StatsError, match="image 3: map shape"):
        pixel_metric_on(np.array([3]), "pixel_ap", wrong_shape, masks)
    non_binary = list(masks)
    non_binary[0] = np.full((10, 12), 2)
    with pytest.raises(StatsError, match="binary"):
        pixel_metric_on(np.array([0, 4]), "pixel_ap", maps, non_binary)


def test_empty_indices_are_rejected() -> None:
    labels = np.array([0, 1, 0, 1])
    empty = np.array([], dtype=np.int64)
    with pytest.raises(StatsError, match="indices is empty"):
        image_statistic("class_accuracy", labels, probs=np.full((4, 3), 1 / 3))(empty)
    with pytest.raises(StatsError, match="indices is empty"):
        image_metric_on(empty, "image_auroc", labels, scores=np.arange(4.0))
    with pytest.raises(StatsError, match="indices is empty"):
        pixel_metric_on(empty, "pixel_ap", np.zeros((4, 2, 2)), [None] * 4)


def test_results_from_precomputed_resamples_match_the_bootstrap() -> None:
    rng = np.random.default_rng(13)
    labels = np.repeat([0, 1, 2], [20, 15, 15])
    scores_a = rng.normal(size=50) + (labels > 0)
    scores_b = rng.normal(size=50) + 0.5 * (labels > 0)
    stat_a = image_statistic("image_auroc", labels, scores=scores_a)
    stat_b = image_statistic("image_auroc", labels, scores=scores_b)
    rows = stratified_bootstrap_indices(labels, 150, seed=2)
    values_a = np.array([stat_a(row) for row in rows])
    values_b = np.array([stat_b(row) for row in rows])
    values_b[[3, 7]] = np.nan  # undefined on two resamples
    full = np.arange(50)

    interval = interval_from_resamples(stat_a(full), values_b, level=0.9)
    assert (interval.n_resamples, interval.n_valid) == (150, 148)
    assert interval.low == pytest.approx(np.quantile(np.delete(values_b, [3, 7]), 0.05), abs=1e-15)
    assert interval_from_resamples(stat_a(full), values_a) == bootstrap_ci(labels, stat_a, 150, seed=2)

    paired = paired_from_resamples(stat_a(full), stat_b(full), values_a, values_b, level=0.9)
    assert (paired.n_resamples, paired.n_valid) == (150, 148)
    values_b[[3, 7]] = [stat_b(rows[3]), stat_b(rows[7])]
    assert paired_from_resamples(stat_a(full), stat_b(full), values_a, values_b) == paired_bootstrap(
        labels, stat_a, stat_b, n_resamples=150, seed=2
    )
    with pytest.raises(StatsError, match="same resamples"):
        paired_from_resamples(0.5, 0.5, values_a, values_b[:-1])
    with pytest.raises(StatsError, match="undefined on all 3"):
        interval_from_resamples(0.5, np.full(3, np.nan))
