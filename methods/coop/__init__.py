"""CoOp (Zhou et al., IJCV 2022) and CoCoOp (Zhou et al., CVPR 2022): learned prompt contexts.

Both learn only prompt-side parameters through the harness's shared prompt-learning access
(:class:`bench.prompt_learning.PromptLearner` -> ``backbone.encode_embeddings``); the image
and text encoders stay frozen and the image features are the cached frozen embeddings.
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

Differences from the official code, forced by the harness: training uses the frozen cached
embedding of each whole image (``train_views: 0``) instead of a fresh random-resized-crop +
flip per iteration; ``train_views: N`` uses N cached augmented views instead (epoch ``e``
uses view ``e mod N``; RandomResizedCrop scale 0.5-1, Tip-Adapter's). fp32 throughout
(CoCoOp's config trains in fp16).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from bench import fewshot
from bench.errors import MethodError
from bench.fewshot import COOP_SCHEDULE, FewShotClassifier, common_config
from bench.method import MethodContext, SupportSet
from bench.prompt_learning import POSITIONS, PromptLearner
from bench.types import ImageItem


class CoOp(FewShotClassifier):
    """Context Optimization: M learnable context vectors shared by (or specific to) the classes."""

    name = "coop"
    table_group = "classifier"
    table_rank = 4
    description = "CoOp: learned prompt context (16 tokens) through the frozen text encoder"
    uses_templates = False
    default_config: ClassVar[Mapping[str, Any]] = {
        **common_config(templates=False),
        "n_ctx": 16,
        "ctx_init": "",
        "class_specific": False,
        "class_token_position": "end",
        "init_std": 0.02,
        "epochs": None,
        "batch_size": 32,
        **COOP_SCHEDULE,
    }
    meta_net: ClassVar[bool] = False
    progress_label: ClassVar[str] = "coop epochs"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = self.config
        if cfg.get("class_token_position", "end") not in POSITIONS:
            raise MethodError(f"method {self.name!r}: 'class_token_position' must be one of {POSITIONS}")
        try:
            self.epochs = int(cfg["epochs"]) if cfg["epochs"] is not None else fewshot.coop_epochs(ctx.shots)
            self.batch_size = int(cfg["batch_size"])
            self.lr = float(cfg["lr"])
        except (TypeError, ValueError) as exc:
            raise MethodError(f"method {self.name!r}: invalid option ({exc})") from exc
        if self.epochs < 1 or self.batch_size < 1:
            raise MethodError(f"method {self.name!r}: 'epochs' and 'batch_size' must be >= 1")
        self.learner: PromptLearner | None = None
        self._text: torch.Tensor | None = None

    def logit_scale(self) -> float:
        value = self.config["logit_scale"]
        if value is not None:
            return float(value)
        return float(self.ctx.backbone.model.logit_scale.detach().exp().item())

    def build_learner(self) -> PromptLearner:
        cfg = self.config
        backbone = self.ctx.backbone
        return PromptLearner(
            backbone,
            self.names,
            n_ctx=int(cfg["n_ctx"]),
            ctx_init=cfg["ctx_init"] or None,
            class_specific=bool(cfg.get("class_specific", False)),
            position=str(cfg.get("class_token_position", "end")),
            meta_net=self.meta_net,
            image_dim=backbone.embed_dim,
            meta_reduction=int(cfg.get("meta_reduction", 16)),
            init_std=float(cfg.get("init_std", 0.02)),
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
        views = self.training_views(support, int(cfg["train_views"]))
        self.learner = self.build_learner()
        self.learner.train()
        scale = self.logit_scale()
        optimiser = torch.optim.SGD(
            self.learner.parameters(),
            lr=self.lr,
            momentum=float(cfg["momentum"]),
            weight_decay=float(cfg["weight_decay"]),
        )
        generator = fewshot.make_generator(self.ctx.seed)
        n = len(labels)
        for epoch in self.ctx.track(range(self.epochs), self.progress_label):
            lr = fewshot.warmup_cosine_lr(
                epoch, self.epochs, self.lr, int(cfg["warmup_epochs"]), float(cfg["warmup_lr"])
            )
            fewshot.set_lr(optimiser, lr)
            feats = views[epoch % len(views)]
            for batch in fewshot.epoch_batches(n, self.batch_size, generator):
                batch = batch.to(feats.device)
                loss = F.cross_entropy(self.class_logits(feats[batch], scale), labels[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
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
    default_config: ClassVar[Mapping[str, Any]] = {
        **common_config(templates=False),
        "n_ctx": 4,
        "ctx_init": "a photo of a",
        "meta_reduction": 16,
        "init_std": 0.02,
        "epochs": 10,
        "batch_size": 1,
        **COOP_SCHEDULE,
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
