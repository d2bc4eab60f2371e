"""Decoding image and mask files, reading image headers, and content keys.

Every file the harness reads goes through here, so that a corrupt or odd file fails with
a :class:`~bench.errors.DatasetError` that names it instead of a bare PIL traceback.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench.errors import DatasetError
from bench.types import Sample

__all__ = ["clear_caches", "file_key", "image_size", "load_mask", "load_mask_file", "load_rgb"]

# PIL raises a zoo of exception types for bad files (truncated streams raise OSError,
# broken chunks SyntaxError, odd headers ValueError): treat them all as "unreadable".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)

_lock = threading.Lock()
# Both caches are keyed on (path, mtime, size) so that a file rewritten during the process
# (a test fixture, a re-download) is not served stale; a stat is far cheaper than a read.
_size_cache: dict[tuple[str, int, int], tuple[int, int]] = {}
_key_cache: dict[tuple[str, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found; check the dataset folder or re-download it") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


def _unreadable(path: Path, exc: BaseException) -> DatasetError:
    return DatasetError(
        f"{path}: not a readable image ({type(exc).__name__}: {exc}). The file is corrupt or truncated: "
        "re-download the dataset, or remove this image (and its manifest row / INFO.csv row)"
    )


def _open_decoded(path: Path) -> Image.Image:
    _stat_key(path)  # turns a missing file into a clear message before PIL sees it
    try:
        with Image.open(path) as im:
            im.load()
            # load() keeps the file handle on some plugins; copy detaches it so the
            # `with` really closes the file (many thousands of images per run).
            return im.copy()
    except _DECODE_ERRORS as exc:
        raise _unreadable(path, exc) from None


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header only (no pixel decoding; cached)."""
    path = Path(path)
    key = _stat_key(path)
    with _lock:
        cached = _size_cache.get(key)
    if cached is not None:
        return cached
    try:
        with Image.open(path) as im:
            size = (int(im.width), int(im.height))
    except _DECODE_ERRORS as exc:
        raise _unreadable(path, exc) from None
    with _lock:
        _size_cache[key] = size
    return size


def file_key(path: Path) -> str:
    """Content key of a file: first 32 hex digits of the SHA-256 of its bytes (cached per path).

    Keyed on content rather than path so that the feature cache survives moving or
    renaming a dataset and is shared by duplicate files.
    """
    path = Path(path)
    key = _stat_key(path)
    with _lock:
        cached = _key_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    value = digest.hexdigest()[:32]
    with _lock:
        _key_cache[key] = value
    return value


def clear_caches() -> None:
    """Forget cached image sizes and file keys (tests; long-lived processes after re-downloads)."""
    with _lock:
        _size_cache.clear()
        _key_cache.clear()


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image as a ``uint8`` array of shape (H, W, 3).

    Grayscale, palette, 16-bit and CMYK images are converted to RGB. Images with an alpha
    channel are composited over black: BrEaST stores the scan sector as alpha with an
    anti-aliased edge, and black is what lies outside the sector in every other set.
    EXIF orientation is deliberately ignored: masks are drawn on the stored pixels.
    Raises :class:`DatasetError` naming the file when it is missing, corrupt or truncated.
    """
    path = Path(path)
    im = _open_decoded(path)
    try:
        if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            # PIL's convert clips 16-bit values at 255; scale the full range instead.
            arr16 = np.asarray(im, dtype=np.uint16)
            grey = (arr16 >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            im.mode == "P" and "transparency" in im.info
        )
        if has_alpha:
            rgba = im.convert("RGBA")
            if rgba.getextrema()[3][0] < 255:
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                rgba = Image.alpha_composite(black, rgba)
            return np.ascontiguousarray(np.asarray(rgba.convert("RGB"), dtype=np.uint8))
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
    except _DECODE_ERRORS as exc:
        raise _unreadable(path, exc) from None


def _channel_max(arr: np.ndarray) -> np.ndarray:
    # Pairwise maximum of the colour planes: ``arr.max(axis=2)`` is several times slower
    # on interleaved uint8 data, and masks are decoded for every evaluation.
    return np.maximum(np.maximum(arr[..., 0], arr[..., 1]), arr[..., 2])


def _distinct_levels(grey: np.ndarray) -> np.ndarray:
    if grey.dtype == np.uint8:
        return np.flatnonzero(np.bincount(grey.ravel(), minlength=256))
    return np.unique(grey)


def _grey_levels(im: Image.Image) -> np.ndarray:
    """The single 2-D channel a mask is judged on (see :func:`load_mask_file`)."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(im)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        arr = np.asarray(im.convert("RGBA"))
        colour = _channel_max(arr)
        alpha = arr[..., 3]
        if alpha.min() == alpha.max():
            return colour  # opaque everywhere: alpha says nothing
        if colour.min() == colour.max():
            return alpha  # alpha-only mask: lesion drawn as opacity on a flat colour
        # Both vary (BrEaST *_tumor.png: white+opaque lesion on black+transparent):
        # transparent pixels are background whatever colour they store.
        return np.where(alpha > 0, colour, 0).astype(colour.dtype)
    return _channel_max(np.asarray(im.convert("RGB")))


def load_mask_file(path: Path) -> np.ndarray:
    """Decode one mask file as a ``bool`` array (H, W): any non-black pixel is lesion.

    Colour masks (BUS-UCLM: green benign, red malignant) are reduced by the maximum over
    the channels. RGBA masks use the colour channels where opaque, or the alpha channel
    when the colour is flat. A mask with more than two grey levels (JPEG artefacts, a
    grey-level image saved as a mask) is ambiguous and raises :class:`DatasetError`.
    """
    path = Path(path)
    im = _open_decoded(path)
    try:
        grey = _grey_levels(im)
    except _DECODE_ERRORS as exc:
        raise _unreadable(path, exc) from None
    levels = _distinct_levels(grey)
    if levels.size > 2:
        shown = ", ".join(str(v) for v in levels[:6].tolist()) + (", ..." if levels.size > 6 else "")
        raise DatasetError(
            f"{path}: mask is not binary ({levels.size} distinct grey levels: {shown}). Expected black "
            "background and a single lesion value; a JPEG-compressed or grey-level image cannot be used as "
            "a mask. Re-export it as a lossless PNG with values 0/255, or remove it from the dataset"
        )
    return grey > 0


def load_mask(sample: Sample) -> np.ndarray | None:
    """The lesion mask of ``sample`` at its stored size, ``bool`` (H, W), or ``None`` without mask files.

    Several mask files (BUSI's ``_mask_1``, ``_mask_2``) are merged by union; they must
    all have the same size.
    """
    if not sample.mask_paths:
        return None
    merged: np.ndarray | None = None
    first = sample.mask_paths[0]
    for path in sample.mask_paths:
        mask = load_mask_file(path)
        if merged is None:
            merged = mask
        elif mask.shape != merged.shape:
            raise DatasetError(
                f"{sample.dataset}/{sample.id}: mask files disagree in size ({first}: "
                f"{merged.shape[1]}x{merged.shape[0]}, {path}: {mask.shape[1]}x{mask.shape[0]}); "
                "fix or remove the extra mask file"
            )
        else:
            merged |= mask
    return merged
