"""Phantom datasets on disk: BUSI-layout export and the ``phantom`` dataset provider.

``phantom_dataset("phantom:device-b?n=20&seed=3", data_root)`` generates the images once
into a cache folder (BUSI layout, written to a temporary folder and renamed into place,
so concurrent runs and interrupted runs never see half a dataset), then reads it with
the ordinary BUSI reader: masks, support sampling and content keys follow the same path
as for real data.

Spec syntax: ``phantom`` (device-a) or ``phantom:<device>``, optionally followed by
``?key=value&key=value`` with keys ``n`` (images per class), ``normal``, ``benign``,
``malignant`` (per-class counts, override ``n``), ``seed`` (anatomy seed) and ``size``
(``256`` for square or ``400x300`` = width x height; default: the device's own size).

Without ``seed``, each device gets its own cohort of breasts (seed = device number - 1:
device-a 0, device-b 1, ...), so a source and a target phantom never share patients.
Give the same ``seed`` to two devices to image the very same breasts on both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.data import Dataset, read_busi
from bench.errors import DatasetError
from bench.phantom.devices import DEVICES, DeviceProfile, get_device
from bench.phantom.generator import GENERATOR_VERSION, PhantomSpec, generate_image
from bench.types import CLASSES, Label

__all__ = [
    "CACHE_ENV",
    "DEFAULT_DEVICE",
    "ExportExistsError",
    "dataset_name",
    "default_seed",
    "export_busi_layout",
    "parse_phantom_spec",
    "phantom_cache_dir",
    "phantom_dataset",
]

#: Environment variable overriding the phantom cache folder.
CACHE_ENV = "BENCH_PHANTOM_DIR"
#: Device of a bare ``phantom`` spec.
DEFAULT_DEVICE = "device-a"
#: Name of the description file written at the root of every exported dataset.
INFO_FILE = "phantom.json"

_DEFAULT = PhantomSpec()
_KEYS = ("n", "normal", "benign", "malignant", "seed", "size")


def phantom_cache_dir() -> Path:
    """``$BENCH_PHANTOM_DIR``, else ``$BENCH_CACHE_DIR/phantom``, else ``~/.cache/ultraad-bench/phantom``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    bench_cache = os.environ.get("BENCH_CACHE_DIR", "").strip()
    if bench_cache:
        return Path(bench_cache).expanduser() / "phantom"
    return Path.home() / ".cache" / "ultraad-bench" / "phantom"


class ExportExistsError(DatasetError, FileExistsError):
    """The export folder already holds files (a :class:`DatasetError`, so the CLI prints it cleanly)."""


def _resolve_device(device: str | DeviceProfile) -> DeviceProfile:
    try:
        return get_device(device)
    except KeyError:
        raise DatasetError(f"unknown phantom device {device!r}; use one of {', '.join(DEVICES)}") from None


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match:
        raise ValueError
    width = int(match.group(1))
    return (width, int(match.group(2)) if match.group(2) else width)


def parse_phantom_spec(spec: str) -> tuple[DeviceProfile, PhantomSpec]:
    """``"phantom:device-b?n=20&seed=3&size=256"`` -> (device profile, :class:`PhantomSpec`)."""
    text = spec.strip()
    head, _, query = text.partition("?")
    prefix, _, device_name = head.partition(":")
    if prefix.strip().lower() != "phantom":
        raise DatasetError(f"{spec!r} is not a phantom spec (expected phantom or phantom:<device>)")
    device_name = device_name.strip() or DEFAULT_DEVICE
    try:
        device = get_device(device_name)
    except KeyError:
        raise DatasetError(
            f"{spec!r}: unknown phantom device {device_name!r}; use one of {', '.join(DEVICES)}"
        ) from None
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in query.split("&"))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in _KEYS:
            raise DatasetError(
                f"{spec!r}: bad phantom option {part!r}; options are key=value with keys {', '.join(_KEYS)} "
                "(e.g. phantom:device-b?n=20&seed=3&size=256)"
            )
        options[key] = value.strip()
    values: dict[str, Any] = {}
    try:
        if "n" in options:
            n = int(options["n"])
            values.update(normal=n, benign=n, malignant=n)
        for label in CLASSES:
            if label.value in options:
                values[label.value] = int(options[label.value])
        values["seed"] = int(options["seed"]) if "seed" in options else default_seed(device)
    except ValueError:
        raise DatasetError(f"{spec!r}: phantom counts and seed must be integers") from None
    if "size" in options:
        try:
            values["size"] = _parse_size(options["size"])
        except ValueError:
            raise DatasetError(f"{spec!r}: size must look like 256 or 400x300 (width x height)") from None
    try:
        return device, replace(_DEFAULT, **values)
    except ValueError as exc:
        raise DatasetError(f"{spec!r}: {exc}") from None


def default_seed(device: DeviceProfile) -> int:
    """Anatomy seed of ``phantom:<device>`` without a ``seed`` option: one cohort per device."""
    return device.number - 1


def dataset_name(device: DeviceProfile, spec: PhantomSpec) -> str:
    """E.g. ``phantom-device-b``, with non-default options appended (``phantom-device-b-n20-seed3``)."""
    parts = [f"phantom-{device.name}"]
    counts = spec.counts()
    if counts != _DEFAULT.counts():
        if len(set(counts.values())) == 1:
            parts.append(f"n{spec.normal}")
        else:
            parts.extend(f"{label.value}{count}" for label, count in counts.items())
    if spec.seed != default_seed(device):
        parts.append(f"seed{spec.seed}")
    if spec.size is not None:
        width, height = spec.size
        parts.append(f"size{width}" if width == height else f"size{width}x{height}")
    return "-".join(parts)


