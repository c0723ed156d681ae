"""The one masking module: which patches a teacher (or an MAE encoder) sees.

Shared by DINO with student-guided teacher masking (MaskedKD, Son et al., arXiv:2302.10494) and
by MAE/DMAE random masking (He et al., arXiv:2111.06377; Bai et al., arXiv:2208.12256).

All indices here are *patch-space*: 0..N-1 over the patch grid in row-major order, with no
prefix tokens. `to_sequence_index` converts to sequence space ([CLS] at 0) for lightly parts.
Pure functions: nothing here reads the config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

STRATEGIES = ("attention_topk", "random", "attention_bottomk", "block")


def num_kept(num_patches: int, keep_ratio: float) -> int:
    """Number of patches kept for a ratio; the one rounding rule used everywhere.

    Rounds half up (196 × 0.5 → 98, 196 × 0.87 = 170.52 → 171) and keeps at least one patch.

    Raises:
        ValueError: if the ratio is outside (0, 1].
    """
    if not 0.0 < keep_ratio <= 1.0:  # NaN fails this too
        raise ValueError(
            f"keep_ratio={keep_ratio} is impossible: it must lie in (0, 1] (1.0 keeps all patches)"
        )
    return min(num_patches, max(1, math.floor(num_patches * keep_ratio + 0.5)))


def select(
    scores: Tensor | None,
    keep: int,
    strategy: str,
    *,
    num_patches: int | None = None,
    grid: tuple[int, int] | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Tensor:
    """Chooses `keep` patches per sample.

    Args:
        scores: [B, N] saliency per patch (e.g. the student's [CLS] attention); required by the
            attention strategies, ignored by `random` and `block`.
        keep: patches to keep per sample, 1 <= keep <= N.
        strategy: `attention_topk` (MaskedKD), `attention_bottomk` (ablation), `random` (MAE),
            `block` (one compact random region, ablation).
        num_patches, batch_size, device: N, B and device when `scores` is None.
        grid: (h, w) patch grid, required by `block`; h * w = N.
        generator: seeded generator for the random strategies.
        shard: (rank, world_size) for the random strategies: the draw is made for
            world_size × B rows and this rank keeps rows rank, rank + world_size, ... (the rows
            its samples have in the global batch), so a sample's mask does not depend on how the
            batch is split over ranks.

    Returns:
        keep_idx: [B, keep] int64 patch indices, unique per row and sorted ascending, so kept
        tokens stay in raster order.
    """
    if scores is not None:
        batch_size, num_patches = scores.shape
        device = scores.device
    if batch_size is None or num_patches is None:
        raise ValueError("select() needs scores, or batch_size and num_patches")
    if not 1 <= keep <= num_patches:
        raise ValueError(f"cannot keep {keep} of {num_patches} patches: need 1 <= keep <= N")
    if strategy in ("attention_topk", "attention_bottomk"):
        if scores is None:
            raise ValueError(f"strategy {strategy!r} needs attention scores")
        largest = strategy == "attention_topk"
        keep_idx = scores.float().topk(keep, dim=1, largest=largest, sorted=False).indices
    elif strategy == "random":
        rank, world_size = shard
        # Drawn on the CPU: the step generator is a CPU generator, also when training on CUDA.
        noise = torch.rand(batch_size * world_size, num_patches, generator=generator)
        keep_idx = noise[rank::world_size].to(device).argsort(dim=1)[:, :keep]
    elif strategy == "block":
        if grid is None or grid[0] * grid[1] != num_patches:
            raise ValueError(f"strategy 'block' needs grid=(h, w) with h * w = {num_patches}")
        keep_idx = _block(batch_size, keep, grid, generator, device, shard)
    else:
        raise ValueError(f"unknown masking strategy {strategy!r}; choose one of {STRATEGIES}")
    return keep_idx.sort(dim=1).values


def _block(
    batch_size: int,
    keep: int,
    grid: tuple[int, int],
    generator: torch.Generator | None,
    device: torch.device | str | None,
    shard: tuple[int, int] = (0, 1),
) -> Tensor:
    """One random rectangle per sample: ceil(sqrt(k)) columns wide, filled row by row to k."""
    h, w = grid
    cols = min(math.ceil(math.sqrt(keep)), w)
    rows = math.ceil(keep / cols)
    rank, world_size = shard
    rows_drawn = (batch_size * world_size, 1)
    top = torch.randint(0, h - rows + 1, rows_drawn, generator=generator)[rank::world_size]
    left = torch.randint(0, w - cols + 1, rows_drawn, generator=generator)[rank::world_size]
    top, left = top.to(device), left.to(device)
    patch_row = torch.arange(h, device=device).repeat_interleave(w)  # [N]
    patch_col = torch.arange(w, device=device).repeat(h)
    inside = (
        (patch_row >= top)
        & (patch_row < top + rows)
        & (patch_col >= left)
        & (patch_col < left + cols)
    )
    order = ((patch_row - top) * cols + (patch_col - left)).float()  # raster order inside
    order = torch.where(inside, order, torch.full_like(order, float("inf")))
    return order.topk(keep, dim=1, largest=False).indices


def interpolate_scores(
    scores: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> Tensor:
    """Resamples patch scores between grids (bilinear), e.g. for a teacher with another patch size.

    Args:
        scores: [B, h_src * w_src].

    Returns:
        [B, h_dst * w_dst].
    """
    if tuple(src_grid) == tuple(dst_grid):
        return scores
    batch_size = scores.shape[0]
    grid_scores = scores.reshape(batch_size, 1, *src_grid).float()
    resized = F.interpolate(grid_scores, size=dst_grid, mode="bilinear", align_corners=False)
    return resized.reshape(batch_size, -1).to(scores.dtype)


def complement(keep_idx: Tensor, num_patches: int) -> Tensor:
    """Sorted patch indices not in keep_idx: [B, k] → [B, N - k]."""
    batch = keep_idx.shape[0]
    masked = torch.ones(batch, num_patches, dtype=torch.bool, device=keep_idx.device)
    masked.scatter_(1, keep_idx, False)
    index = torch.arange(num_patches, device=keep_idx.device).expand(batch, -1)
    return index[masked].reshape(batch, num_patches - keep_idx.shape[1])


def gather_patches(tokens: Tensor, keep_idx: Tensor, num_prefix_tokens: int) -> Tensor:
    """Keeps the prefix tokens and the patch tokens at `keep_idx`.

    Args:
        tokens: [B, P + N, D]; keep_idx: [B, k] patch-space indices.

    Returns:
        [B, P + k, D].
    """
    prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
    index = keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.cat([prefix, patches.gather(1, index)], dim=1)


def to_sequence_index(keep_idx: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Patch-space indices → sequence-space indices with the prefix tokens first (lightly's layout).

    Args:
        keep_idx: [B, k] patch indices.

    Returns:
        [B, num_prefix_tokens + k]: 0..P-1 for the prefix tokens, then keep_idx + P.
    """
    batch_size = keep_idx.shape[0]
    prefix = torch.arange(num_prefix_tokens, device=keep_idx.device).expand(batch_size, -1)
    return torch.cat([prefix, keep_idx + num_prefix_tokens], dim=1)


def keep_ratio_schedule(
    final: float, start: float | None, warmup_steps: int, total_steps: int
) -> Tensor:
    """Per-iteration keep ratio: linear from `start` to `final` over the warm-up, then constant."""
    schedule = torch.full((total_steps,), float(final), dtype=torch.float64)
    if start is not None and warmup_steps > 0:
        warmup = min(warmup_steps, total_steps)
        schedule[:warmup] = torch.linspace(start, final, warmup_steps, dtype=torch.float64)[:warmup]
    return schedule
