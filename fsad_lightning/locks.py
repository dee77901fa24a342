"""Claim a unit of work with a lock file, so that workers sharing a folder never run it twice.

Several processes, GPUs or machines that share a folder (a network file system) split a list of work
items between them: each item has a lock path, and a worker runs an item only while it holds that lock.

- **Claim**: ``os.open(path, O_CREAT | O_EXCL)`` creates the lock file or fails if it exists; exactly one
  of any number of simultaneous claimants succeeds. The winner writes its :class:`LockOwner` (worker id,
  host, pid, the pid's start time, a random token) into the file as JSON.
- **Heartbeat**: while the work runs, a daemon thread refreshes the lock file's modification time every
  ``heartbeat_s`` seconds (:meth:`CellLock.heartbeat`).
- **Stale locks** (:func:`stale_reason`): a lock is stale when its heartbeat is older than ``timeout_s``
  (a crashed, killed or hung worker on any host, or one whose machine went away), or at once when its
  owner ran on this host and that process is gone (pid not alive, or the pid now belongs to a process that
  started at another time). Clocks of the hosts must agree to well within ``timeout_s`` (NTP does).
- **Take-over** (:func:`claim`): a stale lock is removed under a second, short-lived guard lock
  (``<lock>.break``, claimed the same way), after checking again that it is still the same stale file, so
  two workers that both see it stale cannot remove a fresh lock that a third one just made. Then the
  claim is retried like any other. A guard left by a worker that died while holding it is itself removed
  once it is older than ``timeout_s``.
- **Release**: the owner removes the file when the work ends (also on an exception or Ctrl-C). A worker
  whose lock was taken over (its heartbeat stopped for longer than ``timeout_s``, then it came back)
  notices at its next heartbeat (:attr:`CellLock.lost`) and leaves the new owner's file in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: default seconds without a heartbeat after which a lock is stale
DEFAULT_TIMEOUT_S = 300.0
BREAK_SUFFIX = ".break"


def process_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (field 22 of ``/proc/<pid>/stat``), so a
    recycled pid is told apart from the original process; ``None`` where ``/proc`` is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after its closing one
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start_time: str | None = None) -> bool:
    """Whether process ``pid`` of this host runs (and, given ``start_time``, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    if start_time is not None:
        now = process_start_time(pid)
        return now is None or now == start_time
    return True


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: written into the lock file as JSON."""

    worker: str
    host: str
    pid: int
    pid_start: str | None
    token: str
    claimed_at: float

    @classmethod
    def this_process(cls, worker: str | None = None) -> LockOwner:
        """The owner for this process; ``worker`` defaults to ``<host>-<pid>``."""
        host, pid = socket.gethostname(), os.getpid()
        return cls(
            worker=worker or f"{host}-{pid}",
            host=host,
            pid=pid,
            pid_start=process_start_time(pid),
            token=secrets.token_hex(8),
            claimed_at=time.time(),
        )

    def describe(self) -> str:
        return f"worker {self.worker} (pid {self.pid} on {self.host})"


def read_owner(path: str | os.PathLike) -> dict[str, Any] | None:
    """The owner JSON of a lock file; ``None`` when it is absent, empty (being written) or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stale_reason(path: str | os.PathLike, timeout_s: float, now: float | None = None) -> str | None:
    """Why the lock at ``path`` is stale, or ``None`` when it is live (or gone).

    Stale: no heartbeat (modification time) for more than ``timeout_s`` seconds, or its owner ran on this
    host and that process is gone.
    """
    try:
        age = (time.time() if now is None else now) - os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    owner = read_owner(path)
    if owner and owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not process_alive(owner["pid"], owner.get("pid_start")):
            return f"its owner, worker {owner.get('worker')} (pid {owner['pid']} on this host), is gone"
    if age > timeout_s:
        holder = f"worker {owner.get('worker')} on {owner.get('host')}" if owner else "an unknown worker"
        return f"{holder} sent no heartbeat for {age:.0f} s (timeout {timeout_s:g} s)"
    return None


def _create_exclusive(path: Path, content: str) -> bool:
    """Create ``path`` with ``content`` if it does not exist; ``False`` when it does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, content.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _signature(path: Path) -> tuple[int, int, int, str] | None:
    try:
        stat = os.stat(path)
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size, path.read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def break_stale(path: str | os.PathLike, timeout_s: float, owner: LockOwner) -> str | None:
    """Remove the lock at ``path`` if it is stale, under the ``<lock>.break`` guard; returns the reason it
    was stale, or ``None`` when it was live, gone, or another worker is breaking it now."""
    path = Path(path)
    reason = stale_reason(path, timeout_s)
    if reason is None:
        return None
    seen = _signature(path)
    guard = path.with_name(path.name + BREAK_SUFFIX)
    if not _create_exclusive(guard, json.dumps(asdict(owner))):
        if stale_reason(guard, timeout_s) is not None:  # a breaker died holding the guard
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()
        return None
    try:
        # still the same stale file? (another worker may have broken it and claimed it afresh meanwhile)
        if seen is None or _signature(path) != seen or stale_reason(path, timeout_s) is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return reason
    finally:
        with contextlib.suppress(FileNotFoundError):
            guard.unlink()


class CellLock:
    """A held lock (see the module docstring); make one with :func:`claim`."""

    def __init__(self, path: Path, owner: LockOwner, heartbeat_s: float) -> None:
        self.path = path
        self.owner = owner
        self.heartbeat_s = heartbeat_s
        #: set when another worker took the lock over (this one's heartbeat had stopped for too long)
        self.lost = False
        #: why the lock was stale when this worker took it over, else ``None``
        self.took_over: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def owned(self) -> bool:
        owner = read_owner(self.path)
        return bool(owner) and owner.get("token") == self.owner.token

    def beat(self) -> bool:
        """Refresh the heartbeat once; ``False`` (and :attr:`lost`) when the lock is no longer ours."""
        if not self.owned():
            self.lost = True
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.beat():
                return

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[CellLock]:
        """Keep the lock fresh from a daemon thread while the block runs; release it afterwards."""
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self.release()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self.owned():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            self.lost = True


def claim(
    path: str | os.PathLike,
    owner: LockOwner,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    heartbeat_s: float | None = None,
) -> CellLock | None:
    """Claim the lock at ``path`` for ``owner``, taking over a stale one; ``None`` when a live worker holds
    it. ``heartbeat_s`` defaults to a tenth of ``timeout_s``.

    Raises:
        ValueError: ``timeout_s`` or ``heartbeat_s`` is not positive, or the heartbeat is not shorter than
            the timeout.
    """
    heartbeat_s = timeout_s / 10.0 if heartbeat_s is None else heartbeat_s
    if not timeout_s > 0 or not 0 < heartbeat_s < timeout_s:
        raise ValueError(
            f"lock timeout must be > 0 and the heartbeat in (0, timeout), got {timeout_s} and {heartbeat_s}"
        )
    path = Path(path)
    content = json.dumps(asdict(owner), sort_keys=True)
    took_over = None
    if not _create_exclusive(path, content):
        took_over = break_stale(path, timeout_s, owner)
        if took_over is None or not _create_exclusive(path, content):
            return None
    lock = CellLock(path, owner, heartbeat_s)
    lock.took_over = took_over
    return lock
