"""Reference method: training-free CLIP zero-shot detection, classification and localisation.

- Normal / abnormal prompt ensembles: every state phrase x every template, around an
  object name ("breast ultrasound image"). A state phrase containing ``{}`` is formatted
  with the object ("{} with a lesion"); otherwise it is prefixed ("normal" ->
  "normal breast ultrasound image"). A class text embedding is the normalised mean of
  its normalised prompt embeddings.
- Image score: ``softmax(logit_scale * cos(embed, [t_normal, t_abnormal]))[abnormal]``.
- Map: patch tokens of the LAST chosen backbone layer, projected into the joint space
  (:meth:`~bench.kit.clip.Backbone.project_tokens`), the same two-way softmax per patch,
  reshaped to the patch grid and bilinearly upsampled to ``ctx.eval_size``.
- 3-class probabilities: ``softmax(logit_scale * cos(embed, [t_normal, t_benign, t_malignant]))``
  with class prompt ensembles built the same way from ``class_states``.

Everything comes from ``ctx.backbone`` (cached features); text embeddings are computed
once per method instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.kit import Option, text_classifier
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


def _str_lists(value: dict[str, Any]) -> str | None:
    if set(value) != set(class_names()):
        return f"must map exactly {list(class_names())} to phrase lists"
    if not all(
        isinstance(v, list | tuple) and v and all(isinstance(x, str) for x in v) for v in value.values()
    ):
        return "must map every class to a non-empty list of strings"
    return None


def _has_placeholder(value: list[str]) -> str | None:
    return None if all("{}" in t for t in value) else "needs a '{}' placeholder in every template"


class ZeroShotCLIP(Method):
    name = "zeroshot"
    table_group = "reference"
    table_rank = 0
    description = "CLIP zero-shot with normal/abnormal and 3-class prompt ensembles (training-free)"
    tasks = frozenset({Task.DETECT, Task.CLASSIFY, Task.LOCALIZE})
    uses_support = False
    uses_backbone = True
    options: ClassVar[dict[str, Option]] = {
        "object": Option("breast ultrasound image", str, "object name in every prompt"),
        "normal_states": Option(
            ["normal", "healthy", "lesion-free", "unremarkable"],
            list,
            "normal state phrases",
            items=str,
            nonempty=True,
        ),
        "abnormal_states": Option(
            ["abnormal", "{} with a lesion", "{} with a tumor", "{} with a mass"],
            list,
            "abnormal state phrases ('{}' = the object, else the phrase is prefixed)",
            items=str,
            nonempty=True,
        ),
        "templates": Option(
            list(DEFAULT_TEMPLATES),
            list,
            "prompt templates",
            items=str,
            nonempty=True,
            check=_has_placeholder,
        ),
        "class_states": Option(
            {
                "normal": ["normal", "healthy", "{} without a lesion"],
                "benign": ["{} with a benign lesion", "{} with a benign tumor", "benign"],
                "malignant": ["{} with a malignant lesion", "{} with a malignant tumor", "malignant"],
            },
            dict,
            "state phrases of each class for the 3-class probabilities",
            check=_str_lists,
        ),
        "logit_scale": Option(100.0, float, "scale of the cosine similarities before the softmax"),
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.logit_scale = self.config["logit_scale"]
        self._anomaly_text: torch.Tensor | None = None
        self._class_text: torch.Tensor | None = None

    # -- text side (once per instance) ----------------------------------------------------
    def _classifier(self, state_lists: Sequence[Sequence[str]]) -> torch.Tensor:
        prompts = [
            build_prompts(states, self.config["templates"], self.config["object"]) for states in state_lists
        ]
        with self.reported(ValueError):
            return text_classifier(self.ctx.backbone, prompts)

    @property
    def anomaly_text(self) -> torch.Tensor:
        """(2, D) normalised [normal, abnormal] text embeddings."""
        if self._anomaly_text is None:
            self._anomaly_text = self._classifier(
                [self.config["normal_states"], self.config["abnormal_states"]]
            )
        return self._anomaly_text

    @property
    def class_text(self) -> torch.Tensor:
        """(3, D) normalised [normal, benign, malignant] text embeddings."""
        if self._class_text is None:
            states = self.config["class_states"]
            self._class_text = self._classifier([states[c] for c in class_names()])
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


METHODS = [ZeroShotCLIP]
