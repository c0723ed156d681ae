"""Losses no dependency provides: MAE's pixel loss, DMAE's feature alignment."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def mae_pixel_loss(pred: Tensor, target: Tensor, norm_pix_loss: bool = True) -> Tensor:
    """Mean squared error over the masked patches (MAE, arXiv:2111.06377).

    Args:
        pred, target: [B, M, 3 · p²] predicted and true pixels of the M masked patches.
        norm_pix_loss: normalise each target patch by its own mean and variance (+1e-6).
    """
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return ((pred - target) ** 2).mean(dim=-1).mean()


def feature_alignment_loss(projected_student: Tensor, teacher: Tensor) -> Tensor:
    """DMAE's alignment (Bai et al., arXiv:2208.12256): L1 between L2-normalised features.

    Args:
        projected_student, teacher: [B, T, D] tokens ([CLS] included), the student's already
            projected to the teacher's width.
    """
    return F.l1_loss(F.normalize(projected_student, dim=-1), F.normalize(teacher, dim=-1))
