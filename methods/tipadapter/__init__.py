"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter ``main.py``, ``utils.py``).

Cache model built from the support set:

- keys ``K`` (n, D): for each support image, the L2-normalised MEAN of the (unnormalised)
  frozen ``encode_image`` features of ``augment_views`` augmented views (official
  ``utils.py:46-60`` ``build_cache_model``: ``augment_epoch`` (``configs/dtd.yaml:30``: 10)
  passes over ``train_loader_cache``, whose ``train_tranform`` is RandomResizedCrop(224,
  scale (0.5, 1), bicubic) + RandomHorizontalFlip(0.5), ``main.py:173-180``; the features
  are averaged unnormalised (``:59``), then normalised (``:60``)); the views come from
  :func:`bench.kit.augmented_embeds` (own cache, not counted as backbone encodings;
  ``augment_views: 0`` = keys from the plain image);
- values ``L`` (n, 3): one-hot labels;
- query ``f``: the normalised plain cached embedding of the image;
- ``logits = 100 f W^T + alpha exp(-beta (1 - f K^T)) L`` with ``W`` the zero-shot text
  classifier (class names x templates, :func:`bench.kit.text_classifier`); computed by
  :func:`bench.kit.cache_logits`.

**alpha / beta** (``search: true``): the official grid (``search_hp``: ``search_step``
values from 0.1 up to ``search_scale``; ``beta_i = 0.1 + i (scale_b - 0.1) / step_b``,
the same for alpha), scored by cross-validation ON THE SUPPORT SET ONLY, never on test
data: Tip-Adapter uses exact leave-one-out (each support image queried with its own entry
removed from the cache); Tip-Adapter-F uses stratified ``cv_folds``-fold CV (the keys are
fine-tuned on the other folds, then the held-out fold is scored). The official code picks
the first grid point with the best accuracy on a validation split; we pick the best
accuracy and break ties by the lower mean cross-entropy, then by grid order. With fewer
than 2 images in some class, no split is possible and ``init_alpha`` / ``init_beta`` are
used.

