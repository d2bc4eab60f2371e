"""A dataset at a glance (for ``bench datasets``), and ImageItem construction."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.data.dataset import Dataset
from bench.data.io import file_key, image_size, load_rgb
from bench.data.masks import pixel_exclusions
from bench.errors import DatasetError
from bench.types import CLASSES, ImageItem, Label, Sample

__all__ = [
    "CLASS_COLUMNS",
    "DEVICE_COLUMN",
    "NOT_SET",
    "DatasetSummary",
    "MetadataCounts",
    "describe_dataset",
    "image_item",
    "metadata_columns",
    "metadata_count_header",
    "metadata_count_rows",
    "metadata_counts",
]

#: Column headers of :meth:`DatasetSummary.class_rows`.
CLASS_COLUMNS = ("class", "images", "with mask", "pixel-usable")
#: The metadata key every reader uses for the acquiring scanner.
DEVICE_COLUMN = "device"
#: How :func:`metadata_counts` lists samples that have no (or an empty) value.
NOT_SET = "(not set)"

#: Class counts per metadata value: value -> {class: number of images}, every class present.
MetadataCounts = dict[str, dict[Label, int]]


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
    #: Class counts per device (:func:`metadata_counts` on ``device``); empty when no sample names one.
    device_counts: MetadataCounts = field(default_factory=dict)

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

    def device_rows(self) -> list[tuple[str, ...]]:
        """Class counts per device (columns ``metadata_count_header("device")``); empty without devices."""
        return metadata_count_rows(self.device_counts) if self.device_counts else []

    def rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` string pairs for a two-column table (problems are in :attr:`problems`).

        With devices, one ``("device <name>", "<n> (<a> normal / <b> benign / <c> malignant)")``
        row per device follows the image counts.
        """
        masks = " / ".join(f"{self.with_mask[label]} {label.value}" for label in CLASSES)
        usable = " / ".join(f"{self.pixel_usable[label]} {label.value}" for label in CLASSES)
        devices = [
            (f"device {device}", _class_breakdown(counts)) for device, counts in self.device_counts.items()
        ]
        return [
            ("dataset", self.name),
            ("root", str(self.root)),
            ("images", _class_breakdown(self.counts)),
            *devices,
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
            "devices": {
                device: {label.value: counts[label] for label in CLASSES}
                for device, counts in self.device_counts.items()
            },
        }


def _span(bounds: tuple[int, int]) -> str:
    low, high = bounds
    return f"{low}" if low == high else f"{low}-{high}"


def _class_breakdown(counts: Mapping[Label, int]) -> str:
    parts = " / ".join(f"{counts[label]} {label.value}" for label in CLASSES)
    return f"{sum(counts.values())} ({parts})"


def _natural_key(text: str) -> list[tuple[int, int | str]]:
    # "GE Logiq 5" before "GE Logiq 7" before "GE Logiq 10"; tuples keep numbers and text comparable.
    return [(0, int(part)) if part.isdigit() else (1, part.lower()) for part in re.split(r"(\d+)", text)]


def metadata_columns(dataset: Dataset) -> list[str]:
    """Every metadata key some sample of ``dataset`` carries a non-empty value for, sorted."""
    return sorted({key for s in dataset.samples for key, value in s.metadata.items() if str(value).strip()})


def metadata_counts(dataset: Dataset, column: str) -> MetadataCounts:
    """Number of images per class for each value of metadata ``column`` (e.g. ``"device"``).

    Values are ordered naturally (``"x 5"`` before ``"x 10"``); samples without a value are
    counted under :data:`NOT_SET` (listed last). ``column`` is matched case-insensitively,
    as every reader stores metadata keys in lower case. Raises :class:`DatasetError` when no
    sample has a value for ``column``, listing the columns there are.
    """
    key = column.strip().lower()
    counts: MetadataCounts = {}
    for sample in dataset.samples:
        value = str(sample.metadata.get(key, "")).strip() or NOT_SET
        counts.setdefault(value, dict.fromkeys(CLASSES, 0))[sample.label] += 1
    if set(counts) <= {NOT_SET}:
        available = ", ".join(metadata_columns(dataset)) or "none"
        raise DatasetError(
            f"dataset {dataset.name!r}: no image has a {column!r} value (metadata columns: {available})"
        )
    order = sorted((v for v in counts if v != NOT_SET), key=_natural_key)
    if NOT_SET in counts:
        order.append(NOT_SET)
    return {value: counts[value] for value in order}


def metadata_count_header(column: str) -> tuple[str, ...]:
    """Headers of :func:`metadata_count_rows`: ``(column, "normal", "benign", "malignant", "total")``."""
    return (column, *(label.value for label in CLASSES), "total")


def metadata_count_rows(counts: Mapping[str, Mapping[Label, int]]) -> list[tuple[str, ...]]:
    """One row of strings per value of :func:`metadata_counts`' table, then a ``total`` row."""
    rows = [
        (value, *(str(per_class[label]) for label in CLASSES), str(sum(per_class.values())))
        for value, per_class in counts.items()
    ]
    totals = [sum(per_class[label] for per_class in counts.values()) for label in CLASSES]
    rows.append(("total", *(str(n) for n in totals), str(sum(totals))))
    return rows


def describe_dataset(dataset: Dataset) -> DatasetSummary:
    """Summarise ``dataset`` from file headers only (fast: no pixel decoding).

    Counts per class and device are included whenever a sample names its ``device`` in its
    metadata (BUS-UCLM, BUS-BRA, the phantom, manifests with a ``device`` column).
    """
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
    has_device = any(str(s.metadata.get(DEVICE_COLUMN, "")).strip() for s in dataset.samples)
    return DatasetSummary(
        name=dataset.name,
        root=dataset.root,
        counts=counts,
        with_mask=with_mask,
        pixel_usable=usable,
        width_range=(min(widths, default=0), max(widths, default=0)),
        height_range=(min(heights, default=0), max(heights, default=0)),
        problems=list(dataset.problems),
        device_counts=metadata_counts(dataset, DEVICE_COLUMN) if has_device else {},
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
