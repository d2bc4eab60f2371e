"""Lesion masks at the evaluation resolution, and which samples must stay out of pixel metrics.

A sample is *pixel-usable* when its mask (or its absence) can be trusted pixel for pixel:

* a normal image without a mask file has an all-zero mask;
* a lesion image without a mask file is not usable (nothing to score against);
* a mask whose size differs from its image is not usable, whatever the class. BUS-UCLM's
  ``HESN_*`` images were cropped after annotation, so image and mask are not aligned;
  resizing the mask to fit would shift the lesion, so we refuse instead.

Pixel-usable samples are also the only ones the support sampler draws from. The check
reads image headers only (cached), so it is cheap enough to run at read time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bench.data.io import image_size, load_mask
from bench.types import Sample

__all__ = [
    "EMPTY_LESION_MASK",
    "MASK_SIZE_MISMATCH",
    "NONEMPTY_NORMAL_MASK",
    "NO_LESION_MASK",
    "EvalMask",
    "PixelExclusion",
    "eval_mask",
    "mask_problems",
    "pixel_exclusion",
    "pixel_exclusions",
    "resize_mask",
]

#: Exclusion kinds (stable strings, usable as keys in reports).
NO_LESION_MASK = "no-lesion-mask"
MASK_SIZE_MISMATCH = "mask-size-mismatch"
EMPTY_LESION_MASK = "empty-lesion-mask"
NONEMPTY_NORMAL_MASK = "nonempty-normal-mask"

# How each kind reads in a dataset's problem list: "<n> images <phrase> (ids): ...".
_KIND_PHRASES = {
    NO_LESION_MASK: "labelled benign/malignant without a mask file",
    MASK_SIZE_MISMATCH: "whose mask size differs from the image",
    EMPTY_LESION_MASK: "labelled benign/malignant with an all-black mask",
    NONEMPTY_NORMAL_MASK: "labelled normal with lesion pixels in the mask",
}


@dataclass(frozen=True)
class PixelExclusion:
    """Why one sample is kept out of pixel metrics and the support pool."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class EvalMask:
    """A sample's lesion mask at the evaluation resolution, or why there is none.

    ``mask`` is ``bool`` of shape (size, size), all False for normal images; it is
    ``None`` exactly when ``reason`` (a readable sentence, JSON-friendly) says why the
    sample is kept out of pixel metrics, and ``kind`` classifies it (``MASK_SIZE_MISMATCH``...).
    """

    sample_id: str
    mask: np.ndarray | None
    reason: str | None = None
    kind: str | None = None

    @classmethod
    def excluded(cls, sample_id: str, exclusion: PixelExclusion) -> EvalMask:
        """A result without a mask, carrying ``exclusion``'s sentence and kind."""
        return cls(sample_id, None, exclusion.detail, exclusion.kind)

    @property
    def usable(self) -> bool:
        return self.mask is not None


def pixel_exclusion(sample: Sample) -> PixelExclusion | None:
    """Why ``sample`` must stay out of pixel metrics, from file headers only; ``None`` if usable.

    Content problems (an all-black lesion mask) need decoding and are found by
    :func:`eval_mask` instead.
    """
    if not sample.mask_paths:
        if sample.is_lesion:
            return PixelExclusion(NO_LESION_MASK, f"{sample.id}: {sample.label} image without a mask file")
        return None
    width, height = image_size(sample.image_path)
    for path in sample.mask_paths:
        mw, mh = image_size(path)
        if (mw, mh) != (width, height):
            return PixelExclusion(
                MASK_SIZE_MISMATCH,
                f"{sample.id}: mask {path.name} is {mw}x{mh} but the image is {width}x{height}",
            )
    return None


def pixel_exclusions(samples: Iterable[Sample]) -> dict[str, PixelExclusion]:
    """:func:`pixel_exclusion` for many samples: sample id -> reason, usable samples left out."""
    found: dict[str, PixelExclusion] = {}
    for sample in samples:
        reason = pixel_exclusion(sample)
        if reason is not None:
            found[sample.id] = reason
    return found


def _list_ids(ids: list[str], limit: int = 3) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... {len(ids) - limit} more" if len(ids) > limit else "")


def mask_problems(samples: Iterable[Sample]) -> list[str]:
    """One readable line per kind of pixel exclusion in ``samples`` (header checks only).

    E.g. ``"13 images whose mask size differs from the image (HESN_000, HESN_001, HESN_002,
    ... 10 more): kept out of pixel metrics and the support pool"``.
    """
    by_kind: dict[str, list[str]] = {}
    for sample_id, reason in pixel_exclusions(samples).items():
        by_kind.setdefault(reason.kind, []).append(sample_id)
    lines = []
    for kind, ids in by_kind.items():
        noun = "image" if len(ids) == 1 else "images"
        lines.append(
            f"{len(ids)} {noun} {_KIND_PHRASES.get(kind, kind)} ({_list_ids(ids)}): "
            "kept out of pixel metrics and the support pool"
        )
    return lines


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a binary mask to ``size x size``: bilinear on the 0/1 float mask, then ``>= 0.5``.

    The whole frame is squashed to a square (no crop), like the images the backbone sees,
    so that mask pixels stay aligned with patch features.
    """
    if mask.shape == (size, size):
        return mask.astype(bool, copy=True)
    resized = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= 0.5


def eval_mask(sample: Sample, size: int) -> EvalMask:
    """The lesion mask of ``sample`` at ``size x size`` (``bool``), or ``None`` with a reason.

    Normal images without a mask get an all-zero mask. Lesion images without a mask,
    masks whose size differs from the image, all-black lesion masks and normal images
    whose mask marks a lesion are kept out of pixel metrics (``mask`` is ``None``).
    """
    if size <= 0:
        raise ValueError(f"evaluation size must be positive, got {size}")
    reason = pixel_exclusion(sample)
    if reason is not None:
        return EvalMask.excluded(sample.id, reason)
    mask = load_mask(sample)
    if mask is None:
        return EvalMask(sample.id, np.zeros((size, size), dtype=bool))
    if sample.is_lesion and not mask.any():
        return EvalMask.excluded(
            sample.id,
            PixelExclusion(EMPTY_LESION_MASK, f"{sample.id}: {sample.label} image, mask is all black"),
        )
    if not sample.is_lesion and mask.any():
        return EvalMask.excluded(
            sample.id,
            PixelExclusion(NONEMPTY_NORMAL_MASK, f"{sample.id}: normal image, but the mask marks a lesion"),
        )
    return EvalMask(sample.id, resize_mask(mask, size))
