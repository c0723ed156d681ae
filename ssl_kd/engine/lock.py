"""One run per output dir: an exclusive lock held for the run's whole life.

`RunLock(output_dir).acquire()` takes `fcntl.flock` on `OUTPUT_DIR/.lock` and writes the holder
(pid, host, start time) into that file; `release()` empties the record. The kernel drops a
flock when its holder exits in any way (SIGKILL included), so a dead process never keeps the
dir; the record it could not empty is then only reported, as a stale lock taken over.

What this relies on: flock(2) excludes processes of one machine on every local file system. On
NFS, Linux clients (since 2.6.12) turn flock into a whole-file lock that the server arbitrates,
so runs on different nodes exclude each other too, unless the mount keeps locks local (`nolock`,
`local_lock=flock` or `all`): there the lock excludes runs on the same node only. Where flock
fails outright (ENOLCK: NFS without a lock daemon) the record alone decides: a live pid on this
host or any pid on another host holds the dir (its `.lock` may be deleted once that run is known
to be gone); a dead pid on this host is stale and taken over. Never delete `.lock` while a run
may be live: a new file is a new lock.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from ssl_kd.errors import UserError

LOCK_NAME = ".lock"


class RunLocked(UserError):
    """Another live run holds the output dir."""


class RunLock:
    """The lock of one output dir; rank 0 of a run takes it, before reading anything there."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Takes the lock; returns a note when it took over the record of a run that ended
        without releasing it (None otherwise).

        Raises:
            RunLocked: a live run holds the dir; the message names its pid, host and start.
            UserError: the dir or its lock file cannot be created (read-only, under a file).
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(
                f"cannot create the run's lock file {self.path}: {err.strerror or err}; choose "
                "another output_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked_by_kernel = True
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunLocked(self._held_message(holder)) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            locked_by_kernel = False
        previous = _read(fd)
        if not locked_by_kernel and previous and not _known_dead(previous):
            os.close(fd)
            raise RunLocked(
                self._held_message(previous)
                + f" ({self.path.parent} does not support file locks, so the record decides: "
                f"if that run is gone, delete {self.path})"
            )
        _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()})
        self._fd = fd
        if not previous:
            return None
        dead = previous.get("pid") != os.getpid() and _known_dead(previous)
        gone = " (no longer running)" if dead else ""
        return (
            f"took over the lock of {_describe(previous)}{gone}, which ended without releasing "
            f"it ({self.path})"
        )

    def release(self) -> None:
        """Empties the record and drops the lock (the file stays: see the module docstring)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def _held_message(self, holder: dict[str, Any] | None) -> str:
        who = _describe(holder) if holder else "another process (no record yet)"
        return (
            f"output_dir {self.path.parent} is in use by another run: {who}. Wait for it to "
            "end or stop it, or choose another output_dir"
        )


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
        f"{holder.get('since', '?')}"
    )


def _read(fd: int) -> dict[str, Any] | None:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "since": f"unreadable record {text[:40]!r}"}
    return record if isinstance(record, dict) else None


def _write(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _known_dead(holder: dict[str, Any]) -> bool:
    """Whether the recorded process is certainly gone: only checkable on this host."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return True  # our own record, e.g. a lock this process released and takes again
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
