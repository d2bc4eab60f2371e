"""Augmented views of support images, encoded by the frozen CLIP once and cached.

:func:`augmented_embeds`: a seeded RandomResizedCrop + horizontal flip on the decoded uint8
image (torchvision's sampling rule, reimplemented with numpy so the draw depends only on
(augmentation seed, view index, image key)), the harness preprocessing (squash to the model
input size, which is what RandomResizedCrop's resize does), then the frozen
``encode_image`` with no gradient. Results live in a cache of the backbone
(:meth:`~bench.kit.clip.Backbone.register_cache`, counted in its cache statistics) keyed by
``(image key, view, seed)``, so re-fits of the same support set in later cells, shards or
runs read them back. They are extra views: NOT counted in ``backbone.n_encoded`` (the
"each image through the frozen backbone once per grid" figure); :func:`view_stats` reports
their own counters.
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.errors import MethodError
from bench.feature_cache import FeatureCache, FeatureOverflowError
from bench.types import ImageItem

if TYPE_CHECKING:
    from bench.kit.clip import Backbone

log = logging.getLogger(__name__)

#: Tip-Adapter's augmentation (``RandomResizedCrop(scale=(0.5, 1))`` + ``RandomHorizontalFlip``).
DEFAULT_CROP_SCALE = (0.5, 1.0)


DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class Augmentation:
    """RandomResizedCrop (area ``scale``, aspect ``ratio``) then a horizontal flip with ``flip_p``."""

    scale: tuple[float, float] = DEFAULT_CROP_SCALE
    ratio: tuple[float, float] = DEFAULT_CROP_RATIO
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0.0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"crop ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not (0.0 <= self.flip_p <= 1.0):
            raise ValueError(f"flip probability must be in [0, 1], got {self.flip_p}")

    @property
    def identity(self) -> str:
        return (
            f"rrc(scale={self.scale[0]:g}-{self.scale[1]:g},ratio={self.ratio[0]:.6g}-{self.ratio[1]:.6g},"
            f"numpy-pcg64)+hflip(p={self.flip_p:g})+squash-bicubic"
        )

    def crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) with torchvision's ``RandomResizedCrop.get_params`` rule."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height  # fallback: central crop
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Crop (and maybe flip) a uint8 (H, W, C) image; the resize is left to the preprocessing."""
        array = np.asarray(rgb)
        top, left, h, w = self.crop_box(array.shape[0], array.shape[1], rng)
        out = array[top : top + h, left : left + w]
        if rng.random() < self.flip_p:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)


def view_rng(key: str, view: int, seed: int) -> np.random.Generator:
    """The generator of one augmented view: depends only on (image key, view index, seed)."""
    digest = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16)
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, int(view), digest]))


@dataclass
class ViewStats:
    """Counters of augmented-view encodings (kept apart from ``backbone.n_encoded``)."""

    encoded: int = 0
    hits: int = 0


_STATS: weakref.WeakKeyDictionary[Any, ViewStats] = weakref.WeakKeyDictionary()


def _stats(backbone: Backbone) -> ViewStats:
    return _STATS.setdefault(backbone, ViewStats())


def view_stats(backbone: Backbone) -> ViewStats:
    """How many augmented views this backbone object encoded / read from the cache so far."""
    stats = _stats(backbone)
    return ViewStats(stats.encoded, stats.hits)


def view_cache(backbone: Backbone, augmentation: Augmentation) -> FeatureCache:
    """The feature cache of augmented-view embeddings for this backbone and augmentation."""
    config = {
        "features": "augmented-view image embeds (encode_image output, not normalised)",
        "augmentation": augmentation.identity,
        "layout": "flat: embeds (D)",
    }
    return backbone.register_cache(config, backbone.embed_dim)


def view_key(item_key: str, view: int, seed: int) -> str:
    return f"{item_key}.v{view}.s{seed}"


def augmented_embeds(
    backbone: Backbone,
    items: Sequence[ImageItem],
    n_views: int,
    seed: int,
    augmentation: Augmentation | None = None,
) -> torch.Tensor:
    """Frozen ``encode_image`` embeddings of ``n_views`` augmented views of every item.

    Returns (n_views, n_items, D) float32 on the backbone device, NOT normalised, rounded
    through fp16 like the main cache (so cache hits and misses agree bit for bit). View ``v``
    of an image is the same in every call with the same ``seed`` (whatever the other items),
    and is read from the view cache when present.
    """
    augmentation = augmentation or Augmentation()
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    cache = view_cache(backbone, augmentation)
    stats = _stats(backbone)
    encoded_before, hits_before = stats.encoded, stats.hits
    out = np.empty((n_views, len(items), backbone.embed_dim), dtype=np.float32)
    pending: list[tuple[str, int, int, torch.Tensor]] = []
    batch_size = max(1, int(backbone.batch_size))

    def flush() -> None:
        if not pending:
            return
        embeds = backbone.encode_images(torch.stack([p[3] for p in pending])).cpu().numpy()
        for (key, v, i, _), row in zip(pending, embeds, strict=True):
            try:
                out[v, i] = cache.put(key, row)
            except FeatureOverflowError as exc:
                raise MethodError(f"augmented view {key} cannot be stored as fp16: {exc}") from exc
        stats.encoded += len(pending)
        pending.clear()

    for i, item in enumerate(items):
        rgb = None
        for v in range(n_views):
            key = view_key(item.key, v, seed)
            cached = cache.get(key)
            if cached is not None:
                out[v, i] = cached
                stats.hits += 1
                continue
            if rgb is None:
                rgb = item.rgb()
            view = augmentation(rgb, view_rng(item.key, v, seed))
            pending.append((key, v, i, backbone.preprocess(view)))
            if len(pending) >= batch_size:
                flush()
    flush()
    if stats.encoded > encoded_before:
        log.info(
            "encoded %d augmented views (%d read from %s); not counted as backbone encodings",
            stats.encoded - encoded_before,
            stats.hits - hits_before,
            cache.folder,
        )
    return torch.from_numpy(out).to(backbone.device)
