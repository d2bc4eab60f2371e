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
from collections.abc import Sequence
from dataclasses import dataclass

from bench.data.dataset import Dataset
from bench.data.masks import MASK_SIZE_MISMATCH, NO_LESION_MASK, pixel_exclusions
from bench.errors import DatasetError
from bench.types import CLASSES, Label, Sample

__all__ = ["SupportSelection", "check_support_sizes", "sample_support", "support_pool"]

# How each exclusion kind reads after "left out: <n> ..." in a shortfall message.
_LEFT_OUT_PHRASES = {
    NO_LESION_MASK: "lacking a mask file",
    MASK_SIZE_MISMATCH: "whose mask size differs from the image",
}


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


def _check_shots(shots: object) -> int:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DatasetError(f"shots must be a positive integer, got {shots!r}")
    return shots


def _class_supply(dataset: Dataset, label: Label, usable: int) -> str:
    """``"class benign has 4 image(s) usable ... (6 in total; left out: 2 lacking a mask file)"``."""
    of_class = dataset.of_class(label)
    if len(of_class) == usable:
        return f"class {label.value} has {usable} image(s)"
    by_kind: dict[str, int] = {}
    for reason in pixel_exclusions(of_class).values():
        by_kind[reason.kind] = by_kind.get(reason.kind, 0) + 1
    left_out = ", ".join(f"{n} {_LEFT_OUT_PHRASES.get(kind, kind)}" for kind, n in by_kind.items())
    return (
        f"class {label.value} has {usable} image(s) usable for the support set "
        f"({len(of_class)} in total; left out: {left_out})"
    )


def _shortfall(dataset: Dataset, pool: dict[Label, list[Sample]], shots: int) -> str | None:
    """The error message when some class has fewer than ``shots`` candidates, else ``None``."""
    short = [label for label in CLASSES if len(pool[label]) < shots]
    if not short:
        return None
    supplies = "; ".join(_class_supply(dataset, label, len(pool[label])) for label in short)
    most = min(len(pool[label]) for label in CLASSES)
    if most:
        fix = f"lower --shots to at most {most} or use another source dataset"
    else:
        fix = "use another source dataset (the support set needs images of every class)"
    return f"dataset {dataset.name!r}: {supplies}, fewer than shots={shots}; {fix}"


def check_support_sizes(dataset: Dataset, shots: Sequence[int]) -> None:
    """Fail before any work when some shot count cannot be drawn from ``dataset``.

    Raises the :class:`DatasetError` that :func:`sample_support` would raise for the largest
    failing shot count, naming every failing count, so a grid stops before its first cell
    rather than at its last.
    """
    counts = sorted({_check_shots(k) for k in shots})
    pool = support_pool(dataset)
    failing = [k for k in counts if _shortfall(dataset, pool, k) is not None]
    if not failing:
        return
    message = _shortfall(dataset, pool, failing[-1])
    if len(failing) > 1:
        message = f"{message} (shots {', '.join(map(str, failing))} cannot be drawn)"
    raise DatasetError(message)


def sample_support(dataset: Dataset, shots: int, seed: int) -> SupportSelection:
    """Draw ``shots`` images per class (normal, benign, malignant) from ``dataset``, seeded.

    Deterministic everywhere (see the module docstring). Raises :class:`DatasetError` when
    a class has fewer than ``shots`` usable images, naming the dataset, class and counts.
    """
    shots = _check_shots(shots)
    pool = support_pool(dataset)
    message = _shortfall(dataset, pool, shots)
    if message is not None:
        raise DatasetError(message)
    ids: dict[Label, list[str]] = {}
    samples: list[Sample] = []
    for label in CLASSES:
        candidates = pool[label]
        chosen = sorted(candidates, key=lambda s: (_rank(seed, shots, label, s.id), s.id))[:shots]
        # Keep dataset order inside a class so that the selection reads naturally.
        chosen_ids = {s.id for s in chosen}
        picked = [s for s in candidates if s.id in chosen_ids]
        ids[label] = [s.id for s in picked]
        samples.extend(picked)
    return SupportSelection(dataset=dataset.name, shots=shots, seed=seed, ids=ids, samples=tuple(samples))
