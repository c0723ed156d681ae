"""Pictures of what a ViT attends to and which patches a masked teacher sees (pure tensor code).

Every function takes images in [0, 1] and returns images in [0, 1]; nothing reads the config.
Rows built by `attention_panels`: the image, the last-block [CLS] attention of each head, its
mean over heads, and the teacher's input (kept patches as they are, dropped ones dimmed).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

# An inferno-like colour ramp (dark → purple → red → orange → pale yellow), as RGB in [0, 1].
RAMP = torch.tensor(
    [
        [0.0, 0.0, 0.02],
        [0.34, 0.06, 0.43],
        [0.73, 0.21, 0.33],
        [0.98, 0.55, 0.04],
        [0.99, 1.0, 0.64],
    ]
)
DROPPED_BRIGHTNESS = 0.2  # a patch the teacher does not see keeps 20% of its brightness


def colormap(values: Tensor) -> Tensor:
    """values [..., H, W] in [0, 1] → colours [..., 3, H, W] (piecewise-linear ramp)."""
    position = values.clamp(0, 1) * (len(RAMP) - 1)
    low = position.floor().long().clamp(max=len(RAMP) - 2)
    frac = (position - low).unsqueeze(-1)  # [..., H, W, 1]
    ramp = RAMP.to(values.device)
    colours = ramp[low] * (1 - frac) + ramp[low + 1] * frac  # [..., H, W, 3]
    return colours.movedim(-1, -3)


def upsample_patches(values: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """Per-patch values [..., N] → per-pixel [..., h·p, w·p], each patch a constant square."""
    h, w = grid
    squares = values.reshape(*values.shape[:-1], h, w)
    return squares.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)


def attention_overlay(
    images: Tensor, attention: Tensor, grid: tuple[int, int], patch: int, alpha: float = 0.6
) -> Tensor:
    """Each map scaled to [0, 1] (min–max per map), coloured and blended over its image.

    Args:
        images: [B, 3, H, W] in [0, 1], H = h·p, W = w·p.
        attention: [B, M, N] maps (e.g. M heads) over the N = h·w patches.

    Returns:
        [B, M, 3, H, W].
    """
    low = attention.amin(dim=-1, keepdim=True)
    high = attention.amax(dim=-1, keepdim=True)
    scaled = (attention - low) / (high - low).clamp_min(1e-12)
    colours = colormap(upsample_patches(scaled, grid, patch))  # [B, M, 3, H, W]
    return (1 - alpha) * images.unsqueeze(1) + alpha * colours


def keep_mask(keep_idx: Tensor, num_patches: int) -> Tensor:
    """keep_idx [B, k] → [B, N] bool, True where the teacher sees the patch."""
    mask = torch.zeros(keep_idx.shape[0], num_patches, dtype=torch.bool, device=keep_idx.device)
    return mask.scatter(1, keep_idx, True)


def teacher_view(images: Tensor, keep_idx: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """The masked teacher's input: kept patches unchanged, the others dimmed.

    Args:
        images: [B, 3, H, W] in [0, 1]; keep_idx: [B, k] patch indices (masking.select).

    Returns:
        [B, 3, H, W].
    """
    kept = keep_mask(keep_idx, grid[0] * grid[1]).float()
    pixels = upsample_patches(kept, grid, patch).unsqueeze(1)  # [B, 1, H, W]
    return images * (pixels + (1 - pixels) * DROPPED_BRIGHTNESS)


def attention_panels(
    images: Tensor, attention: Tensor, keep_idx: Tensor, grid: tuple[int, int], patch: int
) -> Tensor:
    """One row per image: image, each head's attention, mean over heads, teacher input.

    Args:
        images: [B, 3, H, W] in [0, 1]; attention: [B, heads, N]; keep_idx: [B, k].

    Returns:
        [B, heads + 3, 3, H, W].
    """
    maps = torch.cat([attention, attention.mean(dim=1, keepdim=True)], dim=1)
    overlays = attention_overlay(images, maps.float(), grid, patch)
    view = teacher_view(images, keep_idx, grid, patch)
    return torch.cat([images.unsqueeze(1), overlays, view.unsqueeze(1)], dim=1)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int]) -> Tensor:
    """[B, N, p²·3] (lightly's patchify layout) → [B, 3, H, W]."""
    return rearrange(
        patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch, q=patch
    )
