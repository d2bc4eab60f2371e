"""On-disk cache of frozen-backbone features, shared by every method, shot, seed and run.

A frozen CLIP gives the same outputs for the same image every time, so each image is
encoded once per *feature configuration* — (model, weights identity, input size,
preprocessing id, layers, ...) — and read back from disk afterwards. Layout::

    <cache_dir>/<model>_<size>px_<hash12>/config.json     what the folder holds (readable)
    <cache_dir>/<model>_<size>px_<hash12>/ab/<key>.feat    one fp16 vector per image key

``<hash12>`` is the SHA-256 of the canonical JSON of the configuration, so a different
input size, layer set, weights file or preprocessing lands in a different folder and
never mixes with old entries. The image key is the content hash the data layer gives
(:attr:`bench.types.ImageItem.key`); ``ab`` is its first two characters (keeps folders
small on big datasets).

Entry format (version :data:`CACHE_FORMAT_VERSION`; all integers little-endian)::

    magic b"UADFEAT\\n" | format version u32 | header size u32 | dtype b"<f2" (8 bytes)
    | number of values u64 | key length u32 | key (UTF-8) | zero padding | SHA-256 (32 bytes)
    | payload: the fp16 values

The header is padded to a multiple of 64 bytes; the SHA-256 covers everything before it
(header fields, key, padding) and the payload. A read is one ``read`` of the file plus
one hash, and checks every field: an entry that is truncated, has extra bytes, a damaged
header or payload, another format version, dtype or length, or that belongs to another key
(e.g. a file copied under the wrong name) is *corrupt*: it is treated as a miss, recomputed
and overwritten, counted in :attr:`CacheStats.corrupt`, logged (INFO, one line per entry)
and reported with one WARNING line per cache folder. Version 1 folders (``.npy`` entries
without checksums) are never read: the format version is part of every folder's hash, so
they are simply unused and can be deleted.

Writes are atomic (:func:`bench.fileio.atomic_write_bytes`: temporary file in the same
folder, then :func:`os.replace`), so concurrent shards on a shared filesystem and
interrupted runs never leave a half-written entry under the final name; files get the
user's umask (not ``mkstemp``'s 0600), so a group can share a cache. Entries are not
fsynced: one lost in a crash fails its checksum and is recomputed. A folder that cannot be
written (read-only, disk full) gives one WARNING naming the folder and the fix; the run then
continues uncached (features are computed in memory and returned).

fp16 storage halves the disk footprint. Raw residual-stream tokens of real CLIP models
reach a few hundred in magnitude (fp16 max is 65504), so nothing plausible overflows;
:func:`to_fp16` refuses (raises) rather than silently storing ``inf``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BackboneError
from bench.fileio import atomic_write_bytes
from bench.types import ImageItem

log = logging.getLogger(__name__)

#: Bumped when the on-disk layout changes (part of every folder's hash, so older folders are unused).
CACHE_FORMAT_VERSION = 2
#: Largest finite float16 value.
FP16_MAX = float(np.finfo(np.float16).max)
CONFIG_FILE = "config.json"
#: File name suffix of one cached entry.
ENTRY_SUFFIX = ".feat"
#: First bytes of every entry file.
ENTRY_MAGIC = b"UADFEAT\n"

_DTYPE = np.dtype("<f2")
_DTYPE_TAG = _DTYPE.str.encode("ascii")
# magic, format version, header size, dtype, number of values, key length
_HEADER = struct.Struct("<8sII8sQI")
_DIGEST_SIZE = hashlib.sha256().digest_size
_HEADER_ALIGN = 64

_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
#: errno values of a full disk and of a folder one may not write to (each gets its own fix).
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


def default_cache_dir() -> Path:
    """``$BENCH_CACHE_DIR`` if set, else ``~/.cache/ultraad-bench/features``."""
    env = os.environ.get("BENCH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ultraad-bench" / "features"


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``config``."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class FeatureOverflowError(ValueError):
    """Features hold values that fp16 cannot store (inf/nan or beyond +-65504)."""


def to_fp16(values: np.ndarray) -> np.ndarray:
    """Cast to float16, refusing non-finite input and values that would overflow."""
    values = np.asarray(values)
    if not np.isfinite(values).all():
        raise FeatureOverflowError("features contain NaN or inf")
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak > FP16_MAX:
        raise FeatureOverflowError(
            f"feature magnitude {peak:.4g} exceeds the fp16 range (max {FP16_MAX:.0f})"
        )
    return values.astype(np.float16)


# ---------------------------------------------------------------------------------------
# entry format
# ---------------------------------------------------------------------------------------
def _header_size(key_bytes: int) -> int:
    unpadded = _HEADER.size + key_bytes + _DIGEST_SIZE
    return -(-unpadded // _HEADER_ALIGN) * _HEADER_ALIGN


def encode_entry(key: str, values: np.ndarray) -> bytearray:
    """The bytes of one cache entry: header (with ``key``), SHA-256, then ``values`` (fp16, 1-D)."""
    payload = np.ascontiguousarray(values, dtype=_DTYPE).reshape(-1)
    key_bytes = key.encode("utf-8")
    size = _header_size(len(key_bytes))
    entry = bytearray(size + payload.nbytes)
    _HEADER.pack_into(
        entry, 0, ENTRY_MAGIC, CACHE_FORMAT_VERSION, size, _DTYPE_TAG, payload.size, len(key_bytes)
    )
    entry[_HEADER.size : _HEADER.size + len(key_bytes)] = key_bytes
    view = memoryview(entry)
    view[size:] = payload.view(np.uint8)
    digest = hashlib.sha256(view[: size - _DIGEST_SIZE])
    digest.update(view[size:])
    view[size - _DIGEST_SIZE : size] = digest.digest()
    return entry


class CorruptEntryError(ValueError):
    """A cache entry's bytes are not a valid entry for the expected key and length."""


