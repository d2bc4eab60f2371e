"""Core value types shared by every stage of the harness."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np


class Label(StrEnum):
    """The three image classes of the protocol, in the order used for probability vectors."""

    NORMAL = "normal"
    BENIGN = "benign"
    MALIGNANT = "malignant"


#: Class order of every probability vector and one-hot label in the harness.
CLASSES: tuple[Label, ...] = (Label.NORMAL, Label.BENIGN, Label.MALIGNANT)


def label_index(label: Label) -> int:
    """Position of ``label`` in :data:`CLASSES`."""
    return CLASSES.index(label)


class Task(StrEnum):
    """What a method can output: detection score, 3-class probabilities, pixel map."""

    DETECT = "detect"
    CLASSIFY = "classify"
    LOCALIZE = "localize"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, as read from its files (nothing decoded yet).

    ``mask_paths`` is empty when the image has no mask file (normal images usually);
    several paths are merged into one lesion mask (BUSI's ``_mask_1`` files).
    ``metadata`` keeps patient, device and any extra manifest columns as strings.
    """

    id: str
    image_path: Path
    mask_paths: tuple[Path, ...]
    label: Label
    dataset: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_lesion(self) -> bool:
        return self.label is not Label.NORMAL


@dataclass(frozen=True)
class ImageItem:
    """An image handed to a method: an id, a content key, and a loader the harness owns.

    Methods never open files: they call :meth:`rgb` (decoded by the data layer) or ask
    the backbone for cached features keyed by :attr:`key` (a hash of the file's bytes).
    """

    id: str
    key: str
    loader: Callable[[], np.ndarray] = field(repr=False, compare=False)

    def rgb(self) -> np.ndarray:
        """The image as ``uint8`` array of shape (H, W, 3) at its stored resolution."""
        return self.loader()
