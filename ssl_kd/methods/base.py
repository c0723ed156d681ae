"""The contract every method fulfils; the trainer knows nothing else about a method."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class StepState:
    """Where training is, and this iteration's value of every method schedule."""

    step: int
    epoch: int
    values: dict[str, float] = field(default_factory=dict)
    generator: torch.Generator | None = None
    # (rank, world_size): random masks are drawn for the global batch and sliced per rank
    # (`masking.select(shard=...)`), so a sample's mask does not depend on the world size.
    shard: tuple[int, int] = (0, 1)


class Method(nn.Module):
    """A method owns its networks, heads and loss; the trainer only drives it.

    Subclasses implement `forward(batch, state) -> {"loss": Tensor, <metric>: float, ...}`.
    A metric named `teacher_macs` (and `teacher_macs_unmasked`) is the teacher's multiply-adds in
    this step; the trainer accumulates it into the cost logs.
    """

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, Tensor]:
        """Method-specific per-iteration schedules (e.g. teacher momentum, temperature)."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups; `apply_wd=False` groups get no weight decay (biases, norms)."""
        return param_groups_without_wd_on_1d(self.trainable_module())

    # Subclasses set `self.student` (everything trained), call it through `self._student_call`
    # and may hold a `self.teacher` (EMA or frozen), which stays in eval mode.
    student: nn.Module

    @property
    def _student_call(self) -> nn.Module:
        """The student's forward: the DDP wrapper once `wrap_trainable` ran, else the student."""
        return self.__dict__.get("_student_wrapper", self.student)

    def trainable_module(self) -> nn.Module:
        """What DDP wraps: never an EMA or frozen teacher."""
        return self.student

    def wrap_trainable(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Routes the student's forward through a wrapper (DDP) without changing its weights.

        The wrapper is kept out of the registered submodules, so the state dict holds the
        student once, without a `module.` copy, and checkpoints load with or without DDP.
        """
        self.__dict__["_student_wrapper"] = wrap(self.student)

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.eval()  # a teacher never drops paths or tokens
        return self

    def before_optimizer_step(self, state: StepState) -> dict[str, float]:
        """Gradient hooks (clipping, frozen layers); returns metrics such as the grad norm."""
        return {}

    @torch.no_grad()
    def update_teacher(self, state: StepState) -> None:
        """EMA update or nothing."""

    picture_every_steps: int = 0  # how often the trainer asks for `pictures`; 0: never

    def pictures(self, views: list[Tensor], state: StepState) -> dict[str, Tensor]:
        """Images for TensorBoard, tag → [3, H, W] in [0, 1]."""
        return {}

    def export_backbone(self) -> nn.Module:
        """The backbone to evaluate and export (a `ViTBackbone`)."""
        raise NotImplementedError


def param_groups_without_wd_on_1d(module: nn.Module) -> list[dict[str, Any]]:
    """Two groups: weights with decay; biases and norm parameters (ndim ≤ 1) without."""
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for _name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "apply_wd": True},
        {"params": no_decay, "apply_wd": False},
    ]


def clip_gradients_per_parameter(parameters: list[Tensor], clip: float) -> float:
    """DINO's clipping: each parameter's gradient norm is clipped to `clip` on its own.

    Returns:
        The total gradient norm before clipping (for logging).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms)).item()
    if clip > 0:
        for grad, norm in zip(grads, norms, strict=True):
            coef = clip / (norm + 1e-6)
            grad.mul_(coef.clamp(max=1.0))
    return total