**Tip-Adapter-F**: the keys become a trainable ``Linear`` (weight initialised with ``K``, no
re-normalisation, as official), trained with cross-entropy on the logits above at
``init_alpha`` / ``init_beta``: AdamW (lr 1e-3, eps 1e-4, torch's default weight decay
0.01), ``CosineAnnealingLR`` over ``epochs * batches`` stepped per batch, batch 256
shuffled, 20 epochs (``configs/*.yaml``: ``lr: 0.001``, ``train_epoch: 20``; ImageNet / DTD
/ FGVC). A FIXED epoch count: the official code keeps the epoch with the best TEST accuracy,
which we never do. Training inputs: official ``train_loader_F`` (``main.py:181``) applies
the same ``train_tranform`` afresh in every epoch and encodes it (``main.py:85-89``), so
training views are new draws, independent of the key views. Here a pool of
``train_augment_views`` (default 10) further cached views per image (view indices after the
key views, so independent of them), one per epoch (each view once per cycle of 10 epochs,
seeded): 20 epochs use each view twice instead of 20 fresh draws (``train_augment_views:
20`` removes that difference). ``train_augment_views: 0`` trains on the plain image.

Default ``init_alpha: 2``, ``init_beta: 1``, ``search_scale: [13, 13]``,
``search_step: [200, 20]`` are Tip-Adapter's ``configs/dtd.yaml`` (textures: the closest of the
published configs to ultrasound speckle; ImageNet's is ``[7, 3]``, ``init_alpha 1.17``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.kit import (
    FewShotClassifier,
    Option,
    Schedule,
    augmented_embeds,
    cache_logits,
    common_options,
    cosine_per_step,
    make_generator,
    one_hot,
    train,
)
from bench.kit.views import (
    DEFAULT_CROP_SCALE,
    DEFAULT_POOL_VIEWS,
    ViewPool,
    augmentation_from_config,
    augmentation_options,
)
from bench.method import MethodContext, SupportSet
from bench.types import ImageItem


def search_grid(scale: float, steps: int) -> list[float]:
    """The official grid: ``[0.1 + i * (scale - 0.1) / steps for i in range(steps)]``."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


class GridScore:
    """Accumulates correct counts and cross-entropy sums over a (beta, alpha) grid."""

    def __init__(self, betas: Sequence[float], alphas: Sequence[float]) -> None:
        self.betas = torch.tensor(list(betas), dtype=torch.float64)
        self.alphas = torch.tensor(list(alphas), dtype=torch.float64)
        self.correct = torch.zeros(len(betas), len(alphas), dtype=torch.float64)
        self.loss = torch.zeros(len(betas), len(alphas), dtype=torch.float64)
        self.count = 0

    def add(
        self,
        clip_logits: torch.Tensor,
        affinity: torch.Tensor,
        values: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Score queries (``clip_logits`` (m, C), ``affinity`` (m, n)) against a cache with ``values`` (n, C).

        ``mask`` (m, n), when given, is 1 for cache entries a query may use (0 removes them).
        """
        clip_logits, affinity, values = (
            clip_logits.double().cpu(),
            affinity.double().cpu(),
            values.double().cpu(),
        )
        labels = labels.cpu()
        weights = torch.exp(-self.betas[:, None, None] * (1.0 - affinity)[None])  # (B, m, n)
        if mask is not None:
            weights = weights * mask.double().cpu()[None]
        cache = weights @ values  # (B, m, C)
        logits = clip_logits[None, None] + self.alphas[None, :, None, None] * cache[:, None]  # (B, A, m, C)
        self.correct += (logits.argmax(-1) == labels).double().sum(-1)
        log_probs = torch.log_softmax(logits, dim=-1)
        picked = log_probs.gather(-1, labels.view(1, 1, -1, 1).expand(*logits.shape[:3], 1))[..., 0]
        self.loss -= picked.sum(-1)
        self.count += int(labels.numel())

    def best(self) -> tuple[float, float, float]:
        """(beta, alpha, accuracy): best accuracy, ties by lower cross-entropy, then grid order."""
        acc = self.correct / max(self.count, 1)
        top = acc == acc.max()
        loss = torch.where(top, self.loss, torch.full_like(self.loss, float("inf")))
        flat = int(torch.argmin(loss.flatten()))  # first minimum in beta-major grid order
        b, a = divmod(flat, loss.shape[1])
        return float(self.betas[b]), float(self.alphas[a]), float(acc[b, a])


def stratified_folds(labels: np.ndarray, n_folds: int, generator: torch.Generator) -> list[np.ndarray]:
    """Indices of ``n_folds`` folds; each class is shuffled and dealt round-robin over the folds."""
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[torch.randperm(len(members), generator=generator).numpy()]
        for j, index in enumerate(order):
            folds[j % n_folds].append(int(index))
    return [np.array(sorted(f), dtype=np.int64) for f in folds if f]


class TipAdapter(FewShotClassifier):
    """Training-free cache model over augmented support keys (alpha, beta by support-set LOO)."""

    name = "tipadapter"
    table_group = "classifier"
    table_rank = 3
    description = "Tip-Adapter: training-free cache model over augmented support features (CLIP few-shot)"
    options: ClassVar[dict[str, Option]] = {
        **common_options(),
        **augmentation_options(
            views=10,
            views_help=(
                "augmented views averaged into each cache key (official augment_epoch: 10, "
                "configs/dtd.yaml:30); 0 = keys from the plain image"
            ),
            scale=DEFAULT_CROP_SCALE,
            source="Tip-Adapter main.py:173-176",
        ),
        "augment_seed": Option(None, int, "seed of the augmented views; null = the fit seed", nullable=True),
        "clip_logit_scale": Option(
            100.0, float, "weight of the zero-shot logits f W^T (official: 100)", min=0
        ),
        "init_alpha": Option(
            2.0, float, "cache weight alpha without search / while training (configs/dtd.yaml)", min=0
        ),
        "init_beta": Option(
            1.0, float, "cache sharpness beta without search / while training (configs/dtd.yaml)", min=0
        ),
        "search": Option(
            True, bool, "choose alpha, beta on the official grid by cross-validation on the support set"
        ),
        "search_scale": Option(
            [13.0, 13.0],
            list,
            "grid upper ends [beta, alpha] (official search_scale, configs/dtd.yaml)",
            items=float,
            length=2,
            gt=0,
        ),
        "search_step": Option(
            [200, 20],
            list,
            "grid sizes [beta, alpha] (official search_step, configs/dtd.yaml)",
            items=int,
            length=2,
            min=1,
        ),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = self.config
        self.n_views = cfg["augment_views"]
        self.augmentation = augmentation_from_config(cfg)
        self.clip_scale = cfg["clip_logit_scale"]
        self.alpha, self.beta = cfg["init_alpha"], cfg["init_beta"]
        self.betas = search_grid(cfg["search_scale"][0], cfg["search_step"][0])
        self.alphas = search_grid(cfg["search_scale"][1], cfg["search_step"][1])
        seed = cfg["augment_seed"]
        self.augment_seed = int(ctx.seed if seed is None else seed)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.search_result: dict[str, float] = {}

    # -- cache construction --------------------------------------------------------------
    def support_views(self, support: SupportSet) -> torch.Tensor:
        """(V, n, D) unnormalised augmented-view embeddings of the support images; with
        ``augment_views: 0`` the plain embeddings as the one "view" (1, n, D)."""
        if self.n_views == 0:
            return self.embeds(support.items, normalise=False)[None]
        views = augmented_embeds(
            self.ctx.backbone, support.items, self.n_views, self.augment_seed, self.augmentation
        )
        return views.float().to(self.device)

    @staticmethod
    def keys_from_views(views: torch.Tensor) -> torch.Tensor:
        """Official keys: normalise(mean over views of the unnormalised features)."""
        return F.normalize(views.mean(dim=0), dim=-1)

    def fine_tuning_pool(self, support: SupportSet) -> ViewPool | None:
        """Tip-Adapter trains nothing (Tip-Adapter-F: the inputs of its fine-tuning epochs)."""
        return None

    def fit(self, support: SupportSet) -> None:
        labels = self.support_labels(support)
        views = self.support_views(support)
        queries = self.embeds(support.items)
        pool = self.fine_tuning_pool(support)
        values = one_hot(labels, len(self.names))
        text = self.text_weights()
        keys = self.keys_from_views(views)
        if self.config["search"]:
            self.alpha, self.beta = self.search(queries, views, pool, labels, values, text)
        self.keys, self.values = self.train_keys(keys, pool, labels, values, text, final=True), values
        self._fitted = True

    def train_keys(
        self,
        keys: torch.Tensor,
        pool: ViewPool | None,
        labels: torch.Tensor,
        values: torch.Tensor,
        text: torch.Tensor,
        *,
        final: bool,
    ) -> torch.Tensor:
        """Tip-Adapter keeps the keys as built (Tip-Adapter-F fine-tunes them)."""
        return keys

    # -- alpha / beta by cross-validation on the support set --------------------------------
    def search(
        self,
        queries: torch.Tensor,
        views: torch.Tensor,
        pool: ViewPool | None,
        labels: torch.Tensor,
        values: torch.Tensor,
        text: torch.Tensor,
    ) -> tuple[float, float]:
        counts = np.bincount(labels.cpu().numpy(), minlength=len(self.names))
        if counts.min() < 2:
            self.search_result = {"skipped": 1.0}
            return self.alpha, self.beta
        grid = GridScore(self.betas, self.alphas)
        clip_logits = self.clip_scale * queries @ text.T
        keys = self.keys_from_views(views)
        mask = 1.0 - torch.eye(len(queries), device=queries.device)  # leave one out
        grid.add(clip_logits, queries @ keys.T, values, labels, mask)
        beta, alpha, acc = grid.best()
        self.search_result = {"beta": beta, "alpha": alpha, "cv_accuracy": acc}
        return alpha, beta

    # -- prediction ----------------------------------------------------------------------
    def logits(self, items: Sequence[ImageItem]) -> torch.Tensor:
        assert self.keys is not None and self.values is not None
        queries = self.embeds(items)
        return cache_logits(
            queries, self.keys, self.values, self.text_weights(), self.alpha, self.beta, self.clip_scale
        )


class TipAdapterF(TipAdapter):
    """Tip-Adapter with the cache keys fine-tuned (fixed epoch count, alpha/beta by support k-fold CV)."""

    name = "tipadapter-f"
    table_group = "classifier"
    table_rank = 3
    description = "Tip-Adapter-F: Tip-Adapter cache with fine-tuned keys (AdamW, cosine, 20 epochs)"
    options: ClassVar[dict[str, Option]] = {
        **TipAdapter.options,
        "epochs": Option(20, int, "fine-tuning epochs, fixed (official configs: train_epoch 20)", min=1),
        "lr": Option(
            0.001, float, "AdamW learning rate, cosine per step (official configs: lr 0.001)", min=0
        ),
        "eps": Option(1e-4, float, "AdamW eps (official main.py: 1e-4)", gt=0),
        "weight_decay": Option(0.01, float, "AdamW weight decay (torch's default, as official)", min=0),
        "batch_size": Option(256, int, "training batch size, shuffled (official: 256)", min=1),
        "cv_folds": Option(
            4, int, "stratified folds of the alpha/beta search (fewer when a class has fewer images)", min=2
        ),
        "train_augment_views": Option(
            DEFAULT_POOL_VIEWS,
            int,
            "cached augmented views per image for the fine-tuning, apart from the key views, one per "
            "epoch (official: a fresh view every epoch, main.py:181); 0 = the plain image",
            min=0,
        ),
    }

    def fine_tuning_pool(self, support: SupportSet) -> ViewPool:
        """``train_augment_views`` normalised views per image with the keys' augmentation and
        seed, at view indices after the key views (new draws, as the official per-epoch
        transform); the plain image when it is 0."""
        cfg = self.config
        if cfg["train_augment_views"] == 0:
            return ViewPool.fixed(self.embeds(support.items), cfg["epochs"])
        return self.view_pool(
            support,
            cfg["train_augment_views"],
            cfg["epochs"],
            self.augmentation,
            seed=self.augment_seed,
            first_view=self.n_views,
        )

    def train_keys(
        self,
        keys: torch.Tensor,
        pool: ViewPool | None,
        labels: torch.Tensor,
        values: torch.Tensor,
        text: torch.Tensor,
        *,
        final: bool,
    ) -> torch.Tensor:
        """Fine-tune the keys (as a bias-free Linear's weight) on the pool's normalised views;
        returns them detached. The progress bar is shown for the final fit only."""
        assert pool is not None
        cfg = self.config
        weight = torch.nn.Parameter(keys.detach().clone())
        optimiser = torch.optim.AdamW(
            [weight], lr=cfg["lr"], eps=cfg["eps"], weight_decay=cfg["weight_decay"]
        )

        def step(batch: torch.Tensor, epoch: int) -> torch.Tensor:
            feats = pool.epoch(epoch)
            batch = batch.to(feats.device)
            logits = cache_logits(
                feats[batch], weight, values, text, cfg["init_alpha"], cfg["init_beta"], self.clip_scale
            )
            return F.cross_entropy(logits, labels[batch])

        schedule = Schedule(
            cfg["epochs"], cfg["batch_size"], drop_last=False, lr=cosine_per_step(cfg["lr"]), lr_per="step"
        )
        train(
            optimiser,
            pool.n_items,
            step,
            schedule,
            seed=self.ctx.seed,
            track=self.ctx.track if final else None,
            label="tip-adapter-f epochs",
        )
        return weight.detach()

    def search(
        self,
        queries: torch.Tensor,
        views: torch.Tensor,
        pool: ViewPool | None,
        labels: torch.Tensor,
        values: torch.Tensor,
        text: torch.Tensor,
    ) -> tuple[float, float]:
        assert pool is not None
        labels_np = labels.cpu().numpy()
        counts = np.bincount(labels_np, minlength=len(self.names))
        n_folds = min(self.config["cv_folds"], int(counts.min()))
        if n_folds < 2:
            self.search_result = {"skipped": 1.0}
            return self.alpha, self.beta
        generator = make_generator(self.ctx.seed + 7919)
        folds = stratified_folds(labels_np, n_folds, generator)
        grid = GridScore(self.betas, self.alphas)
        for held_out in self.ctx.track(folds, "tip-adapter-f cv folds"):
            kept = np.setdiff1d(np.arange(len(labels_np)), held_out)
            tr = torch.as_tensor(kept, device=queries.device)
            ho = torch.as_tensor(held_out, device=queries.device)
            keys = self.train_keys(
                self.keys_from_views(views[:, tr]),
                pool.subset(kept),
                labels[tr],
                values[tr],
                text,
                final=False,
            )
            q = queries[ho]
            grid.add(self.clip_scale * q @ text.T, q @ keys.T, values[tr], labels[ho])
        beta, alpha, acc = grid.best()
        self.search_result = {"beta": beta, "alpha": alpha, "cv_accuracy": acc, "folds": float(len(folds))}
        return alpha, beta


METHODS = [TipAdapter, TipAdapterF]
