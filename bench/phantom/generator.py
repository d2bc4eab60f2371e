"""Phantom images: one breast (anatomy) imaged by one simulated device.

Randomness is split in two, so that the same breast can be shown on every device:

* the **anatomy** (class, layers, lesion shape, position, descriptors, tissue texture)
  comes from ``SeedSequence([seed, class, case])``, independent of the device;
* the **acquisition** (speckle, calcification phases, whether callipers are drawn) comes
  from ``SeedSequence([seed, class, case, device number])``.

Everything is a pure function of (spec, index, device). The signal chain is float64 /
complex128 and quantised once, at the end (``np.rint`` to 8 bits); every decision (the
lesion mask, tissue layers, pixel positions of marks) uses :mod:`bench.phantom.stablemath`
instead of numpy's platform-dependent transcendental kernels, so masks are the same bits
everywhere and an 8-bit pixel could only change if a value fell within ~1e-12 of a
rounding boundary. ``tests/test_phantom.py`` pins checksums of a few images.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import map_coordinates

from bench.phantom import stablemath as sm
from bench.phantom.anatomy import (
    Anatomy,
    lesion_point,
    lesion_region,
    sample_anatomy,
    tissue_fields,
    tissue_maps,
)
from bench.phantom.bmode import acquire
from bench.phantom.devices import DeviceProfile, get_device, layout
from bench.phantom.overlays import draw_overlays
from bench.types import CLASSES, Label

__all__ = ["GENERATOR_VERSION", "PhantomImage", "PhantomSpec", "generate_image", "render"]

#: Part of every cache key: bump it whenever a change alters generated pixels or masks.
#: 2: float64/complex128 signal chain, float64 random draws, stablemath geometry.
GENERATOR_VERSION = "2"

_CLASS_CODE = {Label.NORMAL: 0, Label.BENIGN: 1, Label.MALIGNANT: 2}


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    width, height = value
    return (int(width), int(height))


@dataclass(frozen=True)
class PhantomSpec:
    """What a phantom dataset holds: images per class, the anatomy seed and an optional size.

    ``size`` is ``(width, height)`` in pixels (an int means square); ``None`` keeps each
    device's own image size. Images are indexed normal first, then benign, then
    malignant; case ``k`` of a class is the same breast whatever the other counts.
    """

    normal: int = 40
    benign: int = 40
    malignant: int = 40
    seed: int = 0
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _size(self.size))
        for label in CLASSES:
            if int(getattr(self, label.value)) < 0:
                raise ValueError(f"phantom {label.value} count must be >= 0")
        if self.total == 0:
            raise ValueError("a phantom dataset needs at least one image")
        if self.size is not None and min(self.size) < 32:
            raise ValueError(f"phantom image size {self.size} is too small (minimum 32)")

    @classmethod
    def per_class(cls, n: int, seed: int = 0, size: Any = None) -> PhantomSpec:
        return cls(normal=n, benign=n, malignant=n, seed=seed, size=_size(size))

    def counts(self) -> dict[Label, int]:
        return {label: int(getattr(self, label.value)) for label in CLASSES}

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def case(self, index: int) -> tuple[Label, int]:
        """``(class, case number within the class)`` of image ``index`` (0-based)."""
        if not 0 <= index < self.total:
            raise IndexError(f"phantom index {index} out of range (0..{self.total - 1})")
        for label, count in self.counts().items():
            if index < count:
                return label, index
            index -= count
        raise AssertionError("unreachable")

    def to_dict(self) -> dict[str, Any]:
        return {
            "normal": self.normal,
            "benign": self.benign,
            "malignant": self.malignant,
            "seed": self.seed,
            "size": list(self.size) if self.size else None,
        }


@dataclass(eq=False)
class PhantomImage:
    """One generated image.

    ``rgb`` is ``uint8`` (H, W, 3) with overlays; ``mask`` is ``bool`` (H, W), exactly the
    lesion region (all False for normal images). ``envelope`` (only when requested) is the
    detected echo amplitude after TGC and before gain/log compression, 0 outside the field
    of view. ``maps`` (only when requested) holds display-grid ``echo_db`` (scatterer
    echogenicity), ``alpha_db_mm`` (extra attenuation) and ``lesion`` (the region whose
    scatterers are the lesion's). ``anatomy`` is JSON-friendly metadata; ``model`` the
    :class:`Anatomy` itself.
    """

    rgb: np.ndarray
    mask: np.ndarray
    label: Label
    device: str
    anatomy: dict[str, Any]
    model: Anatomy
    envelope: np.ndarray | None = None
    maps: dict[str, np.ndarray] | None = field(default=None)

    @property
    def grey(self) -> np.ndarray:
        return self.rgb.max(axis=2)


def _as_spec(spec: PhantomSpec | Mapping[str, Any] | None) -> PhantomSpec:
    if spec is None:
        return PhantomSpec()
    if isinstance(spec, PhantomSpec):
        return spec
    return PhantomSpec(**dict(spec))


def generate_image(
    spec: PhantomSpec | Mapping[str, Any] | None,
    index: int,
    device: str | DeviceProfile = "device-a",
    *,
    return_envelope: bool = False,
    return_maps: bool = False,
    overlays: bool = True,
) -> PhantomImage:
    """Image ``index`` of the phantom dataset ``spec`` as seen by ``device``."""
    spec = _as_spec(spec)
    label, case = spec.case(index)
    anatomy = sample_anatomy(label, spec.seed, case)
    return render(
        anatomy,
        device,
        size=spec.size,
        return_envelope=return_envelope,
        return_maps=return_maps,
        overlays=overlays,
    )


@functools.cache
def _tint_table(tint: tuple[float, float, float]) -> np.ndarray:
    """(256, 3) uint8: grey level -> tinted RGB."""
    levels = np.arange(256, dtype=np.float64)[:, None] * np.asarray(tint, dtype=np.float64)
    return np.clip(np.rint(levels), 0, 255).astype(np.uint8)


def _display_from_beam(lay, beam: np.ndarray, order: int) -> np.ndarray:
    out = np.zeros(lay.shape, dtype=beam.dtype)
    if lay.device.geometry == "linear":
        out[lay.beam_rows, lay.beam_cols] = beam
    else:
        coords = lay.scan_index[:, lay.inside]
        out[lay.inside] = map_coordinates(beam, coords, order=order, mode="nearest")
    return out


def render(
    anatomy: Anatomy,
    device: str | DeviceProfile,
    *,
    size: tuple[int, int] | int | None = None,
    return_envelope: bool = False,
    return_maps: bool = False,
    overlays: bool = True,
    acquisition_key: int = 0,
) -> PhantomImage:
    """Image ``anatomy`` with ``device`` (``size`` overrides the device's (width, height)).

    ``acquisition_key`` selects another independent speckle realisation of the same scan.
    """
    device = get_device(device)
    size = _size(size)
    lay = layout(device, size)
    rng = np.random.default_rng(
        np.random.SeedSequence(
            [anatomy.seed, _CLASS_CODE[anatomy.label], anatomy.case, device.number, acquisition_key, 0xB30]
        )
    )
    fields = None if anatomy.tissue.uniform else tissue_fields(anatomy)
    echo, alpha, lesion_beam = tissue_maps(
        anatomy, device, lay.beam_s[:1, :], lay.beam_d[:, :1], lay.beam_x, lay.beam_z, fields=fields
    )
    lesion = anatomy.lesion
    points = []
    if lesion is not None:
        for u, w, level in lesion.calcifications:
            row, col = lay.physical_to_beam(*lesion_point(lesion, device, u, w))
            if 0 <= row < echo.shape[0] and 0 <= col < echo.shape[1]:
                points.append((row, col, level))
    acq = acquire(device, size, echo, alpha, rng, points=points, want_envelope=return_envelope)

    # The one quantisation of the float64 signal chain: 8-bit grey (the scanner's display
    # level), then the tint as a colour look-up table.
    grey = np.rint(np.clip(acq.grey * 255.0, 0.0, 255.0)).astype(np.uint8)
    rgb = _tint_table(device.tint)[grey]

    mask = np.zeros(lay.shape, dtype=bool)
    callipers = None
    if lesion is not None:
        if device.geometry == "linear":
            # The beam grid is the field of view of the display: the same points, the same region.
            mask[lay.beam_rows, lay.beam_cols] = lesion_beam
        else:
            mask = lesion_region(lesion, device, lay.x, lay.z)[0] < 1.0
        mask &= lay.inside
        if rng.random() < device.caliper_rate:
            ends = []
            for phi in (0.0, math.pi):
                reach = lesion.half_width * float(lesion.radius(np.array([phi]))[0]) + 1.0
                u = reach if phi == 0.0 else -reach
                ends.append(lay.physical_to_pixel(*lesion_point(lesion, device, u, 0.0)))
            length = sm.hypot(ends[0][0] - ends[1][0], ends[0][1] - ends[1][1]) * lay.px_mm
            callipers = (tuple(ends), length)
    case_id = f"PH{anatomy.seed % 1000:03d}-{_CLASS_CODE[anatomy.label]}{anatomy.case:04d}"
    if overlays:
        rgb = draw_overlays(rgb, lay, case_id=case_id, callipers=callipers)

    maps = None
    if return_maps:
        maps = {
            "echo_db": _display_from_beam(lay, echo, 0),
            "alpha_db_mm": _display_from_beam(lay, alpha, 0),
            "lesion": _display_from_beam(lay, lesion_beam.astype(np.uint8), 0).astype(bool),
        }
    meta = anatomy.to_dict()
    meta.update({"device": device.name, "case_id": case_id, "callipers": callipers is not None})
    return PhantomImage(
        rgb=rgb,
        mask=mask,
        label=anatomy.label,
        device=device.name,
        anatomy=meta,
        model=anatomy,
        envelope=acq.envelope,
        maps=maps,
    )
