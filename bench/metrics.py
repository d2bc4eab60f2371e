"""Metrics of the protocol: image-level detection/classification and pooled pixel-level localisation.

Every value is in [0, 1]; the keys are :data:`bench.results.METRIC_KEYS`. A metric that is
undefined for a target set (e.g. ``image_auroc`` on UDIAT, which has no normal image) is
*omitted* from :attr:`MetricResult.values` and the reason is appended to
:attr:`MetricResult.notes`; no NaN is ever returned. Definitions and measured speed are in
``docs/metrics.md``.

Image level (:func:`image_metrics`, scikit-learn on small arrays):

* ``image_auroc``: binary AUROC, normal (0) vs lesion (benign or malignant = 1), from scores.
* ``class_auroc``: macro one-vs-rest AUROC of the (n, 3) probabilities over the classes
  present in the targets (at least two), each class scored by its own probability column.
* ``class_accuracy`` / ``class_balanced_accuracy``: of ``argmax(probs)`` (first maximum
  wins ties); balanced accuracy is the mean recall over the classes present in the targets.

Pixel level (:class:`PixelMetricAccumulator`), pooled over all pixels of all test images at
the harness's evaluation resolution (normal images count as all-zero masks). Scores are
compared at float32 precision:

* ``pixel_auroc``: exact ROC AUC, ties between a positive and a negative count 1/2
  (identical to ``sklearn.metrics.roc_auc_score``).
* ``pixel_ap``: step-wise average precision ``sum_n (R_n - R_{n-1}) P_n`` over the distinct
  thresholds (identical to ``sklearn.metrics.average_precision_score``; never trapezoid).
* ``pixel_aupro``: area under the per-region-overlap vs false-positive-rate curve up to
  FPR 0.3, divided by 0.3. Regions are the 8-connected components of each image's mask;
  ``PRO(t)`` is the mean over all regions of all images of the fraction of the region's
  pixels with score >= t, ``FPR(t)`` the fraction of all negative pixels with score >= t.
  The curve has a point at every distinct threshold (plus the origin), joined linearly,
  and is cut at FPR 0.3 by linear interpolation.
* ``pixel_dice``: ``max_t 2TP / (2TP + FP + FN)`` over binarisations ``score >= t``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from bench.results import METRIC_KEYS
from bench.types import CLASSES

__all__ = [
    "AUPRO_FPR_LIMIT",
    "PROB_SUM_TOLERANCE",
    "MetricResult",
    "PixelMetricAccumulator",
    "image_metrics",
    "pixel_metrics",
]

#: False-positive-rate limit of ``pixel_aupro`` (the area is divided by it).
AUPRO_FPR_LIMIT = 0.3

#: Tolerance on ``probs.sum(axis=1) == 1`` accepted by :func:`image_metrics`.
PROB_SUM_TOLERANCE = 1e-3

# Regions of a ground-truth mask are its 8-connected components.
_EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)

# Block length of the cache-friendly searchsorted (2**16 float32 = 256 KiB, fits in L2).
_SEARCH_BLOCK = 1 << 16

# Smallest storage chunk (elements) of the accumulator.
_MIN_CHUNK = 1 << 16

# Positive pixels handled per step of the final sweep (temporaries stay a few MB).
_SWEEP_BLOCK = 1 << 20

_SIGN_BIT = np.uint32(0x80000000)


@dataclass
class MetricResult:
    """Metric values (keys from :data:`bench.results.METRIC_KEYS`) and notes on omitted or
    adapted metrics.

    ``values`` never holds NaN: an undefined metric is absent and ``notes`` says why.
    """

    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key, value in self.values.items():
            if key not in METRIC_KEYS:
                raise ValueError(f"unknown metric key {key!r}; expected one of {METRIC_KEYS}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"metric {key} = {value!r} is outside [0, 1]")

    def merge(self, other: MetricResult) -> MetricResult:
        """A new result with the values and notes of both (a key present in both is an error)."""
        clash = sorted(set(self.values) & set(other.values))
        if clash:
            raise ValueError(f"cannot merge metric results: both define {clash}")
        return MetricResult({**self.values, **other.values}, [*self.notes, *other.notes])


# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


def _as_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels is empty: there are no images to evaluate")
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"labels must be integer class indices, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise ValueError("labels must be integer class indices, got non-integer values")
    bad = ~np.isin(arr, np.arange(len(CLASSES)))
    if bad.any():
        raise ValueError(
            f"labels must be in {{0, 1, 2}} (normal, benign, malignant); "
            f"{int(bad.sum())} value(s) are not, e.g. {arr[bad][0]!r} at index {int(np.flatnonzero(bad)[0])}"
        )
    return arr.astype(np.int64)


def _as_finite_float(name: str, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape} to match labels, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        where = np.argwhere(~finite)[0]
        raise ValueError(
            f"{name} contains {int((~finite).sum())} non-finite value(s) (NaN or inf), "
            f"first at index {tuple(int(i) for i in where)}"
        )
    return arr


def image_metrics(
    labels: np.ndarray,
    scores: np.ndarray | None,
    probs: np.ndarray | None = None,
) -> MetricResult:
    """Image-level metrics of one test set.

    Args:
        labels: (n,) class indices into :data:`bench.types.CLASSES` (0 normal, 1 benign,
            2 malignant).
        scores: (n,) image anomaly scores (higher = more likely lesion), or ``None`` when
            the method does not detect; gives ``image_auroc``.
        probs: (n, 3) class probabilities in ``CLASSES`` order (rows sum to 1 within
            :data:`PROB_SUM_TOLERANCE`), or ``None`` when the method does not classify;
            gives ``class_auroc``, ``class_accuracy`` and ``class_balanced_accuracy``.

    Returns:
        The defined metrics; undefined ones (a single class in the targets) are omitted with
        a note, and a class missing from the targets is noted where it changes a metric.

    Raises:
        ValueError: on wrong shapes, labels outside {0, 1, 2}, non-finite scores or
            probabilities that are not probabilities.
    """
    y = _as_labels(labels)
    n = y.size
    result = MetricResult()
    counts = np.bincount(y, minlength=len(CLASSES))
    present = np.flatnonzero(counts)
    absent_names = [CLASSES[k].value for k in range(len(CLASSES)) if counts[k] == 0]

    if scores is not None:
        s = _as_finite_float("scores", scores, (n,))
        lesion = y > 0
        n_lesion = int(lesion.sum())
        if 0 < n_lesion < n:
            result.values["image_auroc"] = float(roc_auc_score(lesion, s))
        else:
            only = "lesion (benign or malignant)" if n_lesion == n else "normal"
            result.notes.append(
                f"image_auroc omitted: all {n} target images are {only}, so normal-vs-lesion "
                "AUROC is undefined"
            )

    if probs is not None:
        p = _as_finite_float("probs", probs, (n, len(CLASSES)))
        if p.min() < -PROB_SUM_TOLERANCE or p.max() > 1 + PROB_SUM_TOLERANCE:
            raise ValueError(f"probs must lie in [0, 1], got values in [{p.min():.6g}, {p.max():.6g}]")
        sums = p.sum(axis=1)
        off = np.abs(sums - 1.0) > PROB_SUM_TOLERANCE
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise ValueError(
                f"probs rows must sum to 1 (softmax over {[c.value for c in CLASSES]}); "
                f"{int(off.sum())} row(s) do not, e.g. row {i} sums to {sums[i]:.6g}"
            )
        pred = p.argmax(axis=1)
        result.values["class_accuracy"] = float(np.mean(pred == y))
        with warnings.catch_warnings():
            # "y_pred contains classes not in y_true": the mean recall is then taken over the
            # classes present in the targets, which is the definition we want.
            warnings.simplefilter("ignore", UserWarning)
            result.values["class_balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        if len(present) >= 2:
            per_class = [roc_auc_score(y == k, p[:, k]) for k in present]
            result.values["class_auroc"] = float(np.mean(per_class))
        else:
            result.notes.append(
                f"class_auroc omitted: the targets hold a single class "
                f"({CLASSES[int(present[0])].value}), so one-vs-rest AUROC is undefined"
            )
        if absent_names:
            used = ", ".join(CLASSES[int(k)].value for k in present)
            msg = (
                f"class(es) absent from the targets: {', '.join(absent_names)}; "
                f"class_balanced_accuracy is the mean recall over {used}"
            )
            if len(present) >= 2:
                msg += f", class_auroc the macro one-vs-rest AUROC over {used} (full probability columns)"
            result.notes.append(msg)
    return result


# --------------------------------------------------------------------------------------------
# Pixel level


def _float32_to_ordered_uint32(values: np.ndarray) -> np.ndarray:
    """Map float32 (no NaN, no -0.0) to uint32 so that unsigned order equals float order."""
    bits = values.view(np.uint32)
    return np.where(bits >= _SIGN_BIT, ~bits, bits | _SIGN_BIT)


def _ordered_uint32_to_float32(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_float32_to_ordered_uint32`."""
    return np.where(keys >= _SIGN_BIT, keys ^ _SIGN_BIT, ~keys).view(np.float32)


