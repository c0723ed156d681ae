"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a mix.
Output folders are checked for writing before a run starts; a write that the file system
refuses (full, read-only, no permission) is one line naming the file, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
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


def replace_file(
    path: str | Path,
    write: Callable[[BinaryIO], object],
    before_replace: Callable[[], object] | None = None,
) -> None:
    """Calls `write(handle)` on a temporary file beside `path`, fsyncs it and renames it over
    `path` (atomic on POSIX); the rename is fsynced too. On any error the temporary file is
    removed and `path` is untouched. The file gets the mode any new file gets (0o666 less the
    umask: 0o644 under the usual umask 022), not a private temporary file's 0o600.

    `before_replace` runs after the data is on disk and before the rename (a test hook).

    Raises:
        OSError: as the file system raised it (see `write_atomic` for one line instead).
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
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(
    path: str | Path,
    write: Callable[[BinaryIO], object],
    before_replace: Callable[[], object] | None = None,
) -> None:
    """`replace_file`, with a refused write worded for a run.

    Raises:
        RunFailed: the file system refused the write (full, read-only, no permission): one
            line naming `path`, which is untouched.
    """
    try:
        replace_file(path, write, before_replace)
    except OSError as err:
        if err.errno not in REFUSED_WRITES:
            raise
        raise RunFailed(
            f"cannot write {path}: {err.strerror}; the previous {Path(path).name}, if any, is "
            "untouched. Free space (or fix the permissions), then run the same command again"
        ) from None


def replace_folder(
    path: str | Path,
    fill: Callable[[Path], object],
    before_replace: Callable[[], object] | None = None,
) -> None:
    """Calls `fill(folder)` on a new hidden folder beside `path`, fsyncs every file in it, then
    puts it in place of `path`. A half-written folder never replaces a good one: an existing
    `path` is moved aside only once the new folder is complete, and deleted once the new one is
    in place (POSIX cannot swap two folders in one rename; a crash between the two renames
    leaves the old folder as `.NAME.old-PID` beside `path`). On any error the new folder is
    removed and `path` is untouched. The folder gets the mode `mkdir` gives (0o755 under the
    usual umask 022), not a private temporary folder's 0o700.

    `before_replace` runs after the new folder is on disk and before the renames (a test hook).

    Raises:
        OSError: as the file system raised it.
    """
    path = Path(path)
    tmp = temporary_path(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        os.mkdir(tmp)  # 0o777 less the umask; tempfile.mkdtemp would give 0o700
        fill(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if before_replace is not None:
            before_replace()
        if os.path.lexists(path):
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if os.path.lexists(old):
                os.rename(old, path)
            raise
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
