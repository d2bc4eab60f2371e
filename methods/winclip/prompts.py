"""WinCLIP's compositional prompt ensemble (state words x templates around an object name).

The lists are the published ones as anomalib ships them
(``src/anomalib/models/image/winclip/prompting.py``): 7 normal states, 4 anomalous states,
21 templates. They are kept verbatim, including anomalib's duplicated template
``"a jpeg corrupted photo of the {}."`` (the paper pairs it with ``"... of a {}."``); the
duplicate gives that template double weight in the class mean, exactly as in anomalib.
All three lists are method options, so a corrected list is one config line away.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Normal state words (``{}`` = the object name).
NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

#: Anomalous state words.
ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

#: Templates (``{}`` = a state phrase). 21 entries, one duplicated, as in anomalib.
TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(states: Sequence[str], templates: Sequence[str], obj: str) -> list[str]:
    """Every state (formatted with the object) inside every template, state-major.

    ``prompt_ensemble(["damaged {}"], ["a photo of a {}."], "bottle")`` ->
    ``["a photo of a damaged bottle."]``.
    """
    return [template.format(state.format(obj)) for state in states for template in templates]
