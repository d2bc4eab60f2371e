"""Declarative method options: one schema per method, checked in one place.

A method declares ``options = {"lr": Option(1e-3, float, "learning rate", min=0), ...}``;
:class:`~bench.method.Method` derives ``default_config`` from it and validates the run's
config section against it before the method sees it (:func:`validate`). ``bench methods
--verbose`` prints the schema (:func:`describe`). A plugin that only sets ``default_config``
gets a schema inferred from its defaults' types (:func:`infer_schema`).

Values are checked, never guessed: an int given for a float option becomes a float, a
tuple given for a list option becomes a list; anything else of the wrong type, out of range
or not among the allowed values is a :class:`~bench.errors.MethodError` naming the method,
the option, the value and what is expected.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from bench.errors import MethodError

#: Option types a schema may name (``object``: any value, checked by ``check`` only).
TYPES: tuple[type, ...] = (bool, int, float, str, list, dict, object)


@dataclass(frozen=True)
class Option:
    """One option: default, type, help text and constraints.

    - ``type``: one of :data:`TYPES`; ``items`` types the elements of a list option.
    - ``choices``: allowed values (for str options: allowed strings).
    - ``min`` / ``max``: inclusive bounds of numbers; ``gt``: exclusive lower bound.
    - ``nullable``: ``None`` is allowed (and means what the help says).
    - ``length``: exact length of a list; ``nonempty``: a list or str must not be empty.
    - ``check``: extra rule; returns a problem (``"must ..."``) or None.
    """

    default: Any
    type: type
    help: str = ""
    choices: tuple[Any, ...] = ()
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    nullable: bool = False
    items: type | None = None
    length: int | None = None
    nonempty: bool = False
    check: Callable[[Any], str | None] | None = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise TypeError(f"option type must be one of {[t.__name__ for t in TYPES]}, got {self.type!r}")

    def with_default(self, default: Any) -> Option:
        """The same option with another default (a variant method changing one default)."""
        return replace(self, default=default)

    # -- checking -----------------------------------------------------------------------
    def coerce(self, value: Any) -> tuple[Any, str | None]:
        """(converted value, problem or None)."""
        if value is None:
            return (None, None) if self.nullable or self.default is None else (None, "must not be null")
        converted, problem = _as_type(value, self.type)
        if problem:
            return value, problem
        if self.items is not None and isinstance(converted, list):
            items = []
            for element in converted:
                item, item_problem = _as_type(element, self.items)
                if item_problem:
                    return value, f"must be a list of {self.items.__name__} values"
                items.append(item)
            converted = items
        problem = self._constraints(converted)
        return converted, problem

    def _constraints(self, value: Any) -> str | None:
        if self.choices and value not in self.choices:
            return f"must be one of {list(self.choices)}"
        numbers = [value] if isinstance(value, int | float) and not isinstance(value, bool) else []
        if isinstance(value, list) and self.items in (int, float):
            numbers = list(value)
        for number in numbers:
            if self.min is not None and number < self.min:
                return f"must be >= {self.min:g}"
            if self.max is not None and number > self.max:
                return f"must be <= {self.max:g}"
            if self.gt is not None and not number > self.gt:
                return f"must be > {self.gt:g}"
        if isinstance(value, list | str | dict):
            if self.nonempty and len(value) == 0:
                return "must not be empty"
            if self.length is not None and isinstance(value, list) and len(value) != self.length:
                return f"must have exactly {self.length} values"
        return self.check(value) if self.check is not None else None

    def describe(self) -> str:
        """``type, default ...: help`` for ``bench methods --verbose``."""
        kind = self.type.__name__ if self.type is not object else "any"
        if self.items is not None:
            kind = f"list[{self.items.__name__}]"
        if self.nullable:
            kind += " | null"
        parts = [f"{kind} = {self.default!r}"]
        if self.choices:
            parts.append(f"one of {list(self.choices)}")
        bounds = [
            f">= {self.min:g}" if self.min is not None else "",
            f"> {self.gt:g}" if self.gt is not None else "",
            f"<= {self.max:g}" if self.max is not None else "",
        ]
        if any(bounds):
            parts.append(" ".join(b for b in bounds if b))
        return ", ".join(parts) + (f": {self.help}" if self.help else "")


def _as_type(value: Any, kind: type) -> tuple[Any, str | None]:
    if kind is object:
        return value, None
    if kind is bool:
        return (value, None) if isinstance(value, bool) else (value, "must be true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return value, "must be an integer"
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value), None
        return value, "must be a finite number"
    if kind is str:
        return (value, None) if isinstance(value, str) else (value, "must be a string")
    if kind is list:
        if isinstance(value, list | tuple):
            return list(value), None
        return value, "must be a list"
    if kind is dict:
        return (dict(value), None) if isinstance(value, Mapping) else (value, "must be a mapping")
    raise TypeError(kind)  # pragma: no cover - guarded in Option.__post_init__


Schema = Mapping[str, Option]


def infer_schema(defaults: Mapping[str, Any]) -> dict[str, Option]:
    """A schema from plain defaults (plugins that only declare ``default_config``)."""
    schema = {}
    for key, value in defaults.items():
        if value is None:
            kind: type = object
        elif isinstance(value, bool):
            kind = bool
        elif isinstance(value, int):
            kind = int
        elif isinstance(value, float):
            kind = float
        elif isinstance(value, str):
            kind = str
        elif isinstance(value, list | tuple):
            kind = list
        elif isinstance(value, Mapping):
            kind = dict
        else:
            kind = object
        schema[key] = Option(value, kind, nullable=value is None)
    return schema


def defaults(schema: Schema) -> dict[str, Any]:
    """Every option's default (deep copies: a method may not alter the schema through them)."""
    return {key: copy.deepcopy(option.default) for key, option in schema.items()}