def decode_entry(data: bytes | bytearray, key: str, length: int) -> np.ndarray:
    """The fp16 values of an entry (a read-only view of ``data``), after checking every field.

    Raises :class:`CorruptEntryError` saying what is wrong.
    """
    if len(data) < _HEADER.size:
        raise CorruptEntryError(f"truncated header ({len(data)} bytes)")
    magic, version, size, dtype, count, key_length = _HEADER.unpack_from(data)
    if magic != ENTRY_MAGIC:
        raise CorruptEntryError("not a feature-cache entry (bad magic bytes)")
    if version != CACHE_FORMAT_VERSION:
        raise CorruptEntryError(f"format version {version}, expected {CACHE_FORMAT_VERSION}")
    if size != _header_size(key_length):
        raise CorruptEntryError(f"damaged header (header size {size} for a {key_length}-byte key)")
    if dtype != _DTYPE_TAG.ljust(8, b"\0"):
        raise CorruptEntryError(f"dtype {dtype.rstrip(bytes(1))!r}, expected {_DTYPE_TAG!r}")
    if count != length:
        raise CorruptEntryError(f"holds {count} values, expected {length}")
    expected_bytes = size + count * _DTYPE.itemsize
    if len(data) != expected_bytes:
        what = "truncated" if len(data) < expected_bytes else "trailing bytes"
        raise CorruptEntryError(f"{what}: {len(data)} bytes, expected {expected_bytes}")
    view = memoryview(data)
    digest = hashlib.sha256(view[: size - _DIGEST_SIZE])
    digest.update(view[size:])
    if digest.digest() != data[size - _DIGEST_SIZE : size]:
        raise CorruptEntryError("checksum mismatch (damaged bytes)")
    stored_key = data[_HEADER.size : _HEADER.size + key_length].decode("utf-8", errors="replace")
    if stored_key != key:
        raise CorruptEntryError(f"holds the entry of another key ({stored_key!r})")
    values = np.frombuffer(data, dtype=_DTYPE, count=count, offset=size)
    values.flags.writeable = False
    return values


# ---------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------
@dataclass
class CacheStats:
    """Counters since the cache object was created.

    ``hits``: lookups served from disk; ``misses``: lookups that found nothing usable
    (including corrupt entries); ``corrupt``: entries found unreadable or malformed;
    ``writes``: entries written.
    """

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    writes: int = 0
    corrupt_keys: list[str] = field(default_factory=list)


