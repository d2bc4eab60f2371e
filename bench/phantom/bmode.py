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

Precision: random draws, FFTs and every array are float64 / complex128, and nothing is
quantised before the caller's final 8-bit rounding, so last-bit differences between CPUs
or library builds (SIMD transcendental kernels, FFT code paths) stay around 1e-13 grey
levels. FFT sizes are kept small instead: the unsteered PSF is separable and applied
axis by axis (see :class:`_Transfer`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft
from scipy.ndimage import gaussian_filter

from bench.phantom import stablemath as sm
from bench.phantom.anatomy import TISSUE_ATTENUATION_DB_MM_MHZ
from bench.phantom.devices import DeviceProfile, Layout, layout

__all__ = ["HEADROOM_DB", "RAYLEIGH_SNR", "Acquisition", "acquire", "simulate_iq_envelope"]

#: mean/std of a Rayleigh variable: sqrt(pi / (4 - pi)).
RAYLEIGH_SNR = math.sqrt(math.pi / (4 - math.pi))
#: Echo level (dB re. the glandular rms echo) that maps to white before gain.
HEADROOM_DB = 18.0


class Acquisition:
    """What :func:`acquire` returns (float64): display grey (H, W) in [0, 1], envelope, beam envelope."""

    __slots__ = ("beam_envelope", "envelope", "grey")

    def __init__(self, grey: np.ndarray, envelope: np.ndarray | None, beam_envelope: np.ndarray) -> None:
        self.grey = grey
        self.envelope = envelope
        self.beam_envelope = beam_envelope


def _effective_sigmas(device: DeviceProfile, lay: Layout) -> tuple[float, float]:
    axial, lateral = device.psf_sigma_mm()
    # The scanner low-passes before resampling to display pixels: a PSF narrower than a
    # pixel shows as one-pixel grain, never finer.
    axial = math.sqrt(axial * axial + (0.5 * lay.dz) ** 2)
    lateral = math.sqrt(lateral * lateral + (0.5 * lay.dx) ** 2)
    return axial, lateral


#: Zero band after the data on each FFT axis, so that the circular convolution does not
#: wrap: PSF sigmas plus samples (the anti-aliasing taper's kernel has slowly decaying tails).
#: Within 5e-4 of the mean amplitude of a much larger padding, as before the float64 change.
_PAD_SIGMAS = 8.0
_PAD_SAMPLES = 16


def _unit_gain(h: np.ndarray) -> np.ndarray:
    """Scale a real transfer function to unit gain on white noise (mean |H|^2 = 1)."""
    return h / math.sqrt(float(np.mean(h * h)))


def _taper(k: np.ndarray, step: float) -> np.ndarray:
    # Anti-aliasing taper to zero at the Nyquist frequency: a Gaussian cut off there would
    # ring (cross-shaped side lobes around bright points after log compression).
    return np.cos((0.5 * math.pi) * (np.abs(k) * (2.0 * step)))


class _Transfer:
    """Cached FFT plan of one device at one size: shapes and real transfer functions.

    The unsteered PSF is separable, so it is applied as an axial pass (``axial_n``,
    ``h_axial``) and a lateral pass (``lateral_n``) whose transfer function differs per
    depth row: ``h_lateral[row] = w h_focus + (1 - w) h_far`` blends the focal and the
    far beam by depth (the same as blending the two filtered fields, by linearity, and
    half the transforms). Steered PSFs (spatial compounding) are not separable: a 2-D
    transform of ``shape_2d`` and one ``(h_focus, h_far)`` pair per steering angle.
    Data sit at index 0 of each padded axis; the zero band after them is
    ``_PAD_SIGMAS`` PSF sigmas plus ``_PAD_SAMPLES`` samples wide or more.
    """

    __slots__ = ("axial_n", "focus_weight", "h_axial", "h_lateral", "lateral_n", "shape_2d", "steered")

    def __init__(self, device: DeviceProfile, size: tuple[int, int] | None) -> None:
        lay = layout(device, size)
        n, m = lay.beam_d.shape
        sig_z, sig_x = _effective_sigmas(device, lay)
        far_x = 2.0 * sig_x
        depth = lay.beam_d[:, 0]
        weight = np.clip(1.0 - np.abs(depth - device.focus_mm) / (0.6 * device.depth_mm), 0.0, 1.0)
        self.focus_weight = weight[:, None]

        def padded(count: int, reach_mm: float, step: float) -> int:
            return scipy.fft.next_fast_len(count + math.ceil(_PAD_SIGMAS * reach_mm / step) + _PAD_SAMPLES)

        def gauss(k: np.ndarray, sigma: float) -> np.ndarray:
            return np.exp((-2.0 * math.pi**2 * sigma * sigma) * (k * k))

        # Unsteered: separable.
        self.axial_n = padded(n, sig_z, lay.dz)
        self.lateral_n = padded(m, far_x, lay.dx)
        kz = scipy.fft.fftfreq(self.axial_n, d=lay.dz)
        kx = scipy.fft.fftfreq(self.lateral_n, d=lay.dx)
        self.h_axial = _unit_gain(_taper(kz, lay.dz) * gauss(kz, sig_z))
        h_focus = _unit_gain(_taper(kx, lay.dx) * gauss(kx, sig_x))
        h_far = _unit_gain(_taper(kx, lay.dx) * gauss(kx, far_x))
        self.h_lateral = self.focus_weight * h_focus[None, :] + (1.0 - self.focus_weight) * h_far[None, :]

        # Steered (compounding): 2-D, one filter pair per angle.
        angles = [a for a in device.compound_deg if a != 0.0]
        self.steered: list[tuple[np.ndarray, np.ndarray]] = []
        self.shape_2d = (0, 0)
        if angles:
            sin_b = max(abs(sm.sin(math.radians(a))) for a in angles)
            self.shape_2d = (
                padded(n, sig_z + far_x * sin_b, lay.dz),
                padded(m, far_x + sig_z * sin_b, lay.dx),
            )
            kz2 = scipy.fft.fftfreq(self.shape_2d[0], d=lay.dz)[:, None]
            kx2 = scipy.fft.fftfreq(self.shape_2d[1], d=lay.dx)[None, :]
            taper = _taper(kz2, lay.dz) * _taper(kx2, lay.dx)
            for angle in angles:
                sb, cb = sm.sincos(math.radians(angle))
                kz_r = kz2 * cb - kx2 * sb
                kx_r = kz2 * sb + kx2 * cb
                pair = tuple(
                    _unit_gain(taper * gauss(kz_r, sig_z) * gauss(kx_r, lateral))
                    for lateral in (sig_x, far_x)
                )
                self.steered.append(pair)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=16)
