"""AdaCLIP's fixed sentence ensemble (``TextEmbebddingLayer`` in ``method/adaclip.py`` of caoyunkang/AdaCLIP).

7 normal and 5 abnormal state phrases (``{}`` = the object name) inside 4 templates, state
major: sentence = ``template.format(state.format(object))``. The learnable text prompts
then overwrite the first tokens after the start token inside the text encoder. All three
lists are method options.
"""

from __future__ import annotations

from collections.abc import Sequence

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
)


def sentences(states: Sequence[str], templates: Sequence[str], obj: str) -> list[str]:
    """Every state (formatted with the object, ``-`` read as a space) inside every template, state-major."""
    name = obj.replace("-", " ")
    return [template.format(state.format(name)) for state in states for template in templates]
