"""Shared building blocks of the few-shot CLIP classifiers (Tip-Adapter, CoOp, CLIP-Adapter, LP++, ...).

What lives here (each method folder keeps only what makes the method different):

- **Class prompts and the zero-shot text classifier.** :data:`DEFAULT_CLASS_NAMES` and
  :data:`DEFAULT_TEMPLATES` (breast-ultrasound defaults; CLIP's ``"a photo of a {}."`` is
  :data:`CLIP_TEMPLATE`), :func:`text_classifier` (each class: the L2-normalised mean of the
  L2-normalised embeddings of its prompts, as ``clip_classifier`` in Tip-Adapter / LP++).
- **Augmented views** of support images (:func:`augmented_embeds`): a seeded
  RandomResizedCrop + horizontal flip on the decoded uint8 image (torchvision's sampling
  rule, reimplemented with numpy so the draw depends only on (augmentation seed, view index,
  image key)), the harness preprocessing (:meth:`~bench.backbone.Backbone.preprocess`:
  squash to the model input size, which is what RandomResizedCrop's resize does), then the
  frozen ``encode_image`` with no gradient. Results are stored in their own
  :class:`~bench.feature_cache.FeatureCache` folder (same root as the backbone's, separate
  config hash) keyed by ``(image key, view, seed)``, so re-fits of the same support set in
  later cells, shards or runs read them back. Augmented views are *extra views*: they are
  NOT counted in ``backbone.n_encoded`` (the runner's "each test/support image through the
  frozen backbone once per grid" figure); :func:`view_stats` reports their own counters.
- **Seeded training helpers**: :func:`seeded` (deterministic module init without touching
  the global RNG state), :func:`make_generator`, :func:`epoch_batches` (Dassl's
  RandomSampler + drop-last rule), :func:`warmup_cosine_lr` (Dassl's cosine schedule with a
  constant warm-up, as CoOp / CoCoOp / CLIP-Adapter use it), :func:`cosine_lr`
  (``CosineAnnealingLR`` stepped per iteration, as Tip-Adapter-F), :func:`coop_epochs`
  (CoOp's 50 / 100 / 200 epochs for 1 / 2-4 / 8-16 shots).
- :class:`FewShotClassifier`: the common :class:`~bench.method.Method` base (tasks detect +
  classify, class-name / template options, cached normalised features, logits ->
  :class:`~bench.method.Prediction` with ``score = 1 - p(normal)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import weakref
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import MethodError
from bench.feature_cache import FeatureCache, FeatureOverflowError
from bench.method import Method, MethodContext, Prediction, SupportSet, class_names
from bench.types import ImageItem, Task

if TYPE_CHECKING:
    from bench.backbone import Backbone

log = logging.getLogger(__name__)

#: Default class phrases (breast ultrasound), in :data:`~bench.types.CLASSES` order.
DEFAULT_CLASS_NAMES: dict[str, str] = {
    "normal": "normal breast tissue",
    "benign": "benign breast lesion",
    "malignant": "malignant breast lesion",
}
#: Default prompt template(s) around a class phrase.
DEFAULT_TEMPLATES: list[str] = ["a breast ultrasound image of {}."]
#: CLIP's generic template (pass ``templates: ["a photo of a {}."]`` to use it).
CLIP_TEMPLATE = "a photo of a {}."

#: Tip-Adapter's augmentation (``RandomResizedCrop(scale=(0.5, 1))`` + ``RandomHorizontalFlip``).
DEFAULT_CROP_SCALE = (0.5, 1.0)
DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


# ---------------------------------------------------------------------------------------
# class prompts and the text classifier
# ---------------------------------------------------------------------------------------
def check_class_names(value: Any, method: str) -> list[str]:
    """The option ``class_names`` (a mapping normal/benign/malignant -> phrase) as a list in class order."""
    wanted = list(class_names())
    if not isinstance(value, Mapping) or set(value) != set(wanted):
        raise MethodError(f"method {method!r}: option 'class_names' must map exactly {wanted} to phrases")
    names = [value[c] for c in wanted]
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise MethodError(f"method {method!r}: every 'class_names' entry must be a non-empty string")
    return [n.strip() for n in names]


def check_templates(value: Any, method: str) -> list[str]:
    """The option ``templates``: a non-empty list of strings, each with one ``{}``."""
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(t, str) and t.count("{}") == 1 for t in value)
    ):
        raise MethodError(
            f"method {method!r}: option 'templates' must be a non-empty list of strings with one '{{}}' "
            f"each (e.g. {DEFAULT_TEMPLATES} or [{CLIP_TEMPLATE!r}]), got {value!r}"
        )
    return list(value)


def class_prompts(names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """``prompts[c]`` = every template filled with class ``c``'s phrase."""
    return [[t.format(name) for t in templates] for name in names]


