"""Simulated scanners: fixed acquisition and display settings, and the pixel geometry they imply.

A :class:`DeviceProfile` is what differs between two hospitals' machines: transducer
(centre frequency, bandwidth, f-number: the speckle size), geometry (linear rectangle or
convex fan), field of view, dynamic range, gain, time-gain compensation, grey map and
tint, spatial compounding and the screen layout (text, depth ruler). :func:`layout`
turns a profile and an image size into coordinate maps:

* *display grid*: the output image, ``(H, W)``; each pixel inside the field of view has
  physical coordinates ``x`` (lateral, mm, 0 under the probe centre) and ``z`` (depth
  below the skin under the probe centre, mm), and *tissue coordinates* ``s`` (position
  along the skin, mm) and ``d`` (depth below the skin along the beam, mm). For a linear
  probe ``s = x`` and ``d = z``; for a convex probe the skin follows the probe face, so
  ``d = r - R`` and ``s = R * theta`` (``r``, ``theta`` polar about the virtual apex).
* *beam grid*: where the echo signal is simulated, ``(n_samples, n_lines)``: rows are
  depth samples along each scan line, columns are scan lines (parallel for linear, fanned
  for convex). For linear probes the beam grid is exactly the display pixels of the field
  of view (no interpolation); convex images are scan-converted (bilinear) to the display.

Anatomy is defined in millimetres, so the same breast seen by two devices lands at
different pixels, sizes and shapes, as it would on two real scanners.

All coordinates are float64 and computed with :mod:`bench.phantom.stablemath` (no
platform-dependent sin/cos/atan2), so the field-of-view masks, the pixel coordinates and
hence the lesion masks are the same bits on every machine.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.phantom import stablemath as sm

__all__ = [
    "COMMON_DEPTH_MM",
    "COMMON_HALF_WIDTH_MM",
    "DEVICES",
    "SOUND_SPEED_MM_US",
    "DeviceProfile",
    "Layout",
    "get_device",
    "layout",
]

#: Speed of sound in soft tissue, mm per microsecond.
SOUND_SPEED_MM_US = 1.54
#: Every device sees at least tissue coordinates |s| <= this (mm) at every depth <= COMMON_DEPTH_MM.
COMMON_HALF_WIDTH_MM = 18.0
#: Every device images at least this deep (mm); lesions are placed inside this box.
COMMON_DEPTH_MM = 34.0


@dataclass(frozen=True)
class DeviceProfile:
    """One simulated scanner: transducer, geometry, processing and screen layout.

    Sizes are ``(width, height)`` in pixels; lengths in mm; gains in dB. ``tgc_db`` are the
    operator's TGC slider offsets from the top to the bottom of the image (interpolated
    linearly in depth), added to the automatic compensation of ``tgc_compensation`` times
    the mean tissue attenuation. ``tint`` multiplies the grey map per RGB channel.
    """

    name: str
    number: int
    description: str
    geometry: str  # "linear" or "convex"
    image_size: tuple[int, int]
    frequency_mhz: float
    bandwidth: float  # fractional -6 dB bandwidth of the pulse
    f_number: float
    focus_mm: float
    depth_mm: float
    width_mm: float = 0.0  # linear: field-of-view width
    radius_mm: float = 0.0  # convex: probe radius (virtual apex above the skin)
    sector_deg: float = 0.0  # convex: full opening angle of the fan
    dynamic_range_db: float = 60.0
    gain_db: float = 0.0
    tgc_db: tuple[float, ...] = (0.0, 0.0)
    tgc_compensation: float = 0.9
    gamma: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    compound_deg: tuple[float, ...] = (0.0,)
    noise_db: float = -60.0  # receiver noise floor relative to the glandular echo at the skin
    smoothing_px: float = 0.0  # speckle-reduction low-pass on the log image (Gaussian sigma, px)
    margins: tuple[float, float, float, float] = (0.07, 0.05, 0.0, 0.01)  # top, right, bottom, left
    model_label: str = ""
    preset_label: str = ""
    caliper_rate: float = 0.4  # fraction of lesion images with calliper '+' marks
    text_grey: int = 230
    colorbar: bool = False

    def __post_init__(self) -> None:
        if self.geometry not in ("linear", "convex"):
            raise ValueError(
                f"device {self.name}: geometry must be 'linear' or 'convex', not {self.geometry!r}"
            )
        if self.geometry == "linear" and self.width_mm < 2 * COMMON_HALF_WIDTH_MM:
            raise ValueError(f"device {self.name}: linear width must be >= {2 * COMMON_HALF_WIDTH_MM} mm")
        if self.geometry == "convex":
            half = math.radians(self.sector_deg / 2)
            if self.radius_mm * half < COMMON_HALF_WIDTH_MM:
                raise ValueError(
                    f"device {self.name}: the fan does not cover |s| <= {COMMON_HALF_WIDTH_MM} mm"
                )
        if self.depth_mm < COMMON_DEPTH_MM:
            raise ValueError(f"device {self.name}: depth must be >= {COMMON_DEPTH_MM} mm")

    @property
    def wavelength_mm(self) -> float:
        return SOUND_SPEED_MM_US / self.frequency_mhz

    def psf_sigma_mm(self) -> tuple[float, float]:
        """(axial, lateral) Gaussian sigma of the pulse-echo point-spread function at the focus, mm.

        Axial: a Gaussian pulse of fractional -6 dB bandwidth ``bandwidth`` has a spectral
        sigma ``B f0 / 2.355``; its envelope in time has sigma ``1 / (2 pi sigma_f)`` and,
        in depth (round trip), ``c sigma_t / 2``. Lateral: the two-way beam of an aperture
        at f-number ``F#`` is about ``lambda F#`` wide; we take sigma = 0.5 lambda F#.
        """
        sigma_f = self.bandwidth * self.frequency_mhz / 2.3548
        sigma_t = 1.0 / (2.0 * math.pi * sigma_f)
        axial = SOUND_SPEED_MM_US * sigma_t / 2.0
        lateral = 0.5 * self.wavelength_mm * self.f_number
        return axial, lateral

    def summary(self) -> dict[str, Any]:
        """The profile as a JSON-friendly dict (for metadata and docs)."""
        return asdict(self)


#: The simulated scanners, by name. Numbers are stable: they key the acquisition noise.
DEVICES: dict[str, DeviceProfile] = {
    d.name: d
    for d in (
        DeviceProfile(
            name="device-a",
            number=1,
            description="Halvorsen Sonix HX-7 with L14-5 linear array, breast preset: 10 MHz, "
            "neutral grey map",
            geometry="linear",
            image_size=(448, 336),
            frequency_mhz=10.0,
            bandwidth=0.55,
            f_number=2.0,
            focus_mm=15.0,
            depth_mm=38.0,
            width_mm=50.0,
            dynamic_range_db=60.0,
            gain_db=-3.0,
            tgc_db=(-4.0, 0.0, 1.0, 2.0),
            tgc_compensation=0.92,
            gamma=1.1,
            tint=(1.0, 1.0, 1.0),
            noise_db=-62.0,
            model_label="HALVORSEN HX-7",
            preset_label="L14-5 BREAST",
            caliper_rate=0.35,
        ),
        DeviceProfile(
            name="device-b",
            number=2,
            description="Meridian Vue C60 with C5-2 convex array, general preset: 4.5 MHz fan, sepia map",
            geometry="convex",
            image_size=(400, 300),
            frequency_mhz=4.5,
            bandwidth=0.6,
            f_number=2.6,
            focus_mm=26.0,
            depth_mm=50.0,
            radius_mm=50.0,
            sector_deg=70.0,
            dynamic_range_db=46.0,
            gain_db=5.0,
            tgc_db=(-6.0, -2.0, 2.0, 4.0),
            tgc_compensation=0.85,
            gamma=0.85,
            tint=(1.0, 0.9, 0.74),
            noise_db=-58.0,
            margins=(0.0, 0.06, 0.0, 0.0),
            model_label="MERIDIAN VUE C60",
            preset_label="C5-2 GEN",
            caliper_rate=0.5,
            colorbar=True,
        ),
        DeviceProfile(
            name="device-c",
            number=3,
            description="Kestrel HD-9 with L18-6 linear array, small-parts preset: 14 MHz, wide dynamic "
            "range, blue-grey map",
            geometry="linear",
            image_size=(360, 360),
            frequency_mhz=14.0,
            bandwidth=0.5,
            f_number=1.8,
            focus_mm=12.0,
            depth_mm=36.0,
            width_mm=38.0,
            dynamic_range_db=75.0,
            gain_db=4.0,
            tgc_db=(-2.0, 0.0, 3.0, 6.0),
            tgc_compensation=0.9,
            gamma=1.25,
            tint=(0.84, 0.92, 1.0),
            noise_db=-66.0,
            margins=(0.08, 0.055, 0.0, 0.0),
            model_label="KESTREL HD-9",
            preset_label="L18-6 SMP",
            caliper_rate=0.3,
            text_grey=210,
        ),
        DeviceProfile(
            name="device-d",
            number=4,
            description="Corvid Nova 5 with L9-3 linear array, breast preset: 7.5 MHz, 3-angle spatial "
            "compounding and speckle reduction, contrasty green-grey map",
            geometry="linear",
            image_size=(448, 320),
            frequency_mhz=7.5,
            bandwidth=0.65,
            f_number=2.2,
            focus_mm=18.0,
            depth_mm=36.0,
            width_mm=52.0,
            dynamic_range_db=56.0,
            gain_db=-3.0,
            tgc_db=(-2.0, 2.0, 2.0, 0.0),
            tgc_compensation=0.95,
            gamma=1.45,
            tint=(0.92, 1.0, 0.94),
            compound_deg=(-12.0, 0.0, 12.0),
            noise_db=-60.0,
            smoothing_px=0.7,
            margins=(0.065, 0.05, 0.045, 0.01),
            model_label="CORVID NOVA 5",
            preset_label="L9-3 BR SC",
            caliper_rate=0.45,
            text_grey=200,
        ),
    )
}


def get_device(device: str | DeviceProfile) -> DeviceProfile:
    """The profile named ``device`` (case-insensitive), or ``device`` itself."""
    if isinstance(device, DeviceProfile):
        return device
    key = str(device).strip().lower()
    if key not in DEVICES:
        raise KeyError(f"unknown phantom device {device!r}; known: {', '.join(DEVICES)}")
    return DEVICES[key]


@dataclass(frozen=True, eq=False)
class Layout:
    """Pixel geometry of one device at one image size (see the module docstring).

    Display maps are ``(H, W)``; beam maps are ``(n_samples, n_lines)``. ``beam_rows`` /
    ``beam_cols`` (linear only) place the beam grid in the display; ``scan_index``
    (convex only) gives, per display pixel, the fractional (sample, line) to interpolate.
    ``dz`` is the axial sample spacing and ``dx`` the lateral line spacing (at the focus
    for convex), both in mm.
    """

    device: DeviceProfile
    width: int
    height: int
    px_mm: float
    inside: np.ndarray
    x: np.ndarray
    z: np.ndarray
    s: np.ndarray
    d: np.ndarray
    beam_s: np.ndarray
    beam_d: np.ndarray
    beam_x: np.ndarray
    beam_z: np.ndarray
    dz: float
    dx: float
    box: tuple[int, int, int, int]  # imaging area in the display: left, top, right, bottom (exclusive)
    beam_rows: slice | None = None
    beam_cols: slice | None = None
    scan_index: np.ndarray | None = None  # (2, H, W) fractional beam indices, convex only
    theta_step: float = 0.0
    theta_max: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @functools.cached_property
    def scan_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """Convex only: bilinear scan conversion of the pixels ``inside``, precomputed.

        ``(index, weight)``, both (4, K) for the K pixels inside: flat beam-grid indices of
        the four neighbours and their bilinear weights (coordinates clamped to the grid).
        """
        if self.scan_index is None:
            raise ValueError("scan_plan: only convex layouts are scan converted")
        n, m = self.beam_d.shape
        rows = np.clip(self.scan_index[0][self.inside], 0.0, n - 1.0)
        cols = np.clip(self.scan_index[1][self.inside], 0.0, m - 1.0)
        r0 = np.minimum(rows.astype(np.intp), n - 2)
        c0 = np.minimum(cols.astype(np.intp), m - 2)
        wr, wc = rows - r0, cols - c0
        base = r0 * m + c0
        index = np.stack([base, base + 1, base + m, base + m + 1])
        weight = np.stack([(1.0 - wr) * (1.0 - wc), (1.0 - wr) * wc, wr * (1.0 - wc), wr * wc])
        return index, weight

    def depth_to_row(self, depth_mm: float) -> float:
        """Display row (fractional) of the skin depth ``depth_mm`` under the probe centre."""
        return self.physical_to_pixel(0.0, depth_mm)[1]

    def tissue_to_pixel(self, s_mm: float, d_mm: float) -> tuple[float, float]:
        """(column, row) of the display pixel centre at tissue coordinates ``(s, d)``."""
        x, z = tissue_to_physical(self.device, s_mm, d_mm)
        return self.physical_to_pixel(float(x), float(z))

    def physical_to_pixel(self, x_mm: float, z_mm: float) -> tuple[float, float]:
        """(column, row) of the display pixel centre at physical ``(x, z)`` (fractional)."""
        left, top, right, _ = self.box
        z_top = 0.0
        if self.device.geometry == "convex":
            radius = self.device.radius_mm
            z_top = radius * sm.cos(self.theta_max) - radius
        return (left + right) / 2 + x_mm / self.px_mm - 0.5, top + (z_mm - z_top) / self.px_mm - 0.5

    def physical_to_beam(self, x_mm: float, z_mm: float) -> tuple[int, int]:
        """Nearest beam-grid (sample, line) of physical ``(x, z)`` (may be out of range)."""
        if self.device.geometry == "linear":
            row = (z_mm - float(self.beam_z[0, 0])) / self.dz
            col = (x_mm - float(self.beam_x[0, 0])) / self.dx
            return round(row), round(col)
        radius = self.device.radius_mm
        r = sm.hypot(x_mm, z_mm + radius)
        theta = sm.atan2(x_mm, z_mm + radius)
        return round((r - radius) / self.dz), round((theta + self.theta_max) / self.theta_step)


def tissue_to_physical(device: DeviceProfile, s_mm: Any, d_mm: Any) -> tuple[Any, Any]:
    """Physical (x, z) in mm of tissue coordinates (s, d) for ``device``'s probe shape."""
    if device.geometry == "linear":
        return s_mm, d_mm
    radius = device.radius_mm
    sin, cos = sm.sincos(np.asarray(s_mm, dtype=np.float64) / radius)
    r = radius + np.asarray(d_mm, dtype=np.float64)
    return r * sin, r * cos - radius


