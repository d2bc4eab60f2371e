"""CLIP-Adapter (Gao et al., IJCV 2024; gaopengcuhk/CLIP-Adapter ``clip_adapter.py``), visual adapter.

- Adapter ``A``: ``Linear(c, c/4, bias=False) - ReLU - Linear(c/4, c, bias=False) - ReLU``
  (``Adapter(c_in, reduction=4)``), c = the embedding width.
- Residual blend on the frozen (unnormalised) image feature: ``f' = ratio * A(f) + (1 - ratio) * f``
  with ``ratio = 0.2`` (option ``ratio``).
- ``logits = logit_scale * cos(f', t_c)`` with CLIP's ``logit_scale.exp()`` and the frozen
  hand-crafted text classifier (official: one template per dataset; here ``class_names`` x
  ``templates``, averaged when several), cross-entropy. Only the adapter learns.

Schedule: the official repository ships only the trainer and says to run it with CoOp's
Dassl configs and commands, so it inherits CoOp's (``configs/trainers/CoOp/vit_b16*.yaml``,
``COOP.md``): SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32 (Dassl sampler and
drop-last rule), cosine per epoch after 1 warm-up epoch at constant 1e-5, 50 / 100 / 200
epochs for 1 / 2-4 / 8-16 shots (``epochs`` option; fixed count, last epoch used). The
adapter's initial weights are torch's default ``nn.Linear`` init under the fit seed.

**Training augmentation** (``augment_views``, ``crop_scale``, ``crop_ratio``, ``flip``): the
official trainer encodes every training batch in ``CustomCLIP.forward``
(``clip_adapter.py:101``, called from ``forward_backward``, ``:155-157``) from Dassl's data
loader, i.e. with CoOp's configs a fresh ``random_resized_crop`` (Dassl's default scale
(0.08, 1), bicubic) + ``random_flip`` of every image each epoch
(``configs/trainers/CoOp/vit_b16.yaml:10,13``; ``dassl/config/defaults.py:40``;
``dassl/data/transforms/transforms.py:231-239``). Here: a pool of ``augment_views``
(default 10) such views per image, each encoded once and cached, one per epoch (every view
once per cycle of 10 epochs, seeded; the same views CoOp and CoCoOp use for that seed, so
they are encoded once for the three); 50-200 epochs reuse each view 5-20 times instead of
drawing new ones. ``augment_views: 0`` trains on the plain image; test images are never
augmented.

Other differences: fp32 (the official adapter is cast to CLIP's dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.kit import (
    COOP_SCHEDULE,
    FewShotClassifier,
    Option,
    Schedule,
    common_options,
    coop_epochs,
    seeded,
    train,
    warmup_cosine,
)
from bench.method import MethodContext, SupportSet
from bench.types import ImageItem


class Adapter(nn.Sequential):
    """``Linear(c, c // reduction, no bias) - ReLU - Linear(c // reduction, c, no bias) - ReLU``."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        hidden = max(1, dim // reduction)
        super().__init__(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.ReLU()
        )


def blend(features: torch.Tensor, adapter: nn.Module, ratio: float) -> torch.Tensor:
    """Residual feature blending ``ratio * A(f) + (1 - ratio) * f`` (before normalisation)."""
    return ratio * adapter(features) + (1.0 - ratio) * features


class CLIPAdapter(FewShotClassifier):
    name = "clipadapter"
    table_group = "classifier"
    table_rank = 2
    description = "CLIP-Adapter: residual bottleneck MLP on the frozen image feature (ratio 0.2)"
    options: ClassVar[dict[str, Option]] = {
        **common_options(),
        "ratio": Option(
            0.2, float, "residual blend ratio * A(f) + (1 - ratio) * f (official: 0.2)", min=0, max=1
        ),
        "reduction": Option(
            4, int, "adapter bottleneck width = dim // reduction (official Adapter: 4)", min=1
        ),
        **COOP_SCHEDULE,
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = self.config
        self.ratio: float = cfg["ratio"]
        self.epochs: int = cfg["epochs"] if cfg["epochs"] is not None else coop_epochs(ctx.shots)
        self.batch_size: int = cfg["batch_size"]
        self.adapter: Adapter | None = None

    def class_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Logits of UNNORMALISED frozen features ``raw`` (B, D)."""
        assert self.adapter is not None
        adapted = F.normalize(blend(raw, self.adapter, self.ratio), dim=-1)
        return self._scale * adapted @ self.text_weights().T

    def fit(self, support: SupportSet) -> None:
        cfg = self.config
        labels = self.support_labels(support)
        pool = self.training_pool(support, self.epochs, normalise=False)
        self._scale = self.logit_scale()
        with seeded(self.ctx.seed):  # the adapter's init, before train() seeds its batch generator
            self.adapter = Adapter(pool.views.shape[-1], cfg["reduction"]).to(self.device)
        optimiser = torch.optim.SGD(
            self.adapter.parameters(),
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            weight_decay=cfg["weight_decay"],
        )

        def step(batch: torch.Tensor, epoch: int) -> torch.Tensor:
            feats = pool.epoch(epoch)
            batch = batch.to(feats.device)
            return F.cross_entropy(self.class_logits(feats[batch]), labels[batch])

        lr = warmup_cosine(self.epochs, cfg["lr"], cfg["warmup_epochs"], cfg["warmup_lr"])
        self.adapter.train()
        train(
            optimiser,
            len(labels),
            step,
            Schedule(self.epochs, self.batch_size, lr=lr),  # Dassl's drop-last rule, shuffled
            seed=self.ctx.seed,
            track=self.ctx.track,
            label="clip-adapter epochs",
        )
        self.adapter.eval()
        self._fitted = True

    def logits(self, items: Sequence[ImageItem]) -> torch.Tensor:
        return self.class_logits(self.embeds(items, normalise=False))


METHODS = [CLIPAdapter]
