"""Losses no dependency provides: MAE's pixel loss, DMAE's feature alignment, logit
distillation (soft and hard)."""

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


def hard_distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeiT's hard distillation: cross-entropy against the teacher's top class.

    Args:
        student_logits, teacher_logits: [B, K].
    """
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
