"""AnomalyCLIP (Zhou et al., ICLR 2024; zqhang/AnomalyCLIP): object-agnostic prompts, trained on the support.

Reimplemented from the official ``train.py``, ``test.py``, ``prompt_ensemble.py`` and
``AnomalyCLIP_lib/AnomalyCLIP.py`` (see docs/anomalyclip.md for every detail and deviation):

- frozen CLIP run ONCE per image through the toolkit's ``vv-attention`` variant (DPAM): from
  block ``dpam_start`` on, a parallel path whose attention is ``softmax(v v^T) v`` on the
  original stream's ``ln_1`` and which skips the FFN; the used blocks' patch tokens come from
  that path, through ``ln_post`` and ``proj``; the global image feature is the original
  path's final class token ``@ proj`` (no ``ln_post``, as the official code);
- learnable prompts ``[V]x12 object.`` / ``[V]x12 damaged object.`` (separate contexts,
  N(0, 0.02)) plus 4 learnable tokens shared by both prompts that replace positions 1..4
  entering text blocks 1..8 (depth 9), through ``encode_embeddings``' deep prompts;
- per layer ``softmax(cos(patch, [t_n, t_a]) / 0.07)`` on the grid, bilinearly upsampled;
  map = sum over layers of ``(p_abn + 1 - p_norm) / 2``, Gaussian sigma 4 px at the input
  resolution; image score ``softmax(cos(image, T) / 0.07)[abnormal]``;
- loss: ``4 * sum over layers of [Focal + Dice(p_abn, mask) + Dice(p_norm, 1 - mask)]``
  plus the image cross-entropy (normal vs lesion); Adam lr 1e-3, betas (0.5, 0.999),
  batch 8, 15 epochs (fixed; the official code also evaluates its last epoch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BackboneError, MethodError
from bench.kit import (
    Backbone,
    FeatureRequest,
    Option,
    PromptLearner,
    Schedule,
    VisionTower,
    adam_options,
    dice_loss,
    feature_options,
    focal_loss,
    gaussian_smooth,
    make_generator,
    segmentation_loss_options,
    sigma_at,
    text_similarity_maps,
    train,
)
from bench.method import Method, MethodContext, Prediction, SupportSet
from bench.types import ImageItem, Task

#: The global image feature: the official raw class token ``@ proj``, or CLIP's ``encode_image``.
IMAGE_FEATURES = ("cls-proj", "encode-image")


class AnomalyCLIP(Method):
    """AnomalyCLIP: object-agnostic learnable prompts with deep text tokens, DPAM patch tokens."""

    name = "anomalyclip"
    description = (
        "AnomalyCLIP (ICLR 2024): object-agnostic learnable prompts, deep text tokens, V-V attention"
    )
    tasks = frozenset({Task.DETECT, Task.LOCALIZE})
    table_group = "anomaly"
    table_rank = 2
    options: ClassVar[dict[str, Option]] = {
        **feature_options("6/12/18/24 = blocks 5/11/17/23"),
        "position_resize": Option(
            "bilinear",
            str,
            "positional-embedding resize for another input size (official: bilinear)",
            choices=("bilinear", "bicubic"),
        ),
        "dpam_start": Option(
            None,
            int,
            "first block with V-V attention (null = the first used layer; official DPAM_layer 20: block 5)",
            nullable=True,
            min=0,
        ),
        "normal_prompt": Option("object", str, "normal state phrase after the context (official: 'object')"),
        "abnormal_prompt": Option("damaged object", str, "abnormal phrase (official: 'damaged object')"),
        "n_ctx": Option(12, int, "learnable context tokens per prompt (official Prompt_length: 12)", min=1),
        "init_std": Option(
            0.02, float, "std of the context and deep-token initialisation (official: 0.02)", min=0
        ),
        "deep_length": Option(4, int, "learnable text tokens per deep layer (official: 4)", min=1),
        "deep_depth": Option(
            9,
            int,
            "text blocks 1 .. depth-1 get deep tokens (official learnabel_text_embedding_depth: 9)",
            min=1,
        ),
        "temperature": Option(
            0.07, float, "softmax temperature (official: 0.07; CLIP's logit scale unused)", gt=0
        ),
        "image_feature": Option(
            "cls-proj",
            str,
            "global feature: raw class token @ proj (official) or encode_image",
            choices=IMAGE_FEATURES,
        ),
        "sigma": Option(
            4.0, float, "Gaussian sigma of the map in px at the input resolution (official: 4)", min=0
        ),
        **adam_options(epochs=15, batch_size=8, lr=1e-3, betas=(0.5, 0.999), source="official"),
        "pixel_loss_weight": Option(
            4.0, float, "weight of the pixel losses (official train.py: lam = 4)", min=0
        ),
        **segmentation_loss_options("official, from April-GAN"),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if self.config["deep_length"] > self.config["n_ctx"]:
            raise MethodError(
                f"method {self.name!r}: option 'deep_length' must not exceed n_ctx {self.config['n_ctx']} "
                f"(the deep tokens replace context slots), got {self.config['deep_length']}"
            )
        self.prompts: AgnosticPrompts | None = None
        self.history: list[dict[str, float]] = []
        self._request: FeatureRequest | None = None
        self._text: torch.Tensor | None = None

    # -- frozen pieces ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.ctx.backbone.device

    @property
    def request(self) -> FeatureRequest:
        """The ``vv-attention`` request (DPAM from ``dpam_start``, default the first used block)."""
        if self._request is None:
            cfg = self.config
            backbone = self.ctx.backbone
            layers = tuple(cfg["layers"]) if cfg["layers"] is not None else backbone.layers
            start = cfg["dpam_start"] if cfg["dpam_start"] is not None else min(layers)
            self._request = FeatureRequest.of(
                "vv-attention",
                layers=layers,
                input_size=cfg["input_size"],
                resize=cfg["position_resize"],
                start=start,
            )
        return self._request

    def features(self, items: Sequence[ImageItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (normalised global feature (B, D), normalised projected DPAM patch tokens (B, L, N, D))."""
        backbone = self.ctx.backbone
        with self.reported(BackboneError):
            feats = backbone.features(items, self.request)
        image = backbone.proj(feats.cls_token) if self.config["image_feature"] == "cls-proj" else feats.embeds
        patches = backbone.project_tokens(feats.vv_tokens)
        return F.normalize(image, dim=-1), F.normalize(patches, dim=-1)

    @property
    def grid(self) -> tuple[int, int]:
        return self._tower().grid

    @property
    def input_size(self) -> int:
        return self._tower().input_size

    def _tower(self) -> VisionTower:
        with self.reported(BackboneError):
            return self.ctx.backbone.tower_for(self.request)

    # -- maps and scores ------------------------------------------------------------------------
    def layer_probabilities(self, patches: torch.Tensor, text: torch.Tensor, size: int) -> torch.Tensor:
        """(B, L, 2, S, S): per layer softmax(cos / T) over [normal, abnormal], upsampled bilinearly."""
        return text_similarity_maps(
            patches,
            text,
            self.grid,
            size,
            tau=self.config["temperature"],
            upsample="probabilities",
            index=None,
        )

    def image_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return image @ text.T / self.config["temperature"]

    def anomaly_map(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Sum over layers of ``(p_abn + 1 - p_norm) / 2``, then the official Gaussian (B, S, S)."""
        maps = ((probabilities[:, :, 1] + 1.0 - probabilities[:, :, 0]) / 2.0).sum(dim=1)
        sigma = self.config["sigma"]
        if sigma > 0:
            maps = gaussian_smooth(maps, sigma_at(int(maps.shape[-1]), sigma, self.input_size))
        return maps

    # -- training ---------------------------------------------------------------------------
    def fit(self, support: SupportSet) -> None:
        cfg = self.config
        self.prompts = AgnosticPrompts(self.ctx.backbone, cfg, self.ctx.seed)
        image, patches = self.features(support.items)
        masks = torch.as_tensor(np.asarray(support.masks, dtype=np.float32), device=self.device)
        lesion = torch.as_tensor(np.asarray(support.labels) > 0, dtype=torch.long, device=self.device)
        size = int(masks.shape[-1])
        optimizer = torch.optim.Adam(self.prompts.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]))

        def step(batch: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
            batch = batch.to(self.device)
            assert self.prompts is not None
            text = self.prompts()
            image_loss = F.cross_entropy(self.image_logits(image[batch], text), lesion[batch])
            probs = self.layer_probabilities(patches[batch], text, size)
            target = masks[batch]
            pixel = sum(
                focal_loss(probs[:, i, 1], target, cfg["focal_gamma"], smooth=cfg["focal_smooth"])
                + dice_loss(probs[:, i, 1], target, cfg["dice_smooth"])
                + dice_loss(probs[:, i, 0], 1.0 - target, cfg["dice_smooth"])
                for i in range(probs.shape[1])
            )
            total = cfg["pixel_loss_weight"] * pixel + image_loss
            return {"pixel": pixel, "image": image_loss, "total": total}

        self.prompts.train()
        schedule = Schedule(cfg["epochs"], cfg["batch_size"], drop_last=False)
        self.history = train(
            optimizer,
            len(support),
            step,
            schedule,
            seed=self.ctx.seed,
            track=self.ctx.track,
            label="anomalyclip epochs",
        )
        self.prompts.eval()
        with torch.no_grad():
            self._text = self.prompts()

    # -- prediction -------------------------------------------------------------------------
    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        if self._text is None:
            raise MethodError(f"method {self.name!r}: predict() called before fit()")
        image, patches = self.features(items)
        with torch.no_grad():
            scores = torch.softmax(self.image_logits(image, self._text), dim=-1)[:, 1]
            maps = self.anomaly_map(self.layer_probabilities(patches, self._text, self.ctx.eval_size))
        return Prediction(
            scores=scores.double().cpu().numpy().astype(np.float64),
            maps=maps.cpu().numpy().astype(np.float32),
        )


class AgnosticPrompts(nn.Module):
    """``[V]x n object.`` / ``[V]x n damaged object.`` with shared deep text tokens -> (2, D) normalised."""

    def __init__(self, backbone: Backbone, config: Mapping[str, Any], seed: int) -> None:
        super().__init__()
        self.learner = PromptLearner(
            backbone,
            [config["normal_prompt"], config["abnormal_prompt"]],
            n_ctx=config["n_ctx"],
            class_specific=True,
            init_std=config["init_std"],
            seed=seed,
        )
        n_deep, length, width = config["deep_depth"] - 1, config["deep_length"], backbone.text_width
        if n_deep > backbone.text_depth - 1:
            raise MethodError(
                f"method 'anomalyclip': option 'deep_depth' {config['deep_depth']} needs {n_deep} text "
                f"blocks after the first, the text encoder has {backbone.text_depth - 1}"
            )
        generator = make_generator(seed + 1)
        self.deep = nn.ParameterList(
            nn.Parameter(torch.randn(length, width, generator=generator) * config["init_std"])
            for _ in range(n_deep)
        )
        self.to(backbone.device)

    def forward(self) -> torch.Tensor:
        deep = {layer + 1: tokens for layer, tokens in enumerate(self.deep)}  # text blocks 1 .. depth-1
        return F.normalize(self.learner(deep_prompts=deep), dim=-1)


METHODS = [AnomalyCLIP]
