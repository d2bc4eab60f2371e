"""The breast being imaged: tissue layers and one optional lesion, in millimetres, device-free.

:func:`sample_anatomy` draws an :class:`Anatomy` from a random generator keyed on
(seed, class, case number) only, so that every simulated device can image the very same
breast. :func:`tissue_maps` evaluates it at arbitrary tissue coordinates: the scatterer
echogenicity (dB relative to glandular tissue), the extra attenuation (dB/mm, one way)
and the lesion region. :func:`lesion_region` is the single definition of "inside the
lesion" used both for the echo map and for the ground-truth mask.

Echogenicity levels (dB re. fibroglandular tissue, before any texture):
skin entry echo +8, dermis +2, subcutaneous and retromammary fat about -11, glandular 0
(with lobular texture), pectoral muscle about -7 with bright fibre striations, chest
wall -9, rib surface +10 with an acoustic shadow behind. Lesion levels are listed in
``docs/phantom.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from bench.phantom import stablemath as sm
from bench.phantom.devices import COMMON_DEPTH_MM, COMMON_HALF_WIDTH_MM, DeviceProfile, tissue_to_physical
from bench.types import Label

__all__ = [
    "LESION_FEATURES",
    "Anatomy",
    "Lesion",
    "Tissue",
    "TissueFields",
    "lesion_region",
    "sample_anatomy",
    "tissue_fields",
    "tissue_maps",
    "uniform_anatomy",
]

#: Baseline soft-tissue attenuation, dB per mm per MHz (one way): 0.5 dB/cm/MHz.
TISSUE_ATTENUATION_DB_MM_MHZ = 0.05

# Extent of the tissue-texture grids (mm): covers the field of view of every device.
_S_RANGE = (-40.0, 40.0)
_D_RANGE = (-2.0, 64.0)

# --------------------------------------------------------------------------- class feature distributions
# Loosely calibrated on the BI-RADS descriptors of BrEaST-Lesions-USG (154 benign, 98
# malignant), then pulled towards each other so that no single feature separates the
# classes. Each entry: value -> probability. docs/phantom.md prints this table.
LESION_FEATURES: dict[str, dict[Label, dict[str, float]]] = {
    "shape": {
        Label.BENIGN: {"oval": 0.58, "round": 0.14, "irregular": 0.28},
        Label.MALIGNANT: {"oval": 0.15, "round": 0.05, "irregular": 0.80},
    },
    "orientation": {  # probability of "not parallel" (taller than wide)
        Label.BENIGN: {"parallel": 0.9, "not parallel": 0.1},
        Label.MALIGNANT: {"parallel": 0.55, "not parallel": 0.45},
    },
    # Margin descriptors are independent flags; "circumscribed" when none is drawn.
    "margin": {
        Label.BENIGN: {"indistinct": 0.2, "angular": 0.06, "microlobulated": 0.06, "spiculated": 0.04},
        Label.MALIGNANT: {"indistinct": 0.55, "angular": 0.4, "microlobulated": 0.2, "spiculated": 0.3},
    },
    "echo": {
        Label.BENIGN: {
            "anechoic": 0.12,
            "hypoechoic": 0.46,
            "heterogeneous": 0.2,
            "complex cystic/solid": 0.06,
            "isoechoic": 0.1,
            "hyperechoic": 0.06,
        },
        Label.MALIGNANT: {
            "hypoechoic": 0.7,
            "heterogeneous": 0.22,
            "complex cystic/solid": 0.04,
            "isoechoic": 0.04,
        },
    },
    "posterior": {
        Label.BENIGN: {"none": 0.62, "enhancement": 0.24, "shadowing": 0.12, "combined": 0.02},
        Label.MALIGNANT: {"none": 0.5, "enhancement": 0.1, "shadowing": 0.35, "combined": 0.05},
    },
    "halo": {
        Label.BENIGN: {"no": 0.97, "yes": 0.03},
        Label.MALIGNANT: {"no": 0.75, "yes": 0.25},
    },
    "calcifications": {
        Label.BENIGN: {"no": 0.94, "yes": 0.06},
        Label.MALIGNANT: {"no": 0.7, "yes": 0.3},
    },
}

# Median long axis (mm) and lognormal spread per class.
_SIZE = {Label.BENIGN: (11.0, 0.35), Label.MALIGNANT: (14.0, 0.3)}

# Mean echo level (dB re. gland) ranges and internal texture (dB) per echo pattern.
_ECHO_DB = {
    "anechoic": ((-32.0, -27.0), (0.0, 0.5)),
    "hypoechoic": ((-22.0, -11.0), (1.0, 3.0)),
    "heterogeneous": ((-18.0, -10.0), (4.0, 7.0)),
    "complex cystic/solid": ((-30.0, -26.0), (0.0, 0.0)),
    "isoechoic": ((-5.0, -2.0), (1.5, 3.0)),
    "hyperechoic": ((2.0, 5.0), (1.5, 3.0)),
}


@dataclass(frozen=True)
class Lesion:
    """One mass, in tissue millimetres, with its BI-RADS-like descriptors.

    The lesion occupies the points whose normalised radius
    ``sqrt((u/a)^2 + (w/b)^2) / R(phi)`` is below 1, where ``(u, w)`` are coordinates
    along and across the skin (rotated by ``tilt``) relative to the centre, ``a`` =
    ``half_width``, ``b`` = ``half_height``, ``phi`` the angle in the normalised frame and
    ``R(phi) = 1 + sum harmonics + sum spikes`` (spikes: triangular bumps in angle, wide
    for angular margins, narrow for spiculations).
    """

    centre_s: float
    centre_d: float
    half_width: float
    half_height: float
    tilt: float
    shape: str
    orientation: str
    margins: tuple[str, ...]
    echo_pattern: str
    echo_db: float
    texture_db: float
    margin_ramp: float  # indistinct margin: fraction of the radius over which echoes blend in
    posterior: str
    posterior_db: float  # > 0 enhancement, < 0 shadowing (dB, behind the full lesion height)
    halo_db: float
    halo_width: float  # fraction of the radius, outside the lesion
    edge_shadow_db: float  # refraction shadows behind the lateral edges (<= 0)
    harmonics: tuple[tuple[int, float, float], ...] = ()
    spikes: tuple[tuple[float, float, float], ...] = ()  # (angle, height, half-width) in radians
    calcifications: tuple[tuple[float, float, float], ...] = ()  # (u mm, w mm, amplitude dB)

    def radius(self, phi: np.ndarray) -> np.ndarray:
        """``R(phi)``, the boundary radius in the normalised frame (float64)."""
        sin, cos = sm.sincos(np.asarray(phi, dtype=np.float64))
        return self.radius_cs(np.asarray(cos), np.asarray(sin))

    def radius_cs(self, cos: np.ndarray, sin: np.ndarray, phi: np.ndarray | None = None) -> np.ndarray:
        """``R`` at the angle whose cosine and sine are given (``phi`` in [-pi, pi] if known).

        Harmonics use ``cos(k phi)``, ``sin(k phi)`` from the angle-addition recurrence,
        spikes the angle itself (:func:`stablemath.atan2` when not given): only correctly
        rounded operations, so the lesion boundary is the same on every machine.
        """
        out = np.ones_like(cos)
        if self.harmonics:
            by_order: dict[int, list[tuple[float, float]]] = {}
            for k, amp, phase in self.harmonics:
                by_order.setdefault(int(k), []).append((amp, phase))
            cos_k, sin_k = cos, sin
            for k in range(1, max(by_order) + 1):
                if k > 1:
                    cos_k, sin_k = cos_k * cos - sin_k * sin, sin_k * cos + cos_k * sin
                for amp, phase in by_order.get(k, ()):
                    # amp cos(k phi + phase) = amp (cos k phi cos phase - sin k phi sin phase)
                    sp, cp = sm.sincos(phase)
                    out = out + (cos_k * (amp * cp) - sin_k * (amp * sp))
        if self.spikes:
            if phi is None:
                phi = np.asarray(sm.atan2(sin, cos))
            for angle, height, width in self.spikes:
                delta = phi - angle  # in [-2 pi, 2 pi]: wrap once into [-pi, pi]
                delta = np.where(delta > math.pi, delta - 2 * math.pi, delta)
                delta = np.abs(np.where(delta < -math.pi, delta + 2 * math.pi, delta))
                out = out + height * np.clip(1.0 - delta / width, 0.0, None)
        return np.maximum(out, 0.3)

    @property
    def max_radius(self) -> float:
        """An upper bound on ``R(phi)``."""
        return (
            1.0 + sum(abs(a) for _, a, _ in self.harmonics) + max((h for _, h, _ in self.spikes), default=0.0)
        )

    @property
    def extent_mm(self) -> float:
        """An upper bound of the distance from the centre to any lesion point (mm), halo included."""
        return max(self.half_width, self.half_height) * self.max_radius * (1.0 + self.halo_width)

    def descriptors(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "orientation": self.orientation,
            "margin": "circumscribed" if not self.margins else "&".join(self.margins),
            "echo_pattern": self.echo_pattern,
            "posterior_features": self.posterior,
            "halo": self.halo_db > 0,
            "calcifications": len(self.calcifications),
        }


@dataclass(frozen=True)
class Tissue:
    """Layers and structures of the breast in tissue coordinates (mm): ``s`` along, ``d`` below the skin."""

    skin_mm: float
    fat_base: float
    fat_waves: tuple[tuple[float, float, float], ...]  # (amplitude, wavelength, phase)
    gland_base: float
    gland_waves: tuple[tuple[float, float, float], ...]
    retro_mm: float
    muscle_mm: float
    fibre_angle: float
    fibre_period: float
    fat_db: float
    gland_db: float
    muscle_db: float
    gland_texture_db: float
    lobules: tuple[tuple[float, float, float, float, float, float], ...] = ()  # s, d, a, b, tilt, dB
    ducts: tuple[
        tuple[float, float, float, float, float], ...
    ] = ()  # s, d, half-length, half-thickness, tilt
    ribs: tuple[tuple[float, float, float, float], ...] = ()  # s, d (centre), half-width, half-height
    ligament_shadows: tuple[tuple[float, float, float], ...] = ()  # s, width, dB
    ligament_shear: float = 0.0  # Cooper's ligaments lean by this ds/dd
    texture_seed: int = 0
    uniform: bool = False

    def fat_bottom(self, s: np.ndarray) -> np.ndarray:
        return _waves(self.fat_base, self.fat_waves, s)

    def gland_bottom(self, s: np.ndarray) -> np.ndarray:
        return np.maximum(_waves(self.gland_base, self.gland_waves, s), self.fat_bottom(s) + 2.0)


def _waves(base: float, waves: tuple[tuple[float, float, float], ...], s: np.ndarray) -> np.ndarray:
    out = np.full(np.shape(s), base, dtype=np.float64)
    for amp, wavelength, phase in waves:
        out += amp * sm.sin(2 * math.pi * np.asarray(s, dtype=np.float64) / wavelength + phase)
    return out


@dataclass(frozen=True)
class Anatomy:
    """One breast: tissue, an optional lesion, and the class it was drawn for."""

    label: Label
    tissue: Tissue
    lesion: Lesion | None
    seed: int
    case: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (floats rounded to 0.01)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float):
                return round(value, 2)
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, Label):
                return value.value
            return value

        data = {
            "label": self.label.value,
            "seed": self.seed,
            "case": self.case,
            "tissue": clean(asdict(self.tissue)),
            "lesion": clean(asdict(self.lesion)) if self.lesion else None,
        }
        if self.lesion:
            data["descriptors"] = self.lesion.descriptors()
        return data


# --------------------------------------------------------------------------- sampling


def _choice(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    p = np.array([table[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _sample_tissue(rng: np.random.Generator) -> Tissue:
    # BI-RADS composition drives the fat/gland balance and how many fat lobules sit in the gland.
    composition = _choice(rng, {"fatty": 0.15, "scattered": 0.4, "heterogeneous": 0.3, "dense": 0.15})
    fat_base = {"fatty": (9, 15), "scattered": (6, 11), "heterogeneous": (4, 8), "dense": (3, 6)}[composition]
    n_lobules = {"fatty": (3, 8), "scattered": (2, 6), "heterogeneous": (1, 5), "dense": (0, 3)}[composition]
    skin = _u(rng, 1.4, 2.4)
    fat = _u(rng, *fat_base)
    fat_waves = tuple(
        (_u(rng, 0.4, 1.6) * scale, _u(rng, *wl), _u(rng, 0, 2 * math.pi))
        for scale, wl in ((1.0, (25, 60)), (0.8, (8, 18)), (0.5, (4, 8)))
    )
    gland = fat + _u(rng, 9, 20)
    gland_waves = tuple(
        (_u(rng, 0.5, 2.5) * scale, _u(rng, *wl), _u(rng, 0, 2 * math.pi))
        for scale, wl in ((1.0, (30, 70)), (0.6, (10, 20)))
    )
    gland = min(gland, 31.0)
    retro = _u(rng, 0.8, 3.0)
    muscle = _u(rng, 4.0, 9.0)
    lobules = []
    for _ in range(int(rng.integers(n_lobules[0], n_lobules[1] + 1))):
        s = _u(rng, -26, 26)
        d = _u(rng, fat + 1.0, gland - 1.0)
        a = _u(rng, 1.5, 5.0)
        lobules.append((s, d, a, a * _u(rng, 0.35, 0.75), _u(rng, -0.3, 0.3), _u(rng, -14.0, -9.0)))
    ducts = []
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 3))):
            ducts.append(
                (
                    _u(rng, -22, 22),
                    _u(rng, fat + 2.0, gland - 1.0),
                    _u(rng, 2.5, 7),
                    _u(rng, 0.6, 1.4),
                    _u(rng, -0.35, 0.35),
                )
            )
    ribs = []
    if rng.random() < 0.45:
        rib_depth = gland + retro + muscle + _u(rng, 3.0, 12.0)
        spacing = _u(rng, 20, 28)
        offset = _u(rng, -spacing / 2, spacing / 2)
        for k in range(-3, 4):
            s = offset + k * spacing
            if abs(s) < 40:
                half_h = _u(rng, 3.0, 5.0)
                ribs.append((s, rib_depth + half_h, _u(rng, 5.0, 8.0), half_h))
    shadows = []
    for _ in range(int(rng.integers(0, 4))):
        shadows.append((_u(rng, -24, 24), _u(rng, 0.3, 0.9), _u(rng, -14, -5)))
    return Tissue(
        skin_mm=skin,
        fat_base=fat,
        fat_waves=fat_waves,
        gland_base=gland,
        gland_waves=gland_waves,
        retro_mm=retro,
        muscle_mm=muscle,
        fibre_angle=_u(rng, -0.35, 0.35),
        fibre_period=_u(rng, 0.9, 1.8),
        fat_db=_u(rng, -12.5, -9.0),
        gland_db=_u(rng, -1.5, 1.5),
        muscle_db=_u(rng, -9.0, -5.0),
        gland_texture_db=_u(rng, 2.5, 4.5),
        lobules=tuple(lobules),
        ducts=tuple(ducts),
        ribs=tuple(ribs),
        ligament_shadows=tuple(shadows),
        ligament_shear=_u(rng, -1.2, 1.2),
        texture_seed=int(rng.integers(0, 2**62)),
    )


def _sample_lesion(rng: np.random.Generator, label: Label, tissue: Tissue) -> Lesion:
    f = LESION_FEATURES
    shape = _choice(rng, f["shape"][label])
    orientation = _choice(rng, f["orientation"][label])
    margins = tuple(m for m, p in f["margin"][label].items() if rng.random() < p)
    echo = _choice(rng, f["echo"][label])
    posterior = _choice(rng, f["posterior"][label])
    if echo == "anechoic" and rng.random() < 0.8:
        posterior = "enhancement"  # cysts transmit sound well
    halo = _choice(rng, f["halo"][label]) == "yes"
    calcs = _choice(rng, f["calcifications"][label]) == "yes"

    median, spread = _SIZE[label]
    long_axis = float(np.clip(median * sm.exp(spread * rng.standard_normal()), 5.0, 26.0))
    if shape == "round":
        aspect = _u(rng, 1.0, 1.15)
    elif shape == "oval":
        aspect = _u(rng, 1.35, 2.1)
    else:
        aspect = _u(rng, 1.1, 1.8)
    if orientation == "not parallel":
        aspect = 1.0 / _u(rng, 1.08, 1.5) if shape != "round" else 1.0 / aspect
    long_half = long_axis / 2
    a, b = (long_half, long_half / aspect) if aspect >= 1 else (long_half * aspect, long_half)
    tilt = _u(rng, -0.25, 0.25) if orientation == "parallel" else _u(rng, -0.35, 0.35)

    harmonics: list[tuple[int, float, float]] = []
    spikes: list[tuple[float, float, float]] = []
    if shape == "irregular":
        for k in (2, 3, 4, 5):
            harmonics.append((k, _u(rng, 0.04, 0.16) / (1 + 0.3 * (k - 2)), _u(rng, 0, 2 * math.pi)))
    else:
        harmonics.append((2, _u(rng, 0.0, 0.04), _u(rng, 0, 2 * math.pi)))
    if "microlobulated" in margins:
        for _ in range(2):
            harmonics.append((int(rng.integers(7, 14)), _u(rng, 0.03, 0.06), _u(rng, 0, 2 * math.pi)))
    if "angular" in margins:
        for _ in range(int(rng.integers(3, 6))):
            spikes.append((_u(rng, -math.pi, math.pi), _u(rng, 0.12, 0.3), _u(rng, 0.45, 0.9)))
    if "spiculated" in margins:
        for _ in range(int(rng.integers(5, 13))):
            spikes.append((_u(rng, -math.pi, math.pi), _u(rng, 0.3, 0.85), _u(rng, 0.06, 0.13)))
    ramp = _u(rng, 0.15, 0.35) if "indistinct" in margins else 0.0

    (lo, hi), (tlo, thi) = _ECHO_DB[echo]
    echo_db = _u(rng, lo, hi)
    texture_db = _u(rng, tlo, thi)
    if posterior == "enhancement":
        posterior_db = _u(rng, 4.0, 10.0)
    elif posterior == "shadowing":
        posterior_db = -_u(rng, 8.0, 22.0)
    elif posterior == "combined":
        posterior_db = -_u(rng, 6.0, 14.0)
    else:
        posterior_db = 0.0
    halo_db, halo_width = (_u(rng, 4.0, 8.0), _u(rng, 0.1, 0.22)) if halo else (0.0, 0.0)
    circumscribed_smooth = not margins and shape != "irregular"
    edge_shadow = -_u(rng, 6.0, 14.0) if (circumscribed_smooth and rng.random() < 0.4) else 0.0

    lesion = Lesion(
        centre_s=0.0,
        centre_d=0.0,
        half_width=a,
        half_height=b,
        tilt=tilt,
        shape=shape,
        orientation=orientation,
        margins=margins,
        echo_pattern=echo,
        echo_db=echo_db,
        texture_db=texture_db,
        margin_ramp=ramp,
        posterior=posterior,
        posterior_db=posterior_db,
        halo_db=halo_db,
        halo_width=halo_width,
        edge_shadow_db=edge_shadow,
        harmonics=tuple(harmonics),
        spikes=tuple(spikes),
    )
    # Keep the whole lesion (halo included) inside the field of view every device shares.
    extent = lesion.extent_mm
    limit = min(COMMON_HALF_WIDTH_MM - 1.0, (COMMON_DEPTH_MM - 5.0) / 2)
    if extent > limit:
        scale = limit / extent
        lesion = replace(lesion, half_width=a * scale, half_height=b * scale)
        extent = lesion.extent_mm
    s_lim = COMMON_HALF_WIDTH_MM - 1.0 - extent
    centre_s = _u(rng, -s_lim, s_lim) * 0.8
    # Most masses sit in the fibroglandular layer or at its interface with the fat.
    d_lo = max(tissue.skin_mm + 1.0 + extent, tissue.fat_base + 1.0)
    d_hi = min(COMMON_DEPTH_MM - 4.0 - extent, tissue.gland_base + 1.0)
    centre_d = _u(rng, d_lo, d_hi) if d_hi > d_lo else min(d_lo, COMMON_DEPTH_MM - 1.0 - extent)
    calcifications: list[tuple[float, float, float]] = []
    if calcs:
        n = int(rng.integers(3, 13))
        cu, cw = _u(rng, -0.3, 0.3), _u(rng, -0.3, 0.3)
        for _ in range(n):
            # Clustered, well inside the lesion (below 0.7 of the boundary radius R(phi)).
            pu = float(np.clip(cu + 0.2 * rng.standard_normal(), -0.5, 0.5))
            pw = float(np.clip(cw + 0.2 * rng.standard_normal(), -0.5, 0.5))
            boundary = float(lesion.radius(np.array([sm.atan2(pw, pu)]))[0])
            scale = min(1.0, 0.7 * boundary / max(sm.hypot(pu, pw), 1e-6))
            calcifications.append(
                (pu * scale * lesion.half_width, pw * scale * lesion.half_height, _u(rng, 14, 22))
            )
    return replace(lesion, centre_s=centre_s, centre_d=centre_d, calcifications=tuple(calcifications))


def sample_anatomy(label: Label | str, seed: int = 0, case: int = 0) -> Anatomy:
    """The breast of case ``case`` of class ``label`` for ``seed`` (device-independent, deterministic)."""
    label = Label(label)
    class_code = {Label.NORMAL: 0, Label.BENIGN: 1, Label.MALIGNANT: 2}[label]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), class_code, int(case), 0xA7A]))
    tissue = _sample_tissue(rng)
    lesion = None if label is Label.NORMAL else _sample_lesion(rng, label, tissue)
    return Anatomy(label=label, tissue=tissue, lesion=lesion, seed=int(seed), case=int(case))


def uniform_anatomy() -> Anatomy:
    """A homogeneous calibration phantom: one tissue at 0 dB everywhere, no lesion, no structures."""
    tissue = Tissue(
        skin_mm=0.0,
        fat_base=0.0,
        fat_waves=(),
        gland_base=1e9,
        gland_waves=(),
        retro_mm=0.0,
        muscle_mm=0.0,
        fibre_angle=0.0,
        fibre_period=1.0,
        fat_db=0.0,
        gland_db=0.0,
        muscle_db=0.0,
        gland_texture_db=0.0,
        uniform=True,
    )
    return Anatomy(label=Label.NORMAL, tissue=tissue, lesion=None, seed=0, case=0)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, eq=False)
class TissueFields:
    """Smooth unit-variance random fields on fixed millimetre grids (device-independent textures)."""

    fine: tuple[np.ndarray, float]  # lobular texture, sigma 0.7 mm
    coarse: tuple[np.ndarray, float]  # slow echogenicity changes, lesion heterogeneity, sigma 2.5 mm
    strands: tuple[np.ndarray, float]  # isolines give Cooper's ligaments: sigma 1 mm across, 3 mm in depth
    wobble: tuple[np.ndarray, float]  # muscle fibre phase, sigma 4 mm

    def sample(self, name: str, s: np.ndarray, d: np.ndarray, shear: float = 0.0) -> np.ndarray:
        """Field ``name`` (bilinear) at tissue points; ``shear`` tilts it (read at s + shear * d).

        ``s`` of shape (1, m) and ``d`` of shape (n, 1) (a separable grid, as every beam
        grid is) take a fast path; any other broadcastable pair works too.
        """
        grid, step = getattr(self, name)
        s, d = np.asarray(s, dtype=np.float64), np.asarray(d, dtype=np.float64)
        if s.ndim == 2 and d.ndim == 2 and s.shape[0] == 1 and d.shape[1] == 1:
            fr = np.clip((d[:, 0] - _D_RANGE[0]) / step, 0.0, grid.shape[0] - 1.000001)
            r0 = fr.astype(np.intp)
            wr = (fr - r0)[:, None]
            rows = grid[r0] * (1.0 - wr) + grid[r0 + 1] * wr  # (n, grid columns)
            if shear == 0.0:  # the same columns on every row
                fc = np.clip((s[0] - _S_RANGE[0]) / step, 0.0, grid.shape[1] - 1.000001)
                c0 = fc.astype(np.intp)
                left = rows[:, c0]
                return left + (rows[:, c0 + 1] - left) * (fc - c0)
            fc = (s + shear * d - _S_RANGE[0]) / step
            fc = np.clip(np.broadcast_to(fc, (d.shape[0], s.shape[1])), 0.0, grid.shape[1] - 1.000001)
            c0 = fc.astype(np.intp)
            wc = fc - c0
            left = np.take_along_axis(rows, c0, axis=1)
            right = np.take_along_axis(rows, c0 + 1, axis=1)
            return left + (right - left) * wc
        s, d = np.broadcast_arrays(s + shear * d if shear else s, d)
        coords = np.stack([(d - _D_RANGE[0]) / step, (s - _S_RANGE[0]) / step])
        return map_coordinates(grid, coords.reshape(2, -1), order=1, mode="nearest").reshape(s.shape)


def _smooth_field(
    rng: np.random.Generator, sigma_mm: float, stretch: float = 1.0
) -> tuple[np.ndarray, float]:
    step = sigma_mm / 2.5
    n_d = math.ceil((_D_RANGE[1] - _D_RANGE[0]) / step) + 1
    n_s = math.ceil((_S_RANGE[1] - _S_RANGE[0]) / step) + 1
    noise = rng.standard_normal((n_d, n_s))
    smooth = gaussian_filter(noise, (2.5 * stretch, 2.5), mode="wrap")
    smooth /= smooth.std()
    return smooth, step


def tissue_fields(anatomy: Anatomy) -> TissueFields:
    """The texture fields of ``anatomy`` (deterministic from its texture seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([anatomy.tissue.texture_seed, 0x7E7]))
    return TissueFields(
        fine=_smooth_field(rng, 0.7),
        coarse=_smooth_field(rng, 2.5),
        strands=_smooth_field(rng, 1.0, stretch=3.0),
        wobble=_smooth_field(rng, 4.0),
    )


