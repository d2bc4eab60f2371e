"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023), training-free detection and localisation.

Reimplemented after anomalib's ``src/anomalib/models/image/winclip`` (see docs/winclip.md),
on the harness's shared frozen backbone:

- Text: the compositional prompt ensemble (7 normal / 4 anomalous states x 21 templates,
  :mod:`methods.winclip.prompts`) around the ``object`` name; a class embedding is the mean
  of its UNnormalised prompt embeddings (anomalib averages ``encode_text`` outputs; the
  cosine normalises the mean).
- Zero-shot score of an embedding: ``softmax(cos(e, [t_normal, t_anomalous]) / 0.07)[1]``.
- ``winclip``: image score = zero-shot score of the image embedding (cached backbone
  feature). Map: window embeddings (the toolkit's ``windows`` forward variant, cached) at each scale
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BackboneError, MethodError
from bench.kit import FeatureRequest, Features, Option, nearest_distance, text_classifier, window_indices
from bench.method import Method, MethodContext, Prediction, SupportSet
from bench.types import ImageItem, Task
from methods.winclip.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, prompt_ensemble
from methods.winclip.windows import Coverage, anomaly_probability, harmonic_aggregation, harmonic_combine

log = logging.getLogger(__name__)

#: Few-shot patch-token variants: what is compared between query and reference patches.
PATCH_FEATURES = ("ln_post", "projected", "raw")


def _placeholders(value: list[str]) -> str | None:
    if any(v.count("{}") != 1 for v in value):
        return "needs exactly one '{}' placeholder in every entry"
    return None


def _distinct(value: list[int]) -> str | None:
    return "must hold distinct window sizes" if len(set(value)) != len(value) else None


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
    options: ClassVar[dict[str, Option]] = {
        "object": Option(
            "breast ultrasound image", str, "object name inside every state phrase", nonempty=True
        ),
        "normal_states": Option(
            list(NORMAL_STATES),
            list,
            "normal state phrases (anomalib's list)",
            items=str,
            nonempty=True,
            check=_placeholders,
        ),
        "anomalous_states": Option(
            list(ANOMALOUS_STATES),
            list,
            "anomalous state phrases (anomalib's list)",
            items=str,
            nonempty=True,
            check=_placeholders,
        ),
        "templates": Option(
            list(TEMPLATES),
            list,
            "prompt templates (anomalib's 21)",
            items=str,
            nonempty=True,
            check=_placeholders,
        ),
        "normalize_prompts": Option(
            False, bool, "false = anomalib: average the raw prompt embeddings; true = normalise each first"
        ),
        "temperature": Option(0.07, float, "softmax temperature on cosine similarities (CLIP's 0.07)", gt=0),
        "scales": Option(
            [2, 3],
            list,
            "window sizes in patches, as in the paper",
            items=int,
            min=1,
            nonempty=True,
            check=_distinct,
        ),
        "stride": Option(1, int, "window stride in patches (1 = every position)", min=1),
        "image_scale": Option(
            True, bool, "true = anomalib: the image score is one more scale in the harmonic combination"
        ),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.temperature = self.config["temperature"]
        self.request = FeatureRequest.of(
            "windows", scales=self.config["scales"], stride=self.config["stride"]
        )
        self._text: torch.Tensor | None = None
        self._coverages: tuple[Coverage, ...] | None = None

    # -- shared pieces ---------------------------------------------------------------------
    @property
    def coverages(self) -> tuple[Coverage, ...]:
        """Which windows cover each patch, per scale (built on first use: it needs the grid)."""
        if self._coverages is None:
            backbone = self.ctx.backbone
            try:
                windows = [
                    window_indices(backbone.grid, s, self.config["stride"]) for s in self.config["scales"]
                ]
            except ValueError as exc:
                raise MethodError(f"method {self.name!r}: {exc} of {backbone.model_name}") from exc
            self._coverages = tuple(Coverage.of(w, backbone.n_patches) for w in windows)
        return self._coverages

    def windows(self, items: Sequence[ImageItem]) -> Features:
        """Cached window embeddings of ``items`` (fields ``windows_<scale>``, maybe ``final_patches``)."""
        _ = self.coverages  # a scale that does not fit the grid fails here, naming the method
        with self.reported(BackboneError):
            return self.ctx.backbone.features(items, self.request)

    def window_embeds(self, windows: Features) -> list[torch.Tensor]:
        return [windows[f"windows_{s}"] for s in self.config["scales"]]

    @property
    def text(self) -> torch.Tensor:
        """(2, D) [normal, anomalous] class text embeddings (not normalised)."""
        if self._text is None:
            cfg = self.config
            prompts = [
                prompt_ensemble(states, cfg["templates"], cfg["object"])
                for states in (cfg["normal_states"], cfg["anomalous_states"])
            ]
            with self.reported(ValueError):
                self._text = text_classifier(
                    self.ctx.backbone, prompts, normalize_each=cfg["normalize_prompts"], normalize_rows=False
                )
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
        for window_embeds, coverage in zip(windows, self.coverages, strict=True):
            window_scores = anomaly_probability(window_embeds, text, self.temperature)
            maps.append(harmonic_aggregation(window_scores, coverage.to(embeds.device)))
        return scores, harmonic_combine(maps).reshape(-1, grid_h, grid_w)

    def analyse(self, items: Sequence[ImageItem]) -> WinCLIPOutput:
        """All intermediate outputs of a batch on the patch grid (what :meth:`predict` upsamples)."""
        with torch.no_grad():
            embeds = self.ctx.backbone.image_features(items).embeds
            windows = self.windows(items)
            scores, maps = self._zero_shot(embeds, self.window_embeds(windows))
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


class WinCLIPFewShot(WinCLIP):
    """WinCLIP+: zero-shot WinCLIP averaged with nearest-normal-reference association scores."""

    name = "winclip-fewshot"
    table_group = "anomaly"
    table_rank = 0
    description = "WinCLIP+ few-shot: zero-shot WinCLIP + association to the normal support images"
    uses_support = True
    options: ClassVar[dict[str, Option]] = {
        **WinCLIP.options,
        "patch_features": Option(
            "ln_post",
            str,
            "last-block patch features compared with the references: ln_post (anomalib: unprojected, "
            "width W), projected (ln_post @ proj) or raw (residual stream)",
            choices=PATCH_FEATURES,
        ),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self._patch_memory: torch.Tensor | None = None
        self._window_memory: list[torch.Tensor] | None = None
        self.n_references = 0

    def _final_patch_features(self, features: Features, windows: Features) -> torch.Tensor:
        """(B, N, C) L2-normalised last-block patch features as chosen by ``patch_features``."""
        backbone = self.ctx.backbone
        if "final_patches" in windows.fields:
            raw = windows["final_patches"]
        else:
            raw = features.patch_tokens[:, backbone.layers.index(backbone.depth - 1)]
        mode = self.config["patch_features"]
        if mode == "ln_post":
            tokens = backbone.ln_post(raw)
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
            windows = self.windows(items)
            patches = self._final_patch_features(features, windows)
            self._patch_memory = patches.reshape(-1, patches.shape[-1])
            self._window_memory = [
                F.normalize(w.float(), dim=-1).reshape(-1, w.shape[-1]) for w in self.window_embeds(windows)
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
            windows = self.windows(items)
            window_embeds = self.window_embeds(windows)
            zs_scores, zs_maps = self._zero_shot(features.embeds, window_embeds)

            patches = self._final_patch_features(features, windows)
            few_shot = [nearest_distance(patches, self._patch_memory.to(patches.device))]
            for embeds, memory, coverage in zip(
                window_embeds, self._window_memory, self.coverages, strict=True
            ):
                queries = F.normalize(embeds.float(), dim=-1)
                scores = nearest_distance(queries, memory.to(queries.device))
                few_shot.append(harmonic_aggregation(scores, coverage.to(queries.device)))
            fs_maps = torch.stack(few_shot).mean(dim=0).reshape(-1, grid_h, grid_w)

            maps = (zs_maps + fs_maps) / 2.0
            scores = (zs_scores + fs_maps.amax(dim=(-2, -1))) / 2.0
        return WinCLIPOutput(zs_scores, zs_maps, fs_maps, scores, maps)


METHODS = [WinCLIP, WinCLIPFewShot]