class _ChunkedBuffer:
    """An append-only 1-D array kept as a few large chunks, joined once by :meth:`contiguous`.

    Each new chunk is a fresh ``np.empty`` at least as large as everything stored so far
    (numpy backs such allocations with huge pages; untouched capacity costs no memory), so
    there are O(log n) chunks and nothing is copied until :meth:`contiguous`, which copies
    each chunk once and frees it right after. With a capacity hint that is never exceeded
    there is a single chunk and no copy at all.
    """

    def __init__(self, dtype: type) -> None:
        self._dtype = dtype
        self._chunks: list[np.ndarray] = []  # all but the last are exactly filled
        self._fill = 0  # elements used in the last chunk
        self.size = 0

    def reserve(self, n: int, capacity_hint: int = 0) -> np.ndarray:
        """The writable slice for the next ``n`` elements."""
        if not self._chunks or self._chunks[-1].size - self._fill < n:
            if self._chunks:
                self._chunks[-1] = self._chunks[-1][: self._fill]
            capacity = max(n, self.size, capacity_hint - self.size, _MIN_CHUNK)
            self._chunks.append(np.empty(capacity, dtype=self._dtype))
            self._fill = 0
        out = self._chunks[-1][self._fill : self._fill + n]
        self._fill += n
        self.size += n
        return out

    def contiguous(self) -> np.ndarray:
        """All stored elements as one array (the buffer then holds just that array)."""
        if len(self._chunks) == 1:
            return self._chunks[0][: self.size]
        joined = np.empty(self.size, dtype=self._dtype)
        self._chunks[-1] = self._chunks[-1][: self._fill]
        at = 0
        while self._chunks:
            chunk = self._chunks.pop(0)
            joined[at : at + chunk.size] = chunk
            at += chunk.size
            del chunk
        self._chunks = [joined]
        self._fill = joined.size
        return joined


