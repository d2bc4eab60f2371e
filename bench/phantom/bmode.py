"""B-mode image formation: scatterers -> point-spread function -> envelope -> TGC -> log -> display.

The steps follow how a scanner forms the picture, in baseband (IQ) form:

1. **Scatterers.** A dense complex Gaussian random field on the beam grid (one sample per
   grid cell, which stands for the sum of the many sub-resolution scatterers in it: with
   >= 10 scatterers per resolution cell the sum is circular complex Gaussian by the central
   limit theorem, so drawing the sum directly is equivalent and vectorised). Its standard
   deviation is the tissue echogenicity times the round-trip attenuation accumulated along
   the beam (``2 * integral of alpha``), so attenuating lesions shadow what lies behind them.
   The receiver noise floor is a depth-independent variance added to it.
2. **Point-spread function.** The pulse is a Gaussian-windowed cosine at the centre
   frequency; demodulated to baseband (IQ) its complex envelope is the Gaussian window, so
   the axial transfer function is a Gaussian of sigma ``1 / (2 pi sigma_z)``; laterally the
   beam is Gaussian, narrowest at the focus and twice as wide far from it (two filtered
   fields blended by depth). Convolution is a product in the 2-D FFT domain.
   Spatially compounded devices repeat this with the PSF steered by a few degrees.
3. **Envelope detection:** magnitude of the IQ signal (averaged over steering angles).
4. **TGC** (automatic compensation of the mean attenuation plus the device's slider curve),
   **log compression** to the device's dynamic range, grey map (gamma) and optional
   speckle-reduction low-pass, **scan conversion** to the display (convex only) and the tint.

In homogeneous tissue without compounding the envelope is Rayleigh distributed
(mean/std = 1.91), the signature of fully developed speckle.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft
from scipy.ndimage import gaussian_filter, map_coordinates

from bench.phantom.anatomy import TISSUE_ATTENUATION_DB_MM_MHZ
from bench.phantom.devices import DeviceProfile, Layout, layout

__all__ = ["HEADROOM_DB", "RAYLEIGH_SNR", "Acquisition", "acquire", "simulate_iq_envelope"]

#: mean/std of a Rayleigh variable: sqrt(pi / (4 - pi)).
RAYLEIGH_SNR = math.sqrt(math.pi / (4 - math.pi))
#: Echo level (dB re. the glandular rms echo) that maps to white before gain.
HEADROOM_DB = 18.0


class Acquisition:
    """What :func:`acquire` returns: display grey (H, W) in [0, 1], envelope (H, W), beam-grid envelope."""

    __slots__ = ("beam_envelope", "envelope", "grey")

    def __init__(self, grey: np.ndarray, envelope: np.ndarray | None, beam_envelope: np.ndarray) -> None:
        self.grey = grey
        self.envelope = envelope
        self.beam_envelope = beam_envelope


def _effective_sigmas(device: DeviceProfile, lay: Layout) -> tuple[float, float]:
    axial, lateral = device.psf_sigma_mm()
    # The scanner low-passes before resampling to display pixels: a PSF narrower than a
    # pixel shows as one-pixel grain, never finer.
    axial = math.hypot(axial, 0.5 * lay.dz)
    lateral = math.hypot(lateral, 0.5 * lay.dx)
    return axial, lateral


@functools.lru_cache(maxsize=16)
def _transfer(device: DeviceProfile, size: tuple[int, int] | None):
    """Padded FFT shape, pads, and per steering angle the (focus, far) transfer functions."""
    lay = layout(device, size)
    n, m = lay.beam_d.shape
    sig_z, sig_x = _effective_sigmas(device, lay)
    far_x = 2.0 * sig_x
    max_steer = max(abs(a) for a in device.compound_deg)
    reach = 4.0 * max(sig_z, far_x)
    pad_z = math.ceil(reach * (1 + math.sin(math.radians(max_steer))) / lay.dz) + 2
    pad_x = math.ceil(reach / lay.dx) + 2
    shape = (scipy.fft.next_fast_len(n + 2 * pad_z), scipy.fft.next_fast_len(m + 2 * pad_x))
    kz = scipy.fft.fftfreq(shape[0], d=lay.dz)[:, None]
    kx = scipy.fft.fftfreq(shape[1], d=lay.dx)[None, :]
    # Anti-aliasing taper to zero at the Nyquist frequency: a Gaussian cut off there would
    # ring (cross-shaped side lobes around bright points after log compression).
    taper = np.cos(0.5 * math.pi * np.abs(kz) * 2 * lay.dz) * np.cos(0.5 * math.pi * np.abs(kx) * 2 * lay.dx)
    filters = []
    for steer in device.compound_deg:
        b = math.radians(steer)
        kz_r = kz * math.cos(b) - kx * math.sin(b)
        kx_r = kz * math.sin(b) + kx * math.cos(b)
        pair = []
        for lateral in (sig_x, far_x):
            h = taper * np.exp(-2.0 * math.pi**2 * (sig_z**2 * kz_r**2 + lateral**2 * kx_r**2))
            h /= math.sqrt(float(np.mean(h**2)))  # unit gain on white noise
            pair.append(h.astype(np.complex64))
        filters.append(tuple(pair))
    return shape, (pad_z, pad_x), filters


def simulate_iq_envelope(
    device: DeviceProfile,
    size: tuple[int, int] | None,
    amplitude: np.ndarray,
    rng: np.random.Generator,
    points: list[tuple[int, int, complex]] | None = None,
) -> np.ndarray:
    """Envelope on the beam grid of a scatterer field with standard deviation ``amplitude``.

    ``amplitude`` has the beam-grid shape of ``layout(device, size)``; ``points`` adds
    strong point reflectors ``(row, col, complex amplitude)`` (microcalcifications). No TGC,
    no log: with a constant ``amplitude`` the result is Rayleigh speckle (mean/std 1.91
    for a device without compounding).
    """
    lay = layout(device, size)
    shape, (pad_z, pad_x), filters = _transfer(device, size)
    n, m = amplitude.shape
    field = np.zeros(shape, dtype=np.complex64)
    noise = rng.standard_normal((2, n, m), dtype=np.float32)
    scale = (amplitude * (1.0 / math.sqrt(2.0))).astype(np.float32)
    field[pad_z : pad_z + n, pad_x : pad_x + m] = (noise[0] * scale) + 1j * (noise[1] * scale)
    for row, col, value in points or ():
        if 0 <= row < n and 0 <= col < m:
            field[pad_z + row, pad_x + col] += np.complex64(value)
    spectrum = scipy.fft.fft2(field)
    depth = lay.beam_d[:, 0]
    focus_weight = np.clip(1.0 - np.abs(depth - device.focus_mm) / (0.6 * device.depth_mm), 0.0, 1.0)
    focus_weight = focus_weight.astype(np.float32)[:, None]
    envelope = np.zeros((n, m), dtype=np.float32)
    for h_focus, h_far in filters:
        near = scipy.fft.ifft2(spectrum * h_focus)[pad_z : pad_z + n, pad_x : pad_x + m]
        far = scipy.fft.ifft2(spectrum * h_far)[pad_z : pad_z + n, pad_x : pad_x + m]
        iq = focus_weight * near + (1.0 - focus_weight) * far
        envelope += np.abs(iq)
    if len(filters) > 1:
        envelope /= len(filters)
    return envelope


def tgc_db(device: DeviceProfile, depth_mm: np.ndarray) -> np.ndarray:
    """Total depth gain (dB): automatic attenuation compensation plus the slider curve."""
    auto = device.tgc_compensation * 2.0 * TISSUE_ATTENUATION_DB_MM_MHZ * device.frequency_mhz * depth_mm
    sliders = np.interp(depth_mm / device.depth_mm, np.linspace(0.0, 1.0, len(device.tgc_db)), device.tgc_db)
    return auto + sliders


def acquire(
    device: DeviceProfile,
    size: tuple[int, int] | None,
    echo_db: np.ndarray,
    alpha_db_mm: np.ndarray,
    rng: np.random.Generator,
    points: list[tuple[int, int, float]] | None = None,
    want_envelope: bool = False,
) -> Acquisition:
    """Image ``echo_db`` / ``alpha_db_mm`` (beam grid) with ``device``: display grey in [0, 1].

    ``points`` are point reflectors ``(row, col, level dB)`` on the beam grid; their phase
    is drawn from ``rng``. The returned envelope (display grid, linear amplitude after TGC,
    before gain and log compression; 0 outside the field of view) is computed only when
    ``want_envelope``.
    """
    lay = layout(device, size)
    dz = lay.dz
    alpha = TISSUE_ATTENUATION_DB_MM_MHZ * device.frequency_mhz + alpha_db_mm
    # Round-trip attenuation accumulated down to the middle of each sample.
    path = 2.0 * (np.cumsum(alpha, axis=0) - 0.5 * alpha) * dz
    amplitude_db = echo_db - path
    amplitude = np.sqrt(10.0 ** (amplitude_db / 10.0) + 10.0 ** (device.noise_db / 10.0))
    reflectors = []
    if points:
        phases = rng.uniform(0.0, 2 * math.pi, size=len(points))
        for (row, col, level), phase in zip(points, phases, strict=True):
            gain = 10.0 ** ((level - path[row, col]) / 20.0)
            reflectors.append((row, col, complex(gain * math.cos(phase), gain * math.sin(phase))))
    beam_env = simulate_iq_envelope(device, size, amplitude.astype(np.float32), rng, reflectors)
    gain_curve = tgc_db(device, lay.beam_d[:, 0]).astype(np.float32)[:, None]
    log_env = 20.0 * np.log10(np.maximum(beam_env, 1e-12)) + gain_curve
    if device.smoothing_px > 0:
        log_env = gaussian_filter(log_env, device.smoothing_px, mode="nearest")
    level = 1.0 + (log_env + device.gain_db - HEADROOM_DB) / device.dynamic_range_db
    beam_grey = np.clip(level, 0.0, 1.0) ** device.gamma
    beam_env_tgc = beam_env * (10.0 ** (gain_curve / 20.0)) if want_envelope else None
    grey = _to_display(lay, beam_grey.astype(np.float32))
    envelope = _to_display(lay, beam_env_tgc.astype(np.float32)) if beam_env_tgc is not None else None
    return Acquisition(grey, envelope, beam_env)


def _to_display(lay: Layout, beam: np.ndarray) -> np.ndarray:
    out = np.zeros(lay.shape, dtype=np.float32)
    if lay.device.geometry == "linear":
        out[lay.beam_rows, lay.beam_cols] = beam
        return out
    coords = lay.scan_index[:, lay.inside]
    out[lay.inside] = map_coordinates(beam, coords, order=1, mode="nearest")
    return out
