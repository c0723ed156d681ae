"""Position embeddings as the original methods build and resample them.

MAE (He et al., arXiv:2111.06377) fixes its encoder's and decoder's position embeddings to a
2-D sine-cosine table that is never trained: `sincos_2d_table`, `fix_sincos_pos_embed`.

DINO (Caron et al., arXiv:2104.14294) learns a table for the 224-px grid and resamples it for
the 96-px local crops: bicubic by a scale factor computed from the target grid plus 0.1, no
antialiasing (`resample_like_dino`). timm resamples to the target size with antialiasing; on a
96-px crop of a ViT-S/16 the two give [CLS] outputs about 2% apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# How a backbone resamples its position embedding for a grid other than its own.
# The option values name the code each follows: official DINO's resampling, or timm's.
DINO_INTERPOLATION, TIMM_INTERPOLATION = "dino", "timm"
INTERPOLATIONS = (DINO_INTERPOLATION, TIMM_INTERPOLATION)


def sincos_2d_table(dim: int, grid: tuple[int, int]) -> Tensor:
    """MAE's fixed 2-D sine-cosine position embedding, without prefix rows.

    The first half of the channels encodes a patch's column, the second half its row, each as
    [sin(p·ω), cos(p·ω)] with ω_i = 10000^(-i / (dim/4)), i < dim/4; computed in float64 as MAE
    does, then rounded to float32.

    Args:
        dim: embedding width, a multiple of 4.
        grid: (rows, columns) of patches.

    Returns:
        [rows · columns, dim], patches in row-major order.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {dim}")
    rows, columns = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    row, column = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64),
        torch.arange(columns, dtype=torch.float64),
        indexing="ij",
    )

    def encode(position: Tensor) -> Tensor:  # [rows, columns] → [rows · columns, dim / 2]
        angles = position.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(column), encode(row)], dim=1).float()


def fix_sincos_pos_embed(pos_embed: nn.Parameter, grid: tuple[int, int]) -> None:
    """Fills `pos_embed` [1, P + rows · columns, D] with MAE's table (zeros in the P prefix
    rows, e.g. [CLS]) and freezes it, as MAE does: it is never trained nor weight-decayed."""
    table = sincos_2d_table(pos_embed.shape[-1], grid)
    prefix_rows = pos_embed.shape[1] - table.shape[0]
    with torch.no_grad():
        pos_embed.zero_()
        pos_embed[0, prefix_rows:] = table.to(pos_embed)
    pos_embed.requires_grad_(False)


def resample_like_dino(
    table: Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> Tensor:
    """Official DINO's resampling of a patch position table for another grid.

    Bicubic (align_corners=False, no antialiasing) by the scale factor (target + 0.1) / source
    per side: the factor, not the target size, sets where the samples fall, and DINO's +0.1
    keeps floor(source · factor) at the target size despite rounding.

    Args:
        table: [1, source_rows · source_columns, D] patch rows only (no prefix rows).

    Returns:
        [1, target_rows · target_columns, D] in the dtype of `table`.
    """
    (rows, columns), (new_rows, new_columns) = source_grid, target_grid
    image = rearrange(table.float(), "1 (h w) d -> 1 d h w", h=rows, w=columns)
    resampled = F.interpolate(
        image,
        scale_factor=((new_rows + 0.1) / rows, (new_columns + 0.1) / columns),
        mode="bicubic",
        align_corners=False,
    )
    if resampled.shape[-2:] != (new_rows, new_columns):  # cannot happen for integer grids
        raise RuntimeError(f"resampled to {tuple(resampled.shape[-2:])}, not {target_grid}")
    return rearrange(resampled, "1 d h w -> 1 (h w) d").to(table.dtype)
