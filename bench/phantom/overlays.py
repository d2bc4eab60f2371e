"""Screen furniture burnt into the image: labels, depth ruler, focus marker, grey bar, callipers.

Drawn with PIL's built-in bitmap font (no font files, identical on every machine).
Overlays change image pixels only; the lesion mask is tissue ground truth and never
changes.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bench.phantom.devices import Layout

__all__ = ["Callipers", "draw_overlays"]

#: Calliper marks: a list of display (column, row) points and the measured length in mm.
Callipers = tuple[tuple[tuple[float, float], ...], float]


@functools.cache
def _font() -> ImageFont.ImageFont:
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1: the bitmap font
    return loader() if loader is not None else ImageFont.load_default()  # type: ignore[return-value]


def _tinted(value: int, tint: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(int(min(255, round(value * c))) for c in tint)  # type: ignore[return-value]


def draw_overlays(
    rgb: np.ndarray,
    lay: Layout,
    *,
    case_id: str,
    callipers: Callipers | None,
) -> np.ndarray:
    """Return ``rgb`` with the device's screen overlays drawn on it."""
    device = lay.device
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    font = _font()
    text = _tinted(device.text_grey, device.tint)
    left, top, right, bottom = lay.box
    width, height = lay.width, lay.height

    # Header: model / preset on the left, acquisition settings and case id below or right.
    draw.text((3, 2), f"{device.model_label}  {device.preset_label}", fill=text, font=font)
    settings = f"{device.frequency_mhz:.1f}MHz  DR{device.dynamic_range_db:.0f}  G{device.gain_db:+.0f}"
    if height >= 160 and top >= 24:
        draw.text((3, 13), settings, fill=text, font=font)
    ident = f"ID {case_id}"
    ident_w = int(draw.textlength(ident, font=font))
    if width - ident_w - 3 > int(draw.textlength(device.model_label, font=font)) + 60:
        draw.text((width - ident_w - 3, 2), ident, fill=text, font=font)

    # Depth ruler in the right margin: minor ticks every 5 mm, labelled every 10 mm (cm).
    ruler_x = min(width - 2, right + 3)
    step = 5.0
    depth = 0.0
    while depth <= device.depth_mm + 1e-6:
        row = lay.depth_to_row(depth)
        if 0 <= row < height:
            major = abs(depth / 10 - round(depth / 10)) < 1e-6
            length = 5 if major else 2
            draw.line([(ruler_x, row), (min(width - 1, ruler_x + length), row)], fill=text)
            if major and depth > 0 and ruler_x + 7 < width - 5:
                draw.text((ruler_x + 7, row - 5), f"{depth / 10:.0f}", fill=text, font=font)
        depth += step
    # Focus marker: a small triangle pointing at the focal depth.
    focus_row = lay.depth_to_row(device.focus_mm)
    fx = max(right + 1, ruler_x - 3)
    if fx + 3 < width:
        draw.polygon([(fx, focus_row), (fx + 3, focus_row - 3), (fx + 3, focus_row + 3)], fill=text)
    # Probe orientation mark in the top-left corner of the field of view.
    draw.rectangle([left + 3, top + 3, left + 6, top + 6], fill=text)

    if device.colorbar and left >= 10:
        bar_top, bar_bottom = top + 4, min(bottom - 4, top + (bottom - top) // 2)
        for row in range(bar_top, bar_bottom):
            level = (bar_bottom - row) / max(1, bar_bottom - bar_top)
            draw.line([(2, row), (6, row)], fill=_tinted(round(255 * level**device.gamma), device.tint))

    if callipers is not None:
        points, length_mm = callipers
        mark = (255, 230, 60)
        for col, row in points:
            c, r = round(col), round(row)
            draw.line([(c - 3, r), (c + 3, r)], fill=mark)
            draw.line([(c, r - 3), (c, r + 3)], fill=mark)
        if bottom - 11 > top:
            draw.text((left + 4, bottom - 11), f"D1 {length_mm / 10:.2f}cm", fill=mark, font=font)
    return np.asarray(image, dtype=np.uint8).copy()
