"""Checks of what a method returns, before anything of its cell is stored.

A method's :class:`~bench.method.Prediction` must hold real, finite numbers of the declared
shapes for every task the method declares; a malformed one is a
:class:`~bench.errors.MethodError` naming the cell, the method and the first bad image, and
nothing of that cell is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from bench.errors import ConfigError, MethodError
from bench.method import Prediction
from bench.types import CLASSES, ImageItem, Task

if TYPE_CHECKING:
    from bench.runner import Cell

__all__ = ["PROB_SUM_TOLERANCE", "check_storable", "validate_prediction"]

#: Probabilities must sum to one within this tolerance.
PROB_SUM_TOLERANCE = 1e-4


def validate_prediction(
    prediction: Prediction, items: Sequence[ImageItem], tasks: frozenset[Task], size: int, cell: Cell
) -> None:
    """Reject malformed or non-finite method output with a message naming the cell and image."""
    b = len(items)

    def fail(problem: str) -> NoReturn:
        raise MethodError(
            f"cell {cell}: method {cell.unit.method!r} returned {problem}; nothing was written for this cell"
        )

    def first_bad(values: np.ndarray) -> str:
        bad = np.flatnonzero(~np.isfinite(values.reshape(b, -1)).all(axis=1))
        return items[int(bad[0])].id if bad.size else "?"

    def numeric(name: str, values: object) -> np.ndarray:
        try:
            array = np.asarray(values)
        except (TypeError, ValueError) as exc:  # ragged nested lists and the like
            fail(f"{name} that are not an array ({exc})")
        if array.dtype.kind not in "biuf":
            fail(f"non-numeric {name} (dtype {array.dtype}); return real numbers")
        return array

    scores = numeric("scores", prediction.scores)
    if scores.shape != (b,):
        fail(f"scores of shape {scores.shape} for a batch of {b} images (expected ({b},))")
    if not np.isfinite(scores).all():
        fail(f"a NaN or infinite score (first bad image: {first_bad(scores)})")
    if Task.CLASSIFY in tasks:
        probs = prediction.probs
        if probs is None or np.shape(probs) != (b, len(CLASSES)):
            fail(f"probabilities of shape {None if probs is None else np.shape(probs)} (expected ({b}, 3))")
        probs = numeric("probabilities", probs)
        if not np.isfinite(probs).all():
            fail(f"NaN or infinite probabilities (first bad image: {first_bad(probs)})")
        if (probs < 0).any() or np.abs(probs.sum(axis=1) - 1).max() > PROB_SUM_TOLERANCE:
            fail("probabilities that are negative or do not sum to 1")
    if Task.LOCALIZE in tasks:
        maps = prediction.maps
        if maps is None or np.shape(maps) != (b, size, size):
            fail(f"maps of shape {None if maps is None else np.shape(maps)} (expected ({b}, {size}, {size}))")
        maps = numeric("maps", maps)
        if not np.isfinite(maps).all():
            fail(f"NaN or infinite map values (first bad image: {first_bad(maps)})")


def check_storable(maps: np.ndarray, dtype: np.dtype, items: Sequence[ImageItem], cell: Cell) -> None:
    """Refuse maps that ``dtype`` cannot hold (float16 turns finite values above 65504 into inf)."""
    limit = float(np.finfo(dtype).max)
    peaks = np.abs(np.asarray(maps)).reshape(len(items), -1).max(axis=1).astype(np.float64)
    if (peaks > limit).any():
        first = items[int(np.flatnonzero(peaks > limit)[0])].id
        raise ConfigError(
            f"cell {cell}: method {cell.unit.method!r} returned map values up to {peaks.max():.6g} "
            f"(first on image {first}), beyond what {dtype} stores ({limit:g}); run with "
            "--maps-dtype float32 (nothing was written for this cell)"
        )
