"""``intensity``: a no-CLIP sanity floor.

Breast lesions are mostly hypoechoic (darker than the surrounding tissue), so the darkest
smooth regions of an image are a crude lesion detector. The pixel map is the inverted
brightness, Gaussian-smoothed; the image score is a high quantile of that map. Any learned
method must beat this floor for its numbers to mean anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from bench.kit import Option
from bench.method import Method, Prediction
from bench.types import ImageItem, Task


class IntensityBaseline(Method):
    """Map = smoothed inverted brightness at the evaluation resolution; score = its quantile."""

    name = "intensity"
    table_group = "reference"
    table_rank = 1
    description = "No-CLIP floor: smoothed inverted brightness as map, its high quantile as score"
    tasks = frozenset({Task.DETECT, Task.LOCALIZE})
    uses_support = False
    uses_backbone = False
    options: ClassVar[dict[str, Option]] = {
        "sigma": Option(4.0, float, "Gaussian sigma in pixels of the evaluation resolution", gt=0),
        "quantile": Option(0.99, float, "quantile of the map used as the image score", min=0, max=1),
    }

    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        size = self.ctx.eval_size
        maps = np.stack([self._map(item.rgb(), size) for item in items])
        scores = np.quantile(maps.reshape(len(items), -1), self.config["quantile"], axis=1)
        return Prediction(scores=scores.astype(np.float64), maps=maps)

    def _map(self, rgb: np.ndarray, size: int) -> np.ndarray:
        gray = Image.fromarray(rgb).convert("L").resize((size, size), Image.Resampling.BILINEAR)
        darkness = 1.0 - np.asarray(gray, dtype=np.float32) / 255.0
        return gaussian_filter(darkness, sigma=self.config["sigma"]).astype(np.float32)


METHODS = [IntensityBaseline]
