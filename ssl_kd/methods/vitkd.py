"""ViTKD's feature distillation on top of logit distillation, with MaskedKD's teacher masking.

ViTKD: Yang et al., "ViTKD: Practical Guidelines for ViT feature knowledge distillation",
arXiv:2209.02432 (official code: yzd-v/cls_KD, `ViTKDLoss`). Two terms added to `kd`'s loss:
- mimicking: the patch tokens of student blocks 0 and 1 (raw block outputs), each through its
  own Linear to the teacher's width, match the teacher's blocks 0 and 1 (squared error summed,
  divided by the batch size, weight α = 3e-5);
- generation: the student's last patch tokens (after the final norm) through a Linear, a random
  λ = 0.5 of them replaced by a learned mask token, through Conv3×3-ReLU-Conv3×3 on the patch
  grid, match the teacher's last tokens on the masked positions (summed, / batch / λ, β = 3e-6).

With masking.keep_ratio < 1 the teacher has tokens only for the patches it saw (MaskedKD,
arXiv:2302.10494): both terms are taken on those tokens alone, summed as the official code sums,
so they shrink with the keep ratio. The paper pairs ViTKD with NKD; here the logit term is
`kd`'s (soft KL or hard distillation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from ssl_kd.config.sections import Config, check_not_negative
from ssl_kd.errors import ConfigError
from ssl_kd.losses import vitkd_generation_loss, vitkd_mimic_loss
from ssl_kd.masking import complement, gather_patches, select
from ssl_kd.methods.base import StepState
from ssl_kd.methods.kd import FeatureKD, KDConfig
from ssl_kd.methods.registry import register
from ssl_kd.models.backbone import check_backbone
from ssl_kd.models.classifier import ClassifierOutput, is_vit_model


@dataclass
class VitKDConfig(KDConfig):
    """The `vitkd` section: every `kd` key, and ViTKD's weights (the official defaults)."""

    mimic_blocks: list[int] = field(default_factory=lambda: [0, 1])  # shallow blocks mimicked
    mimic_weight: float = 3e-5  # α (alpha_vitkd)
    generation_weight: float = 3e-6  # β (beta_vitkd)
    generation_mask_ratio: float = 0.5  # λ (lambda_vitkd)

    def check(self) -> None:
        self.check_keys("vitkd")
        check_not_negative(
            {"vitkd.mimic_weight": self.mimic_weight,
             "vitkd.generation_weight": self.generation_weight}
        )  # fmt: skip
        if not 0.0 < self.generation_mask_ratio < 1.0:
            raise ConfigError(
                f"vitkd.generation_mask_ratio={self.generation_mask_ratio} must lie in (0, 1)"
            )
        if not self.mimic_blocks or min(self.mimic_blocks) < 0:
            raise ConfigError(
                f"vitkd.mimic_blocks={self.mimic_blocks} must be 0-based block indices, e.g. [0, 1]"
            )