def _count_sorted(haystack: np.ndarray, needles: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
    """``np.searchsorted(haystack, needles, side)`` for sorted ``needles``, block by block; and
    whether ``haystack`` holds each needle (``haystack[result] == needle``, side ``left`` only).

    Same result as one call, but each block's searches stay inside a cache-sized slice of
    ``haystack`` (about 1.5x faster on the ~46M negatives of a BUSI-sized test set), and the
    equality probe reads from that same slice.
    """
    n = haystack.size
    out = np.empty(needles.size, dtype=np.int64)
    found = np.zeros(needles.size, dtype=bool)
    block = _SEARCH_BLOCK
    firsts = haystack[::block]
    # The answer for a needle lies in block c (inclusive of its end) when
    # firsts[c] < needle <= firsts[c+1] (side left) or firsts[c] <= needle < firsts[c+1]
    # (side right); needles are sorted, so each block's needles are a contiguous run.
    starts = np.searchsorted(needles, firsts, side="right" if side == "left" else "left")
    starts[0] = 0
    ends = np.append(starts[1:], needles.size)
    for c, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        if lo < hi:
            offset = c * block
            part = haystack[offset : offset + block + 1]  # one more: the next block's first
            run = needles[lo:hi]
            index = np.searchsorted(part[:block], run, side=side)
            out[lo:hi] = index
            out[lo:hi] += offset
            if side == "left":
                np.equal(part[np.minimum(index, part.size - 1)], run, out=found[lo:hi])
                found[lo:hi] &= index + offset < n
    return out, found


def _region_sizes(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per positive pixel of ``masks`` (B, H, W), in ``masks[masks]`` order, the size of its
    8-connected region (uint64); and the number of regions.

    Each image is labelled on the bounding box of its mask only (2-3x faster than labelling
    whole images); row-major order inside the box is the order of ``masks[masks]``.
    """
    rows_any = masks.any(axis=2)
    cols_any = masks.any(axis=1)
    parts = []
    total_regions = 0
    for i in np.flatnonzero(rows_any.any(axis=1)).tolist():
        rows = np.flatnonzero(rows_any[i])
        cols = np.flatnonzero(cols_any[i])
        box = masks[i, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        labels, n_regions = ndimage.label(box, structure=_EIGHT_CONNECTIVITY)
        region_of_pixel = labels[box]
        parts.append(np.bincount(region_of_pixel).astype(np.uint64)[region_of_pixel])
        total_regions += int(n_regions)
    sizes = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
    return sizes, total_regions


class PixelMetricAccumulator:
    """Streaming pooled pixel metrics (AUROC, AP, AUPRO, Dice) over a test set.

    Call :meth:`add` batch by batch, then :meth:`result`. Only scores are kept, compared at
    float32 precision: each negative (background) pixel's score as float32 (4 bytes), and for
    each positive (lesion) pixel its score packed with the size of its 8-connected region into
    one uint64 (8 bytes). A 780-image 256x256 test set with 10% lesion pixels holds ~220 MB.

    :meth:`result` sorts both arrays once and evaluates every metric exactly from counts at the
    distinct positive scores (see ``docs/metrics.md``); it may be called again after more
    :meth:`add` calls.
    """

    def __init__(self, expected_images: int | None = None) -> None:
        """``expected_images``: the number of test images, if known; lets the accumulator
        reserve its memory once instead of growing (optional, any value is safe)."""
        self._expected_images = expected_images
        self._neg = _ChunkedBuffer(np.float32)
        self._pos = _ChunkedBuffer(np.uint64)  # ordered score bits << 32 | region size
        self._n_regions = 0
        self._n_images = 0
        self._image_shape: tuple[int, int] | None = None

    @property
    def n_images(self) -> int:
        """Images added so far."""
        return self._n_images

    @property
    def n_positive(self) -> int:
        """Lesion pixels added so far."""
        return self._pos.size

    @property
    def n_negative(self) -> int:
        """Background pixels added so far."""
        return self._neg.size

    @property
    def n_regions(self) -> int:
        """8-connected lesion regions added so far."""
        return self._n_regions

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Add a batch of anomaly maps and their ground-truth masks.

        Args:
            maps: (B, H, W) (or a single (H, W)) real anomaly scores, higher = more anomalous.
                Cast to float32; every value must be finite at float32.
            masks: same shape, boolean or 0/1 valued (normal images are all zero).

        Raises:
            ValueError: shapes differ (from each other or from earlier batches), maps are not
                real or not finite at float32, or masks are not binary. Nothing is added then.
        """
        maps = np.asarray(maps)
        masks = np.asarray(masks)
        if maps.ndim == 2:
            maps = maps[None]
        if masks.ndim == 2:
            masks = masks[None]
        if maps.ndim != 3:
            raise ValueError(f"maps must have shape (B, H, W), got {maps.shape}")
        if masks.shape != maps.shape:
            raise ValueError(f"masks shape {masks.shape} does not match maps shape {maps.shape}")
        image_shape = (int(maps.shape[1]), int(maps.shape[2]))
        if self._image_shape is not None and image_shape != self._image_shape:
            raise ValueError(
                f"maps of {image_shape[0]}x{image_shape[1]} after earlier batches of "
                f"{self._image_shape[0]}x{self._image_shape[1]}: pixel metrics pool one evaluation "
                "resolution, resize maps and masks to it first"
            )
        if image_shape[0] * image_shape[1] >= 1 << 32:
            raise ValueError(
                f"maps of {image_shape[0]}x{image_shape[1]} are too large (region sizes are uint32)"
            )
        if maps.dtype == bool or not (
            np.issubdtype(maps.dtype, np.floating) or np.issubdtype(maps.dtype, np.integer)
        ):
            raise ValueError(f"maps must be a real-valued (float) array, got dtype {maps.dtype}")
        if maps.size == 0:
            return

        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            scores = maps.astype(np.float32, copy=False)
        finite = np.isfinite(scores)
        if not finite.all():
            bad = ~finite
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            n_bad = int(bad.sum())
            if np.isfinite(maps[first]):
                raise ValueError(
                    f"maps contain {n_bad} value(s) beyond the float32 range (|x| > 3.4e38) that "
                    f"overflow to inf, first at (image, row, col) {first} of this batch; rescale the maps"
                )
            raise ValueError(
                f"maps contain {n_bad} non-finite value(s) (NaN or inf), "
                f"first at (image, row, col) {first} of this batch"
            )
        del finite

        if masks.dtype != bool:
            if not (np.issubdtype(masks.dtype, np.integer) or np.issubdtype(masks.dtype, np.floating)):
                raise ValueError(f"masks must be boolean or 0/1, got dtype {masks.dtype}")
            binary = (masks == 0) | (masks == 1)
            if not binary.all():
                first = tuple(int(i) for i in np.argwhere(~binary)[0])
                raise ValueError(
                    f"masks must be binary (bool or 0/1); found value {masks[first]!r} at "
                    f"(image, row, col) {first} of this batch; threshold the resized masks first"
                )
            masks = masks == 1

        # Capacity for the expected test set: every pixel for negatives, a quarter for positives.
        hint = (self._expected_images or 0) * image_shape[0] * image_shape[1]
        sizes, n_regions = _region_sizes(masks)
        pos = scores[masks]
        pos += np.float32(0.0)  # -0.0 -> +0.0: equal scores must have equal bits below
        packed = self._pos.reserve(pos.size, hint // 4)
        packed[:] = _float32_to_ordered_uint32(pos)
        packed <<= np.uint64(32)
        packed |= sizes

        inverse = ~masks
        neg = self._neg.reserve(int(np.count_nonzero(inverse)), hint)
        neg[:] = scores[inverse]

        self._n_regions += n_regions
        self._n_images += int(maps.shape[0])
        self._image_shape = image_shape

    def result(self) -> MetricResult:
        """Pooled ``pixel_auroc``, ``pixel_ap``, ``pixel_aupro`` and ``pixel_dice``.

        All four are omitted, with a note, when no image was added or when the pooled pixels
        hold no lesion pixel or no background pixel.
        """
        if self._n_images == 0:
            return MetricResult(notes=["pixel metrics omitted: no anomaly maps were evaluated"])
        if self._pos.size == 0:
            return MetricResult(
                notes=[
                    f"pixel metrics omitted: the {self._n_images} evaluated images have no lesion "
                    "pixel (all-normal masks), so pixel AUROC/AP/AUPRO/Dice are undefined"
                ]
            )
        if self._neg.size == 0:
            return MetricResult(
                notes=[
                    f"pixel metrics omitted: every pixel of the {self._n_images} evaluated images "
                    "is lesion (no background pixel), so pixel AUROC/AP/AUPRO/Dice are undefined"
                ]
            )
        neg = self._neg.contiguous()
        neg.sort()  # in place; the order of the stored pixels does not matter
        packed = self._pos.contiguous()
        packed.sort()
        return MetricResult(values=_pixel_values_from_sorted(neg, packed, self._n_regions))


def _pixel_values_from_sorted(neg: np.ndarray, packed: np.ndarray, n_regions: int) -> dict[str, float]:
    """The four pixel metrics from ascending negative scores and ascending packed positives.

    Sweeps the positives from the highest score down in blocks of :data:`_SWEEP_BLOCK`
    pixels, so every temporary is a few MB (fresh 40 MB arrays cost more in page faults than
    the arithmetic done on them).
    """
    n_pos = int(packed.size)
    sweep = _Sweep(neg, n_pos, n_regions)
    desc = packed[::-1]
    low_bits = np.uint64(0xFFFFFFFF)
    shift = np.uint64(32)
    weight_before = 0.0  # sum of 1 / region size over the pixels of earlier blocks
    for start in range(0, n_pos, _SWEEP_BLOCK):
        stop = min(start + _SWEEP_BLOCK, n_pos)
        chunk = desc[start:stop]
        score_keys = chunk >> shift
        # Last pixel of each group of equal scores that ends in this block.
        is_last = np.empty(score_keys.size, dtype=bool)
        np.not_equal(score_keys[1:], score_keys[:-1], out=is_last[:-1])
        is_last[-1] = stop == n_pos or (desc[stop] >> shift) != score_keys[-1]
        last = np.flatnonzero(is_last)
        weights = np.divide(1.0, chunk & low_bits)  # 1 / region size
        np.cumsum(weights, out=weights)
        weights += weight_before
        weight_before = float(weights[-1])
        if last.size:
            u_desc = _ordered_uint32_to_float32(score_keys[last].astype(np.uint32))
            sweep.update(tp=last + (start + 1), weight=weights[last], u_desc=u_desc)
    return sweep.values()


class _Sweep:
    """Running sums of the pixel metrics over the distinct positive scores u_1 > u_2 > ...

    For each u_j: TP_j = #pos >= u_j, c_j = #pos == u_j, FP_j = #neg >= u_j,
    FPs_j = #neg > u_j, PRO_j = (sum of 1 / region size over pos >= u_j) / #regions.

    * AUROC = sum_j c_j (#neg < u_j + #neg <= u_j) / (2 P N), exact in int64;
    * AP = sum_j (c_j / P) * TP_j / (TP_j + FP_j) (recall moves only at these thresholds);
    * Dice = max_j 2 TP_j / (TP_j + FP_j + P);
    * AUPRO: the curve through every distinct threshold runs (0, 0) -> (FPRs_1, 0) ->
      (FPR_1, PRO_1) -> (FPRs_2, PRO_1) -> (FPR_2, PRO_2) -> ... -> (FPR_K, PRO_K) ->
      (1, PRO_K): the flat pieces are thresholds holding only negatives, the sloped ones a
      threshold where negatives tie with positives (vertical when none do).
    """

    def __init__(self, neg: np.ndarray, n_pos: int, n_regions: int) -> None:
        self.neg = neg
        self.n_neg = int(neg.size)
        self.n_pos = n_pos
        self.n_regions = n_regions
        self.tp_before = 0
        self.auroc_twice = 0  # sum_j c_j (#neg < u_j + #neg <= u_j), a Python int
        self.ap = 0.0
        self.dice = 0.0
        self.limit = AUPRO_FPR_LIMIT
        self.pro_area = 0.0
        self.pro_done = False
        self.last_fpr = 0.0  # last curve point (FPR_j, PRO_j) integrated so far
        self.last_pro = 0.0

    def update(self, tp: np.ndarray, weight: np.ndarray, u_desc: np.ndarray) -> None:
        """Add the next distinct scores (descending) with their TP counts and cumulative weights."""
        n_neg = self.n_neg
        count = np.diff(tp, prepend=self.tp_before)
        self.tp_before = int(tp[-1])

        # L_j = #neg < u_j and E_j = #neg <= u_j (second search only where a negative ties).
        u_asc = np.ascontiguousarray(u_desc[::-1])
        below_asc, has_tie = _count_sorted(self.neg, u_asc, "left")
        below_eq_asc = below_asc.copy()
        tied = np.flatnonzero(has_tie)
        if tied.size:
            below_eq_asc[tied] = _count_sorted(self.neg, u_asc[tied], "right")[0]
        below = below_asc[::-1]
        below_eq = below_eq_asc[::-1]

        self.auroc_twice += int(np.dot(count, below)) + int(np.dot(count, below_eq))
        fp = n_neg - below
        predicted = tp + fp  # TP + FP
        self.ap += float(np.dot(count, tp / predicted))
        predicted += self.n_pos  # TP + FP + TP + FN
        self.dice = max(self.dice, 2.0 * float(np.max(tp / predicted)))
        if not self.pro_done:
            pro = weight / self.n_regions
            if tp[-1] == self.n_pos:
                pro[-1] = 1.0  # every region fully covered (the float sum may be off by an ulp)
            self._pro_area(fp / n_neg, (n_neg - below_eq) / n_neg, pro)

    def _pro_area(self, fpr: np.ndarray, fpr_strict: np.ndarray, pro: np.ndarray) -> None:
        limit = self.limit
        j0 = int(np.searchsorted(fpr, limit, side="left"))  # first j with FPR_j >= limit
        prev_fpr = np.concatenate(([self.last_fpr], fpr[:j0]))
        prev_pro = np.concatenate(([self.last_pro], pro[:j0]))
        s, f, p = fpr_strict[:j0], fpr[:j0], pro[:j0]
        self.pro_area += float(np.sum((s - prev_fpr[:-1]) * prev_pro[:-1]))  # flat pieces
        self.pro_area += float(np.sum((f - s) * (prev_pro[:-1] + p))) / 2.0  # sloped pieces
        fa, pa = float(prev_fpr[-1]), float(prev_pro[-1])
        if j0 == fpr.size:
            self.last_fpr, self.last_pro = fa, pa
            return
        # The limit falls in the flat piece or the sloped piece leading to point j0.
        s0, f0, p0 = float(fpr_strict[j0]), float(fpr[j0]), float(pro[j0])
        self.pro_area += (min(s0, limit) - fa) * pa
        if s0 < limit:
            p_cut = pa + (p0 - pa) * (limit - s0) / (f0 - s0)
            self.pro_area += (limit - s0) * (pa + p_cut) / 2.0
        self.pro_done = True

    def values(self) -> dict[str, float]:
        """The four metrics, clipped to [0, 1] against rounding."""
        if not self.pro_done:  # the curve ends flat at PRO = 1 from the last point to FPR 1
            self.pro_area += (self.limit - self.last_fpr) * self.last_pro
            self.pro_done = True
        raw = {
            "pixel_auroc": self.auroc_twice / (2 * self.n_pos * self.n_neg),
            "pixel_ap": self.ap / self.n_pos,
            "pixel_aupro": self.pro_area / self.limit,
            "pixel_dice": self.dice,
        }
        return {key: float(min(1.0, max(0.0, value))) for key, value in raw.items()}


def pixel_metrics(maps: np.ndarray, masks: np.ndarray) -> MetricResult:
    """Pooled pixel metrics of in-memory (N, H, W) maps and masks (a one-shot accumulator)."""
    acc = PixelMetricAccumulator()
    acc.add(maps, masks)
    return acc.result()
