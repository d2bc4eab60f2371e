"""Tests of bench.metrics against scikit-learn, brute-force references and hand-computed cases.

The fast pixel metrics must agree with the references to 1e-9 (observed: ~1e-15) on random
and adversarial inputs; the brute-force AUPRO and Dice references below loop over every
distinct threshold explicitly and are themselves checked on hand-computed cases.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    roc_auc_score,
)

import bench.metrics as metrics_module
from bench.metrics import (
    AUPRO_FPR_LIMIT,
    MetricResult,
    PixelMetricAccumulator,
    image_metrics,
    pixel_metrics,
)
from bench.results import METRIC_KEYS

TOL = 1e-9
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_dice")


# --------------------------------------------------------------------------------------------
# Brute-force references (slow, obviously correct; fed the float32-cast scores)
# --------------------------------------------------------------------------------------------


def ref_dice(scores: np.ndarray, targets: np.ndarray) -> float:
    """max over every threshold t (all distinct scores, and +inf) of 2TP / (2TP + FP + FN)."""
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & targets)
        fp = np.sum(pred & ~targets)
        fn = np.sum(~pred & targets)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return float(best)


def ref_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """PRO curve with a point at every distinct threshold, trapezoid up to FPR ``limit`` / limit."""
    region_ids, region_scores, n_regions = [], [], 0
    for score_map, mask in zip(maps, masks, strict=True):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        region_ids.append(labels[mask] - 1 + n_regions)  # global region id of each lesion pixel
        region_scores.append(score_map[mask])
        n_regions += n
    ids, scores = np.concatenate(region_ids), np.concatenate(region_scores)
    region_size = np.bincount(ids, minlength=n_regions)
    negatives = maps[~masks]
    points = [(0.0, 0.0)]  # threshold +inf
    for t in np.unique(maps)[::-1]:
        fpr = np.mean(negatives >= t)
        overlap = np.bincount(ids, weights=scores >= t, minlength=n_regions) / region_size
        points.append((float(fpr), float(np.mean(overlap))))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_cut = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_cut) / 2
    return area / limit


def reference_pixel_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    maps32 = np.asarray(maps).astype(np.float32)
    masks = np.asarray(masks).astype(bool)
    if maps32.ndim == 2:  # one image
        maps32, masks = maps32[None], masks[None]
    scores, targets = maps32.ravel(), masks.ravel()
    return {
        "pixel_auroc": float(roc_auc_score(targets, scores)),
        "pixel_ap": float(average_precision_score(targets, scores)),
        "pixel_aupro": ref_aupro(maps32, masks),
        "pixel_dice": ref_dice(scores, targets),
    }


def assert_close(got: dict[str, float], want: dict[str, float], tol: float = TOL) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in want:
        assert abs(got[key] - want[key]) <= tol, f"{key}: got {got[key]!r}, want {want[key]!r}"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def blob_masks(rng: np.random.Generator, n: int, h: int, w: int, normal_every: int = 4) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i % normal_every == 0:
            continue  # a normal image
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(1, h / 4), rng.uniform(1, w / 4)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return masks


def make_case(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, h, w = 5, 12, 14
    masks = blob_masks(rng, n, h, w)
    noise = rng.standard_normal((n, h, w))
    if kind == "random":
        maps = noise + 1.2 * masks
    elif kind == "quantised":  # 3 levels: massive ties between positives and negatives
        maps = np.round(np.clip(0.5 + 0.3 * noise + 0.3 * masks, 0, 1) * 2) / 2
    elif kind == "near_half":  # float64 within 1e-7 of 0.5: a handful of float32 levels
        maps = 0.5 + 1e-7 * np.tanh(noise + masks)
    elif kind == "outliers":
        maps = rng.uniform(0, 1, (n, h, w)) + 0.3 * masks
        maps.flat[rng.choice(maps.size, 12, replace=False)] = 1e30
    elif kind == "negative":
        maps = -5.0 - np.abs(noise) + 0.5 * masks
    elif kind == "signed_zero":  # -0.0 and +0.0 are the same score
        maps = np.where(rng.random((n, h, w)) < 0.5, -0.0, 0.0)
        maps[rng.random((n, h, w)) < 0.2 + 0.3 * masks] = 1.0
    elif kind == "tiny_regions":  # many 1-pixel lesions
        masks = rng.random((n, h, w)) < 0.04
        maps = noise + 1.0 * masks
    elif kind == "integer_scores":
        maps = rng.integers(0, 4, (n, h, w)) + masks.astype(int)
    else:
        raise AssertionError(kind)
    return maps, masks


KINDS = (
    "random",
    "quantised",
    "near_half",
    "outliers",
    "negative",
    "signed_zero",
    "tiny_regions",
    "integer_scores",
)


# --------------------------------------------------------------------------------------------
# References are right (so that the comparisons below mean something)
# --------------------------------------------------------------------------------------------


def test_references_on_hand_computed_case() -> None:
    maps, masks, want = HAND_CASES[1]
    got = reference_pixel_metrics(maps, masks)
    assert_close(got, want, 1e-12)


# --------------------------------------------------------------------------------------------
# Hand-computed tiny cases
# --------------------------------------------------------------------------------------------

HAND_CASES = [
    # (a) 2x2, one positive tied with two negatives.
    #   pos {0.5}, neg {0.5, 0.5, 0.0}: AUROC = (1/2 + 1/2 + 1) / 3 = 2/3.
    #   Threshold 0.5: TP 1, FP 2 -> precision 1/3 at recall 1, AP = 1/3 (trapezoid: 2/3).
    #   Dice: t = 0.5 -> 2/(2+2) = 1/2; t = 0 -> 2/(2+3).
    #   PRO curve (0,0) -> (2/3, 1) (a sloped tie piece) -> (1, 1): at FPR 0.3 PRO = 0.45,
    #   area = 0.3 * 0.45 / 2 = 0.0675, / 0.3 = 0.225.
    (
        np.array([[0.5, 0.5], [0.5, 0.0]]),
        np.array([[1, 0], [0, 0]], dtype=bool),
        {"pixel_auroc": 2 / 3, "pixel_ap": 1 / 3, "pixel_dice": 1 / 2, "pixel_aupro": 0.225},
    ),
    # (b) 3x3, one 8-connected region of 3 pixels ((0,1) and (1,2) touch diagonally).
    #   pos {0.3, 0.3, 0.9}, neg {0.2, 0.1, 0.0, 0.0, 0.5, 0.1} (N = 6).
    #   AUROC: 0.9 beats 6, each 0.3 beats 5 -> 16/18 = 8/9.
    #   AP: recall 1/3 at precision 1 (t 0.9), recall 1 at precision 3/4 (t 0.3) -> 1/3 + 1/2 = 5/6.
    #   Dice: t 0.9 -> 2/4; t 0.3 -> 6/7; t 0.2 -> 6/8 -> 6/7.
    #   PRO: (0,0) -> (0, 1/3) [t 0.9] -> (1/6, 1/3) [t 0.5] -> (1/6, 1) [t 0.3] -> ...
    #   area to 0.3 = 1/6 * 1/3 + (0.3 - 1/6) * 1 = 17/90, / 0.3 = 17/27
    #   (4-connectivity would give 2 regions, PRO(0.9) = 1/2 and 13/18).
    (
        np.array([[0.3, 0.3, 0.2], [0.1, 0.0, 0.9], [0.0, 0.5, 0.1]]),
        np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=bool),
        {"pixel_auroc": 8 / 9, "pixel_ap": 5 / 6, "pixel_dice": 6 / 7, "pixel_aupro": 17 / 27},
    ),
    # (c) two 2x3 images: a 4-pixel region in A, a 1-pixel region in B (PRO averages regions,
    #   not pixels). pos {0.9, 0.9, 0.2, 0.2 | 0.8}, neg {0.1 x 6, 0.3} (N = 7, P = 5).
    #   AUROC: 2*7 + 7 + 2*6 = 33 of 35.
    #   AP: +2/5 at precision 1 (0.9), +1/5 at 1 (0.8), +2/5 at 5/6 (0.2) -> 3/5 + 1/3 = 14/15.
    #   Dice: 4/7, 6/8, 10/11 (t 0.2), 10/17 -> 10/11.
    #   PRO: (0,0) -> (0, 1/4) [0.9: half of A, none of B] -> (0, 3/4) [0.8] -> (1/7, 3/4) [0.3]
    #   -> (1/7, 1) [0.2] -> (1, 1); area = 3/4 * 1/7 + (0.3 - 1/7) = 0.3 - 1/28, / 0.3 = 37/42.
    (
        np.array([[[0.9, 0.9, 0.1], [0.2, 0.2, 0.1]], [[0.1, 0.1, 0.1], [0.1, 0.3, 0.8]]]),
        np.array([[[1, 1, 0], [1, 1, 0]], [[0, 0, 0], [0, 0, 1]]], dtype=bool),
        {"pixel_auroc": 33 / 35, "pixel_ap": 14 / 15, "pixel_dice": 10 / 11, "pixel_aupro": 37 / 42},
    ),
]


@pytest.mark.parametrize("case", range(len(HAND_CASES)))
def test_hand_computed_cases(case: int) -> None:
    maps, masks, want = HAND_CASES[case]
    assert_close(pixel_metrics(maps, masks).values, want, 1e-12)


def test_constant_map() -> None:
    # One threshold: TP = P, FP = N. AUROC 1/2, AP = prevalence, Dice = 2P / (2P + N);
    # the PRO curve is the straight line (0,0) -> (1,1), so AUPRO = 0.3 / 2 = 0.15.
    masks = blob_masks(np.random.default_rng(3), 4, 16, 16)
    p, n = int(masks.sum()), int((~masks).sum())
    got = pixel_metrics(np.full(masks.shape, 0.7), masks).values
    want = {
        "pixel_auroc": 0.5,
        "pixel_ap": p / (p + n),
        "pixel_dice": 2 * p / (2 * p + n),
        "pixel_aupro": 0.15,
    }
    assert_close(got, want, 1e-12)


def test_perfect_map_scores_one() -> None:
    rng = np.random.default_rng(4)
    masks = blob_masks(rng, 6, 16, 16)
    maps = rng.uniform(0, 0.5, masks.shape) + 0.5 * masks  # every lesion pixel above every other
    got = pixel_metrics(maps, masks).values
    assert got == {key: 1.0 for key in PIXEL_KEYS}


def test_inverted_map() -> None:
    # Lesion pixels strictly below every background pixel: AUROC 0, the PRO curve stays at 0
    # up to FPR 1; AP and Dice come from the one threshold that includes everything.
    masks = blob_masks(np.random.default_rng(5), 4, 16, 16)
    p, n = int(masks.sum()), int((~masks).sum())
    got = pixel_metrics(-masks.astype(np.float32), masks).values
    want = {
        "pixel_auroc": 0.0,
        "pixel_ap": p / (p + n),
        "pixel_dice": 2 * p / (2 * p + n),
        "pixel_aupro": 0.0,
    }
    assert_close(got, want, 1e-12)


def test_aupro_is_cut_at_limit_and_normalised() -> None:
    # One positive above all negatives but one: the curve jumps to PRO 1 at FPR 1/N.
    n_neg = 10
    maps = np.array([[*np.linspace(0.0, 0.5, n_neg - 1), 0.95, 0.9]])
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, -1] = True
    got = pixel_metrics(maps, masks).values["pixel_aupro"]
    assert got == pytest.approx((AUPRO_FPR_LIMIT - 1 / n_neg) / AUPRO_FPR_LIMIT, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Random and adversarial inputs vs references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_references(kind: str, seed: int) -> None:
    maps, masks = make_case(kind, seed)
    assert_close(pixel_metrics(maps, masks).values, reference_pixel_metrics(maps, masks))


@pytest.mark.parametrize("kind", ["random", "quantised", "near_half", "signed_zero", "tiny_regions"])
@pytest.mark.parametrize(("sweep_block", "search_block"), [(1, 1), (2, 3), (7, 4), (64, 16)])
def test_block_boundaries(kind: str, sweep_block: int, search_block: int, monkeypatch) -> None:
    """Tiny sweep / search blocks: groups of tied scores and needle runs cross block edges."""
    maps, masks = make_case(kind, 11)
    want = reference_pixel_metrics(maps, masks)
    monkeypatch.setattr(metrics_module, "_SWEEP_BLOCK", sweep_block)
    monkeypatch.setattr(metrics_module, "_SEARCH_BLOCK", search_block)
    assert_close(pixel_metrics(maps, masks).values, want)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("block", [1, 2, 5, 64])
def test_count_sorted_matches_searchsorted(side: str, block: int, monkeypatch) -> None:
    rng = np.random.default_rng(block)
    haystack = np.sort(rng.integers(0, 40, 300).astype(np.float32))
    needles = np.unique(rng.integers(-5, 45, 60)).astype(np.float32)
    monkeypatch.setattr(metrics_module, "_SEARCH_BLOCK", block)
    got, found = metrics_module._count_sorted(haystack, needles, side)
    want = np.searchsorted(haystack, needles, side=side)
    np.testing.assert_array_equal(got, want)
    if side == "left":
        np.testing.assert_array_equal(found, np.isin(needles, haystack))


def test_medium_size_default_blocks_match_sklearn() -> None:
    """More than one search block (65536 negatives) and one sweep block at the default sizes."""
    rng = np.random.default_rng(6)
    masks = blob_masks(rng, 30, 80, 80)
    maps = (rng.standard_normal(masks.shape) + 1.5 * masks).astype(np.float32)
    maps = np.round(maps, 3)  # some ties too
    assert (~masks).sum() > 2 * metrics_module._SEARCH_BLOCK
    got = pixel_metrics(maps, masks).values
    scores, targets = maps.astype(np.float32).ravel(), masks.ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(targets, scores), abs=TOL)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(targets, scores), abs=TOL)


def test_float32_comparison() -> None:
    # Distinct in float64, equal at float32: they tie (AUROC 1/2 as sklearn on float32 values).
    maps = np.array([[0.5, 0.5 + 1e-12]])
    masks = np.array([[False, True]])
    assert pixel_metrics(maps, masks).values["pixel_auroc"] == 0.5


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


def test_streaming_equals_one_call() -> None:
    rng = np.random.default_rng(7)
    masks = blob_masks(rng, 23, 20, 18)
    maps = np.round(rng.standard_normal(masks.shape) + masks, 2)
    one = pixel_metrics(maps, masks)
    acc = PixelMetricAccumulator()
    for lo, hi in [(0, 1), (1, 8), (8, 8), (8, 20), (20, 23)]:
        acc.add(maps[lo:hi], masks[lo:hi])
    assert acc.n_images == 23
    assert acc.n_positive == masks.sum()
    assert acc.n_negative == (~masks).sum()
    assert acc.result() == one
    assert_close(one.values, reference_pixel_metrics(maps, masks))


@functools.cache
def streamed_case() -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    rng = np.random.default_rng(9)
    masks = blob_masks(rng, 23, 12, 10)
    maps = rng.standard_normal(masks.shape) + masks
    return maps, masks, reference_pixel_metrics(maps, masks)


@pytest.mark.parametrize("expected_images", [None, 1, 3, 23, 1000])
@pytest.mark.parametrize("min_chunk", [1, 50, 1 << 16])
def test_capacity_hint_does_not_change_results(
    expected_images: int | None, min_chunk: int, monkeypatch
) -> None:
    """Storage split over many chunks (small hint / chunk size) or one gives the same result."""
    monkeypatch.setattr(metrics_module, "_MIN_CHUNK", min_chunk)
    maps, masks, want = streamed_case()
    acc = PixelMetricAccumulator(expected_images=expected_images)
    for lo in range(0, 23, 4):
        acc.add(maps[lo : lo + 4], masks[lo : lo + 4])
    got = acc.result()
    assert_close(got.values, want)
    assert acc.result() == got  # a second call (storage now one sorted chunk) agrees


def test_result_can_be_called_again_after_more_batches() -> None:
    rng = np.random.default_rng(8)
    masks = blob_masks(rng, 10, 16, 16)
    maps = rng.standard_normal(masks.shape) + masks
    acc = PixelMetricAccumulator()
    acc.add(maps[:5], masks[:5])
    first = acc.result()
    assert acc.result() == first
    assert_close(first.values, reference_pixel_metrics(maps[:5], masks[:5]))
    acc.add(maps[5:], masks[5:])
    assert_close(acc.result().values, reference_pixel_metrics(maps, masks))


def test_regions_are_per_image_and_8_connected() -> None:
    masks = np.zeros((3, 6, 6), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 4:6, 4:6] = True  # a second region
    masks[1, 0, 0] = True  # a third (same position as in image 0, different image)
    masks[2, 5, :] = True  # bottom row of image 2 ...
    acc = PixelMetricAccumulator()
    acc.add(np.zeros(masks.shape), masks)
    assert acc.n_regions == 4  # ... does not connect to image 1, nor image 1 to image 0


def test_single_2d_map_and_integer_masks() -> None:
    maps, masks, want = HAND_CASES[1]
    acc = PixelMetricAccumulator()
    acc.add(maps.astype(np.float64), masks.astype(np.uint8))  # (H, W) and 0/1 integers
    assert_close(acc.result().values, want, 1e-12)
    assert acc.n_images == 1


# --------------------------------------------------------------------------------------------
# Degenerate sets and validation
# --------------------------------------------------------------------------------------------


def test_no_lesion_pixels_omits_metrics_with_note() -> None:
    acc = PixelMetricAccumulator()
    acc.add(np.random.default_rng(0).random((3, 8, 8)), np.zeros((3, 8, 8), dtype=bool))
    result = acc.result()
    assert result.values == {}
    assert len(result.notes) == 1 and "no lesion pixel" in result.notes[0]


def test_no_background_pixels_omits_metrics_with_note() -> None:
    result = pixel_metrics(np.random.default_rng(0).random((2, 4, 4)), np.ones((2, 4, 4), dtype=bool))
    assert result.values == {}
    assert "no background pixel" in result.notes[0]


def test_empty_accumulator() -> None:
    result = PixelMetricAccumulator().result()
    assert result.values == {} and "no anomaly maps" in result.notes[0]


@pytest.mark.parametrize(
    ("maps", "masks", "match"),
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5), bool), "does not match"),
        (np.zeros((2, 2, 4, 4)), np.zeros((2, 2, 4, 4), bool), r"\(B, H, W\)"),
        (np.array([[[0.0, np.nan]]]), np.zeros((1, 1, 2), bool), "non-finite"),
        (np.array([[[0.0, -np.inf]]]), np.zeros((1, 1, 2), bool), "non-finite"),
        (np.array([[[0.0, 1e39]]]), np.zeros((1, 1, 2), bool), "float32 range"),
        (np.zeros((1, 2, 2)), np.array([[[0, 0.5], [1, 0]]]), "binary"),
        (np.zeros((1, 2, 2)), np.array([[[0, 2], [1, 0]]]), "binary"),
        (np.zeros((1, 2, 2), dtype=complex), np.zeros((1, 2, 2), bool), "real-valued"),
    ],
)
def test_add_validates(maps: np.ndarray, masks: np.ndarray, match: str) -> None:
    acc = PixelMetricAccumulator()
    with pytest.raises(ValueError, match=match):
        acc.add(maps, masks)
    assert acc.n_images == 0 and acc.n_positive == 0 and acc.n_negative == 0


def test_add_rejects_a_second_resolution() -> None:
    acc = PixelMetricAccumulator()
    acc.add(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="evaluation"):
        acc.add(np.zeros((1, 8, 8)), np.zeros((1, 8, 8), bool))


# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


def random_probs(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    logits = rng.standard_normal((labels.size, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(3))
def test_image_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 60)
    scores = rng.standard_normal(60) + (labels > 0)
    probs = random_probs(rng, labels)
    result = image_metrics(labels, scores, probs)
    assert result.notes == []
    assert result.values == pytest.approx(
        {
            "image_auroc": roc_auc_score(labels > 0, scores),
            "class_auroc": roc_auc_score(labels, probs, multi_class="ovr", average="macro"),
            "class_accuracy": accuracy_score(labels, probs.argmax(1)),
            "class_balanced_accuracy": balanced_accuracy_score(labels, probs.argmax(1)),
        },
        abs=1e-12,
    )


def test_image_metrics_hand_computed() -> None:
    labels = np.array([0, 0, 1, 2])
    scores = np.array([0.1, 0.6, 0.5, 0.9])  # lesion 0.5 loses to normal 0.6: 3/4
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # normal -> normal (right)
            [0.3, 0.6, 0.1],  # normal -> benign (wrong)
            [0.2, 0.7, 0.1],  # benign -> benign (right)
            [0.1, 0.5, 0.4],  # malignant -> benign (wrong)
        ]
    )
    # OvR AUROC: normal col [.8,.3 | .2,.1] -> 1; benign col [.7 | .1,.6,.5] -> 1;
    # malignant col [.4 | .1,.1,.1] -> 1. Accuracy 2/4; recalls 1/2, 1, 0 -> 1/2.
    result = image_metrics(labels, scores, probs)
    assert result.values == pytest.approx(
        {"image_auroc": 0.75, "class_auroc": 1.0, "class_accuracy": 0.5, "class_balanced_accuracy": 0.5},
        abs=1e-12,
    )


def test_image_metrics_without_normal_images() -> None:
    # UDIAT-like: benign and malignant only. image_auroc is undefined -> omitted with a note;
    # class_auroc is the OvR mean over benign and malignant using the full columns:
    # benign col [.6, .5 | .4, .7] -> 1/2 (0.6 and 0.5 beat 0.4, lose to 0.7: 2/4);
    # malignant col [.3, .6 | .1, .3] -> (0.3 ties 0.3 -> 1/2, 0.3 beats 0.1, 0.6 beats both) = 3.5/4.
    labels = np.array([1, 1, 2, 2])
    probs = np.array([[0.3, 0.6, 0.1], [0.2, 0.5, 0.3], [0.0, 0.4, 0.6], [0.0, 0.7, 0.3]])
    result = image_metrics(labels, np.array([0.2, 0.4, 0.1, 0.3]), probs)
    assert "image_auroc" not in result.values
    assert result.values["class_auroc"] == pytest.approx((0.5 + 3.5 / 4) / 2, abs=1e-12)
    assert result.values["class_accuracy"] == pytest.approx(0.75)  # argmax: 1, 1, 2, 1
    assert result.values["class_balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert any("image_auroc omitted" in note and "lesion" in note for note in result.notes)
    assert any("absent" in note and "normal" in note for note in result.notes)
    assert all(np.isfinite(v) for v in result.values.values())


def test_image_metrics_single_class() -> None:
    labels = np.array([2, 2, 2])
    probs = np.array([[0.1, 0.2, 0.7]] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warnings leak out
        result = image_metrics(labels, np.array([0.1, 0.2, 0.3]), probs)
    assert set(result.values) == {"class_accuracy", "class_balanced_accuracy"}
    assert any("class_auroc omitted" in note for note in result.notes)
    assert any("image_auroc omitted" in note for note in result.notes)


def test_image_metrics_optional_outputs() -> None:
    labels = np.array([0, 1, 2, 1])
    assert set(image_metrics(labels, np.array([0.0, 1.0, 2.0, 3.0])).values) == {"image_auroc"}
    probs = np.full((4, 3), 1 / 3)
    assert "image_auroc" not in image_metrics(labels, None, probs).values


@pytest.mark.parametrize(
    ("labels", "scores", "probs", "match"),
    [
        (np.array([0, 3]), np.zeros(2), None, r"\{0, 1, 2\}"),
        (np.array([0.0, 1.5]), np.zeros(2), None, "integer"),
        (np.array([], dtype=int), np.zeros(0), None, "empty"),
        (np.array([0, 1]), np.zeros(3), None, "shape"),
        (np.array([0, 1]), np.array([0.0, np.nan]), None, "non-finite"),
        (np.array([0, 1]), None, np.ones((2, 3)), "sum to 1"),
        (np.array([0, 1]), None, np.full((2, 2), 0.5), "shape"),
        (np.array([0, 1]), None, np.array([[1.5, -0.5, 0.0], [1.0, 0.0, 0.0]]), r"\[0, 1\]"),
    ],
)
def test_image_metrics_validates(labels, scores, probs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        image_metrics(labels, scores, probs)


# --------------------------------------------------------------------------------------------
# MetricResult
# --------------------------------------------------------------------------------------------


def test_metric_result_keys_and_merge() -> None:
    maps, masks, _ = HAND_CASES[2]
    pixel = pixel_metrics(maps, masks)
    image = image_metrics(np.array([1, 2]), np.array([0.1, 0.2]), None)
    merged = image.merge(pixel)
    assert set(merged.values) == set(PIXEL_KEYS)
    assert set(merged.values) <= set(METRIC_KEYS)
    assert merged.notes == image.notes
    with pytest.raises(ValueError, match="both define"):
        pixel.merge(pixel)
    with pytest.raises(ValueError, match="unknown metric"):
        MetricResult({"pixel_f1": 0.5})
    with pytest.raises(ValueError, match="outside"):
        MetricResult({"pixel_ap": float("nan")})