def _cache_key(device: DeviceProfile, spec: PhantomSpec) -> str:
    payload = {"generator": GENERATOR_VERSION, "device": device.summary(), "spec": spec.to_dict()}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _as_spec(n_per_class: int | Mapping[str, int] | PhantomSpec, seed: int, size: Any) -> PhantomSpec:
    if isinstance(n_per_class, PhantomSpec):
        return n_per_class
    if isinstance(n_per_class, Mapping):
        counts = {Label(k).value: int(v) for k, v in n_per_class.items()}
        return PhantomSpec(
            **{label.value: counts.get(label.value, 0) for label in CLASSES}, seed=seed, size=size
        )
    return PhantomSpec.per_class(int(n_per_class), seed=seed, size=size)


def _write_layout(root: Path, device: DeviceProfile, spec: PhantomSpec) -> None:
    records = []
    numbers = dict.fromkeys(CLASSES, 0)
    for label in CLASSES:
        (root / label.value).mkdir(parents=True, exist_ok=True)
    for index in range(spec.total):
        image = generate_image(spec, index, device)
        numbers[image.label] += 1
        stem = f"{image.label.value} ({numbers[image.label]})"
        folder = root / image.label.value
        # Speckle barely compresses: zlib level 1 is 4x faster than the default for ~10% more bytes.
        Image.fromarray(image.rgb, mode="RGB").save(folder / f"{stem}.png", compress_level=1)
        mask = np.where(image.mask, 255, 0).astype(np.uint8)
        Image.fromarray(mask, mode="L").save(folder / f"{stem}_mask.png")
        records.append({"id": f"{image.label.value}/{stem}", **image.anatomy})
    info = {
        "generator": "bench.phantom",
        "generator_version": GENERATOR_VERSION,
        "device": device.summary(),
        "spec": spec.to_dict(),
        "images": records,
    }
    (root / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def export_busi_layout(
    out_dir: Path | str,
    device: str | DeviceProfile = DEFAULT_DEVICE,
    n_per_class: int | Mapping[str, int] | PhantomSpec = 40,
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
) -> Path:
    """Write a phantom dataset in the BUSI layout under ``out_dir`` and return ``out_dir``.

    Layout: ``<out_dir>/{benign,malignant,normal}/<class> (<n>).png`` with the binary mask
    ``<class> (<n>)_mask.png`` (8-bit, 0/255; all zero for normal images, as in BUSI) and
    ``phantom.json`` (generator version, device settings and per-image anatomy). Counts are
    an int per class, a mapping ``{"normal": 10, ...}`` or a :class:`PhantomSpec` (which then
    also gives seed and size). The folder is written under a temporary name beside
    ``out_dir`` and renamed into place; ``out_dir`` must not exist or be empty
    (:class:`ExportExistsError`, both a ``DatasetError`` and a ``FileExistsError``).
    An unknown device or a bad count raises :class:`~bench.errors.DatasetError`.
    """
    out_dir = Path(out_dir).expanduser()
    device = _resolve_device(device)
    try:
        spec = _as_spec(n_per_class, seed, size)
    except ValueError as exc:
        raise DatasetError(f"phantom export: {exc}") from None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportExistsError(f"{out_dir} exists and is not an empty folder; choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_layout(tmp, device, spec)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory portably
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _ensure_cached(device: DeviceProfile, spec: PhantomSpec) -> Path:
    cache = phantom_cache_dir()
    final = cache / f"{device.name}_{_cache_key(device, spec)}"
    if (final / INFO_FILE).is_file():
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    except OSError as exc:
        raise DatasetError(
            f"cannot create the phantom cache folder {cache} ({exc}); set {CACHE_ENV} to a writable folder"
        ) from None
    try:
        _write_layout(tmp, device, spec)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same dataset first: use theirs.
            if not (final / INFO_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def phantom_dataset(spec: str, data_root: Path | None = None) -> Dataset:
    """The dataset provider registered as ``phantom``: generate once (cached), read as BUSI.

    ``data_root`` is ignored: the images live in :func:`phantom_cache_dir`. Sample metadata
    holds the device, a per-case patient id and the lesion's BI-RADS-like descriptors.
    """
    device, phantom = parse_phantom_spec(spec)
    root = _ensure_cached(device, phantom)
    name = dataset_name(device, phantom)
    base = read_busi(root, name=name)
    try:
        info = json.loads((root / INFO_FILE).read_text(encoding="utf-8"))
        by_id = {record["id"]: record for record in info.get("images", [])}
    except (OSError, ValueError) as exc:
        raise DatasetError(
            f"{root / INFO_FILE}: unreadable ({exc}); delete {root} to regenerate it"
        ) from None
    samples = []
    for sample in base.samples:
        record = by_id.get(sample.id, {})
        metadata = {"device": device.name, "scanner": device.description, "patient": f"phantom-{sample.id}"}
        descriptors = record.get("descriptors") or {}
        for key in ("shape", "orientation", "margin", "echo_pattern", "posterior_features"):
            if key in descriptors:
                metadata[key] = str(descriptors[key])
        samples.append(replace(sample, metadata=metadata))
    return Dataset(name=name, root=root, samples=samples, problems=list(base.problems))
