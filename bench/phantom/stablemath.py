"""Elementary functions that return the same bits on every machine.

numpy's ``sin``, ``cos``, ``arctan2``, ``exp`` ... dispatch at run time to SIMD kernels
(AVX2, AVX-512/SVML, NEON) or to the C library, and these differ from each other in the
last bit. That is harmless for a continuous quantity, but not where the result decides
something discrete: whether a pixel is inside the lesion (the ground-truth mask), which
tissue layer a sample belongs to, which pixel a calliper mark lands on.

The functions here use only IEEE-754 basic operations (``+ - * /``, ``sqrt``, ``rint``,
``ldexp``, comparisons), each of which is correctly rounded, so they give identical
results on every IEEE-754 platform and with every numpy build (numpy never fuses two
ufunc calls into one fused multiply-add). Accuracy is a few units in the last place,
plenty for geometry; speed is a few times below numpy's kernels, so they are used for
geometry and decisions, not for the bulk signal path.

Every function accepts a Python float or an array (float64) and returns a float or a
float64 array accordingly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["atan2", "cos", "exp", "hypot", "sin", "sincos"]

# pi/2 in three parts (fdlibm): k * _PIO2_1 and k * _PIO2_2 are exact for |k| < 2**20.
_PIO2_1 = 1.57079632673412561417e00
_PIO2_2 = 6.07710050630396597660e-11
_PIO2_3 = 2.02226624871116645580e-21
_TWO_OVER_PI = 6.36619772367581382433e-01
_PI = 3.14159265358979311600e00
_PI_2 = 1.57079632679489655800e00
# ln 2 in two parts (fdlibm): k * _LN2_HI is exact for |k| < 2**11.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00

# Taylor coefficients (each a correctly rounded quotient, hence the same everywhere).
_SIN = tuple((-1) ** j / math.factorial(2 * j + 1) for j in range(1, 10))  # r^3 ... r^19
_COS = tuple((-1) ** j / math.factorial(2 * j) for j in range(1, 11))  # r^2 ... r^20
_ATAN = tuple((-1) ** j / (2 * j + 1) for j in range(1, 13))  # t^3 ... t^25
_EXP = tuple(1.0 / math.factorial(j) for j in range(2, 15))  # r^2 ... r^14


def _wrap(x: Any) -> tuple[np.ndarray, bool]:
    scalar = np.ndim(x) == 0
    return np.asarray(x, dtype=np.float64), scalar


def _unwrap(value: np.ndarray, scalar: bool) -> Any:
    return float(value) if scalar else value


def _horner(coefficients: tuple[float, ...], x2: np.ndarray) -> np.ndarray:
    """``c0 x2 + c1 x2^2 + ...`` evaluated from the highest power (Horner)."""
    acc = np.full_like(x2, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        acc = acc * x2 + c
    return acc * x2


def _sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if np.any(np.abs(x) > 1e5):
        raise ValueError("stablemath.sin/cos: argument too large (|x| > 1e5)")
    k = np.rint(x * _TWO_OVER_PI)
    r = ((x - k * _PIO2_1) - k * _PIO2_2) - k * _PIO2_3  # |r| <= pi/4 (+ a hair)
    r2 = r * r
    s = r + r * _horner(_SIN, r2)
    c = 1.0 + _horner(_COS, r2)
    q = np.mod(k, 4.0)  # exact: k is an integer-valued float; quadrant 0..3
    odd = (q == 1.0) | (q == 3.0)
    sin = np.where(odd, c, s)
    cos = np.where(odd, s, c)
    np.negative(sin, out=sin, where=q >= 2.0)  # sin: +s, +c, -s, -c
    np.negative(cos, out=cos, where=(q == 1.0) | (q == 2.0))  # cos: +c, -s, -c, +s
    return sin, cos


def sincos(x: Any) -> tuple[Any, Any]:
    """``(sin x, cos x)`` for |x| <= 1e5 (radians)."""
    arr, scalar = _wrap(x)
    s, c = _sincos(arr)
    return _unwrap(s, scalar), _unwrap(c, scalar)


def sin(x: Any) -> Any:
    """``sin x`` for |x| <= 1e5 (radians)."""
    return sincos(x)[0]


def cos(x: Any) -> Any:
    """``cos x`` for |x| <= 1e5 (radians)."""
    return sincos(x)[1]


def _atan_unit(t: np.ndarray) -> np.ndarray:
    """``atan t`` for 0 <= t <= 1: two argument halvings to t <= tan(pi/16), then Taylor."""
    for _ in range(2):  # atan t = 2 atan(t / (1 + sqrt(1 + t^2)))
        t = t / (1.0 + np.sqrt(1.0 + t * t))
    return 4.0 * (t + t * _horner(_ATAN, t * t))


def atan2(y: Any, x: Any) -> Any:
    """The angle of the point ``(x, y)`` in [-pi, pi] (``atan2(0, 0) = 0``; zeros are unsigned)."""
    ya, y_scalar = _wrap(y)
    xa, x_scalar = _wrap(x)
    ya, xa = np.broadcast_arrays(ya, xa)
    ax, ay = np.abs(xa), np.abs(ya)
    big = np.maximum(ax, ay)
    small = np.minimum(ax, ay)
    ratio = np.divide(small, big, out=np.zeros_like(big), where=big > 0)
    angle = _atan_unit(ratio)
    angle = np.where(ay > ax, _PI_2 - angle, angle)
    angle = np.where(xa < 0, _PI - angle, angle)
    angle = np.where(ya < 0, -angle, angle)
    return _unwrap(angle, y_scalar and x_scalar)


def hypot(x: Any, y: Any) -> Any:
    """``sqrt(x^2 + y^2)`` (no overflow protection: for lengths in millimetres)."""
    xa, x_scalar = _wrap(x)
    ya, y_scalar = _wrap(y)
    return _unwrap(np.sqrt(xa * xa + ya * ya), x_scalar and y_scalar)


def exp(x: Any) -> Any:
    """``e^x`` for |x| <= 700."""
    arr, scalar = _wrap(x)
    if np.any(np.abs(arr) > 700):
        raise ValueError("stablemath.exp: argument out of range (|x| > 700)")
    k = np.rint(arr * _INV_LN2)
    r = (arr - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln(2) / 2 (+ a hair)
    p = 1.0 + r + r * _horner(_EXP, r)
    return _unwrap(np.ldexp(p, k.astype(np.int64)), scalar)
