"""VCP-CLIP (Qu et al., ECCV 2024; xiaozhen228/VCP-CLIP): visual context prompting, trained on the support.

Reimplemented from the official ``train.py``, ``test.py``, ``models/pre_vcp.py``,
``models/post_vcp.py``, ``models/prompt_ensemble.py``, ``models/model_CLIP.py`` and
``utils/loss.py`` (see docs/vcpclip.md for every detail and deviation):

- frozen CLIP, ``standard`` features: the global embedding ``ln_post(cls) @ proj`` (not
  normalised) and the RAW patch tokens of the used blocks (no ``ln_post``, no ``proj``);
- Pre-VCP: r = 2 class tokens per image, ``query + Conv1d(1 -> r, k 3)(global embedding)``,
  put into "a photo of a good [c_1 c_2]" / "a photo of a damaged [c_1 c_2]" at the class
  slot (before the positional embedding); VPT-style text prompts: one token after SOS entering
  text block 0 without positional embedding, replaced in every later block, all through one
  ``Linear`` + dropout 0.1, a trainable ``LayerNorm`` before ``ln_final``;
- Pre-VCP map: per layer ``softmax(exp(tau_1) cos(Linear_l(P_l), T))``; Post-VCP map: the
  text attends to the layer's normalised patch tokens (8 heads, no scaling), per layer
  ``softmax(exp(tau_2) cos(P_l, PostVCP(T, P_l)))``; logits upsampled bilinearly
  (align_corners) before the softmax;
- map: ``gaussian(0.2 mean_l pre + 0.8 mean_l post, sigma 8 px at the input size)``; image
  score: mean of the top 2000 (at 518 px) pixels of the unsmoothed pre map + the same of
  the post map; both min-max normalised with SUPPORT-set statistics (the official code uses
  the test images of the class);
- loss: Focal + Dice on every layer's pre and post maps, summed; Adam betas (0.5, 0.999),
  lr 4e-5 (temperatures 0.01), batch 32, 10 epochs (fixed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from bench.errors import BackboneError, MethodError
from bench.kit import (
    FeatureRequest,
    Option,
    Schedule,
    adam_options,
    dice_loss,
    feature_options,
    focal_loss,
    gaussian_smooth,
    seeded,
    segmentation_loss_options,
    sigma_at,
    train,
    upsample_grid,
)
from bench.method import Method, MethodContext, Prediction, SupportSet
from bench.types import ImageItem, Task
from methods.vcpclip.modules import SLOT, ContextPrompting, PostVCP, TemplateSlots, TextPrompts, VCPModel

#: How maps and scores are rescaled after fitting: by the support images' range, or not at all.
NORMALIZATIONS = ("support-minmax", "none")

__all__ = ["VCPCLIP", "ContextPrompting", "PostVCP", "TemplateSlots", "TextPrompts", "VCPModel"]


def _templates_problem(value: Any) -> str | None:
    if not all(isinstance(t, str) and t.count(SLOT) == 1 for t in value):
        return "must hold strings with exactly one '{}' (the class slot)"
    return None


def _templates_option(default: str, official: str) -> Option:
    return Option(
        [default],
        list,
        f"templates with the class slot '{{}}' (official: [{official!r}])",
        items=str,
        nonempty=True,
        check=_templates_problem,
    )


def top_k_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    """(B, S, S) -> (B,): the mean of each map's k largest values (official ``np.partition``)."""
    return maps.flatten(1).topk(k, dim=1).values.mean(dim=1)


