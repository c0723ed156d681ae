"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a mix."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