def _transfer(device: DeviceProfile, size: tuple[int, int] | None) -> _Transfer:
    return _Transfer(device, size)


def _magnitude(iq: np.ndarray) -> np.ndarray:
    # sqrt(re^2 + im^2) from correctly rounded operations (np.abs goes through hypot).
    return np.sqrt(iq.real * iq.real + iq.imag * iq.imag)


def simulate_iq_envelope(
    device: DeviceProfile,
    size: tuple[int, int] | None,
    amplitude: np.ndarray,
    rng: np.random.Generator,
    points: list[tuple[int, int, complex]] | None = None,
) -> np.ndarray:
    """Envelope (float64) on the beam grid of a scatterer field with standard deviation ``amplitude``.

    ``amplitude`` has the beam-grid shape of ``layout(device, size)``; ``points`` adds
    strong point reflectors ``(row, col, complex amplitude)`` (microcalcifications). No TGC,
    no log: with a constant ``amplitude`` the result is Rayleigh speckle (mean/std 1.91
    for a device without compounding). Computed in float64 / complex128 throughout.
    """
    plan = _transfer(device, size)
    amplitude = np.asarray(amplitude, dtype=np.float64)
    n, m = amplitude.shape
    noise = rng.standard_normal((2, n, m))
    scale = amplitude * (1.0 / math.sqrt(2.0))
    # The field at rows [0, n) of a zero-padded buffer: its first ``axial_n`` (or
    # ``shape_2d[0]``) rows are the axially padded field, without a copy.
    padded_rows = max(plan.axial_n, plan.shape_2d[0])
    buffer = np.zeros((padded_rows, m), dtype=np.complex128)
    field = buffer[:n]
    np.multiply(noise[0], scale, out=field.real)
    np.multiply(noise[1], scale, out=field.imag)
    for row, col, value in points or ():
        if 0 <= row < n and 0 <= col < m:
            field[row, col] += complex(value)
    envelope = None
    count = 0
    if plan.steered:
        nz, nx = plan.shape_2d
        spectrum = scipy.fft.fft(scipy.fft.fft(buffer[:nz], axis=0), n=nx, axis=1, overwrite_x=True)
        for h_focus, h_far in plan.steered:
            near = scipy.fft.ifft(spectrum * h_focus, axis=0, overwrite_x=True)[:n]
            far = scipy.fft.ifft(spectrum * h_far, axis=0, overwrite_x=True)[:n]
            near -= far  # near <- far + w (near - far): the depth blend
            near *= plan.focus_weight
            near += far
            env = _magnitude(scipy.fft.ifft(near, axis=1, overwrite_x=True)[:, :m])
            envelope = env if envelope is None else envelope + env
            count += 1
    if 0.0 in device.compound_deg:
        axial = scipy.fft.fft(buffer[: plan.axial_n], axis=0, overwrite_x=True)
        axial *= plan.h_axial[:, None]
        rows = scipy.fft.ifft(axial, axis=0, overwrite_x=True)[:n]
        lateral = scipy.fft.fft(rows, n=plan.lateral_n, axis=1, overwrite_x=True)
        lateral *= plan.h_lateral
        env = _magnitude(scipy.fft.ifft(lateral, axis=1, overwrite_x=True)[:, :m])
        envelope = env if envelope is None else envelope + env
        count += 1
    assert envelope is not None
    if count > 1:
        envelope /= count
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

    Everything is float64 (the grey level is quantised once, by the caller). ``points``
    are point reflectors ``(row, col, level dB)`` on the beam grid; their phase is drawn
    from ``rng``. The returned envelope (display grid, linear amplitude after TGC, before
    gain and log compression; 0 outside the field of view) is computed only when
    ``want_envelope``.
    """
    lay = layout(device, size)
    dz = lay.dz
    alpha = TISSUE_ATTENUATION_DB_MM_MHZ * device.frequency_mhz + alpha_db_mm
    # Round-trip attenuation accumulated down to the middle of each sample.
    path = 2.0 * (np.cumsum(alpha, axis=0) - 0.5 * alpha) * dz
    amplitude_db = echo_db - path
    # 10^(dB/10) as exp (faster than pow); continuous, so numpy's exp is fine here.
    amplitude = np.sqrt(np.exp(amplitude_db * (math.log(10.0) / 10.0)) + 10.0 ** (device.noise_db / 10.0))
    reflectors = []
    if points:
        phases = rng.uniform(0.0, 2 * math.pi, size=len(points))
        for (row, col, level), phase in zip(points, phases, strict=True):
            gain = 10.0 ** ((level - path[row, col]) / 20.0)
            reflectors.append((row, col, complex(gain * math.cos(phase), gain * math.sin(phase))))
    beam_env = simulate_iq_envelope(device, size, amplitude, rng, reflectors)
    gain_curve = tgc_db(device, lay.beam_d[:, 0])[:, None]
    log_env = 20.0 * np.log10(np.maximum(beam_env, 1e-12)) + gain_curve
    if device.smoothing_px > 0:
        log_env = gaussian_filter(log_env, device.smoothing_px, mode="nearest")
    level = 1.0 + (log_env + device.gain_db - HEADROOM_DB) / device.dynamic_range_db
    beam_grey = np.clip(level, 0.0, 1.0) ** device.gamma
    beam_env_tgc = beam_env * (10.0 ** (gain_curve / 20.0)) if want_envelope else None
    grey = _to_display(lay, beam_grey)
    envelope = _to_display(lay, beam_env_tgc) if beam_env_tgc is not None else None
    return Acquisition(grey, envelope, beam_env)


def _to_display(lay: Layout, beam: np.ndarray) -> np.ndarray:
    out = np.zeros(lay.shape, dtype=np.float64)
    if lay.device.geometry == "linear":
        out[lay.beam_rows, lay.beam_cols] = beam
        return out
    index, weight = lay.scan_plan  # bilinear scan conversion
    flat = beam.ravel()
    total = flat[index[0]] * weight[0]
    for k in (1, 2, 3):
        total += flat[index[k]] * weight[k]
    out[lay.inside] = total
    return out