class ViTKDHeads(nn.Module):
    """What ViTKD trains besides the student: one projection per mimicked block, the
    generation's projection, mask token and Conv3×3-ReLU-Conv3×3 (identity projections when the
    widths are equal, as in the official code)."""

    def __init__(
        self, student_dim: int, teacher_dim: int, mimic_blocks: int, grid: tuple[int, int]
    ) -> None:
        super().__init__()
        self.grid = grid

        def projection() -> nn.Module:
            if student_dim == teacher_dim:
                return nn.Identity()
            return nn.Linear(student_dim, teacher_dim)

        self.mimic = nn.ModuleList(projection() for _ in range(mimic_blocks))
        self.align = projection()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, teacher_dim))
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_dim, teacher_dim, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_dim, teacher_dim, kernel_size=3, padding=1),
        )

    def forward(self, shallow: list[Tensor], last: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
        """shallow: per mimicked block, student patch tokens [B, n, D_s]; last: the student's
        last patch tokens [B, N, D_s]; masked: [B, N] bool, the tokens to generate →
        (projected shallow tokens [B, L, n, D_t], generated tokens [B, N, D_t])."""
        mimicked = torch.stack(
            [project(tokens) for project, tokens in zip(self.mimic, shallow, strict=True)], dim=1
        )
        tokens = self.align(last)
        tokens = torch.where(masked.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        grid = rearrange(tokens, "b (h w) d -> b d h w", h=self.grid[0], w=self.grid[1])
        generated = rearrange(self.generation(grid), "b d h w -> b (h w) d")
        return mimicked, generated


@register
class ViTKD(FeatureKD):
    """`kd` with ViTKD's mimicking and generation terms (see the module docstring)."""

    names = ("vitkd",)
    section = "vitkd"
    config_class = VitKDConfig

    cfg: VitKDConfig

    @classmethod
    def check_masking(cls, cfg: Config) -> None:
        super().check_masking(cfg)  # the teacher's name, file and masking first
        vitkd: VitKDConfig = cfg.section(cls.section)
        for key, name in (
            ("model.name", cfg.model.name),
            ("vitkd.teacher_name", vitkd.teacher_name),
        ):
            if not is_vit_model(name):
                raise ConfigError(f"{key}={name} is not a ViT: ViTKD distils ViT tokens")
        size = cfg.data.global_crop_size
        teacher_size = vitkd.teacher_img_size or size
        student = check_backbone(cfg.model.name, cfg.model.img_size, **dict(cfg.model.kwargs))
        teacher = check_backbone(vitkd.teacher_name, teacher_size, **dict(vitkd.teacher_kwargs))
        if student.grid(size) != teacher.grid(teacher_size):
            raise ConfigError(
                f"ViTKD matches student and teacher tokens one to one: the student's patch grid "
                f"{student.grid(size)} differs from the teacher's {teacher.grid(teacher_size)}"
            )
        deepest = max(vitkd.mimic_blocks)
        if deepest >= min(student.num_blocks, teacher.num_blocks):
            raise ConfigError(
                f"vitkd.mimic_blocks={vitkd.mimic_blocks}: the student has "
                f"{student.num_blocks} blocks, the teacher {teacher.num_blocks}"
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert self.student_grid is not None, "ViTKD's student is a ViT (checked)"
        self.student_blocks = self.teacher_blocks = tuple(self.cfg.mimic_blocks)
        self.heads = ViTKDHeads(
            self.student.vit.embed_dim, self.teacher.vit.embed_dim, len(self.student_blocks),
            self.student_grid,
        )  # fmt: skip

    def feature_loss(
        self, student: ClassifierOutput, teacher: ClassifierOutput, keep_idx: Tensor | None,
        state: StepState,
    ) -> tuple[Tensor | float, dict[str, float | Tensor]]:  # fmt: skip
        prefix = self.student.vit.num_prefix_tokens
        assert student.tokens is not None and teacher.tokens is not None
        last = student.tokens[:, prefix:]  # [B, N, D_s] after the final norm
        batch, num_patches = last.shape[:2]
        shallow = []
        for block in self.student_blocks:
            tokens = student.block_outputs[block]  # [B, P + N, D_s], raw
            if keep_idx is not None:  # only the patches the teacher saw have a target
                tokens = gather_patches(tokens, keep_idx, prefix)
            shallow.append(tokens[:, prefix:])

        # ViTKD's generation mask (1 = generated), drawn from the step's generator.
        visible = select(
            None, int(num_patches * (1 - self.cfg.generation_mask_ratio)), "random",
            num_patches=num_patches, batch_size=batch, generator=state.generator,
            device=last.device, shard=state.shard,
        )  # fmt: skip
        masked = torch.zeros(batch, num_patches, dtype=torch.bool, device=last.device)
        masked.scatter_(1, complement(visible, num_patches), True)
        mimicked, generated = self.heads_call(shallow, last, masked)

        teacher_prefix = self.teacher.vit.num_prefix_tokens
        teacher_shallow = torch.stack(
            [teacher.block_outputs[block][:, teacher_prefix:] for block in self.teacher_blocks],
            dim=1,
        ).float()  # [B, L, k, D_t]
        target, seen = scatter_patches(teacher.tokens[:, teacher_prefix:], keep_idx, num_patches)
        mimic = vitkd_mimic_loss(mimicked.float(), teacher_shallow)
        generation = vitkd_generation_loss(
            generated.float(), target.float(), (masked & seen).float(),
            self.cfg.generation_mask_ratio,
        )  # fmt: skip
        loss = self.cfg.mimic_weight * mimic + self.cfg.generation_weight * generation
        return loss, {"mimic_loss": mimic.detach(), "generation_loss": generation.detach()}


def scatter_patches(
    tokens: Tensor, keep_idx: Tensor | None, num_patches: int
) -> tuple[Tensor, Tensor]:
    """Kept patch tokens [B, k, D] back on the full grid: ([B, N, D] with zeros where no token
    was kept, [B, N] bool: which positions hold one). keep_idx None: all N were kept."""
    batch = tokens.shape[0]
    if keep_idx is None:
        return tokens, torch.ones(batch, num_patches, dtype=torch.bool, device=tokens.device)
    full = tokens.new_zeros(batch, num_patches, tokens.shape[-1])
    full.scatter_(1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens)
    seen = torch.zeros(batch, num_patches, dtype=torch.bool, device=tokens.device)
    seen.scatter_(1, keep_idx, True)
    return full, seen
