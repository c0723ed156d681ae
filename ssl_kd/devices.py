"""Device names (`auto`, `cpu`, `cuda`) → the torch device of this process."""

from __future__ import annotations

import torch

from ssl_kd.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, local_rank: int = 0, option: str = "train.device") -> torch.device:
    """`auto` takes the GPU of this local rank when CUDA is available, else the CPU.

    Raises:
        UserError: `cuda` was asked for without CUDA (`option` names the setting).
    """
    if name not in DEVICE_CHOICES:
        raise UserError(
            f"{option}={name!r} is not valid; choose one of: {', '.join(DEVICE_CHOICES)}"
        )
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}=cuda but CUDA is not available here; use {option}=auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    # submitit's export leaves one visible GPU per task; torchrun leaves all of them.
    return torch.device("cuda", local_rank % torch.cuda.device_count())
