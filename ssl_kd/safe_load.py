"""Reading `.pth` files without running code from them.

A pickle can name any function to call while it is read (`os.system` in a class's
`__reduce__`), so every file is read with `torch.load(weights_only=True)`: tensors, containers
and plain types only. ssl_kd's own checkpoints need nothing more. Official DINO and MAE
checkpoints pickle a few objects besides; `OFFICIAL_GLOBALS` allows exactly those, and only
where such files are expected (`official=True`). Anything else is refused with one line that
names the file and the object it wanted.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_kd.errors import UserError

# numpy's scalar constructor: pickles of numpy scalars call it (numpy 2 moved it to numpy._core).
_numpy_scalar = np.float64(0).__reduce__()[0]

# The objects official DINO/MAE checkpoints pickle besides tensors and plain types.
OFFICIAL_GLOBALS: list[Any] = [
    # `args`: facebookresearch/dino main_dino.py (`save_dict`) and facebookresearch/mae
    # util/misc.py (`save_model`) save the run's argparse Namespace of strings, numbers, lists.
    argparse.Namespace,
    # DINO sets param_group["lr"] and ["weight_decay"] from numpy schedules, so its optimizer
    # state holds numpy.float64 scalars: the constructor (under numpy 1's and numpy 2's module
    # name) and the float64 dtype it is given.
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    np.dtypes.Float64DType,
]

# How torch's weights-only unpickler names what it refused.
_REFUSED = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"unrecognized function (.+?)(?: which belongs|$)", re.MULTILINE),
    re.compile(r"allowlisted via `add_safe_globals`,? but got (.+)$", re.MULTILINE),
)


def load_weights_only(path: str | Path, *, official: bool = False, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with `OFFICIAL_GLOBALS` if `official`.

    Raises:
        UserError: the file needs an object a weights-only load refuses (named in the message).
        Exception: whatever torch.load raises for a file it cannot read at all (truncated, not
            written by torch.save); `describe_load_error` words it in one line.
    """
    allowed = OFFICIAL_GLOBALS if official else []
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # A pickle protocol above 2 is refused anyway; its warning would be a second line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        wanted = refused_object(err)
        if wanted is None:
            raise
        raise UserError(
            f"{path} was not loaded: it needs {wanted}, and reading pickled objects other than "
            "tensors and plain types could run code from the file. If you trust it, load it "
            "yourself and save its tensors (torch.save of a plain dict, or safetensors)"
            + (_NUMPY_HINT if wanted.startswith("numpy") else "")
        ) from None


# ssl_kd before weights-only loading saved numpy's RNG state as an array.
_NUMPY_HINT = (
    "; a checkpoint of an older ssl_kd holds numpy's RNG state this way: resume, evaluate or "
    "export it with the version that wrote it, or start afresh with --overwrite"
)


def refused_object(err: BaseException) -> str | None:
    """The object a weights-only load refused, from torch's message; None if none is named."""
    text = str(err)
    for pattern in _REFUSED:
        if match := pattern.search(text):
            return match.group(1).strip()
    return None


def describe_load_error(err: BaseException) -> str:
    """`Type: message` of a failed torch.load in one line (torch's weights-only errors wrap
    the cause in paragraphs of advice; only the cause is kept)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no details'}"