@functools.lru_cache(maxsize=32)
def layout(device: DeviceProfile, size: tuple[int, int] | None = None) -> Layout:
    """The coordinate maps of ``device`` rendered at ``size`` = (width, height) (default: its own)."""
    width, height = size or device.image_size
    if width < 32 or height < 32:
        raise ValueError(f"phantom image size {width}x{height} is too small (minimum 32x32)")
    top_f, right_f, bottom_f, left_f = device.margins
    left = round(width * left_f)
    right = width - round(width * right_f)
    top = round(height * top_f)
    bottom = height - round(height * bottom_f)
    box_w, box_h = right - left, bottom - top
    if device.geometry == "linear":
        return _linear_layout(device, width, height, (left, top, right, bottom), box_w, box_h)
    return _convex_layout(device, width, height, (left, top, right, bottom), box_w, box_h)


def _display_xy(width: int, height: int, box: tuple[int, int, int, int], px_mm: float, z_top: float):
    left, top, right, _ = box
    cols = (np.arange(width, dtype=np.float64) + 0.5 - (left + right) / 2) * px_mm
    rows = (np.arange(height, dtype=np.float64) + 0.5 - top) * px_mm + z_top
    return np.meshgrid(cols, rows)


def _linear_layout(device, width, height, box, box_w, box_h) -> Layout:
    px_mm = max(device.width_mm / box_w, device.depth_mm / box_h)
    x, z = _display_xy(width, height, box, px_mm, 0.0)
    inside = (np.abs(x) <= device.width_mm / 2) & (z >= 0) & (z <= device.depth_mm)
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    row_slice = slice(int(rows[0]), int(rows[-1]) + 1)
    col_slice = slice(int(cols[0]), int(cols[-1]) + 1)
    # The field of view is a rectangle: keep the beam grid and the display in lockstep.
    inside = np.zeros_like(inside)
    inside[row_slice, col_slice] = True
    beam_x = x[row_slice, col_slice]
    beam_z = z[row_slice, col_slice]
    return Layout(
        device=device,
        width=width,
        height=height,
        px_mm=px_mm,
        inside=inside,
        x=x,
        z=z,
        s=x,
        d=z,
        beam_s=beam_x,
        beam_d=beam_z,
        beam_x=beam_x,
        beam_z=beam_z,
        dz=px_mm,
        dx=px_mm,
        box=box,
        beam_rows=row_slice,
        beam_cols=col_slice,
    )


