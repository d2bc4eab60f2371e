"""Declared requests for frozen image features, and what they return.

A method asks ``backbone.features(items, FeatureRequest(...))`` for what it needs: which
forward variant (``standard``, ``windows``, ``vv-attention``, ``stream`` or one a plugin
registered, see :mod:`bench.kit.variants`), which blocks, which input size and the variant's
own options. The toolkit computes the features once per image, caches them on disk keyed
by the backbone's identity and the request, and hands back :class:`Features`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class FeatureRequest:
    """What frozen features to compute: a forward variant, blocks, input size and options.

    ``layers=None`` and ``input_size=None`` mean the run's ``--layers`` and ``--input-size``
    (the backbone's defaults); layers are 0-based block indices, kept sorted. ``resize`` is
    how the positional embedding is resized for an input size the model was not built for:
    ``"bicubic"`` (open_clip's own rule, antialiased; April-GAN) or ``"bilinear"``
    (AnomalyCLIP's official code). ``options`` are the variant's own settings (hashable;
    build with :meth:`of`).
    """

    variant: str = "standard"
    layers: tuple[int, ...] | None = None
    input_size: int | None = None
    options: tuple[tuple[str, Any], ...] = ()
    resize: str = "bicubic"

    @classmethod
    def of(
        cls,
        variant: str = "standard",
        *,
        layers: tuple[int, ...] | list[int] | None = None,
        input_size: int | None = None,
        resize: str = "bicubic",
        **options: Any,
    ) -> FeatureRequest:
        """``FeatureRequest.of("windows", scales=[2, 3], stride=1)``."""
        return cls(
            variant=variant,
            layers=None if layers is None else tuple(sorted(int(i) for i in layers)),
            input_size=None if input_size is None else int(input_size),
            options=tuple(sorted((k, _freeze(v)) for k, v in options.items())),
            resize=resize,
        )

    def option(self, key: str, default: Any = None) -> Any:
        """The value of one variant option (``default`` when the request does not set it)."""
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class Features:
    """Frozen features of B images: named fields, each (B, *field shape), float32 on the device.

    The standard variant's fields are ``embeds`` (B, D: ``encode_image``, not normalised),
    ``cls_tokens`` (B, L, W) and ``patch_tokens`` (B, L, N, W) (raw residual stream after each
    requested block, row-major over the patch grid); other variants document their own.
    """

    fields: Mapping[str, torch.Tensor]
    grid: tuple[int, int]
    layers: tuple[int, ...]

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.fields[name]
        except KeyError:
            raise KeyError(f"no feature field {name!r}; fields: {sorted(self.fields)}") from None

    def __getattr__(self, name: str) -> torch.Tensor:
        if name.startswith("_") or name in ("fields", "grid", "layers"):
            raise AttributeError(name)
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"no feature field {name!r}; fields: {sorted(self.fields)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        first = next(iter(self.fields.values()))
        return int(first.shape[0])
