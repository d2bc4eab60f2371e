"""MVFA's support augmentation (``utils.py`` ``augment``), as cached views of the support images.

The official code turns each of the k support images into 11 inputs: the image itself, four
rotations (-pi/8, -pi/16, pi/16, pi/8), four translations ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1),
(0.1, -0.1) in normalised coordinates, i.e. 5 % of the side), a horizontal and a vertical
flip. Rotations and translations are ``affine_grid`` + ``grid_sample`` (bilinear, reflection
padding, ``align_corners=False``) on the image already resized to the input size; masks get the
same transform and are thresholded at 0.5.

Each augmented copy is another input image, so here it is another :class:`ImageItem` (its own
key, derived from the original's key and the transform): the toolkit caches its frozen prefix
like any image's, computed once per grid. Its loader resizes the decoded image to the input
size exactly as the harness preprocessing does (PIL bicubic, whole image), applies the
transform there, and rounds to uint8 (the preprocessing then leaves the size as it is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.types import ImageItem

#: Bumped when what a view renders changes (part of every view's cache key).
VIEW_VERSION = 1

#: The official rotations (radians) and translations (normalised coordinates).
ROTATIONS: tuple[float, ...] = (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)
TRANSLATIONS: tuple[tuple[float, float], ...] = ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))

KINDS = ("identity", "rotate", "translate", "hflip", "vflip")


@dataclass(frozen=True)
class ViewTransform:
    """One of the official geometric transforms: ``kind`` and its parameters."""

    kind: str
    params: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"view transform must be one of {KINDS}, got {self.kind!r}")

    @property
    def tag(self) -> str:
        """A readable, key-safe name (``rotate_-0.392699``, ``translate_0.1_-0.1``, ``hflip``)."""
        return "_".join([self.kind, *(f"{p:.6g}" for p in self.params)])

    def theta(self) -> torch.Tensor | None:
        """The 2 x 3 ``affine_grid`` matrix of a rotation / translation (None for the others)."""
        if self.kind == "rotate":
            (angle,) = self.params
            c, s = math.cos(angle), math.sin(angle)
            return torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=torch.float32)
        if self.kind == "translate":
            a, b = self.params
            return torch.tensor([[1.0, 0.0, a], [0.0, 1.0, b]], dtype=torch.float32)
        return None

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float -> the transformed images (same shape)."""
        theta = self.theta()
        if theta is not None:
            theta = theta.to(images.device)[None].expand(images.shape[0], 2, 3)
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            return F.grid_sample(
                images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
            )
        if self.kind == "hflip":
            return images.flip(-1)
        if self.kind == "vflip":
            return images.flip(-2)
        return images


def official_views(
    rotations: Sequence[float], translations: Sequence[Sequence[float]], flips: bool
) -> list[ViewTransform]:
    """The views in the official order: the image, rotations, translations, hflip, vflip."""
    views = [ViewTransform("identity")]
    views += [ViewTransform("rotate", (float(angle),)) for angle in rotations]
    views += [ViewTransform("translate", (float(a), float(b))) for a, b in translations]
    if flips:
        views += [ViewTransform("hflip"), ViewTransform("vflip")]
    return views


def render_view(item: ImageItem, transform: ViewTransform, size: int) -> np.ndarray:
    """The view as the uint8 (size, size, 3) image the tower sees: the whole image resized to
    ``size`` (PIL bicubic, as the harness preprocessing), transformed, rounded."""
    array = np.asarray(item.rgb())
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    array = array[:, :, :3]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    image = Image.fromarray(np.ascontiguousarray(array))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = transform.apply(tensor)[0].permute(1, 2, 0)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def view_item(item: ImageItem, transform: ViewTransform, size: int) -> ImageItem:
    """The original item for the identity, else a derived item whose key names the view."""
    if transform.kind == "identity":
        return item
    tag = f"mvfa{VIEW_VERSION}-{size}-{transform.tag}"
    return ImageItem(
        id=f"{item.id}~{transform.tag}",
        key=f"{item.key}.{tag}",
        loader=partial(render_view, item, transform, size),
    )


def view_masks(masks: torch.Tensor, transform: ViewTransform) -> torch.Tensor:
    """(n, S, S) masks under the same transform, thresholded at 0.5 as the official loop does."""
    moved = transform.apply(masks[:, None].float())[:, 0]
    return (moved > 0.5).to(masks.dtype)