class VCPCLIP(Method):
    """VCP-CLIP: image-conditioned class tokens in learnable text prompts, text-to-patch attention."""

    name = "vcpclip"
    description = "VCP-CLIP (ECCV 2024): visual context prompting (Pre-VCP class tokens, Post-VCP attention)"
    tasks = frozenset({Task.DETECT, Task.LOCALIZE})
    table_group = "anomaly"
    table_rank = 3
    options: ClassVar[dict[str, Option]] = {
        **feature_options("6/12/18/24 = blocks 5/11/17/23"),
        "normal_templates": _templates_option("a photo of a good {}", "a photo of a good <|class|>"),
        "abnormal_templates": _templates_option("a photo of a damaged {}", "a photo of a damaged <|class|>"),
        "class_length": Option(2, int, "class tokens r from Pre-VCP (official prompt_len: 2)", min=1),
        "use_global": Option(
            True, bool, "add the projected global embedding to the class query (official use_global: true)"
        ),
        "deep_prompts": Option(
            True,
            bool,
            "learnable text tokens in every text block + the prompt LayerNorm (official total_d_layer_len 11 "
            "= every block after the first; false = 0: none)",
        ),
        "deep_length": Option(1, int, "learnable text tokens per block (official deep_prompt_len: 1)", min=1),
        "prompt_dropout": Option(
            0.1, float, "dropout on the projected text tokens while training (official: 0.1)", min=0, max=0.99
        ),
        "heads": Option(8, int, "Post-VCP attention heads (official num_heads: 8)", min=1),
        "temperature": Option(
            0.07, float, "initial temperature of both maps, tau = log(1 / t) (official: 0.07)", gt=0
        ),
        "learn_temperature": Option(
            True, bool, "train tau_1 and tau_2 (official: true, in their own Adam group)"
        ),
        "temperature_lr": Option(0.01, float, "Adam learning rate of tau_1, tau_2 (official: 0.01)", gt=0),
        "pre_weight": Option(
            0.2, float, "weight alpha of the Pre-VCP map in the fused map (official alpha: 0.2)", min=0, max=1
        ),
        "sigma": Option(
            8.0,
            float,
            "Gaussian sigma of the map in px at the input resolution (official: 8); 0 = off",
            min=0,
        ),
        "top_k": Option(
            2000,
            int,
            "image score: mean of the top k pixels at the input resolution, rescaled by area to the map "
            "(official: 2000 at 518 px)",
            min=1,
        ),
        "normalize": Option(
            "support-minmax",
            str,
            "min-max rescaling of maps and scores: by the support images' range (official: by the test "
            "images of the class) or none",
            choices=NORMALIZATIONS,
        ),
        **adam_options(epochs=10, batch_size=32, lr=4e-5, betas=(0.5, 0.999), source="official, VisA"),
        **segmentation_loss_options("official"),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = self.config
        layers = None if cfg["layers"] is None else tuple(cfg["layers"])
        self.request = FeatureRequest.of("standard", layers=layers, input_size=cfg["input_size"])
        self.model: VCPModel | None = None
        self.history: list[dict[str, float]] = []
        self.map_range: tuple[float, float] = (0.0, 1.0)
        self.score_range: tuple[float, float] = (0.0, 1.0)

    # -- frozen pieces ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.ctx.backbone.device

    def features(self, items: Sequence[ImageItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (global embeddings (B, D), raw patch tokens (B, L, N, W)) at the method's blocks, size."""
        with self.reported(BackboneError):
            feats = self.ctx.backbone.features(items, self.request)
        return feats.embeds, feats.patch_tokens

    @property
    def grid(self) -> tuple[int, int]:
        return self._tower_value("grid")

    @property
    def input_size(self) -> int:
        return self._tower_value("input_size")

    def _tower_value(self, name: str) -> Any:
        with self.reported(BackboneError):
            return getattr(self.ctx.backbone.tower_for(self.request), name)

    # -- maps and scores ------------------------------------------------------------------------
    def probabilities(self, logits: torch.Tensor, size: int) -> torch.Tensor:
        """(B, L, 2, N) logits -> (B, L, 2, S, S): bilinear upsampling (align_corners) then softmax."""
        return torch.softmax(upsample_grid(logits, self.grid, size, align_corners=True), dim=2)

    def layer_maps(
        self, embeds: torch.Tensor, tokens: torch.Tensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Pre-VCP, Post-VCP) probabilities, each (B, L, 2, S, S) [normal, abnormal]."""
        assert self.model is not None
        _, pre, post = self.model.logits(embeds, tokens)
        return self.probabilities(pre, size), self.probabilities(post, size)

    def top_k(self, size: int) -> int:
        """The official k (pixels at the input resolution) for a map of ``size`` pixels, by area."""
        k = round(self.config["top_k"] * size * size / self.input_size**2)
        return int(min(max(k, 1), size * size))

    def fuse(self, pre: torch.Tensor, post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-mean anomaly maps (B, S, S) -> (smoothed fused map (B, S, S), image score (B,))."""
        alpha, sigma = self.config["pre_weight"], self.config["sigma"]
        size = int(pre.shape[-1])
        fused = alpha * pre + (1.0 - alpha) * post
        if sigma > 0:
            fused = gaussian_smooth(fused, sigma_at(size, sigma, self.input_size))
        k = self.top_k(size)
        return fused, top_k_mean(pre, k) + top_k_mean(post, k)

    def raw_outputs(
        self, embeds: torch.Tensor, tokens: torch.Tensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, S, S), scores (B,)) before the min-max rescaling, in chunks of the backbone's batch."""
        maps, scores = [], []
        step = max(1, self.ctx.backbone.batch_size)
        with torch.no_grad():
            for start in range(0, embeds.shape[0], step):
                pre, post = self.layer_maps(embeds[start : start + step], tokens[start : start + step], size)
                fused, score = self.fuse(pre[:, :, 1].mean(dim=1), post[:, :, 1].mean(dim=1))
                maps.append(fused)
                scores.append(score)
        return torch.cat(maps), torch.cat(scores)

    # -- training ---------------------------------------------------------------------------
    def _check(self, width: int) -> None:
        backbone = self.ctx.backbone
        if width % self.config["heads"]:
            raise MethodError(
                f"method {self.name!r}: option 'heads' {self.config['heads']} must divide the image "
                f"tower width {width}"
            )
        if self.config["deep_prompts"] and backbone.text_depth < 2:
            raise MethodError(
                f"method {self.name!r}: option 'deep_prompts' needs a text encoder of at least 2 blocks"
            )

    def fit(self, support: SupportSet) -> None:
        cfg = self.config
        embeds, tokens = self.features(support.items)
        self._check(int(tokens.shape[-1]))
        with seeded(self.ctx.seed):
            self.model = VCPModel(self.ctx.backbone, cfg, int(tokens.shape[1]), int(tokens.shape[-1]))
        self.model.text.seed(self.ctx.seed + 1)
        masks = torch.as_tensor(np.asarray(support.masks, dtype=np.float32), device=self.device)
        masks = (masks > 0.5).float()
        size = int(masks.shape[-1])
        temperatures = {id(p) for p in self.model.temperatures()}
        groups: list[dict[str, Any]] = [
            {"params": [p for p in self.model.parameters() if id(p) not in temperatures], "lr": cfg["lr"]}
        ]
        if cfg["learn_temperature"]:
            groups.append({"params": self.model.temperatures(), "lr": cfg["temperature_lr"]})
        optimizer = torch.optim.Adam(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))

        def segmentation(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return sum(
                focal_loss(probs[:, i, 1], target, cfg["focal_gamma"], smooth=cfg["focal_smooth"])
                + dice_loss(probs[:, i, 1], target, cfg["dice_smooth"])
                for i in range(probs.shape[1])
            )

        def step(batch: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
            batch = batch.to(self.device)
            pre, post = self.layer_maps(embeds[batch], tokens[batch], size)
            pre_loss, post_loss = segmentation(pre, masks[batch]), segmentation(post, masks[batch])
            return {"pre": pre_loss, "post": post_loss, "total": pre_loss + post_loss}

        self.model.train()
        schedule = Schedule(cfg["epochs"], cfg["batch_size"], drop_last=False)
        self.history = train(
            optimizer,
            len(support),
            step,
            schedule,
            seed=self.ctx.seed,
            track=self.ctx.track,
            label="vcpclip epochs",
        )
        self.model.eval()
        if cfg["normalize"] == "support-minmax":
            maps, scores = self.raw_outputs(embeds, tokens, size)
            self.map_range = _range(maps)
            self.score_range = _range(scores)

    # -- prediction -------------------------------------------------------------------------
    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        if self.model is None:
            raise MethodError(f"method {self.name!r}: predict() called before fit()")
        embeds, tokens = self.features(items)
        maps, scores = self.raw_outputs(embeds, tokens, self.ctx.eval_size)
        if self.config["normalize"] == "support-minmax":
            maps = (maps - self.map_range[0]) / (self.map_range[1] - self.map_range[0])
            scores = (scores.double() - self.score_range[0]) / (self.score_range[1] - self.score_range[0])
        return Prediction(
            scores=scores.double().cpu().numpy().astype(np.float64),
            maps=maps.float().cpu().numpy().astype(np.float32),
        )


def _range(values: torch.Tensor) -> tuple[float, float]:
    """(min, max) of ``values``; a constant gives a unit range (the official ``normalize``
    returns zeros then)."""
    low, high = float(values.min()), float(values.max())
    return (low, high if high > low else low + 1.0)


METHODS = [VCPCLIP]
