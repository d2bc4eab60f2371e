"""The published state x template prompt ensemble of April-GAN (``prompt_ensemble.py`` of
ByChelsea/VAND-APRIL-GAN), which MVFA's ``utils.py`` uses unchanged.

7 normal and 5 abnormal state phrases (``{}`` = the object name) inside 35 templates, state
major: sentence = ``template.format(state.format(object))``. Methods expose all three lists
as options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from bench.kit.prompts import text_classifier

if TYPE_CHECKING:
    from bench.kit.clip import Backbone

VAND_NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

VAND_ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

VAND_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def state_sentences(states: Sequence[str], templates: Sequence[str], obj: str) -> list[str]:
    """Every state (formatted with the object) inside every template, state-major."""
    return [template.format(state.format(obj)) for state in states for template in templates]


def state_classifier(
    backbone: Backbone,
    normal_states: Sequence[str],
    abnormal_states: Sequence[str],
    templates: Sequence[str],
    obj: str,
) -> torch.Tensor:
    """(2, D) normalised [normal, abnormal] class embeddings of a state x template ensemble
    (each class the normalised mean of its normalised sentence embeddings; April-GAN, MVFA).
    A sentence longer than the text context raises ``ValueError``."""
    prompts = [state_sentences(states, templates, obj) for states in (normal_states, abnormal_states)]
    return text_classifier(backbone, prompts)