def lesion_region(
    lesion: Lesion, device: DeviceProfile, x: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normalised radius ``rho`` (< 1 inside the lesion) and local (u, w) at physical points (x, z).

    Returns ``(rho, u, w, near)`` where ``near`` is the boolean mask of points that were
    evaluated (within the lesion's bounding circle); ``rho`` is ``inf`` elsewhere.
    """
    cx, cz = tissue_to_physical(device, lesion.centre_s, lesion.centre_d)
    theta_c = lesion.centre_s / device.radius_mm if device.geometry == "convex" else 0.0
    angle = theta_c + lesion.tilt
    sin, cos = sm.sincos(angle)
    tx, tz = cos, -sin  # along the skin
    nx, nz = sin, cos  # into the body
    dx = np.asarray(x) - float(cx)
    dz = np.asarray(z) - float(cz)
    reach = lesion.extent_mm + 0.5
    near = (np.abs(dx) <= reach) & (np.abs(dz) <= reach)
    rho = np.full(np.shape(dx), np.inf)
    u = np.zeros(np.shape(dx))
    w = np.zeros(np.shape(dx))
    if near.any():
        ddx, ddz = dx[near], dz[near]
        uu = ddx * tx + ddz * tz
        ww = ddx * nx + ddz * nz
        un, wn = uu / lesion.half_width, ww / lesion.half_height
        # Only correctly rounded operations from here to the comparison rho < 1 (and in the
        # coordinates before): the mask is the same bits on every machine.
        r = np.sqrt(un * un + wn * wn)
        positive = r > 0
        cos = np.divide(un, r, out=np.ones_like(r), where=positive)
        sin = np.divide(wn, r, out=np.zeros_like(r), where=positive)
        phi = np.asarray(sm.atan2(wn, un)) if lesion.spikes else None
        rho[near] = r / lesion.radius_cs(cos, sin, phi)
        u[near], w[near] = uu, ww
    return rho, u, w, near


def lesion_point(lesion: Lesion, device: DeviceProfile, u: float, w: float) -> tuple[float, float]:
    """Physical (x, z) of the point at local lesion coordinates (u along the skin, w into the body)."""
    cx, cz = tissue_to_physical(device, lesion.centre_s, lesion.centre_d)
    theta_c = lesion.centre_s / device.radius_mm if device.geometry == "convex" else 0.0
    angle = theta_c + lesion.tilt
    sin, cos = sm.sincos(angle)
    x = float(cx) + u * cos + w * sin
    z = float(cz) - u * sin + w * cos
    return x, z


def _box(s: np.ndarray, d: np.ndarray, cs: float, cd: float, reach: float) -> tuple[slice, slice] | None:
    """Rows/columns of the separable grid (s (1, m), d (n, 1)) within ``reach`` of (cs, cd)."""
    cols = np.flatnonzero(np.abs(s[0] - cs) <= reach)
    rows = np.flatnonzero(np.abs(d[:, 0] - cd) <= reach)
    if cols.size == 0 or rows.size == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _ellipse(s, d, cs, cd, a, b, tilt) -> np.ndarray:
    ds, dd = s - cs, d - cd
    sn, c = sm.sincos(tilt)
    u, w = (ds * c - dd * sn) / a, (ds * sn + dd * c) / b
    return u * u + w * w


def tissue_maps(
    anatomy: Anatomy,
    device: DeviceProfile,
    s: np.ndarray,
    d: np.ndarray,
    x: np.ndarray,
    z: np.ndarray,
    fields: TissueFields | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Echogenicity (dB), extra attenuation (dB/mm, one way) and lesion region on a grid of points.

    ``s`` (1, m) and ``d`` (n, 1) are the tissue coordinates of a separable grid (every beam
    grid is one: ``s`` depends on the scan line only, ``d`` on the sample only); ``x, z``
    (n, m) are the matching physical coordinates (mm) for ``device`` (see
    :mod:`bench.phantom.devices`). The baseline tissue attenuation is not included: the
    acquisition adds it and the scanner's TGC compensates it. Returns float64 (n, m) maps
    and the boolean lesion region.
    """
    t = anatomy.tissue
    s = np.asarray(s, dtype=np.float64).reshape(1, -1)
    d = np.asarray(d, dtype=np.float64).reshape(-1, 1)
    shape = (d.shape[0], s.shape[1])
    alpha = np.zeros(shape, dtype=np.float64)
    if t.uniform:
        return np.zeros(shape, dtype=np.float64), alpha, np.zeros(shape, dtype=bool)
    fields = fields or tissue_fields(anatomy)
    fine = fields.sample("fine", s, d)
    coarse = fields.sample("coarse", s, d)
    fat_b = t.fat_bottom(s)  # (1, m)
    gland_b = t.gland_bottom(s)
    muscle_t = gland_b + t.retro_mm
    muscle_b = muscle_t + t.muscle_mm

    # Deep to shallow; each layer overwrites what lies above it.
    echo = -9.0 + 2.0 * coarse + 1.5 * fine  # chest wall / intercostal tissue
    in_muscle = (d >= muscle_t) & (d < muscle_b)
    if in_muscle.any():
        wobble = fields.sample("wobble", s, d)
        sa, ca = sm.sincos(t.fibre_angle)
        across = d * ca - s * sa
        # A continuous quantity (numpy's cos is fine: last-bit differences stay far below
        # one grey level); only decisions need stablemath.
        fibres = np.cos(2 * math.pi * across / t.fibre_period + 2.5 * wobble)
        muscle = t.muscle_db + 1.0 * fine + 14.0 * np.clip(fibres - 0.6, 0.0, None)
        np.copyto(echo, muscle, where=in_muscle)
    fat_texture = t.fat_db + 1.5 * fine + 1.0 * coarse
    retro = (d >= gland_b) & (d < muscle_t)
    np.copyto(echo, fat_texture, where=retro)
    in_gland = (d >= fat_b) & (d < gland_b)
    gland = t.gland_db + t.gland_texture_db * fine + 1.5 * coarse
    np.copyto(echo, gland, where=in_gland)
    # Subcutaneous fat crossed by thin bright Cooper's ligaments (isolines of a smooth field).
    in_fat = (d >= t.skin_mm) & (d < fat_b)
    if in_fat.any():
        strands = fields.sample("strands", s, d, shear=t.ligament_shear)
        fat = np.where(np.abs(strands) < 0.06, t.gland_db + 2.0, fat_texture)
        np.copyto(echo, fat, where=in_fat)
    skin = np.broadcast_to((d >= 0) & (d < t.skin_mm), shape)
    np.copyto(echo, 2.0 + fine, where=skin)
    echo[np.broadcast_to((d >= 0) & (d < 0.35), shape)] = 8.0  # skin entry echo
    echo[np.abs(d - muscle_t) < 0.3] = 5.0  # pectoral fascia
    for cs, cd, a, b, tilt, level in t.lobules:
        box = _box(s, d, cs, cd, max(a, b))
        if box is not None:
            inside = (_ellipse(s[:, box[1]], d[box[0]], cs, cd, a, b, tilt) < 1.0) & in_gland[box]
            echo[box][inside] = level + 1.5 * fine[box][inside]
    for cs, cd, half_len, half_thick, tilt in t.ducts:
        box = _box(s, d, cs, cd, max(half_len, half_thick))
        if box is not None:
            inside = (_ellipse(s[:, box[1]], d[box[0]], cs, cd, half_len, half_thick, tilt) < 1.0) & in_gland[
                box
            ]
            echo[box][inside] = -24.0 + fine[box][inside]
    for cs, cd, a, b in t.ribs:
        box = _box(s, d, cs, cd, max(a, b))
        if box is not None:
            q = _ellipse(s[:, box[1]], d[box[0]], cs, cd, a, b, 0.0)
            bone = q < 1.0
            surface = bone & (q > 0.8) & (d[box[0]] < cd)
            echo[box][bone] = -20.0
            echo[box][surface] = 10.0 + 2.0 * fine[box][surface]
            alpha[box][bone & ~surface] = 9.0
    for cs, width, level in t.ligament_shadows:
        fb = float(t.fat_bottom(np.array(cs)))
        box = _box(s, d, cs, fb, max(width / 2, 1.0))
        if box is not None:
            spot = (np.abs(s[:, box[1]] - cs) < width / 2) & (np.abs(d[box[0]] - fb) < 1.0)
            alpha[box][spot] = -level / 4.0

    lesion_mask = np.zeros(shape, dtype=bool)
    lesion = anatomy.lesion
    if lesion is not None:
        rho, u, w, near = lesion_region(lesion, device, x, z)
        lesion_mask = rho < 1.0
        tissue_echo = echo[near]
        rho_n, u_n, w_n = rho[near], u[near], w[near]
        inner = lesion.echo_db + lesion.texture_db * coarse[near]
        if lesion.echo_pattern == "complex cystic/solid":
            inner = np.where(coarse[near] > 0.2, -9.0 + 2.0 * fine[near], lesion.echo_db)
        if lesion.margin_ramp > 0:
            blend = 0.6 * np.clip((rho_n - (1.0 - lesion.margin_ramp)) / lesion.margin_ramp, 0.0, 1.0)
            inner = inner + blend * (tissue_echo - 3.0 - inner)
        inside_n = rho_n < 1.0
        new = np.where(inside_n, inner, tissue_echo)
        if lesion.halo_db > 0:
            halo = (rho_n >= 1.0) & (rho_n < 1.0 + lesion.halo_width)
            new = np.where(halo, new + lesion.halo_db, new)
        echo[near] = new
        extra_n = np.zeros(rho_n.shape, dtype=np.float64)
        if lesion.posterior_db != 0:
            extra = -lesion.posterior_db / (2.0 * 2.0 * lesion.half_height)
            if lesion.posterior == "combined":
                extra_n[inside_n] = np.where(u_n[inside_n] < 0, extra, -0.6 * extra)
            else:
                extra_n[inside_n] = extra
        if lesion.edge_shadow_db < 0:
            edge = (rho_n >= 0.92) & (rho_n < 1.1) & (np.abs(w_n) < 0.35 * lesion.half_height)
            extra_n[edge] -= lesion.edge_shadow_db / (2.0 * 0.7 * lesion.half_height)
        alpha[near] += extra_n
    return echo, alpha, lesion_mask
