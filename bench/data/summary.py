"""A dataset at a glance (for ``bench datasets``), and ImageItem construction."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.data.dataset import Dataset
from bench.data.io import file_key, image_size, load_rgb
from bench.data.masks import pixel_exclusions
from bench.types import CLASSES, ImageItem, Label, Sample

__all__ = ["CLASS_COLUMNS", "DatasetSummary", "describe_dataset", "image_item"]

#: Column headers of :meth:`DatasetSummary.class_rows`.
CLASS_COLUMNS = ("class", "images", "with mask", "pixel-usable")


@dataclass(frozen=True)
class DatasetSummary:
    """Counts, mask coverage, image size range and problems of one dataset.

    ``pixel_usable`` counts images that enter pixel metrics and the support pool (see
    :mod:`bench.data.masks`). Sizes come from image headers, ``(min, max)`` in pixels.
    """

    name: str
    root: Path
    counts: dict[Label, int]
    with_mask: dict[Label, int]
    pixel_usable: dict[Label, int]
    width_range: tuple[int, int]
    height_range: tuple[int, int]
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def class_rows(self) -> list[tuple[str, ...]]:
        """One row of strings per class plus a ``total`` row, columns :data:`CLASS_COLUMNS`."""
        rows = [
            (label.value, str(self.counts[label]), str(self.with_mask[label]), str(self.pixel_usable[label]))
            for label in CLASSES
        ]
        rows.append(
            (
                "total",
                str(self.total),
                str(sum(self.with_mask.values())),
                str(sum(self.pixel_usable.values())),
            )
        )
        return rows

    def rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` string pairs for a two-column table (problems are in :attr:`problems`)."""
        counts = " / ".join(f"{self.counts[label]} {label.value}" for label in CLASSES)
        masks = " / ".join(f"{self.with_mask[label]} {label.value}" for label in CLASSES)
        usable = " / ".join(f"{self.pixel_usable[label]} {label.value}" for label in CLASSES)
        return [
            ("dataset", self.name),
            ("root", str(self.root)),
            ("images", f"{self.total} ({counts})"),
            ("with mask", masks),
            ("pixel-usable", usable),
            ("width", _span(self.width_range)),
            ("height", _span(self.height_range)),
            ("problems", str(len(self.problems)) if self.problems else "none"),
        ]

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form (``bench datasets --json``)."""
        return {
            "name": self.name,
            "root": str(self.root),
            "counts": {label.value: self.counts[label] for label in CLASSES},
            "with_mask": {label.value: self.with_mask[label] for label in CLASSES},
            "pixel_usable": {label.value: self.pixel_usable[label] for label in CLASSES},
            "width_range": list(self.width_range),
            "height_range": list(self.height_range),
            "problems": list(self.problems),
        }


def _span(bounds: tuple[int, int]) -> str:
    low, high = bounds
    return f"{low}" if low == high else f"{low}-{high}"


def describe_dataset(dataset: Dataset) -> DatasetSummary:
    """Summarise ``dataset`` from file headers only (fast: no pixel decoding)."""
    excluded = pixel_exclusions(dataset.samples)
    counts = dict.fromkeys(CLASSES, 0)
    with_mask = dict.fromkeys(CLASSES, 0)
    usable = dict.fromkeys(CLASSES, 0)
    widths: list[int] = []
    heights: list[int] = []
    for sample in dataset.samples:
        counts[sample.label] += 1
        with_mask[sample.label] += bool(sample.mask_paths)
        usable[sample.label] += sample.id not in excluded
        width, height = image_size(sample.image_path)
        widths.append(width)
        heights.append(height)
    return DatasetSummary(
        name=dataset.name,
        root=dataset.root,
        counts=counts,
        with_mask=with_mask,
        pixel_usable=usable,
        width_range=(min(widths, default=0), max(widths, default=0)),
        height_range=(min(heights, default=0), max(heights, default=0)),
        problems=list(dataset.problems),
    )


def image_item(sample: Sample) -> ImageItem:
    """The :class:`ImageItem` a method sees for ``sample``: its id, content key and a lazy RGB loader.

    The loader is a :func:`functools.partial` rather than a lambda so that items can be
    pickled into worker processes.
    """
    return ImageItem(
        id=sample.id,
        key=file_key(sample.image_path),
        loader=functools.partial(load_rgb, sample.image_path),
    )
