"""April-GAN (Chen et al., VAND 2023 challenge; ByChelsea/VAND-APRIL-GAN), trained on the support set.

Reimplemented from the official ``train.py``, ``test.py``, ``few_shot.py``, ``model.py``,
``prompt_ensemble.py`` and ``loss.py`` (see docs/aprilgan.md for every detail and deviation):

- frozen CLIP; one ``Linear(W -> D)`` (with bias) per used block on that block's RAW patch
  tokens (no ``ln_post``, no ``proj``), outputs L2-normalised;
- text: the published 7 normal / 5 abnormal states x 35 templates around ``object``; each
  class the normalised mean of the normalised sentence embeddings;
- per layer: ``100 * cos`` logits of the two classes, bilinearly upsampled (align_corners)
  to the map size, softmax over the classes; the anomalous channel SUMMED over layers;
- image probability ``softmax(100 * cos(encode_image, T))[anomalous]``;
- few-shot memory (``memory: true``): the raw tokens of the NORMAL support images at the
  same blocks; per layer ``min over the memory of (1 - cos)``, upsampled and summed, added
  to the map; image score ``0.5 * (probability + normalised map maximum)``, the maximum
  normalised by the map maxima of the support images (each scored with its own tokens left
  out of the memory), never by test-set statistics as the official code does;
- training: per layer Focal (gamma 2, the official label smoothing 1e-5) + Dice on the
  anomalous channel, summed over layers; Adam lr 1e-3, betas (0.5, 0.999), batch 8,
  15 epochs (fixed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BackboneError, MethodError
from bench.kit import (
    FeatureRequest,
    LayerAdapters,
    Option,
    Schedule,
    adam_options,
    dice_loss,
    feature_options,
    focal_loss,
    nearest_cosine_distance,
    seeded,
    segmentation_loss_options,
    text_similarity_maps,
    train,
    upsample_grid,
)
from bench.kit.ensembles import VAND_ABNORMAL_STATES as ABNORMAL_STATES
from bench.kit.ensembles import VAND_NORMAL_STATES as NORMAL_STATES
from bench.kit.ensembles import VAND_TEMPLATES as TEMPLATES
from bench.kit.ensembles import state_classifier
from bench.method import Method, MethodContext, Prediction, SupportSet
from bench.types import ImageItem, Task

#: How the image score uses the map: the official fusion with a support-normalised maximum, or not.
SCORE_FUSIONS = ("support-minmax", "probability")


class AprilGAN(Method):
    """April-GAN: per-layer linear adapters on frozen patch tokens + normal-image memory."""

    name = "aprilgan"
    description = "April-GAN (VAND 2023): per-layer linear adapters on patch tokens + normal-image memory"
    tasks = frozenset({Task.DETECT, Task.LOCALIZE})
    table_group = "anomaly"
    table_rank = 5
    options: ClassVar[dict[str, Option]] = {
        **feature_options("6/12/18/24 = blocks 5/11/17/23"),
        "object": Option(
            "breast ultrasound image", str, "object name in every sentence (official: the class name)"
        ),
        "normal_states": Option(
            list(NORMAL_STATES), list, "official normal states", items=str, nonempty=True
        ),
        "abnormal_states": Option(
            list(ABNORMAL_STATES), list, "official abnormal states", items=str, nonempty=True
        ),
        "templates": Option(list(TEMPLATES), list, "official 35 templates", items=str, nonempty=True),
        "logit_scale": Option(100.0, float, "scale of the cosine similarities (official: 100)", gt=0),
        "align_corners": Option(
            True, bool, "bilinear upsampling of the logits with align_corners (official: true)"
        ),
        "memory": Option(
            True, bool, "few-shot memory of the normal support images' raw tokens (official few-shot)"
        ),
        "score_fusion": Option(
            "support-minmax",
            str,
            "image score: 0.5 (p + max of the map normalised over the support images' map maxima), or p only",
            choices=SCORE_FUSIONS,
        ),
        **adam_options(epochs=15, batch_size=8, lr=1e-3, betas=(0.5, 0.999), source="official, VisA"),
        **segmentation_loss_options("official"),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = self.config
        layers = None if cfg["layers"] is None else tuple(cfg["layers"])
        self.request = FeatureRequest.of("standard", layers=layers, input_size=cfg["input_size"])
        self.adapters: LayerAdapters | None = None
        self.memory: torch.Tensor | None = None  # (R, L, N, W) raw tokens of the normal support images
        self.score_range: tuple[float, float] = (0.0, 1.0)
        self.history: list[dict[str, float]] = []
        self._text: torch.Tensor | None = None

    # -- frozen pieces ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.ctx.backbone.device

    def features(self, items: Sequence[ImageItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (embeds (B, D), raw patch tokens (B, L, N, W)) at the method's blocks and size."""
        with self.reported(BackboneError):
            feats = self.ctx.backbone.features(items, self.request)
        return feats.embeds, feats.patch_tokens

    @property
    def grid(self) -> tuple[int, int]:
        with self.reported(BackboneError):
            return self.ctx.backbone.tower_for(self.request).grid

    def text(self) -> torch.Tensor:
        """(2, D) normalised [normal, abnormal] class embeddings."""
        if self._text is None:
            cfg = self.config
            with self.reported(ValueError):
                self._text = state_classifier(
                    self.ctx.backbone,
                    cfg["normal_states"],
                    cfg["abnormal_states"],
                    cfg["templates"],
                    cfg["object"],
                )
        return self._text

    # -- maps -------------------------------------------------------------------------------
    def probability_maps(self, tokens: torch.Tensor, size: int) -> torch.Tensor:
        """(B, L, 2, S, S): per layer the softmax over [normal, abnormal] of the upsampled logits."""
        assert self.adapters is not None
        adapted = self.adapters(tokens)
        cfg = self.config
        return text_similarity_maps(
            adapted,
            self.text(),
            self.grid,
            size,
            tau=1.0 / cfg["logit_scale"],
            upsample="logits",
            align_corners=cfg["align_corners"],
            index=None,
        )

    def memory_map(
        self, tokens: torch.Tensor, size: int, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, S, S): sum over layers of the upsampled ``min (1 - cos)`` to the normal memory."""
        assert self.memory is not None
        per_layer = [
            nearest_cosine_distance(tokens[:, i], self.memory[:, i], exclude) for i in range(tokens.shape[1])
        ]
        distances = torch.stack(per_layer, dim=1)  # (B, L, N)
        return upsample_grid(distances, self.grid, size, align_corners=self.config["align_corners"]).sum(
            dim=1
        )

    def score_and_map(
        self, embeds: torch.Tensor, tokens: torch.Tensor, size: int, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image probability (B,), map (B, S, S), map maximum (B,))."""
        text = self.text()
        probability = torch.softmax(
            self.config["logit_scale"] * F.normalize(embeds, dim=-1) @ text.T, dim=-1
        )[:, 1]
        maps = self.probability_maps(tokens, size)[:, :, 1].sum(dim=1)
        if self.memory is not None:
            maps = maps + self.memory_map(tokens, size, exclude)
        return probability, maps, maps.flatten(1).max(dim=1).values

    # -- training ---------------------------------------------------------------------------
    def fit(self, support: SupportSet) -> None:
        cfg = self.config
        if cfg["memory"] and not (support.labels == 0).any():
            raise MethodError(
                f"method {self.name!r}: the memory needs normal support images, the support set has none"
            )
        embeds, tokens = self.features(support.items)
        backbone = self.ctx.backbone
        with seeded(self.ctx.seed):
            self.adapters = LayerAdapters(tokens.shape[1], backbone.width, backbone.embed_dim).to(self.device)
        masks = torch.as_tensor(np.asarray(support.masks, dtype=np.float32), device=self.device)
        size = int(masks.shape[-1])
        optimizer = torch.optim.Adam(self.adapters.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]))

        def step(batch: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
            batch = batch.to(self.device)
            probs = self.probability_maps(tokens[batch], size)  # (b, L, 2, S, S)
            target = masks[batch]
            focal = sum(
                focal_loss(probs[:, i, 1], target, cfg["focal_gamma"], smooth=cfg["focal_smooth"])
                for i in range(probs.shape[1])
            )
            dice = sum(dice_loss(probs[:, i, 1], target, cfg["dice_smooth"]) for i in range(probs.shape[1]))
            return {"focal": focal, "dice": dice, "total": focal + dice}

        self.adapters.train()
        schedule = Schedule(cfg["epochs"], cfg["batch_size"], drop_last=False)
        self.history = train(
            optimizer,
            len(support),
            step,
            schedule,
            seed=self.ctx.seed,
            track=self.ctx.track,
            label="april-gan epochs",
        )
        self.adapters.eval()
        if cfg["memory"]:
            self._build_memory(support, embeds, tokens, size)

    def _build_memory(
        self, support: SupportSet, embeds: torch.Tensor, tokens: torch.Tensor, size: int
    ) -> None:
        normal = np.flatnonzero(support.labels == 0)
        self.memory = tokens[torch.as_tensor(normal, device=tokens.device)]
        if self.config["score_fusion"] != "support-minmax":
            return
        # the support images' map maxima, each image scored with its own tokens left out of the memory
        exclude = torch.full((len(support),), -1, dtype=torch.long)
        exclude[torch.as_tensor(normal)] = torch.arange(normal.size)
        with torch.no_grad():
            _, _, peaks = self.score_and_map(embeds, tokens, size, exclude)
        low, high = float(peaks.min()), float(peaks.max())
        self.score_range = (low, high if high > low else low + 1.0)

    # -- prediction -------------------------------------------------------------------------
    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        if self.adapters is None:
            raise MethodError(f"method {self.name!r}: predict() called before fit()")
        embeds, tokens = self.features(items)
        with torch.no_grad():
            probability, maps, peaks = self.score_and_map(embeds, tokens, self.ctx.eval_size)
        if self.memory is not None and self.config["score_fusion"] == "support-minmax":
            low, high = self.score_range
            scores = 0.5 * (probability.double() + (peaks.double() - low) / (high - low))
        else:
            scores = probability.double()
        return Prediction(
            scores=scores.cpu().numpy().astype(np.float64), maps=maps.cpu().numpy().astype(np.float32)
        )


METHODS = [AprilGAN]