class FeatureCache:
    """One configuration's folder of per-image fp16 feature vectors of a fixed length.

    ``config`` describes what the vectors are (written to ``config.json`` and hashed into
    the folder name); ``length`` is the number of values per image.
    """

    def __init__(self, root: Path | str | None, config: Mapping[str, Any], length: int) -> None:
        if length < 1:
            raise ValueError(f"feature length must be positive, got {length}")
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.config = {"cache_format": CACHE_FORMAT_VERSION, **dict(config), "length": int(length)}
        self.length = int(length)
        self.hash = config_hash(self.config)
        prefix = _SAFE_NAME.sub("-", str(self.config.get("model", "features")))[:48]
        size = self.config.get("input_size")
        label = f"{prefix}_{size}px" if size is not None else prefix
        self.folder = self.root / f"{label}_{self.hash[:12]}"
        self._stats = CacheStats()
        self._config_written = False
        #: False once a write failed: the rest of the run computes without caching.
        self.writable = True
        self._corrupt_reported = 0
        self._first_corrupt = ""
        self._deferring_reports = False

    # -- paths --------------------------------------------------------------------------
    @staticmethod
    def file_stem(key: str) -> str:
        """The file name (without suffix) for an image key; unsafe keys are hashed."""
        if _SAFE_KEY.fullmatch(key):
            return key
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def path_for(self, key: str) -> Path:
        """Where the entry of ``key`` lives (whether or not it exists)."""
        stem = self.file_stem(key)
        return self.folder / stem[:2] / f"{stem}{ENTRY_SUFFIX}"

    # -- reads --------------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        """The cached vector (read-only, float16, shape ``(length,)``) or None (missing or corrupt)."""
        path = self.path_for(key)
        try:
            with open(path, "rb", buffering=0) as handle:
                data = handle.read()
        except FileNotFoundError:
            self._stats.misses += 1
            return None
        except OSError as exc:
            return self._corrupt(key, path, f"unreadable ({exc.strerror or exc})")
        try:
            values = decode_entry(data, key, self.length)
        except CorruptEntryError as exc:
            return self._corrupt(key, path, str(exc))
        self._stats.hits += 1
        return values

    def __contains__(self, key: str) -> bool:
        """Whether an entry file exists for ``key`` (not verified; :meth:`get` verifies)."""
        return self.path_for(key).is_file()

    def _corrupt(self, key: str, path: Path, why: str) -> None:
        self._stats.misses += 1
        self._stats.corrupt += 1
        self._stats.corrupt_keys.append(key)
        self._first_corrupt = self._first_corrupt or f"{path.relative_to(self.folder)}: {why}"
        log.info("feature cache entry %s is corrupt (%s); recomputing it", path, why)
        if not self._deferring_reports:
            self._report_corrupt()
        return None

    def _report_corrupt(self) -> None:
        """One WARNING per folder (how many entries were corrupt, the first one); later finds at INFO."""
        new = self._stats.corrupt - self._corrupt_reported
        if new <= 0:
            return
        if self._corrupt_reported == 0:
            log.warning(
                "feature cache %s: %d corrupt entr%s (first: %s), recomputed and overwritten; further "
                "corrupt entries in this folder are logged at INFO level and counted in the cache stats",
                self.folder,
                new,
                "y" if new == 1 else "ies",
                self._first_corrupt,
            )
        else:
            log.info("feature cache %s: %d more corrupt entries recomputed", self.folder, new)
        self._corrupt_reported = self._stats.corrupt

    # -- writes -------------------------------------------------------------------------
    def put(self, key: str, values: np.ndarray) -> np.ndarray:
        """Store ``values`` (cast to fp16, must have ``length`` elements) atomically.

        Returns the stored fp16 array, so callers hand out exactly what later hits read. When
        the folder cannot be written, warns once and returns the array without storing it.
        """
        stored = np.ascontiguousarray(to_fp16(np.asarray(values).reshape(-1)))
        if stored.shape != (self.length,):
            raise ValueError(f"feature vector has {stored.size} values, this cache stores {self.length}")
        if not self.writable:
            return stored
        try:
            self._write_config()
            atomic_write_bytes(self.path_for(key), encode_entry(key, stored), fsync=False)
        except OSError as exc:
            self._stop_writing(exc)
            return stored
        self._stats.writes += 1
        return stored

    def _stop_writing(self, exc: OSError) -> None:
        self.writable = False
        where = exc.filename2 or exc.filename  # os.replace: the destination, not the temporary file
        reason = f"{exc.strerror or exc}" + (f": {where}" if where else "")
        elsewhere = "or point --cache-dir (or BENCH_CACHE_DIR) at another folder"
        if exc.errno in _NO_SPACE:
            fix = f"free disk space there {elsewhere}"
        elif exc.errno in _NO_PERMISSION:
            fix = f"make it writable (chmod/chown) {elsewhere}"
        else:
            fix = f"check that the folder can be written {elsewhere}"
        log.warning(
            "feature cache folder %s cannot be written (%s); this run continues WITHOUT caching these "
            "features (computed in memory, recomputed next run). Fix: %s.",
            self.folder,
            reason,
            fix,
        )

    def _write_config(self) -> None:
        if self._config_written:
            return
        target = self.folder / CONFIG_FILE
        if not target.is_file():
            payload = json.dumps({**self.config, "hash": self.hash}, indent=2, sort_keys=True, default=str)
            atomic_write_bytes(target, (payload + "\n").encode("utf-8"), fsync=False)
        self._config_written = True

    def rows(
        self,
        items: Sequence[ImageItem],
        compute: Callable[[list[ImageItem]], np.ndarray],
        batch_size: int,
        what: str = "features",
    ) -> dict[str, np.ndarray]:
        """One stored row per distinct item key: hits read back, misses computed by
        ``compute`` (a list of items -> array with one row each) in batches and stored."""
        rows: dict[str, np.ndarray] = {}
        todo: dict[str, ImageItem] = {}
        self._deferring_reports = True  # one summary line for the whole lookup, not one per entry
        try:
            for item in items:
                if item.key in rows or item.key in todo:
                    continue
                cached = self.get(item.key)
                if cached is None:
                    todo[item.key] = item
                else:
                    rows[item.key] = cached
        finally:
            self._deferring_reports = False
            self._report_corrupt()
        pending = list(todo.values())
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            for item, row in zip(chunk, compute(chunk), strict=True):
                try:
                    rows[item.key] = self.put(item.key, row)
                except FeatureOverflowError as exc:
                    raise BackboneError(
                        f"{what} of image {item.id} cannot be stored as fp16: {exc}; the input or the "
                        "weights are broken"
                    ) from exc
        return rows

    # -- bookkeeping --------------------------------------------------------------------
    def stats(self) -> CacheStats:
        """A copy of the hit/miss/corrupt/write counters."""
        s = self._stats
        return CacheStats(s.hits, s.misses, s.corrupt, s.writes, list(s.corrupt_keys))

    def __repr__(self) -> str:
        return f"FeatureCache({self.folder})"
