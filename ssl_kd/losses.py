"""Losses no dependency provides: MAE's pixel loss, DMAE's feature alignment, logit
distillation (soft and hard), ViTKD's and ScaleKD's feature terms."""

from __future__ import annotations

import math

import torch
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


def soft_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Hinton's soft-target term as MaskedKD's code weighs it (arXiv:2302.10494; DeiT's
    `DistillationLoss`, arXiv:2012.12877): τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), summed over the
    classes and averaged over the batch.

    Args:
        student_logits, teacher_logits: [B, K].
    """
    return (
        F.kl_div(
            F.log_softmax(student_logits / tau, dim=-1),
            F.log_softmax(teacher_logits / tau, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * tau**2
    )


def distribution_gap(full_logits: Tensor, masked_logits: Tensor) -> Tensor:
    """KL(softmax(full) ‖ softmax(masked)), summed over the classes and averaged over the rows:
    what a target loses when the masked teacher's distribution stands in for the full one's
    (the adaptive keep ratio's gap for DINO's and kd's targets, whose temperature and centre
    the caller applies first).

    Args:
        full_logits, masked_logits: [B, K].
    """
    return F.kl_div(
        F.log_softmax(masked_logits, dim=-1),
        F.log_softmax(full_logits, dim=-1),
        reduction="batchmean",
        log_target=True,
    ).clamp_min(0.0)  # rounding can leave a tiny negative where the two are equal


def hard_distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeiT's hard distillation: cross-entropy against the teacher's top class.

    Args:
        student_logits, teacher_logits: [B, K].
    """
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


def vitkd_mimic_loss(projected_student: Tensor, teacher: Tensor) -> Tensor:
    """ViTKD's mimicking of the shallow blocks (Yang et al., arXiv:2209.02432): squared error
    summed over blocks, tokens and channels, divided by the batch size (the official code's
    `MSELoss(reduction="sum") / B`).

    Args:
        projected_student, teacher: [B, L, N, D] patch tokens of L blocks, the student's
            already projected to the teacher's width.
    """
    return (projected_student - teacher).pow(2).sum() / projected_student.shape[0]


def vitkd_generation_loss(
    generated: Tensor, teacher: Tensor, compared: Tensor, mask_ratio: float
) -> Tensor:
    """ViTKD's generation of the deep layer: squared error on the generated (masked) tokens,
    summed, divided by the batch size and by the mask ratio λ, as the official code does.

    Args:
        generated, teacher: [B, N, D] patch tokens; compared: [B, N] 1 where a token was masked
            (and the teacher has it), else 0.
    """
    squared = (generated - teacher).pow(2) * compared.unsqueeze(-1)
    return squared.sum() / generated.shape[0] / mask_ratio


def spatial_view_loss(projected_student: Tensor, teacher: Tensor) -> Tensor:
    """ScaleKD's spatial view (Fan et al., arXiv:2411.06786; official `get_spat_loss`): each
    position's feature L2-normalised over the channels, squared error summed, / batch size.

    Args:
        projected_student, teacher: [B, D, H, W] feature maps of the teacher's shape.
    """
    diff = F.normalize(projected_student, dim=1) - F.normalize(teacher, dim=1)
    return diff.pow(2).sum() / projected_student.shape[0]


def dct_matrix(size: int, device: torch.device | None = None) -> Tensor:
    """The orthonormal DCT-II matrix [size, size]: row k is
    c_k · cos(π (2n + 1) k / (2 · size)), c_0 = √(1/size), else √(2/size)."""
    n = torch.arange(size, dtype=torch.float64, device=device)
    basis = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size))
    basis[0] *= math.sqrt(1 / size)
    basis[1:] *= math.sqrt(2 / size)
    return basis


def without_dc(features: Tensor) -> Tensor:
    """The frequency view of ScaleKD's dual-view mimicking: 2-D DCT-II over the spatial axes,
    the DC (mean) coefficient zeroed, inverse DCT, so that what the global mean carries (which
    the spatial view already dominates) is left out.

    Args:
        features: [B, D, H, W]. Returns: [B, D, H, W].
    """
    rows = dct_matrix(features.shape[-2], features.device).to(features.dtype)
    cols = dct_matrix(features.shape[-1], features.device).to(features.dtype)
    coefficients = rows @ features @ cols.T
    dc = torch.zeros_like(coefficients[..., :1, :1])
    coefficients = torch.cat(
        [torch.cat([dc, coefficients[..., :1, 1:]], dim=-1), coefficients[..., 1:, :]], dim=-2
    )
    return rows.T @ coefficients @ cols


def frequency_view_loss(
    projected_student: Tensor, teacher: Tensor, compared: Tensor | None = None
) -> Tensor:
    """ScaleKD's frequency view: `spatial_view_loss` of both maps with their DC term removed
    (`without_dc`), normalised afterwards.

    Args:
        projected_student, teacher: [B, D, H, W]; compared: [B, 1, H, W] 1 where the teacher
            has a token (a masked teacher), else 0; None: everywhere.
    """
    student, target = without_dc(projected_student), without_dc(teacher)
    if compared is not None:
        student, target = student * compared, target * compared
    return spatial_view_loss(student, target)
