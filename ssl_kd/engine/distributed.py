"""torch.distributed for the trainer: process group, device per rank, rank-aware helpers.

One process per GPU (or per CPU task on a CPU cluster). The environment is torchrun's (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a submitit job exports the same variables
first (`export_submitit_env`). NCCL on CUDA, gloo on CPU. Without these variables everything
here degrades to a single process and no collective is ever called.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ssl_kd.devices import resolve_device

T = TypeVar("T")

# How long a rank waits in a collective before the job fails. Rank 0 alone runs k-NN while the
# others wait at a barrier, which on ImageNet takes minutes, far beyond a step's time.
TIMEOUT_ENV = "SSL_KD_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 60


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among `world_size` and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def export_submitit_env() -> bool:
    """Inside a submitit job, exports RANK, WORLD_SIZE, MASTER_ADDR... for `init`.

    Returns:
        Whether this process runs in a submitit job (False: nothing exported).
    """
    import submitit

    try:
        submitit.JobEnvironment()
    except RuntimeError:  # not started by submitit
        return False
    submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=torch.cuda.is_available(), overwrite=True
    )
    return True


def init(device_name: str) -> DistContext:
    """Joins the process group the environment describes (if any) and picks this rank's device.

    Safe to call when a group already exists (it is reused) or when WORLD_SIZE is unset or 1
    (single process, no group).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if is_initialized():
        world_size = dist.get_world_size()
    device = resolve_device(device_name, local_rank)
    if world_size <= 1:
        return DistContext(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; torch would give every rank all of them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        timeout = datetime.timedelta(
            minutes=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
        )
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return DistContext(dist.get_rank(), world_size, local_rank, device)


def current(device_name: str) -> DistContext:
    """The context of an already initialised group (or a single process); never initialises."""
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return DistContext(
            dist.get_rank(),
            dist.get_world_size(),
            local_rank,
            resolve_device(device_name, local_rank),
        )
    return DistContext(device=resolve_device(device_name))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def sync_batch_norms(module: nn.Module, ctx: DistContext) -> nn.Module:
    """Every BatchNorm in `module` (student and teacher alike) becomes a SyncBatchNorm when
    several CUDA processes train, as official DINO converts its networks when the head has
    BatchNorm (`dino.batch_norm`): batch statistics are then those of the global batch.

    torch's SyncBatchNorm runs on GPUs only (a CPU input raises), so on CPU (gloo) each
    process keeps normalising its own share of the batch. The layers keep their parameters and
    buffers (same tensors, same state-dict keys); `module` is converted in place and returned.
    """
    if not (ctx.distributed and ctx.device.type == "cuda"):
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP around the trainable part only (`Method.wrap_trainable`); gradients are averaged
    over ranks, so equal shards give the gradient of the global batch's mean loss."""
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def barrier() -> None:
    """Waits for every rank (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable objects; the identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def cleanup() -> None:
    """Leaves the process group, if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reduce_metrics(
    means: Mapping[str, float | Tensor], sums: Mapping[str, float], ctx: DistContext
) -> tuple[dict[str, float | Tensor], dict[str, float]]:
    """Every rank's metrics combined into the global batch's, in one all-reduce.

    `means` are per-batch means (averaged over ranks: the global mean for equal shards);
    `sums` count things in this rank's share (images, teacher multiply-adds): summed.
    Means given as tensors come back as 0-d tensors on the device, unread (a log step reads
    them); the host's floats come back as floats, in the one read of the device this makes.
    """
    if not ctx.distributed:
        return dict(means), dict(sums)
    device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    tensors = {n: v for n, v in sorted(means.items()) if isinstance(v, Tensor)}
    floats = {n: float(v) for n, v in sorted(means.items()) if not isinstance(v, Tensor)}
    host_names = [*floats, *sorted(sums)]
    host = torch.tensor([*floats.values(), *(sums[n] for n in sorted(sums))], dtype=torch.float64)
    if device.type == "cuda":  # copied while the device still works on the step
        host = host.pin_memory().to(device, non_blocking=True)
    stacked = [t.detach().to(device, torch.float64) for t in tensors.values()]
    values = torch.cat([torch.stack(stacked), host]) if stacked else host
    dist.all_reduce(values)
    read = dict(zip(host_names, values[len(tensors) :].tolist(), strict=True))
    reduced: dict[str, float | Tensor] = {
        name: values[i] / ctx.world_size for i, name in enumerate(tensors)
    }
    reduced.update({name: read[name] / ctx.world_size for name in floats})
    return reduced, {name: read[name] for name in sums}