def text_classifier(backbone: Backbone, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Zero-shot CLIP classifier weights (C, D), rows L2-normalised, on the backbone device.

    Row ``c`` = normalise(mean over templates of normalise(encode_text(template(c)))).
    """
    rows = []
    for prompts in class_prompts(names, templates):
        embeds = F.normalize(backbone.encode_text(prompts).float(), dim=-1)
        rows.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(rows)


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), n_classes).float()


# ---------------------------------------------------------------------------------------
# augmented views
# ---------------------------------------------------------------------------------------
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


@dataclass
class _ViewStore:
    caches: dict[str, FeatureCache] = field(default_factory=dict)
    stats: ViewStats = field(default_factory=ViewStats)


_STORES: weakref.WeakKeyDictionary[Any, _ViewStore] = weakref.WeakKeyDictionary()


def _store(backbone: Backbone) -> _ViewStore:
    store = _STORES.get(backbone)
    if store is None:
        store = _STORES[backbone] = _ViewStore()
    return store


def view_stats(backbone: Backbone) -> ViewStats:
    """How many augmented views this backbone object encoded / read from the cache so far."""
    stats = _store(backbone).stats
    return ViewStats(stats.encoded, stats.hits)


def view_cache(backbone: Backbone, augmentation: Augmentation) -> FeatureCache:
    """The feature cache of augmented-view embeddings for this backbone and augmentation."""
    store = _store(backbone)
    cache = store.caches.get(augmentation.identity)
    if cache is None:
        base = {
            k: v for k, v in backbone.cache.config.items() if k not in ("cache_format", "length", "layers")
        }
        base.update(
            {
                "features": "augmented-view image embeds (encode_image output, not normalised)",
                "augmentation": augmentation.identity,
                "layout": "flat: embeds (D)",
            }
        )
        cache = FeatureCache(backbone.cache.root, base, backbone.embed_dim)
        store.caches[augmentation.identity] = cache
    return cache


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
    stats = _store(backbone).stats
    encoded_before, hits_before = stats.encoded, stats.hits
    out = np.empty((n_views, len(items), backbone.embed_dim), dtype=np.float32)
    pending: list[tuple[str, int, int, torch.Tensor]] = []
    batch_size = max(1, int(backbone.spec.batch_size))

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([p[3] for p in pending]).to(backbone.device)
        with torch.no_grad():
            embeds = backbone.model.encode_image(batch).float().cpu().numpy()
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


# ---------------------------------------------------------------------------------------
# seeded training helpers
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` and restore the global CPU RNG afterwards.

    Used around module construction (``nn.Linear`` default init) so a method's initial
    weights depend on its seed only, not on what ran before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (shuffling, random init)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return generator


def epoch_batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    shuffle: bool = True,
    drop_last: bool | None = None,
) -> list[torch.Tensor]:
    """Index batches of one epoch.

    ``drop_last=None`` is Dassl's training rule (CoOp / CoCoOp / CLIP-Adapter): drop the last
    incomplete batch when there are at least ``batch_size`` samples, so 48 samples with batch
    32 give ONE batch of 32 random samples per epoch and 6 samples give one batch of 6.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if drop_last is None:
        drop_last = n >= batch_size
    batches = list(torch.split(order, batch_size))
    if drop_last and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    return batches


def warmup_cosine_lr(
    epoch: int, max_epochs: int, base_lr: float, warmup_epochs: int = 1, warmup_lr: float = 1e-5
) -> float:
    """Learning rate of ``epoch`` (0-based) under Dassl's ``cosine`` + constant warm-up.

    Dassl (``WARMUP_RECOUNT=True``, the default) runs the first ``warmup_epochs`` epochs at
    ``warmup_lr``, then restarts ``CosineAnnealingLR(T_max=max_epochs)`` from step 0, stepped
    once per epoch: ``base_lr * (1 + cos(pi * (epoch - warmup_epochs) / max_epochs)) / 2``.
    """
    if epoch < warmup_epochs:
        return float(warmup_lr)
    t = epoch - warmup_epochs
    return float(base_lr) * 0.5 * (1.0 + math.cos(math.pi * t / max_epochs))


def cosine_lr(step: int, total_steps: int, base_lr: float, eta_min: float = 0.0) -> float:
    """``CosineAnnealingLR(T_max=total_steps)`` learning rate before ``step`` (0-based)."""
    return eta_min + (base_lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def coop_epochs(shots: int) -> int:
    """CoOp's epochs per shot count (COOP.md: *_ep50 for 1 shot, *_ep100 for 2-4, 200 for 8-16)."""
    if shots <= 1:
        return 50
    if shots <= 4:
        return 100
    return 200


# ---------------------------------------------------------------------------------------
# the common method base
# ---------------------------------------------------------------------------------------
class FewShotClassifier(Method):
    """Base of the few-shot CLIP classifiers: 3-class probabilities, score = 1 - p(normal).

    Subclasses implement :meth:`fit` and :meth:`logits`. ``class_names`` (and, when
    ``uses_templates``, ``templates``) are options of every subclass.
    """

    tasks = frozenset({Task.DETECT, Task.CLASSIFY})
    uses_support = True
    uses_backbone = True
    #: Whether the method builds a hand-crafted text classifier from ``templates``.
    uses_templates: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.names = check_class_names(self.config["class_names"], self.name)
        self.templates = check_templates(self.config["templates"], self.name) if self.uses_templates else []
        self._text_weights: torch.Tensor | None = None
        self._fitted = False

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    # -- shared pieces -----------------------------------------------------------------
    def text_weights(self) -> torch.Tensor:
        """(3, D) frozen zero-shot classifier from ``class_names`` x ``templates`` (computed once)."""
        if self._text_weights is None:
            weights = text_classifier(self.ctx.backbone, self.names, self.templates)
            self._text_weights = weights.to(self.device)
        return self._text_weights

    def embeds(self, items: Sequence[ImageItem], *, normalise: bool = True) -> torch.Tensor:
        """Frozen cached image embeddings (n, D) float32 on the method device."""
        feats = self.ctx.backbone.image_features(items).embeds.float().to(self.device)
        return F.normalize(feats, dim=-1) if normalise else feats

    def support_labels(self, support: SupportSet) -> torch.Tensor:
        labels = torch.as_tensor(np.asarray(support.labels), dtype=torch.long, device=self.device)
        present = set(labels.tolist())
        if present != set(range(len(self.names))):
            raise MethodError(
                f"method {self.name!r}: the support set must hold every class, got classes {sorted(present)}"
            )
        return labels

    def training_views(
        self, support: SupportSet, n_views: int, *, normalise: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """Per-epoch training features: the plain cached embeds (``n_views=0``) or augmented views.

        Returns a tuple of (n, D) tensors; epoch ``e`` uses entry ``e % len(tuple)``.
        """
        if n_views <= 0:
            return (self.embeds(support.items, normalise=normalise),)
        views = augmented_embeds(self.ctx.backbone, support.items, n_views, self.ctx.seed).to(self.device)
        if normalise:
            views = F.normalize(views, dim=-1)
        return tuple(views.unbind(0))

    # -- prediction ----------------------------------------------------------------------
    @abstractmethod
    def logits(self, items: Sequence[ImageItem]) -> torch.Tensor:
        """(B, 3) class logits of a batch (called under ``torch.no_grad``)."""

    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        if not self._fitted:
            raise MethodError(f"method {self.name!r}: predict() called before fit()")
        with torch.no_grad():
            logits = self.logits(items)
        return prediction_from_logits(logits)


def prediction_from_logits(logits: torch.Tensor) -> Prediction:
    """Softmax probabilities (float64) and the anomaly score ``1 - p(normal)``.

    The score is computed as ``p(benign) + p(malignant)`` in log space, which equals
    ``1 - p(normal)`` but keeps its resolution when ``p(normal)`` is within 1e-16 of 1.
    """
    logits = logits.detach().double().cpu()
    log_probs = torch.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    scores = torch.logsumexp(log_probs[:, 1:], dim=1).exp()
    return Prediction(scores=scores.numpy().astype(np.float64), probs=probs.numpy().astype(np.float64))


#: CoOp's published optimisation schedule (Dassl SGD, cosine after a constant warm-up), also
#: used by CLIP-Adapter, whose official code runs on CoOp's configs.
COOP_SCHEDULE: dict[str, Any] = {
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "train_views": 0,
    "logit_scale": None,
}


def common_config(*, templates: bool = True) -> dict[str, Any]:
    """The options every few-shot classifier has (fresh copies)."""
    config: dict[str, Any] = {"class_names": dict(DEFAULT_CLASS_NAMES)}
    if templates:
        config["templates"] = list(DEFAULT_TEMPLATES)
    return config
