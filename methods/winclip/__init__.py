"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023), training-free detection and localisation.

Reimplemented after anomalib's ``src/anomalib/models/image/winclip`` (see docs/winclip.md),
on the harness's shared frozen backbone:

- Text: the compositional prompt ensemble (7 normal / 4 anomalous states x 21 templates,
  :mod:`methods.winclip.prompts`) around the ``object`` name; a class embedding is the mean
  of its UNnormalised prompt embeddings (anomalib averages ``encode_text`` outputs; the
  cosine normalises the mean).
- Zero-shot score of an embedding: ``softmax(cos(e, [t_normal, t_anomalous]) / 0.07)[1]``.
- ``winclip``: image score = zero-shot score of the image embedding (cached backbone
  feature). Map: window embeddings (:mod:`methods.winclip.windows`, cached) at each scale
  are scored, aggregated per patch by the harmonic mean over the windows covering it, and
  the per-scale maps are combined by a harmonic mean TOGETHER WITH the image score as a
  constant map (anomalib's "full image scale"), then upsampled bilinearly to the evaluation
  size.
- ``winclip-fewshot`` (WinCLIP+): the support set's normal images are the reference memory.
  Few-shot map = mean over [final-block patch tokens after ``ln_post`` (unprojected, as
  anomalib's ``encode_image`` returns them), window embeddings at each scale (harmonically
  aggregated to patches)] of ``min over all reference tokens of (1 - cos) / 2``. Final map =
  (zero-shot map + few-shot map) / 2; image score = (zero-shot image score + max of the
  few-shot map on the patch grid) / 2.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import MethodError
from bench.method import Method, MethodContext, Prediction, SupportSet
from bench.types import ImageItem, Task
from methods.winclip.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, prompt_ensemble
from methods.winclip.windows import (
    WindowEncoder,
    anomaly_probability,
    association_scores,
    harmonic_aggregation,
    harmonic_combine,
)

log = logging.getLogger(__name__)

#: Prompt-ensemble embeddings per backbone (frozen, so shared by every instance and fit unit).
_TEXT_MEMO: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], torch.Tensor]] = weakref.WeakKeyDictionary()

#: Few-shot patch-token variants: what is compared between query and reference patches.
PATCH_FEATURES = ("ln_post", "projected", "raw")


@dataclass
class WinCLIPOutput:
    """Everything one batch produces, on the patch grid (before upsampling).

    ``zero_shot_scores`` (B,), ``zero_shot_maps`` (B, gh, gw); ``few_shot_maps`` (B, gh, gw)
    or None; ``scores`` (B,) and ``maps`` (B, gh, gw) are the method's final outputs.
    """

    zero_shot_scores: torch.Tensor
    zero_shot_maps: torch.Tensor
    few_shot_maps: torch.Tensor | None
    scores: torch.Tensor
    maps: torch.Tensor


