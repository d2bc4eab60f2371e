"""The interface every method implements, and what the harness hands it.

A method is constructed with a :class:`MethodContext`, fitted once per
(source support set, shots, seed) with :meth:`Method.fit`, then asked to
:meth:`Method.predict` batches of test images. It never opens dataset files and never
computes metrics: images arrive as :class:`~bench.types.ImageItem`, frozen CLIP
features come from ``ctx.backbone`` (cached), and the harness scores the output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from bench.errors import MethodError
from bench.types import CLASSES, ImageItem, Task

if TYPE_CHECKING:
    import torch

    from bench.kit.clip import Backbone
    from bench.kit.options import Option

T = TypeVar("T")

#: Row groups of the printed tables, in the paper's order: training-free references,
#: anomaly-detection baselines, few-shot classifiers, methods of no known group (plugins),
#: then the paper's own method and its ablations.
TABLE_GROUPS: tuple[str, ...] = ("reference", "anomaly", "classifier", "other", "ours")


@dataclass(frozen=True)
class SupportSet:
    """The labelled few-shot images a method adapts on.

    ``labels`` index :data:`~bench.types.CLASSES`; ``masks`` are binary lesion masks at the
    evaluation resolution (all zero for normal images), shape (n, S, S), float32.
    """

    items: tuple[ImageItem, ...]
    labels: np.ndarray
    masks: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.items)
        if self.labels.shape != (n,) or self.masks.ndim != 3 or self.masks.shape[0] != n:
            raise ValueError(
                f"SupportSet shapes disagree: {n} items, labels {self.labels.shape}, masks {self.masks.shape}"
            )

    def __len__(self) -> int:
        return len(self.items)

    def of_class(self, class_index: int) -> SupportSet:
        """The subset of one class (e.g. ``0`` = normal references for WinCLIP+)."""
        keep = np.flatnonzero(self.labels == class_index)
        return SupportSet(tuple(self.items[i] for i in keep), self.labels[keep], self.masks[keep])


@dataclass
class Prediction:
    """A method's output for a batch of B images.

    - ``scores``: (B,) image anomaly scores, higher = more abnormal (always required).
    - ``probs``: (B, 3) probabilities over (normal, benign, malignant), rows summing to 1,
      when the method classifies; otherwise ``None``.
    - ``maps``: (B, S, S) pixel anomaly maps at the evaluation resolution S when the
      method localizes; otherwise ``None``.
    """

    scores: np.ndarray
    probs: np.ndarray | None = None
    maps: np.ndarray | None = None


@dataclass
class MethodContext:
    """Everything a method may use. Built by the runner; methods never build their own.

    The backbone is created on first access, so methods that do not use CLIP never pay
    for it. ``config`` is the method's own config section merged over its defaults.
    """

    device: torch.device
    seed: int
    shots: int
    scratch_dir: Path
    config: Mapping[str, Any]
    eval_size: int
    backbone_factory: Callable[[], Backbone] | None = field(default=None, repr=False)
    progress: Callable[[Iterable[Any], str, int | None], Iterator[Any]] | None = field(
        default=None, repr=False
    )
    _backbone: Backbone | None = field(default=None, init=False, repr=False)

    @property
    def backbone(self) -> Backbone:
        """The shared frozen CLIP backbone (with its feature cache)."""
        if self._backbone is None:
            if self.backbone_factory is None:
                raise RuntimeError("this context has no backbone; the method must set uses_backbone = True")
            self._backbone = self.backbone_factory()
        return self._backbone

    def track(self, iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a progress bar (rich, with ETA) when the runner provides one."""
        if self.progress is None:
            yield from iterable
        else:
            yield from self.progress(iterable, description, total)


class Method(ABC):
    """Base class of every benchmarked method.

    Subclasses set the class attributes and implement :meth:`predict` (and :meth:`fit`
    when they learn from the support set). ``options`` declares every option (type,
    default, allowed values, help); the run's YAML section for the method overrides the
    defaults key by key and is validated against the schema before the method sees it.
    """

    #: Registry name, used on the command line and as the table row.
    name: ClassVar[str]
    #: One line for ``bench methods``.
    description: ClassVar[str]
    #: The outputs the method produces; tables show "-" for the others.
    tasks: ClassVar[frozenset[Task]]
    #: The option schema (:class:`bench.kit.options.Option` per name); ``default_config`` is
    #: derived from it. A class that sets only ``default_config`` gets a schema inferred from it.
    options: ClassVar[Mapping[str, Option]] = {}
    #: Every option's default (derived from :attr:`options`).
    default_config: ClassVar[Mapping[str, Any]] = {}
    #: False for methods that ignore the support set: the grid runs them once per target
    #: (shots 0, seed 0) and tables show one value for every shots column.
    uses_support: ClassVar[bool] = True
    #: False for methods that never touch CLIP, so no backbone is loaded for them.
    uses_backbone: ClassVar[bool] = True
    #: How many test images the runner passes to one :meth:`predict` call.
    predict_batch_size: ClassVar[int] = 32
    #: Which block of rows the method sits in when tables are printed (see :data:`TABLE_GROUPS`).
    table_group: ClassVar[str] = "other"
    #: Position inside its group (the paper's row order); ties are broken by name.
    table_rank: ClassVar[int] = 100
    #: The method whose ablation table lists this one as a row (the full method names itself).
    ablation_of: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        from bench.kit.options import defaults, infer_schema

        if "options" in cls.__dict__:
            cls.default_config = defaults(cls.options)
        elif "default_config" in cls.__dict__:
            cls.options = infer_schema(cls.default_config)

    def __init__(self, ctx: MethodContext) -> None:
        from bench.kit.options import validate

        self.ctx = ctx
        #: The validated options: defaults overridden by the run's config section.
        self.config: dict[str, Any] = validate(self.options, ctx.config, self.name)

    @contextmanager
    def reported(self, *errors: type[Exception]) -> Iterator[None]:
        """Re-raise ``errors`` (e.g. a toolkit's ``BackboneError`` or ``ValueError`` on bad
        options) as a :class:`~bench.errors.MethodError` naming this method, which the CLI
        prints as one clear line."""
        try:
            yield
        except errors as exc:
            raise MethodError(f"method {self.name!r}: {exc}") from exc

    def fit(self, support: SupportSet) -> None:  # noqa: B027 - training-free methods keep the default
        """Adapt to the support set. Training-free methods need not override this."""

    @abstractmethod
    def predict(self, items: Sequence[ImageItem]) -> Prediction:
        """Score a batch of test images (see :class:`Prediction` for shapes)."""


def class_names() -> tuple[str, ...]:
    """The class names in probability-vector order."""
    return tuple(str(c) for c in CLASSES)
