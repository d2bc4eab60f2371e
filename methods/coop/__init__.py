"""CoOp (Zhou et al., IJCV 2022) and CoCoOp (Zhou et al., CVPR 2022): learned prompt contexts.

Both learn only prompt-side parameters through the harness's shared prompt-learning access
(:class:`bench.kit.PromptLearner` -> ``backbone.encode_embeddings``); the image
and text encoders stay frozen and the image features are cached frozen embeddings (of
augmented views while training, see below).
``logits = logit_scale * cos(f, t_c)`` with CLIP's own ``logit_scale.exp()`` (100 for the
OpenAI weights), cross-entropy, as ``trainers/coop.py`` / ``trainers/cocoop.py``.

**CoOp** (KaiyangZhou/CoOp ``configs/trainers/CoOp/vit_b16*.yaml``, ``scripts/coop/main.sh``,
``COOP.md``): 16 context tokens ~ N(0, 0.02), class token at the end, unified context
(``class_specific: true`` = CSC), SGD lr 0.002 (Dassl defaults: momentum 0.9, weight decay
5e-4), cosine schedule per epoch with 1 warm-up epoch at a constant 1e-5
(``WARMUP_RECOUNT``: the cosine restarts after it), batch 32 with Dassl's random sampler and
drop-last rule, 50 / 100 / 200 epochs for 1 / 2-4 / 8-16 shots (``vit_b16_ep50``,
``vit_b16_ep100``, ``vit_b16``). Fixed epoch count; the last epoch's context is used.

**CoCoOp** (``configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml``): 4 context tokens
initialised from "a photo of a", meta-net ``Linear(d, d/16) - ReLU - Linear(d/16, text_width)``
on the normalised image feature, its output added to every context token; batch 1, 10
epochs, SGD lr 0.002 with the same Dassl warm-up + cosine schedule. Text features are
recomputed for every image (training and test).

**Training augmentation** (both; ``augment_views``, ``crop_scale``, ``crop_ratio``, ``flip``):
the official trainers encode a fresh Dassl transform of every image at every step
(``configs/trainers/CoOp/vit_b16.yaml:10,13`` and the CoCoOp config: ``random_resized_crop``
with Dassl's default scale (0.08, 1) (``dassl/config/defaults.py:40``) and bicubic resize,
then ``random_flip`` p=0.5; ``dassl/data/transforms/transforms.py:231-239``; the image
encoder runs in ``CustomCLIP.forward`` on each batch). Here each support image has a pool
of ``augment_views`` (default 10) views of that transform, each encoded once by the frozen
tower and cached (:meth:`~bench.kit.FewShotClassifier.training_pool`; a later fit or
method with the same seed reads them back), and each epoch uses one of them (every view
once per cycle of 10 epochs, seeded). CoCoOp's 10 epochs thus see 10 distinct views, as
official; CoOp's 50-200 epochs reuse each view 5-20 times instead of drawing new ones
(``augment_views: 200`` removes that difference at 20 x the encoding cost).
``augment_views: 0`` trains on the plain image. Test images are never augmented (official:
resize + centre crop; here the harness's whole-image squash).

Other differences: fp32 throughout (CoCoOp's config trains in fp16).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.kit import (
    COOP_SCHEDULE,
    POSITIONS,
    FewShotClassifier,
    Option,
    PromptLearner,
    Schedule,
    common_options,
    coop_epochs,
    train,
    warmup_cosine,
)
from bench.method import MethodContext, SupportSet
from bench.types import ImageItem


class CoOp(FewShotClassifier):
    """Context Optimization: M learnable context vectors shared by (or specific to) the classes."""

    name = "coop"
    table_group = "classifier"
    table_rank = 4
    description = "CoOp: learned prompt context (16 tokens) through the frozen text encoder"
    uses_templates = False
    options: ClassVar[dict[str, Option]] = {
        **common_options(templates=False),
        "n_ctx": Option(
            16, int, "learnable context tokens M when ctx_init is empty (CoOp configs: N_CTX 16)", min=1
        ),
        "ctx_init": Option("", str, "phrase whose token embeddings initialise the context ('' = random)"),
        "class_specific": Option(False, bool, "one context per class (CoOp's CSC) instead of a shared one"),
        "class_token_position": Option(
            "end", str, "where the class phrase goes (CoOp's CLASS_TOKEN_POSITION)", choices=POSITIONS
        ),
        "init_std": Option(0.02, float, "std of the random context initialisation (CoOp: 0.02)", min=0),
        **COOP_SCHEDULE,
    }
    meta_net: ClassVar[bool] = False
    progress_label: ClassVar[str] = "coop epochs"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = self.config
        self.epochs: int = cfg["epochs"] if cfg["epochs"] is not None else coop_epochs(ctx.shots)
        self.batch_size: int = cfg["batch_size"]
        self.lr: float = cfg["lr"]
        self.learner: PromptLearner | None = None
        self._text: torch.Tensor | None = None

    def build_learner(self) -> PromptLearner:
        cfg = self.config
        backbone = self.ctx.backbone
        return PromptLearner(
            backbone,
            self.names,
            n_ctx=cfg["n_ctx"],
            ctx_init=cfg["ctx_init"] or None,
            class_specific=cfg.get("class_specific", False),  # CoOp only
            position=cfg.get("class_token_position", "end"),  # CoOp only
            meta_net=self.meta_net,
            image_dim=backbone.embed_dim,
            meta_reduction=cfg.get("meta_reduction", 16),  # CoCoOp only
            init_std=cfg["init_std"],
            seed=self.ctx.seed,
        )

    def class_logits(self, feats: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, C) logits of normalised image features ``feats`` (B, D), with gradients."""
        assert self.learner is not None
        text = F.normalize(self.learner(), dim=-1)
        return scale * feats @ text.T

    def fit(self, support: SupportSet) -> None:
        cfg = self.config
        labels = self.support_labels(support)
        pool = self.training_pool(support, self.epochs)
        self.learner = self.build_learner()
        self.learner.train()
        scale = self.logit_scale()
        optimiser = torch.optim.SGD(
            self.learner.parameters(), lr=self.lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
        )

        def step(batch: torch.Tensor, epoch: int) -> torch.Tensor:
            feats = pool.epoch(epoch)
            batch = batch.to(feats.device)
            return F.cross_entropy(self.class_logits(feats[batch], scale), labels[batch])

        lr = warmup_cosine(self.epochs, self.lr, cfg["warmup_epochs"], cfg["warmup_lr"])
        schedule = Schedule(self.epochs, self.batch_size, lr=lr)  # Dassl's drop-last rule, shuffled
        train(
            optimiser,
            len(labels),
            step,
            schedule,
            seed=self.ctx.seed,
            track=self.ctx.track,
            label=self.progress_label,
        )
        self.learner.eval()
        self._scale = scale
        self._finish_fit()
        self._fitted = True

    def _finish_fit(self) -> None:
        assert self.learner is not None
        with torch.no_grad():
            self._text = F.normalize(self.learner(), dim=-1)

    def logits(self, items: Sequence[ImageItem]) -> torch.Tensor:
        assert self._text is not None
        return self._scale * self.embeds(items) @ self._text.T


