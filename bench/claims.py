"""Claims on fit units, so that several processes can share one grid without computing a cell twice.

Before fitting a unit (method, shots, seed) a run claims it by creating
``<run dir>/.claims/<unit>.json`` with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+
filesystems). The claim holds the host, the process id, a random token and the start time;
while the process works, a daemon thread touches its claims every :data:`HEARTBEAT_SECONDS`.
A claim is *stale*, and may be taken over, when its process is known to be dead (same host,
no such pid) or its heartbeat is older than :data:`STALE_SECONDS` (another host that died).
Taking over replaces the file atomically and then re-reads it: of several processes taking
over at once, only the one whose token is in the file proceeds.

So N processes (one per GPU, overlapping SLURM jobs) can run the very same ``bench run``
command into one results folder: each unit is fitted by exactly one of them, and a process
that finds a unit claimed does the others first, then waits for it and skips its cells once
they are finished (or takes the unit over if its claimant died).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.fileio import atomic_write_text, file_mode_from_umask

__all__ = ["HEARTBEAT_SECONDS", "STALE_SECONDS", "Claim", "ClaimBook"]

#: How often a live process refreshes its claims.
HEARTBEAT_SECONDS = 30.0
#: A claim whose heartbeat is older than this is taken to belong to a dead process.
STALE_SECONDS = 300.0
CLAIMS_DIR = ".claims"


@dataclass(frozen=True)
class Claim:
    """A unit this process holds: release it when its cells are written (or on failure)."""

    name: str
    path: Path
    token: str


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class ClaimBook:
    """The claims of one run folder held by this process (thread-safe heartbeat)."""

    def __init__(
        self,
        run_dir: Path,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        stale_seconds: float = STALE_SECONDS,
    ) -> None:
        self.folder = Path(run_dir) / CLAIMS_DIR
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_seconds = stale_seconds
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self, token: str) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "token": token, "started": time.time()})

    def try_claim(self, name: str) -> Claim | None:
        """Claim ``name`` (a file-system-safe unit name); None when a live process holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.json"
        token = uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, file_mode_from_umask())
        except FileExistsError:
            if not self._stale(path):
                return None
            atomic_write_text(path, self._payload(token))  # take over; re-read below decides
            time.sleep(0.05)  # let a concurrent taker's replace land before we check
            if self._owner_token(path) != token:
                return None
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self._payload(token))
        claim = Claim(name, path, token)
        with self._lock:
            self._held[name] = claim
        self._ensure_heartbeat()
        return claim

    def release(self, claim: Claim) -> None:
        """Give ``claim`` up (only if the file is still ours)."""
        with self._lock:
            self._held.pop(claim.name, None)
        if self._owner_token(claim.path) == claim.token:
            with contextlib.suppress(FileNotFoundError):
                claim.path.unlink()

    def held_by_other(self, name: str) -> bool:
        """True when a live process other than this one holds ``name``."""
        path = self.folder / f"{name}.json"
        return path.exists() and not self._stale(path) and name not in self._held

    def close(self) -> None:
        """Release every claim and stop the heartbeat."""
        self._stop.set()
        with self._lock:
            held = list(self._held.values())
        for claim in held:
            self.release(claim)

    # -- internals ------------------------------------------------------------------------
    @staticmethod
    def _read(path: Path) -> dict[str, object] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _owner_token(self, path: Path) -> str | None:
        data = self._read(path)
        return None if data is None else str(data.get("token"))

    def _stale(self, path: Path) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        data = self._read(path)
        if data is None:
            # unreadable: being written right now, or damaged; only its age can tell
            return age > self.stale_seconds
        if data.get("host") == self.host:
            pid = int(data.get("pid", -1))  # type: ignore[call-overload]
            if pid == self.pid:
                return str(data.get("token")) not in {c.token for c in self._held.values()}
            return not _pid_alive(pid)
        return age > self.stale_seconds

    def _ensure_heartbeat(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="bench-claims-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with self._lock:
                held = list(self._held.values())
            for claim in held:
                with contextlib.suppress(OSError):
                    os.utime(claim.path)
