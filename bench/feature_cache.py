"""On-disk cache of frozen-backbone features, shared by every method, shot, seed and run.

A frozen CLIP gives the same outputs for the same image every time, so each image is
encoded once per *feature configuration* — (model, weights identity, input size,
preprocessing id, layers, ...) — and read back from disk afterwards. Layout::

    <cache_dir>/<model>_<size>px_<hash12>/config.json     what the folder holds (readable)
    <cache_dir>/<model>_<size>px_<hash12>/ab/<key>.npy     one fp16 1-D array per image key

``<hash12>`` is the SHA-256 of the canonical JSON of the configuration, so a different
input size, layer set, weights file or preprocessing lands in a different folder and
never mixes with old entries. The image key is the content hash the data layer gives
(:attr:`bench.types.ImageItem.key`); ``ab`` is its first two characters (keeps folders
small on big datasets).

Writes are atomic (temporary file in the same folder, then :func:`os.replace`), so
concurrent shards on a shared filesystem and interrupted runs never leave a half-written
entry under the final name. Reads use ``np.load(mmap_mode="r")``. An entry that cannot be
read, has the wrong dtype or length, or holds non-finite values is treated as a miss:
the caller recomputes and overwrites it, and it is counted in :attr:`CacheStats.corrupt`
and logged.

fp16 storage halves the disk footprint. Raw residual-stream tokens of real CLIP models
reach a few hundred in magnitude (fp16 max is 65504), so nothing plausible overflows;
:func:`to_fp16` refuses (raises) rather than silently storing ``inf``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BackboneError
from bench.types import ImageItem

log = logging.getLogger(__name__)

#: Bumped when the on-disk layout changes (part of every folder's hash).
CACHE_FORMAT_VERSION = 1
#: Largest finite float16 value.
FP16_MAX = float(np.finfo(np.float16).max)
CONFIG_FILE = "config.json"

_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


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

    # -- paths --------------------------------------------------------------------------
    @staticmethod
    def file_stem(key: str) -> str:
        """The file name (without ``.npy``) for an image key; unsafe keys are hashed."""
        if _SAFE_KEY.fullmatch(key):
            return key
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def path_for(self, key: str) -> Path:
        stem = self.file_stem(key)
        return self.folder / stem[:2] / f"{stem}.npy"

    # -- reads --------------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        """The cached vector (a read-only memory map, float16, shape ``(length,)``) or None."""
        path = self.path_for(key)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            self._stats.misses += 1
            return None
        except (OSError, ValueError, EOFError) as exc:
            return self._corrupt(key, path, f"unreadable ({exc})")
        if array.dtype != np.float16 or array.shape != (self.length,):
            return self._corrupt(
                key, path, f"dtype {array.dtype} shape {array.shape}, expected float16 ({self.length},)"
            )
        if not np.isfinite(array).all():
            return self._corrupt(key, path, "non-finite values")
        self._stats.hits += 1
        return array

    def __contains__(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def _corrupt(self, key: str, path: Path, why: str) -> None:
        self._stats.misses += 1
        self._stats.corrupt += 1
        self._stats.corrupt_keys.append(key)
        log.warning("feature cache entry %s is corrupt (%s); recomputing it", path, why)
        return None

    # -- writes -------------------------------------------------------------------------
    def put(self, key: str, values: np.ndarray) -> np.ndarray:
        """Store ``values`` (cast to fp16, must have ``length`` elements) atomically.

        Returns the stored fp16 array, so callers hand out exactly what later hits read.
        """
        stored = np.ascontiguousarray(to_fp16(np.asarray(values).reshape(-1)))
        if stored.shape != (self.length,):
            raise ValueError(f"feature vector has {stored.size} values, this cache stores {self.length}")
        self._write_config()
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, stored, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._stats.writes += 1
        return stored

    def _write_config(self) -> None:
        if self._config_written:
            return
        target = self.folder / CONFIG_FILE
        if not target.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            payload = (
                json.dumps({**self.config, "hash": self.hash}, indent=2, sort_keys=True, default=str) + "\n"
            )
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".config.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(payload)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
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
        for item in items:
            if item.key in rows or item.key in todo:
                continue
            cached = self.get(item.key)
            if cached is None:
                todo[item.key] = item
            else:
                rows[item.key] = cached
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