def validate(schema: Schema, given: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The method's config: defaults overridden by ``given``, every value checked and converted."""
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise MethodError(
            f"method {method!r}: unknown option(s) {unknown} in its config section; "
            f"known options: {sorted(schema)} (see `bench methods --verbose`)"
        )
    config = defaults(schema)
    for key, value in given.items():
        converted, problem = schema[key].coerce(copy.deepcopy(value))
        if problem:
            raise MethodError(f"method {method!r}: option {key!r} {problem}, got {value!r}")
        config[key] = converted
    return config


def describe(schema: Schema) -> list[str]:
    """One line per option (``name: type = default, constraints: help``)."""
    return [f"{key}: {option.describe()}" for key, option in schema.items()]


def feature_options(official: str) -> dict[str, Option]:
    """``layers`` and ``input_size`` of a method that may run the frozen tower at its own
    blocks and size (null = the run's ``--layers`` / ``--input-size``); ``official`` says what
    the official code uses."""
    return {
        "layers": Option(
            None,
            list,
            f"0-based blocks whose tokens are used (null = the run's --layers; official: {official})",
            items=int,
            nullable=True,
            nonempty=True,
        ),
        "input_size": Option(
            None,
            int,
            "input size (null = the run's --input-size; official: 518 with ViT-L/14@336)",
            nullable=True,
            min=16,
        ),
    }


def adam_options(
    *, epochs: int, batch_size: int, lr: float, betas: tuple[float, float], source: str
) -> dict[str, Option]:
    """A fixed-epoch Adam schedule as options (``source`` names where the defaults come from)."""
    return {
        "epochs": Option(epochs, int, f"training epochs, a fixed count ({source}: {epochs})", min=0),
        "batch_size": Option(batch_size, int, f"training batch size ({source}: {batch_size})", min=1),
        "lr": Option(lr, float, f"Adam learning rate ({source}: {lr:g})", gt=0),
        "betas": Option(
            list(betas),
            list,
            f"Adam betas ({source}: {betas[0]:g}, {betas[1]:g})",
            items=float,
            length=2,
            min=0,
            max=1,
        ),
    }


def segmentation_loss_options(source: str) -> dict[str, Option]:
    """Focal + Dice settings of April-GAN's ``loss.py`` (shared by AnomalyCLIP's)."""
    return {
        "focal_gamma": Option(2.0, float, f"focal loss gamma ({source}: 2)", min=0),
        "focal_smooth": Option(
            1e-5, float, f"focal loss label smoothing ({source} FocalLoss: 1e-5)", min=0, max=0.5
        ),
        "dice_smooth": Option(1.0, float, f"Dice smoothing ({source} BinaryDiceLoss: 1)", min=0),
    }
