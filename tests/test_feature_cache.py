"""The feature cache's integrity checks, unwritable folders and file modes; bench.fileio.

Damage is done to the bytes on disk without using the entry format (cut, flip, copy, overwrite),
so each test says what the cache must survive, whatever the format.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import bench.fileio as fileio
from bench.feature_cache import (
    CACHE_FORMAT_VERSION,
    ENTRY_MAGIC,
    FeatureCache,
    decode_entry,
    encode_entry,
)
from bench.types import ImageItem

LENGTH = 40
CONFIG = {"model": "test-model", "input_size": 32}
CACHE_LOGGER = "bench.feature_cache"


def rows_for(keys: list[str]) -> dict[str, np.ndarray]:
    """A distinct, exactly fp16-representable row per key."""
    return {key: (np.arange(LENGTH, dtype=np.float32) + 100 * i) / 4 for i, key in enumerate(keys)}


class Source:
    """Items plus a ``compute`` that records which keys it was asked for."""

    def __init__(self, keys: list[str]) -> None:
        self.values = rows_for(keys)
        self.items = [ImageItem(id=f"id-{key}", key=key, loader=lambda: None) for key in keys]
        self.computed: list[str] = []

    def compute(self, chunk: list[ImageItem]) -> np.ndarray:
        self.computed.extend(item.key for item in chunk)
        return np.stack([self.values[item.key] for item in chunk])


KEYS = [f"img{i:02d}" for i in range(5)]


@pytest.fixture
def filled(tmp_path: Path) -> tuple[FeatureCache, Source]:
    """A cache folder holding the five entries of KEYS."""
    source = Source(KEYS)
    FeatureCache(tmp_path, CONFIG, LENGTH).rows(source.items, source.compute, batch_size=2)
    return FeatureCache(tmp_path, CONFIG, LENGTH), Source(KEYS)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == CACHE_LOGGER and r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- format
def test_entry_layout_is_the_documented_one() -> None:
    values = np.array([1.0, -2.5, 65504.0], dtype=np.float16)
    data = encode_entry("abc", values)
    magic, version, header_size, dtype, count, key_length = struct.unpack_from("<8sII8sQI", data)
    assert (magic, version, dtype, count, key_length) == (
        ENTRY_MAGIC,
        CACHE_FORMAT_VERSION,
        b"<f2".ljust(8, b"\0"),
        3,
        3,
    )
    # 36 fixed bytes + 3 key bytes + 32 digest bytes = 71, padded to 128
    assert header_size == 128 and len(data) == 128 + 3 * 2
    assert data[36:39] == b"abc" and data[39:96] == bytes(57)
    assert data[96:128] == hashlib.sha256(data[:96] + data[128:]).digest()
    assert data[128:] == values.astype("<f2").tobytes()
    decoded = decode_entry(data, "abc", 3)
    np.testing.assert_array_equal(decoded, values)
    assert decoded.dtype == np.float16 and not decoded.flags.writeable


def test_round_trip_is_bit_identical_and_read_only(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, CONFIG, LENGTH)
    values = np.random.default_rng(0).standard_normal(LENGTH) * 300
    stored = cache.put("key-1", values)
    read = cache.get("key-1")
    assert read is not None and read.dtype == np.float16 and read.shape == (LENGTH,)
    assert read.tobytes() == stored.tobytes() == values.astype(np.float16).tobytes()
    assert not read.flags.writeable
    assert cache.path_for("key-1").read_bytes().startswith(ENTRY_MAGIC)
    assert (cache.stats().hits, cache.stats().writes, cache.stats().corrupt) == (1, 1, 0)


# --------------------------------------------------------------------------- corruption
def flip_bit(position: int) -> Callable[[Path, Path], None]:
    def damage(path: Path, other: Path) -> None:
        data = bytearray(path.read_bytes())
        data[position] ^= 0x10
        path.write_bytes(bytes(data))

    return damage


def overwrite(start: int, junk: bytes) -> Callable[[Path, Path], None]:
    def damage(path: Path, other: Path) -> None:
        data = bytearray(path.read_bytes())
        data[start : start + len(junk)] = junk
        path.write_bytes(bytes(data))

    return damage


def replace_with_folder(path: Path, other: Path) -> None:
    path.unlink()
    path.mkdir()


#: name -> damage(entry of img01, entry of img03)
DAMAGES: dict[str, Callable[[Path, Path], None]] = {
    "another-key-entry": lambda path, other: path.write_bytes(other.read_bytes()),
    "payload-bit-flip": flip_bit(-7),
    "header-bit-flip": flip_bit(20),
    "damaged-header": overwrite(8, b"{'descr': <garbage ]]) (" * 2),
    "unbalanced-header-bytes": overwrite(10, b"(((("),  # version 1 crashed here with SyntaxError
    "damaged-magic": overwrite(0, b"\x93NUMPY\x01\x00"),
    "truncated-half": lambda path, other: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "truncated-to-header": lambda path, other: path.write_bytes(path.read_bytes()[:30]),
    "last-byte-missing": lambda path, other: path.write_bytes(path.read_bytes()[:-1]),
    "trailing-bytes": lambda path, other: path.write_bytes(path.read_bytes() + b"\0\0"),
    "empty-file": lambda path, other: path.write_bytes(b""),
    "text-file": lambda path, other: path.write_text("not a cache entry\n"),
    "unreadable-entry": replace_with_folder,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_corrupt_entry_is_counted_recomputed_and_overwritten(
    filled: tuple[FeatureCache, Source], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache, source = filled
    victim = "img01"
    DAMAGES[damage](cache.path_for(victim), cache.path_for("img03"))
    with caplog.at_level(logging.INFO, logger=CACHE_LOGGER):
        rows = cache.rows(source.items, source.compute, batch_size=2)
    assert source.computed == [victim]
    for key in KEYS:
        np.testing.assert_array_equal(rows[key], source.values[key].astype(np.float16))
    stats = cache.stats()
    assert (stats.corrupt, stats.misses, stats.hits, stats.corrupt_keys) == (1, 1, 4, [victim])
    warnings = warnings_of(caplog)
    (warning,) = (w for w in warnings if "corrupt entr" in w)
    assert str(cache.folder) in warning and "1 corrupt entry" in warning
    if damage == "unreadable-entry":  # a folder where the entry belongs cannot be replaced by a file
        assert len(warnings) == 2 and "cannot be written" in warnings[1]
    else:
        assert len(warnings) == 1
        fresh = FeatureCache(cache.root, CONFIG, LENGTH)
        np.testing.assert_array_equal(fresh.get(victim), source.values[victim].astype(np.float16))
        assert fresh.stats().corrupt == 0


def test_corrupt_entries_give_one_warning_per_folder(
    filled: tuple[FeatureCache, Source], caplog: pytest.LogCaptureFixture
) -> None:
    cache, source = filled
    for key in ("img00", "img02", "img04"):
        cache.path_for(key).write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger=CACHE_LOGGER):
        cache.rows(source.items, source.compute, batch_size=2)
        (warning,) = warnings_of(caplog)
        assert "3 corrupt entries" in warning and str(cache.folder) in warning
        details = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert sum(str(cache.path_for(key)) in " ".join(details) for key in ("img00", "img02", "img04")) == 3
        # later damage in the same folder is counted and logged, not warned about again
        cache.path_for("img01").write_bytes(b"garbage")
        cache.rows(source.items, source.compute, batch_size=2)
        assert len(warnings_of(caplog)) == 1
    assert cache.stats().corrupt == 4 and sorted(source.computed) == ["img00", "img01", "img02", "img04"]


def test_direct_reads_warn_once_too(
    filled: tuple[FeatureCache, Source], caplog: pytest.LogCaptureFixture
) -> None:
    cache, _ = filled
    for key in ("img00", "img01"):
        cache.path_for(key).write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger=CACHE_LOGGER):
        assert cache.get("img00") is None and cache.get("img01") is None
    assert len(warnings_of(caplog)) == 1 and cache.stats().corrupt == 2


# --------------------------------------------------------------------------- unwritable folders
def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every file write runs out of space after writing part of its payload."""
    attempts: list[int] = []

    def half_then_enospc(fd: int, payload) -> None:
        attempts.append(fd)
        view = memoryview(payload).cast("B")
        os.write(fd, view[: len(view) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio, "_write_all", half_then_enospc)
    yield attempts


def test_full_disk_warns_once_and_the_run_continues_uncached(
    tmp_path: Path, disk_full: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    cache = FeatureCache(tmp_path, CONFIG, LENGTH)
    source = Source(KEYS)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        rows = cache.rows(source.items, source.compute, batch_size=2)
        again = cache.rows(source.items, source.compute, batch_size=2)
    for key in KEYS:
        np.testing.assert_array_equal(rows[key], source.values[key].astype(np.float16))
        np.testing.assert_array_equal(again[key], rows[key])
    (warning,) = warnings_of(caplog)
    assert str(cache.folder) in warning and "free disk space" in warning and "--cache-dir" in warning
    assert "WITHOUT caching" in warning
    assert len(disk_full) == 1  # no write is attempted after the first failure
    assert source.computed == KEYS + KEYS  # nothing was cached, so the second call recomputed
    assert cache.stats().writes == 0 and not cache.writable
    assert leftovers(tmp_path) == [] and not list(tmp_path.rglob("*.feat"))


requires_non_root = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions"
)


@requires_non_root
def test_read_only_cache_root_warns_once_and_computes_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(0o500)
    try:
        cache = FeatureCache(root, CONFIG, LENGTH)
        source = Source(KEYS)
        with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
            rows = cache.rows(source.items, source.compute, batch_size=2)
        for key in KEYS:
            np.testing.assert_array_equal(rows[key], source.values[key].astype(np.float16))
        (warning,) = warnings_of(caplog)
        assert str(cache.folder) in warning and "make it writable" in warning and "--cache-dir" in warning
        assert list(root.iterdir()) == []
    finally:
        root.chmod(0o700)


@requires_non_root
def test_read_only_filled_folder_still_serves_hits(
    filled: tuple[FeatureCache, Source], caplog: pytest.LogCaptureFixture
) -> None:
    cache, _ = filled
    folders = [cache.folder, *(p for p in cache.folder.iterdir() if p.is_dir())]
    for folder in folders:
        folder.chmod(0o500)
    try:
        source = Source([*KEYS, "new01", "new02"])
        with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
            rows = cache.rows(source.items, source.compute, batch_size=2)
        assert source.computed == ["new01", "new02"]
        np.testing.assert_array_equal(rows["new02"], source.values["new02"].astype(np.float16))
        assert cache.stats().hits == len(KEYS) and len(warnings_of(caplog)) == 1
    finally:
        for folder in folders:
            folder.chmod(0o700)


# --------------------------------------------------------------------------- file modes
@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_cache_files_follow_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int, mode: int
) -> None:
    umask(mask)
    cache = FeatureCache(tmp_path, CONFIG, LENGTH)
    cache.put("key-1", np.ones(LENGTH))
    assert stat.S_IMODE(cache.path_for("key-1").stat().st_mode) == mode
    assert stat.S_IMODE((cache.folder / "config.json").stat().st_mode) == mode


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640)])
def test_atomic_write_follows_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int, mode: int
) -> None:
    umask(mask)
    assert fileio.current_umask() == mask and fileio.file_mode_from_umask() == mode
    target = tmp_path / "sub" / "file.json"
    fileio.atomic_write_bytes(target, b"{}\n")
    assert target.read_bytes() == b"{}\n" and stat.S_IMODE(target.stat().st_mode) == mode


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_atomic_write_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    target = tmp_path / "file.bin"
    fileio.atomic_write_bytes(target, b"old")

    def write_then_fail(fd: int, payload) -> None:
        os.write(fd, b"ne")
        raise failure

    monkeypatch.setattr(fileio, "_write_all", write_then_fail)
    with pytest.raises(type(failure)):
        fileio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_atomic_write_text_round_trips(tmp_path: Path) -> None:
    fileio.atomic_write_text(tmp_path / "a.txt", "é\n", fsync=False)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "é\n"
