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

Training on augmented views (the official CoOp / CoCoOp / CLIP-Adapter / Tip-Adapter-F
trainers draw a fresh random view of every image each epoch): :class:`ViewPool` holds a
FINITE pool of K cached views per image and :func:`view_schedule` says which one each
image uses in each epoch (every view once per cycle of K epochs, in a seeded order), so a
fit never runs the frozen tower itself. :func:`augmentation_options` declares the options
(``augment_views``, ``crop_scale``, ``crop_ratio``, ``flip``) and
:func:`augmentation_from_config` turns them into an :class:`Augmentation`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.errors import MethodError
from bench.feature_cache import FeatureCache, FeatureOverflowError
from bench.kit.options import Option
from bench.types import ImageItem

if TYPE_CHECKING:
    from bench.kit.clip import Backbone

log = logging.getLogger(__name__)

#: Tip-Adapter's and LP++'s augmentation (``RandomResizedCrop(scale=(0.5, 1))`` + ``RandomHorizontalFlip``).
DEFAULT_CROP_SCALE = (0.5, 1.0)
#: Dassl's ``INPUT.RRCROP_SCALE`` default (torchvision's), used by CoOp, CoCoOp and CLIP-Adapter.
DASSL_CROP_SCALE = (0.08, 1.0)
#: torchvision's ``RandomResizedCrop`` aspect-ratio range (no official code changes it).
DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: ``RandomHorizontalFlip``'s default probability (the ``flip`` option switches it on or off).
FLIP_PROBABILITY = 0.5
#: Default size of a training pool of cached views per image (see :func:`augmentation_options`).
DEFAULT_POOL_VIEWS = 10


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
    *,
    first_view: int = 0,
) -> torch.Tensor:
    """Frozen ``encode_image`` embeddings of ``n_views`` augmented views of every item.

    Returns (n_views, n_items, D) float32 on the backbone device, NOT normalised, rounded
    through fp16 like the main cache (so cache hits and misses agree bit for bit): row ``j``
    holds view ``first_view + j``. View ``v`` of an image is the same in every call with the
    same ``seed`` (whatever the other items), and is read from the view cache when present.
    """
    augmentation = augmentation or Augmentation()
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    if first_view < 0:
        raise ValueError(f"first_view must be >= 0, got {first_view}")
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
        for (key, slot, i, _), embed in zip(pending, embeds, strict=True):
            try:
                out[slot, i] = cache.put(key, embed)
            except FeatureOverflowError as exc:
                raise MethodError(f"augmented view {key} cannot be stored as fp16: {exc}") from exc
        stats.encoded += len(pending)
        pending.clear()

    for i, item in enumerate(items):
        rgb = None
        for row in range(n_views):
            v = first_view + row
            key = view_key(item.key, v, seed)
            cached = cache.get(key)
            if cached is not None:
                out[row, i] = cached
                stats.hits += 1
                continue
            if rgb is None:
                rgb = item.rgb()
            view = augmentation(rgb, view_rng(item.key, v, seed))
            pending.append((key, row, i, backbone.preprocess(view)))
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


# --------------------------------------------------------------------------- training on views


def _ordered(value: list[Any]) -> str | None:
    return None if value[0] <= value[1] else "must be [low, high] with low <= high"


def augmentation_options(
    *, views: int, views_help: str, scale: tuple[float, float], source: str, max_views: int | None = None
) -> dict[str, Option]:
    """The augmentation options of a method: ``augment_views`` (``views_help`` says what the
    number means for it; 0 = no augmentation), ``crop_scale``, ``crop_ratio`` and ``flip``.

    ``scale`` is the official RandomResizedCrop area range and ``source`` names where the
    official transform is built (file:line), for the help texts.
    """
    return {
        "augment_views": Option(views, int, views_help, min=0, max=max_views),
        "crop_scale": Option(
            list(scale),
            list,
            f"RandomResizedCrop area range [low, high] (official: {scale[0]:g}-{scale[1]:g}, {source})",
            items=float,
            length=2,
            gt=0,
            max=1,
            check=_ordered,
        ),
        "crop_ratio": Option(
            list(DEFAULT_CROP_RATIO),
            list,
            "RandomResizedCrop aspect-ratio range [low, high] (official: torchvision's default 3/4-4/3)",
            items=float,
            length=2,
            gt=0,
            check=_ordered,
        ),
        "flip": Option(True, bool, f"horizontal flip with probability 0.5 (official: on, {source})"),
    }