def _convex_layout(device, width, height, box, box_w, box_h) -> Layout:
    radius, depth = device.radius_mm, device.depth_mm
    half = math.radians(device.sector_deg / 2)
    z_top = radius * sm.cos(half) - radius
    fov_h = depth - z_top
    # Fit the depth to the box height; the fan's lower flanks may run off the image sides
    # (as on many scanners' zoomed displays), which keeps the black corners small.
    px_mm = fov_h / box_h
    x, z = _display_xy(width, height, box, px_mm, z_top)
    r = sm.hypot(x, z + radius)
    theta = sm.atan2(x, z + radius)
    d = r - radius
    inside = (np.abs(theta) <= half) & (d >= 0) & (d <= depth)
    half_x = (box[2] - box[0]) / 2 * px_mm
    inside &= (
        (np.abs(x) <= half_x) & (np.arange(width)[None, :] >= box[0]) & (np.arange(width)[None, :] < box[2])
    )
    # Beam grid: lines spaced ~1 display pixel apart at mid-depth, samples 1 pixel apart.
    n_lines = math.ceil(2 * half * (radius + depth / 2) / px_mm) + 1
    n_samples = math.ceil(depth / px_mm) + 1
    theta_step = 2 * half / (n_lines - 1)
    dz = depth / (n_samples - 1)
    thetas = -half + theta_step * np.arange(n_lines)
    depths = dz * np.arange(n_samples)
    beam_theta, beam_d = np.meshgrid(thetas, depths)
    beam_r = radius + beam_d
    scan_index = np.stack([d / dz, (theta + half) / theta_step])
    return Layout(
        device=device,
        width=width,
        height=height,
        px_mm=px_mm,
        inside=inside,
        x=x,
        z=z,
        s=radius * theta,
        d=d,
        beam_s=radius * beam_theta,
        beam_d=beam_d,
        beam_x=beam_r * sm.sin(beam_theta),
        beam_z=beam_r * sm.cos(beam_theta) - radius,
        dz=dz,
        dx=theta_step * (radius + device.focus_mm),
        box=box,
        scan_index=scan_index,
        theta_step=theta_step,
        theta_max=half,
    )