class CoCoOp(CoOp):
    """Conditional CoOp: context tokens shifted per image by a meta-net of the image feature."""

    name = "cocoop"
    table_group = "classifier"
    table_rank = 5
    description = (
        "CoCoOp: image-conditioned prompt context (4 tokens + meta-net) through the frozen text encoder"
    )
    options: ClassVar[dict[str, Option]] = {
        **common_options(templates=False),
        "n_ctx": Option(4, int, "context tokens M when ctx_init is empty (CoCoOp config: N_CTX 4)", min=1),
        "ctx_init": Option(
            "a photo of a", str, "phrase initialising the context, sets M (CoCoOp config: CTX_INIT)"
        ),
        "meta_reduction": Option(
            16, int, "meta-net hidden width = image dim // meta_reduction (CoCoOp: 16)", min=1
        ),
        "init_std": CoOp.options["init_std"],
        **COOP_SCHEDULE,
        "epochs": Option(
            10,
            int,
            "training epochs, fixed (CoCoOp config: 10); null = CoOp's per-shot rule",
            nullable=True,
            min=1,
        ),
        "batch_size": Option(
            1, int, "batch size, Dassl sampler and drop-last rule (CoCoOp config: 1)", min=1
        ),
    }
    meta_net = True
    progress_label = "cocoop epochs"

    def class_logits(self, feats: torch.Tensor, scale: float) -> torch.Tensor:
        assert self.learner is not None
        text = F.normalize(self.learner(feats), dim=-1)  # (B, C, D)
        return scale * torch.einsum("bd,bcd->bc", feats, text)

    def _finish_fit(self) -> None:
        self._text = None

    def logits(self, items: Sequence[ImageItem]) -> torch.Tensor:
        return self.class_logits(self.embeds(items), self._scale)


METHODS = [CoOp, CoCoOp]
