"""Seeded few-shot support selection: K images per class from a source dataset.

The draw must be identical on every machine, Python and NumPy version, because results
are compared across runs. It therefore uses no RNG stream at all: each candidate id gets
the rank ``sha256("<seed>:<shots>:<class>:<id>")`` and the K smallest ranks win. Hence:

* the choice does not depend on file-system order or on the other classes;
* adding or removing one candidate changes at most one pick of its class;
* each (seed, K) is its own draw: K=8 is *not* a superset of K=4 (the paper draws
  each shot count independently).

Only samples usable for training are candidates: normal images (with no mask file or a
size-consistent one) and lesion images whose mask is present and has the image's size.
BUS-UCLM's ``HESN_*`` pairs (mask size differs from the cropped image) are therefore
never drawn, normal or not (see :mod:`bench.data.masks`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bench.data.dataset import Dataset
from bench.data.masks import pixel_exclusions
from bench.errors import DatasetError
from bench.types import CLASSES, Label, Sample

__all__ = ["SupportSelection", "sample_support", "support_pool"]


@dataclass(frozen=True)
class SupportSelection:
    """The chosen support images of one (dataset, shots, seed) draw.

    ``ids`` maps each class to its chosen ids; ``samples`` holds the same samples flat,
    class by class in :data:`CLASSES` order (the order of the support set handed to methods).
    """

    dataset: str
    shots: int
    seed: int
    ids: dict[Label, list[str]]
    samples: tuple[Sample, ...]

    def all_ids(self) -> list[str]:
        """Every chosen id, in the order of :attr:`samples`."""
        return [s.id for s in self.samples]

    def samples_of(self, label: Label) -> list[Sample]:
        """The chosen samples of one class."""
        return [s for s in self.samples if s.label is label]

    def to_json(self) -> dict[str, list[str]]:
        """The ids per class name (``{"normal": [...], "benign": [...], "malignant": [...]}``), JSON-ready."""
        return {label.value: list(self.ids[label]) for label in CLASSES}

    @classmethod
    def from_json(cls, data: dict[str, list[str]], dataset: Dataset, seed: int) -> SupportSelection:
        """Rebuild a selection saved by :meth:`to_json` against ``dataset`` (every id must exist)."""
        ids = {label: [str(i) for i in data.get(label.value, [])] for label in CLASSES}
        missing = [i for label in CLASSES for i in ids[label] if i not in dataset]
        if missing:
            raise DatasetError(
                f"saved support set names {len(missing)} id(s) absent from dataset {dataset.name!r} "
                f"({', '.join(missing[:3])}); was it drawn from another version of the data?"
            )
        return cls(
            dataset=dataset.name,
            shots=max(len(v) for v in ids.values()),
            seed=seed,
            ids=ids,
            samples=tuple(dataset[i] for label in CLASSES for i in ids[label]),
        )


def support_pool(dataset: Dataset) -> dict[Label, list[Sample]]:
    """Candidates for the support set per class: samples whose mask (or its absence) is trustworthy."""
    excluded = pixel_exclusions(dataset.samples)
    pool: dict[Label, list[Sample]] = {label: [] for label in CLASSES}
    for sample in dataset.samples:
        if sample.id not in excluded:
            pool[sample.label].append(sample)
    return pool


def _rank(seed: int, shots: int, label: Label, sample_id: str) -> str:
    return hashlib.sha256(f"{seed}:{shots}:{label.value}:{sample_id}".encode()).hexdigest()


def sample_support(dataset: Dataset, shots: int, seed: int) -> SupportSelection:
    """Draw ``shots`` images per class (normal, benign, malignant) from ``dataset``, seeded.

    Deterministic everywhere (see the module docstring). Raises :class:`DatasetError` when
    a class has fewer than ``shots`` usable images, naming the dataset, class and counts.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DatasetError(f"shots must be a positive integer, got {shots!r}")
    pool = support_pool(dataset)
    ids: dict[Label, list[str]] = {}
    samples: list[Sample] = []
    for label in CLASSES:
        candidates = pool[label]
        if len(candidates) < shots:
            total = sum(1 for s in dataset.samples if s.label is label)
            raise DatasetError(
                f"dataset {dataset.name!r}: class {label.value} has {len(candidates)} image(s) usable "
                f"for the support set ({total} in total, the others lack a size-consistent mask), fewer than "
                f"shots={shots}; lower --shots or use another source dataset"
            )
        chosen = sorted(candidates, key=lambda s: (_rank(seed, shots, label, s.id), s.id))[:shots]
        # Keep dataset order inside a class so that the selection reads naturally.
        chosen_ids = {s.id for s in chosen}
        picked = [s for s in candidates if s.id in chosen_ids]
        ids[label] = [s.id for s in picked]
        samples.extend(picked)
    return SupportSelection(dataset=dataset.name, shots=shots, seed=seed, ids=ids, samples=tuple(samples))
