"""The optimizer of a run: AdamW or SGD over the method's parameter groups, with the update
implementation `optim.implementation` names.

torch runs one optimizer update three ways, equal up to float rounding: `loop` (a Python loop
over the parameters, torch's default on CPU), `foreach` (the parameters' tensors in a few
multi-tensor kernels, torch's default on CUDA) and `fused` (the whole update in one kernel per
dtype and device; torch ≥ 2.4 has it for AdamW and SGD on CPU and CUDA). `auto` takes the fused
kernel where torch has one for the device, else torch's own default.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from ssl_kd.config.sections import OptimConfig


def implementation_flags(implementation: str, device: torch.device) -> dict[str, bool]:
    """The `foreach` / `fused` arguments of torch's AdamW and SGD for `optim.implementation`.

    Raises:
        ValueError: `fused` on a device torch has no fused kernel for.
    """
    fused_here = device.type in _get_fused_kernels_supported_devices()
    if implementation == "auto":
        return {"fused": True} if fused_here else {}
    if implementation == "fused" and not fused_here:
        raise ValueError(f"optim.implementation=fused: torch has no fused kernel on {device}")
    return {
        "loop": {"foreach": False, "fused": False},
        "foreach": {"foreach": True, "fused": False},
        "fused": {"foreach": False, "fused": True},
    }[implementation]


def build_optimizer(
    groups: list[dict[str, Any]], cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (`cfg.betas`) or SGD (momentum 0.9) over `groups`; lr and weight decay start at 0,
    the trainer sets them from its schedules every step."""
    flags = implementation_flags(cfg.implementation, device)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, **flags)
    betas = (cfg.betas[0], cfg.betas[1])
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, **flags)
