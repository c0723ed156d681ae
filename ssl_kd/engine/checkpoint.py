"""Checkpoints written atomically: a crash mid-write never replaces a good checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pth"
REQUIRED_KEYS = ("method", "optimizer", "step", "config")


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then os.replace (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a training checkpoint, with errors that say what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}). Move it away to "
            "start from scratch, or restore it from a backup."
        ) from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(
            f"{path} is not an ssl_kd training checkpoint (missing {', '.join(missing)}). "
            "Use a fresh output_dir, or move the file away."
        )
    return state