def augmentation_from_config(config: Mapping[str, Any]) -> Augmentation:
    """The :class:`Augmentation` of a method config holding :func:`augmentation_options`."""
    scale, ratio = config["crop_scale"], config["crop_ratio"]
    return Augmentation(
        scale=(scale[0], scale[1]),
        ratio=(ratio[0], ratio[1]),
        flip_p=FLIP_PROBABILITY if config["flip"] else 0.0,
    )


#: Separates the epoch-order stream from the views' own streams (which use the view index).
_SCHEDULE_STREAM = 0x5C4ED


def view_schedule(n_items: int, n_views: int, epochs: int, seed: int) -> np.ndarray:
    """(epochs, n_items) int64: the view (0 .. n_views - 1) each image uses in each epoch.

    Per image, each cycle of ``n_views`` consecutive epochs is a seeded permutation of its
    views: no view repeats before every view was used, so with ``n_views >= epochs`` every
    epoch sees a new random view, exactly as a fresh transform per epoch would.
    """
    if n_items < 0 or n_views < 1 or epochs < 0:
        raise ValueError(f"need n_items >= 0, n_views >= 1, epochs >= 0, got {n_items}, {n_views}, {epochs}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, _SCHEDULE_STREAM, n_views]))
    cycles = -(-epochs // n_views)
    base = np.broadcast_to(np.arange(n_views, dtype=np.int64), (n_items, n_views))
    blocks = [rng.permuted(base, axis=1).T for _ in range(cycles)]  # each (n_views, n_items)
    if not blocks:
        return np.zeros((0, n_items), dtype=np.int64)
    return np.ascontiguousarray(np.concatenate(blocks)[:epochs])


class ViewPool:
    """Training features of ``n`` support images from a finite pool of ``K`` cached views.

    ``views`` (K, n, D) on the training device; ``schedule`` (E, n) the view each image uses
    in each epoch (:func:`view_schedule`). :meth:`epoch` gives that epoch's (n, D) features.
    :meth:`fixed` is the un-augmented pool: one "view" (the plain embedding) for every epoch.
    """

    def __init__(self, views: torch.Tensor, schedule: np.ndarray) -> None:
        if views.ndim != 3:
            raise ValueError(f"views must be (K, n, D), got {tuple(views.shape)}")
        schedule = np.asarray(schedule, dtype=np.int64)
        if schedule.ndim != 2 or schedule.shape[1] != views.shape[1]:
            raise ValueError(f"schedule must be (epochs, {views.shape[1]}), got {schedule.shape}")
        if schedule.size and not (schedule.min() >= 0 and schedule.max() < views.shape[0]):
            raise ValueError(f"schedule indexes views outside 0 .. {views.shape[0] - 1}")
        self.views = views
        self.schedule = schedule
        self._last: tuple[int, torch.Tensor] | None = None

    @classmethod
    def fixed(cls, features: torch.Tensor, epochs: int) -> ViewPool:
        """The same (n, D) ``features`` in every one of ``epochs`` epochs (no augmentation)."""
        return cls(features[None], np.zeros((epochs, features.shape[0]), dtype=np.int64))

    @property
    def n_views(self) -> int:
        return int(self.views.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.views.shape[1])

    @property
    def epochs(self) -> int:
        return int(self.schedule.shape[0])

    def epoch(self, epoch: int) -> torch.Tensor:
        """(n, D) training features of ``epoch``: row i is image i's scheduled view."""
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"epoch {epoch} outside the pool's schedule of {self.epochs} epochs")
        if self.n_views == 1:
            return self.views[0]
        if self._last is None or self._last[0] != epoch:
            rows = torch.as_tensor(self.schedule[epoch], device=self.views.device)
            self._last = (epoch, self.views[rows, torch.arange(self.n_items, device=self.views.device)])
        return self._last[1]

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ViewPool:
        """The pool of some images only (their views and schedule columns, in ``indices`` order)."""
        index = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64)
        rows = torch.as_tensor(index, device=self.views.device)
        return ViewPool(self.views[:, rows], self.schedule[:, index])
