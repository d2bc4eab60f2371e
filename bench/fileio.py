"""Atomic file writes that respect the user's umask.

:func:`tempfile.mkstemp` creates files with mode ``0600`` whatever the umask, and
:func:`os.replace` keeps that mode, so a naive "write a temporary file, then rename it"
leaves results and caches unreadable to the rest of a group that shares them.
:func:`atomic_write_bytes` gives the final file the mode a plain ``open(path, "w")`` would
(``0o666 & ~umask``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

#: Where Linux reports a process's umask without changing it.
_PROC_STATUS = "/proc/self/status"


def _umask_from_proc() -> int | None:
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _umask_by_setting() -> int:
    # os.umask can only be read by setting it; done once, at import, before this module's
    # writers can run in other threads.
    current = os.umask(0o022)
    os.umask(current)
    return current


#: The umask at import time: used where the kernel does not report the current one.
_IMPORT_UMASK = _umask_from_proc()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _umask_by_setting()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux, so later
    ``os.umask`` calls are honoured); elsewhere the value read once at import."""
    umask = _umask_from_proc()
    return _IMPORT_UMASK if umask is None else umask


def file_mode_from_umask() -> int:
    """The permission bits a newly created regular file gets: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def _write_all(fd: int, payload: bytes | bytearray | memoryview) -> None:
    view = memoryview(payload).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write_bytes(
    path: Path | str, payload: bytes | bytearray | memoryview, *, fsync: bool = True
) -> None:
    """Write ``payload`` to ``path`` so readers see the old file or the new one, never half.

    The parent folder is created if needed. The file gets the umask's mode
    (:func:`file_mode_from_umask`), not ``mkstemp``'s ``0600``. With ``fsync`` (the default)
    the data and the rename are flushed to disk before returning; caches whose entries carry
    their own checksum may skip that. On any error (including ``KeyboardInterrupt``) the
    temporary file is removed and the error propagates; ``path`` is then untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, file_mode_from_umask())
            _write_all(fd, payload)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    # makes the rename itself durable; not every platform/filesystem can open a folder
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path | str, text: str, *, fsync: bool = True) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)