class WinCLIP(Method):
    """Zero-shot WinCLIP: compositional prompts, multi-scale windows, harmonic aggregation."""

    name = "winclip"
    table_group = "anomaly"
    table_rank = 0
    description = "WinCLIP zero-shot: prompt ensemble + multi-scale window embeddings (training-free)"
    tasks = frozenset({Task.DETECT, Task.LOCALIZE})
    uses_support = False
    uses_backbone = True
    default_config: ClassVar[Mapping[str, Any]] = {
        # Object name inside every state phrase.
        "object": "breast ultrasound image",
        # The published compositional prompt ensemble (anomalib's lists, verbatim).
        "normal_states": list(NORMAL_STATES),
        "anomalous_states": list(ANOMALOUS_STATES),
        "templates": list(TEMPLATES),
        # False = anomalib: average the raw prompt embeddings; True = normalise each first.
        "normalize_prompts": False,
        # Softmax temperature on cosine similarities (CLIP's 0.07 = logit scale 1/0.07).
        "temperature": 0.07,
        # Window sizes in patches (stride 1 = every position), as in the paper.
        "scales": [2, 3],
        "stride": 1,
        # True = anomalib: the image score is one more "scale" in the harmonic combination.
        "image_scale": True,
        # Tokens per transformer forward when encoding windows (memory vs speed only).
        "batch_tokens": 16384,
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = self.config
        if not isinstance(cfg["object"], str) or not cfg["object"].strip():
            raise MethodError(f"method {self.name!r}: option 'object' must be a non-empty string")
        for key in ("normal_states", "anomalous_states", "templates"):
            value = cfg[key]
            if not (isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value)):
                raise MethodError(f"method {self.name!r}: option {key!r} must be a non-empty list of strings")
            if any(v.count("{}") != 1 for v in value):
                raise MethodError(
                    f"method {self.name!r}: every entry of {key!r} needs exactly one '{{}}' placeholder"
                )
        try:
            self.temperature = float(cfg["temperature"])
        except (TypeError, ValueError) as exc:
            raise MethodError(f"method {self.name!r}: 'temperature' must be a number") from exc
        if not self.temperature > 0:
            raise MethodError(f"method {self.name!r}: 'temperature' must be > 0")
        scales = cfg["scales"]
        if (
            not isinstance(scales, list | tuple)
            or not scales
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scales)
            or len(set(scales)) != len(scales)
        ):
            raise MethodError(
                f"method {self.name!r}: 'scales' must be distinct positive integers, got {scales!r}"
            )
        if not isinstance(cfg["stride"], int) or cfg["stride"] < 1:
            raise MethodError(f"method {self.name!r}: 'stride' must be a positive integer")
        if not isinstance(cfg["batch_tokens"], int) or cfg["batch_tokens"] < 1:
            raise MethodError(f"method {self.name!r}: 'batch_tokens' must be a positive integer")
        self._text: torch.Tensor | None = None
        self._encoder: WindowEncoder | None = None

    # -- shared pieces ---------------------------------------------------------------------
    @property
    def encoder(self) -> WindowEncoder:
        """The cached window encoder (built on first use: it needs the backbone's grid)."""
        if self._encoder is None:
            backbone = self.ctx.backbone
            try:
                self._encoder = WindowEncoder(
                    backbone, self.config["scales"], self.config["stride"], self.config["batch_tokens"]
                )
            except ValueError as exc:
                raise MethodError(f"method {self.name!r}: {exc} of {backbone.spec.model}") from exc
        return self._encoder

    @property
    def text(self) -> torch.Tensor:
        """(2, D) [normal, anomalous] class text embeddings (not normalised)."""
        if self._text is None:
            cfg = self.config
            rows = []
            for states in (cfg["normal_states"], cfg["anomalous_states"]):
                prompts = tuple(prompt_ensemble(states, cfg["templates"], cfg["object"]))
                embeds = _prompt_embeddings(self.ctx.backbone, prompts)
                if cfg["normalize_prompts"]:
                    embeds = F.normalize(embeds, dim=-1)
                rows.append(embeds.mean(dim=0))
            self._text = torch.stack(rows)
        return self._text

    def _zero_shot(
        self, embeds: torch.Tensor, windows: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and zero-shot maps (B, gh, gw)."""
        text = self.text.to(embeds.device)
        scores = anomaly_probability(embeds, text, self.temperature)
        grid_h, grid_w = self.ctx.backbone.grid
        maps = []
        if self.config["image_scale"]:
            maps.append(scores[:, None].expand(-1, grid_h * grid_w))
        for window_embeds, coverage in zip(windows, self.encoder.coverages, strict=True):
            window_scores = anomaly_probability(window_embeds, text, self.temperature)
            maps.append(harmonic_aggregation(window_scores, coverage.to(embeds.device)))
        return scores, harmonic_combine(maps).reshape(-1, grid_h, grid_w)

    def analyse(self, items: Sequence[ImageItem]) -> WinCLIPOutput:
        """All intermediate outputs of a batch on the patch grid (what :meth:`predict` upsamples)."""
        with torch.no_grad():
            embeds = self.ctx.backbone.image_features(items).embeds
            windows = self.encoder.encode(items)
            scores, maps = self._zero_shot(embeds, windows.windows)
        return WinCLIPOutput(scores, maps, None, scores, maps)

    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        out = self.analyse(items)
        size = self.ctx.eval_size
        maps = F.interpolate(
            out.maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False
        )
        maps = maps[:, 0].clamp_(0.0, 1.0)
        return Prediction(
            scores=out.scores.cpu().numpy().astype(np.float64),
            maps=maps.cpu().numpy().astype(np.float32),
        )


def _prompt_embeddings(backbone: Any, prompts: tuple[str, ...]) -> torch.Tensor:
    """(n, D) raw text embeddings of ``prompts``, computed once per backbone object."""
    memo = _TEXT_MEMO.setdefault(backbone, {})
    if prompts not in memo:
        memo[prompts] = backbone.encode_text(list(prompts)).float()
    return memo[prompts]


class WinCLIPFewShot(WinCLIP):
    """WinCLIP+: zero-shot WinCLIP averaged with nearest-normal-reference association scores."""

    name = "winclip-fewshot"
    table_group = "anomaly"
    table_rank = 0
    description = "WinCLIP+ few-shot: zero-shot WinCLIP + association to the normal support images"
    uses_support = True
    default_config: ClassVar[Mapping[str, Any]] = {
        **WinCLIP.default_config,
        # Patch-level few-shot features from the last block: "ln_post" (anomalib: ln_post,
        # unprojected, width W), "projected" (ln_post @ proj, dim D) or "raw" (residual stream).
        "patch_features": "ln_post",
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if self.config["patch_features"] not in PATCH_FEATURES:
            raise MethodError(
                f"method {self.name!r}: 'patch_features' must be one of {list(PATCH_FEATURES)}, "
                f"got {self.config['patch_features']!r}"
            )
        self._patch_memory: torch.Tensor | None = None
        self._window_memory: list[torch.Tensor] | None = None
        self.n_references = 0

    def _final_patch_features(self, features: Any, windows: Any) -> torch.Tensor:
        """(B, N, C) L2-normalised last-block patch features as chosen by ``patch_features``."""
        backbone = self.ctx.backbone
        if windows.final_patches is not None:
            raw = windows.final_patches
        else:
            raw = features.patch_tokens[:, backbone.layers.index(backbone.depth - 1)]
        mode = self.config["patch_features"]
        if mode == "ln_post":
            tokens = backbone.visual.ln_post(raw)
        elif mode == "projected":
            tokens = backbone.project_tokens(raw)
        else:
            tokens = raw
        return F.normalize(tokens.float(), dim=-1)

    def fit(self, support: SupportSet) -> None:
        references = support.of_class(0)
        if len(references) == 0:
            raise MethodError(
                f"method {self.name!r} needs normal reference images, but the support set has none"
            )
        items = list(references.items)
        with torch.no_grad():
            features = self.ctx.backbone.image_features(items)
            windows = self.encoder.encode(items)
            patches = self._final_patch_features(features, windows)
            self._patch_memory = patches.reshape(-1, patches.shape[-1])
            self._window_memory = [
                F.normalize(w.float(), dim=-1).reshape(-1, w.shape[-1]) for w in windows.windows
            ]
        self.n_references = len(items)
        log.debug("%s: %d normal reference images", self.name, self.n_references)

    def analyse(self, items: Sequence[ImageItem]) -> WinCLIPOutput:
        if self._patch_memory is None or self._window_memory is None:
            raise MethodError(f"method {self.name!r}: predict called before fit (no reference images)")
        backbone = self.ctx.backbone
        grid_h, grid_w = backbone.grid
        with torch.no_grad():
            features = backbone.image_features(items)
            windows = self.encoder.encode(items)
            zs_scores, zs_maps = self._zero_shot(features.embeds, windows.windows)

            patches = self._final_patch_features(features, windows)
            few_shot = [association_scores(patches, self._patch_memory.to(patches.device))]
            for window_embeds, memory, coverage in zip(
                windows.windows, self._window_memory, self.encoder.coverages, strict=True
            ):
                queries = F.normalize(window_embeds.float(), dim=-1)
                scores = association_scores(queries, memory.to(queries.device))
                few_shot.append(harmonic_aggregation(scores, coverage.to(queries.device)))
            fs_maps = torch.stack(few_shot).mean(dim=0).reshape(-1, grid_h, grid_w)

            maps = (zs_maps + fs_maps) / 2.0
            scores = (zs_scores + fs_maps.amax(dim=(-2, -1))) / 2.0
        return WinCLIPOutput(zs_scores, zs_maps, fs_maps, scores, maps)


METHODS = [WinCLIP, WinCLIPFewShot]
