"""Reference method: training-free CLIP zero-shot detection, classification and localisation.

- Normal / abnormal prompt ensembles: every state phrase x every template, around an
  object name ("breast ultrasound image"). A state phrase containing ``{}`` is formatted
  with the object ("{} with a lesion"); otherwise it is prefixed ("normal" ->
  "normal breast ultrasound image"). A class text embedding is the normalised mean of
  its normalised prompt embeddings.
- Image score: ``softmax(logit_scale * cos(embed, [t_normal, t_abnormal]))[abnormal]``.
- Map: patch tokens of the LAST chosen backbone layer, projected into the joint space
  (:meth:`~bench.backbone.Backbone.project_tokens`), the same two-way softmax per patch,
  reshaped to the patch grid and bilinearly upsampled to ``ctx.eval_size``.
- 3-class probabilities: ``softmax(logit_scale * cos(embed, [t_normal, t_benign, t_malignant]))``
  with class prompt ensembles built the same way from ``class_states``.

Everything comes from ``ctx.backbone`` (cached features); text embeddings are computed
once per method instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import MethodError
from bench.method import Method, MethodContext, Prediction, class_names
from bench.types import ImageItem, Task

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "an ultrasound image of a {}.",
    "a medical image of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "there is a {} in the scene.",
)


def build_prompts(states: Sequence[str], templates: Sequence[str], obj: str) -> list[str]:
    """Every state phrase (with the object) inside every template."""
    phrases = [s.format(obj) if "{}" in s else f"{s} {obj}" for s in states]
    return [t.format(p) for p in phrases for t in templates]


class ZeroShotCLIP(Method):
    name = "zeroshot"
    table_group = "reference"
    table_rank = 0
    description = "CLIP zero-shot with normal/abnormal and 3-class prompt ensembles (training-free)"
    tasks = frozenset({Task.DETECT, Task.CLASSIFY, Task.LOCALIZE})
    uses_support = False
    uses_backbone = True
    default_config: ClassVar[Mapping[str, Any]] = {
        "object": "breast ultrasound image",
        "normal_states": ["normal", "healthy", "lesion-free", "unremarkable"],
        "abnormal_states": ["abnormal", "{} with a lesion", "{} with a tumor", "{} with a mass"],
        "templates": list(DEFAULT_TEMPLATES),
        "class_states": {
            "normal": ["normal", "healthy", "{} without a lesion"],
            "benign": ["{} with a benign lesion", "{} with a benign tumor", "benign"],
            "malignant": ["{} with a malignant lesion", "{} with a malignant tumor", "malignant"],
        },
        "logit_scale": 100.0,
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = self.config
        for key in ("normal_states", "abnormal_states", "templates"):
            if not _is_str_list(cfg[key]):
                raise MethodError(f"method {self.name!r}: option {key!r} must be a non-empty list of strings")
        if any("{}" not in t for t in cfg["templates"]):
            raise MethodError(
                f"method {self.name!r}: every template needs a '{{}}' placeholder, got {cfg['templates']}"
            )
        class_states = cfg["class_states"]
        if not isinstance(class_states, Mapping) or set(class_states) != set(class_names()):
            raise MethodError(
                f"method {self.name!r}: option 'class_states' must map exactly {list(class_names())} "
                "to phrase lists"
            )
        if not all(_is_str_list(class_states[c]) for c in class_names()):
            raise MethodError(
                f"method {self.name!r}: every 'class_states' entry must be a non-empty list of strings"
            )
        try:
            self.logit_scale = float(cfg["logit_scale"])
        except (TypeError, ValueError) as exc:
            raise MethodError(f"method {self.name!r}: 'logit_scale' must be a number") from exc
        self._anomaly_text: torch.Tensor | None = None
        self._class_text: torch.Tensor | None = None

    # -- text side (once per instance) ----------------------------------------------------
    def _class_embedding(self, states: Sequence[str]) -> torch.Tensor:
        prompts = build_prompts(states, self.config["templates"], self.config["object"])
        embeds = F.normalize(self.ctx.backbone.encode_text(prompts).float(), dim=-1)
        return F.normalize(embeds.mean(dim=0), dim=-1)

    @property
    def anomaly_text(self) -> torch.Tensor:
        """(2, D) normalised [normal, abnormal] text embeddings."""
        if self._anomaly_text is None:
            self._anomaly_text = torch.stack(
                [
                    self._class_embedding(self.config["normal_states"]),
                    self._class_embedding(self.config["abnormal_states"]),
                ]
            )
        return self._anomaly_text

    @property
    def class_text(self) -> torch.Tensor:
        """(3, D) normalised [normal, benign, malignant] text embeddings."""
        if self._class_text is None:
            states = self.config["class_states"]
            self._class_text = torch.stack([self._class_embedding(states[c]) for c in class_names()])
        return self._class_text

    # -- prediction -----------------------------------------------------------------------
    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        backbone = self.ctx.backbone
        with torch.no_grad():
            features = backbone.image_features(items)
            embeds = F.normalize(features.embeds.float(), dim=-1)
            anomaly_text = self.anomaly_text.to(embeds.device)
            class_text = self.class_text.to(embeds.device)

            scores = torch.softmax(self.logit_scale * embeds @ anomaly_text.T, dim=-1)[:, 1]
            probs = torch.softmax(self.logit_scale * embeds @ class_text.T, dim=-1)

            patches = F.normalize(backbone.project_tokens(features.patch_tokens[:, -1]).float(), dim=-1)
            patch_scores = torch.softmax(self.logit_scale * patches @ anomaly_text.T, dim=-1)[..., 1]
            grid_h, grid_w = backbone.grid
            maps = patch_scores.reshape(-1, 1, grid_h, grid_w)
            size = self.ctx.eval_size
            maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            maps = maps.clamp_(0.0, 1.0)

        return Prediction(
            scores=scores.cpu().numpy().astype(np.float64),
            probs=probs.cpu().numpy().astype(np.float64),
            maps=maps.cpu().numpy().astype(np.float32),
        )


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) > 0 and all(isinstance(v, str) for v in value)


METHODS = [ZeroShotCLIP]
