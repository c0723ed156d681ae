"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a mix.
Output folders are checked for writing before a run starts; a write that the file system
refuses (full, read-only, no permission) is one line naming the file, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ssl_kd.errors import RunFailed, UserError

# What the file system says when it refuses a write: the user's to fix, not a bug.
REFUSED_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
PROBE_BYTES = 1 << 20  # a folder with less room than this cannot hold a checkpoint anyway


def temporary_path(path: Path) -> Path:
    """The hidden temporary name beside `path` that this process writes before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(
    path: str | Path,
    write: Callable[[BinaryIO], object],
    before_replace: Callable[[], object] | None = None,
) -> None:
    """Calls `write(handle)` on a temporary file beside `path`, fsyncs it and renames it over
    `path` (atomic on POSIX); the rename is fsynced too. On any error the temporary file is
    removed and `path` is untouched.

    `before_replace` runs after the data is on disk and before the rename (a test hook).

    Raises:
        RunFailed: the file system refused the write (full, read-only, no permission): one
            line naming `path`, which is untouched.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        if err.errno not in REFUSED_WRITES:
            raise
        raise RunFailed(
            f"cannot write {path}: {err.strerror}; the previous {path.name}, if any, is "
            "untouched. Free space (or fix the permissions), then run the same command again"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda handle: handle.write(text.encode()))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable_folder(path: str | Path, option: str = "output_dir") -> None:
    """Creates `path` (and missing parents) and writes, fsyncs and removes a 1 MiB probe file in
    it, so that a run never starts where it could not save. Folders it created are removed
    again when the probe fails.

    Raises:
        UserError: `path` is a file or lies under one, or the file system refuses the folder
            or the probe (read-only, full, no permission); `option` names the setting.
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"{option}={path} is a file, not a folder; choose another {option}")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{option}={path} lies under the file {blocking}, which is not a folder")
    created = [folder for folder in (path, *path.parents) if not folder.exists()]
    probe = path / f".ssl_kd-write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as handle:
                handle.write(bytes(PROBE_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise UserError(
            f"{option}={path} cannot be written: {err.strerror or err}{where}; choose another "
            f"{option} (or free space, fix the permissions)"
        ) from None
