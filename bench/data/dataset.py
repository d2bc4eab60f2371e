"""The :class:`Dataset` value every reader and provider returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import DatasetError
from bench.types import CLASSES, Label, Sample

__all__ = ["Dataset"]


@dataclass
class Dataset:
    """A named list of samples read from ``root``.

    ``problems`` lists human-readable, non-fatal issues found while reading (size
    mismatches, stray files): the samples concerned are still listed but may be kept out
    of pixel metrics and the support pool. Sample ids are unique (checked here).
    """

    name: str
    root: Path
    samples: list[Sample]
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        duplicates: list[str] = []
        for sample in self.samples:
            if sample.id in seen:
                duplicates.append(sample.id)
            seen.add(sample.id)
        if duplicates:
            shown = ", ".join(duplicates[:5]) + (", ..." if len(duplicates) > 5 else "")
            raise DatasetError(
                f"dataset {self.name!r} ({self.root}): {len(duplicates)} duplicate sample id(s): {shown}; "
                "each image must appear once"
            )
        self._by_id = {s.id: s for s in self.samples}

    def __len__(self) -> int:
        return len(self.samples)

    def _index(self) -> dict[str, Sample]:
        if len(self._by_id) != len(self.samples):
            # ``samples`` is a plain list: rebuild the index if a caller appended to it.
            self._by_id = {s.id: s for s in self.samples}
        return self._by_id

    def __getitem__(self, sample_id: str) -> Sample:
        """The sample with id ``sample_id`` (raises :class:`DatasetError` naming the dataset)."""
        try:
            return self._index()[sample_id]
        except KeyError:
            raise DatasetError(f"dataset {self.name!r} has no sample {sample_id!r}") from None

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._index()

    def of_class(self, label: Label) -> list[Sample]:
        """Samples with ``label``, in dataset order."""
        return [s for s in self.samples if s.label is label]

    def counts(self) -> dict[Label, int]:
        """Number of samples per class, every class of :data:`CLASSES` present (possibly 0)."""
        counts = dict.fromkeys(CLASSES, 0)
        for sample in self.samples:
            counts[sample.label] += 1
        return counts
