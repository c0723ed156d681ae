"""ScaleKD's feature distillation on top of logit distillation, with MaskedKD's teacher masking.

ScaleKD: Fan et al., "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers",
arXiv:2411.06786 (official code: deep-optimization/ScaleKD, `FreqMaskingDistillLoss(v2)` in
mmcls/models/dis_losses, `ClassificationDistiller`). A ViT teacher, a ViT or CNN student; three
parts added to `kd`'s loss (τ = 1, 0.5 KD + 0.5 CE):
- cross-attention projector (CAP): the student's last feature map (a CNN's last stage, a ViT's
  normed patch tokens on their grid) through Conv3×3-BN-ReLU plus a learned position embedding,
  read by learned queries on the teacher's token grid (multi-head cross-attention, logits
  scaled by 1/√d × `softmax_scale` as the official `WindowMultiheadPosAttention` scales them),
  then LayerNorm and a residual FFN: the teacher's token count and width, whatever the student's;
- dual-view feature mimicking: a spatial view (channel-L2-normalised squared error, weight
  α₀ = 0.08) and a frequency view (2-D DCT, DC coefficient zeroed, inverse DCT, then the same,
  α₁ = 0.06, as the official `get_freq_loss`), each through its own projector, against the
  teacher's last tokens;
- teacher parameter perception (TPP): a third projector maps the student into the teacher's
  space before its last `tpp_depth` blocks; the frozen teacher runs them on it (gradients reach
  the student, never the teacher) and both views compare the result with the teacher's output.

Departures from the official code, said plainly: (1) it aligns two stages (the student's stages
3 and 4); here one, the student's last features, which lets a ResNet's last map alone be the
student side. (2) Its TPP runs stage 3's spatial and frequency projections through the
teacher's last stage, and stage 4's projectors take those as queries; here a third projector
enters from the last features and every projector has learned queries. (3) Its teachers are
Swin (or EVA/BEiT) models built by mmcls; here any timm ViT. (4) With a masked teacher
(MaskedKD, arXiv:2302.10494) every term is taken on the kept tokens only, which none of the
original codes has. The logged teacher cost includes TPP's forward through the teacher's last
blocks (not the backward through them, which carries the student's gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ssl_kd.config.sections import Config, check_not_negative, check_positive
from ssl_kd.errors import ConfigError
from ssl_kd.flops import flop_counter
from ssl_kd.losses import frequency_view_loss, spatial_view_loss
from ssl_kd.masking import gather_patches
from ssl_kd.methods.base import StepState
from ssl_kd.methods.kd import FeatureKD, KDConfig
from ssl_kd.methods.registry import register
from ssl_kd.methods.vitkd import scatter_patches
from ssl_kd.models.backbone import check_backbone
from ssl_kd.models.classifier import (
    Classifier,
    ClassifierOutput,
    create_timm_model,
    feature_map_of,
    is_vit_model,
)


@dataclass
class ScaleKDConfig(KDConfig):
    """The `scalekd` section: every `kd` key, and ScaleKD's projector and weights."""

    spatial_weight: float = 0.08  # α₀
    frequency_weight: float = 0.06  # α₁
    tpp_depth: int = 2  # the teacher's last blocks the projected student passes through
    num_heads: int = 8  # of the projectors' cross-attention; must divide the teacher's width
    softmax_scale: float = 5.0

    def check(self) -> None:
        self.check_keys("scalekd")
        check_not_negative(
            {"scalekd.spatial_weight": self.spatial_weight,
             "scalekd.frequency_weight": self.frequency_weight}
        )  # fmt: skip
        check_positive(
            {"scalekd.tpp_depth": self.tpp_depth, "scalekd.num_heads": self.num_heads,
             "scalekd.softmax_scale": self.softmax_scale}
        )  # fmt: skip


class CrossAttentionProjector(nn.Module):
    """Student map [B, C, h, w] → tokens [B, H·W, D] on the teacher's grid (H, W) and width D."""

    def __init__(
        self, student_dim: int, teacher_dim: int, student_grid: tuple[int, int],
        teacher_grid: tuple[int, int], num_heads: int, softmax_scale: float,
    ) -> None:  # fmt: skip
        super().__init__()
        assert teacher_dim % num_heads == 0, "checked with the config"
        self.num_heads = num_heads
        self.scale = (teacher_dim // num_heads) ** -0.5 * softmax_scale
        self.proj_student = nn.Sequential(
            nn.Conv2d(student_dim, student_dim, 3, padding=1),
            nn.BatchNorm2d(student_dim),
            nn.ReLU(),
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, student_dim, *student_grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.query = nn.Parameter(torch.randn(teacher_grid[0] * teacher_grid[1], teacher_dim))
        self.proj_query = nn.Sequential(nn.Linear(teacher_dim, teacher_dim), nn.ReLU())
        self.q = nn.Linear(teacher_dim, teacher_dim)
        self.kv = nn.Linear(student_dim, 2 * teacher_dim)
        self.out = nn.Linear(teacher_dim, teacher_dim)
        self.norm = nn.LayerNorm(teacher_dim)
        self.ffn = nn.Sequential(
            nn.Linear(teacher_dim, 4 * teacher_dim),
            nn.GELU(),
            nn.Linear(4 * teacher_dim, teacher_dim),
        )

    def forward(self, student_map: Tensor) -> Tensor:
        keys = rearrange(self.proj_student(student_map) + self.pos_embed, "b c h w -> b (h w) c")
        queries = self.q(self.proj_query(self.query)).expand(len(keys), -1, -1)  # [B, N_t, D]
        k, v = self.kv(keys).chunk(2, dim=-1)
        q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=self.num_heads) for x in (queries, k, v))
        read = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        tokens = self.norm(self.out(rearrange(read, "b h n d -> b n (h d)")))
        return tokens + self.ffn(tokens)  # mmcv's FFN: residual on its (normed) input


class ScaleKDHeads(nn.Module):
    """The three projectors: spatial view, frequency view, teacher parameter perception."""

    def __init__(self, *args: Any) -> None:
        super().__init__()
        self.spatial = CrossAttentionProjector(*args)
        self.frequency = CrossAttentionProjector(*args)
        self.perception = CrossAttentionProjector(*args)

    def forward(self, student_map: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.spatial(student_map), self.frequency(student_map), self.perception(student_map)


@register
class ScaleKD(FeatureKD):
    """`kd` with ScaleKD's projector, dual-view mimicking and TPP (see the module docstring)."""

    names = ("scalekd",)
    section = "scalekd"
    config_class = ScaleKDConfig
    default_strategy = "random"  # a CNN student has no [CLS] attention to rank patches by

    cfg: ScaleKDConfig

    @classmethod
    def check_masking(cls, cfg: Config) -> None:
        super().check_masking(cfg)  # the teacher's name, file and masking first
        scalekd: ScaleKDConfig = cfg.section(cls.section)
        if not is_vit_model(scalekd.teacher_name):
            raise ConfigError(
                f"scalekd.teacher_name={scalekd.teacher_name} is not a ViT: ScaleKD's targets "
                "and teacher parameter perception need a timm VisionTransformer teacher"
            )
        size = scalekd.teacher_img_size or cfg.data.global_crop_size
        teacher = check_backbone(scalekd.teacher_name, size, **dict(scalekd.teacher_kwargs))
        if scalekd.tpp_depth >= teacher.num_blocks:
            raise ConfigError(
                f"scalekd.tpp_depth={scalekd.tpp_depth}: the teacher {scalekd.teacher_name} has "
                f"{teacher.num_blocks} blocks and perception enters before its last tpp_depth; "
                f"use 1 to {teacher.num_blocks - 1}"
            )
        if teacher.embed_dim % scalekd.num_heads:
            raise ConfigError(
                f"scalekd.num_heads={scalekd.num_heads} does not divide the teacher's width "
                f"{teacher.embed_dim}: the projectors attend in the teacher's width; use a "
                f"divisor such as {math.gcd(teacher.embed_dim, 16)}"
            )
        check_student_map(cfg)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert self.teacher_grid is not None, "ScaleKD's teacher is a ViT (checked)"
        self.tpp_block = self.teacher.vit.num_blocks - 1 - self.cfg.tpp_depth
        self.teacher_blocks = (self.tpp_block,)
        probe = student_map(self.student, torch.zeros(1, 3, self.img_size, self.img_size))
        self.heads = ScaleKDHeads(
            probe.shape[1], self.teacher.vit.embed_dim, tuple(probe.shape[2:]),
            self.teacher_grid, self.cfg.num_heads, self.cfg.softmax_scale,
        )  # fmt: skip
        self._tpp_macs_cache: dict[int | None, int] = {}

    def teacher_macs(self, keep: int | None) -> int:
        """The teacher's forward, plus TPP's second pass through its last `tpp_depth` blocks
        (and final norm) on the projected student, on as many tokens as the teacher kept."""
        if keep not in self._tpp_macs_cache:
            assert self.teacher_grid is not None
            vit = self.teacher.vit
            patches = self.teacher_grid[0] * self.teacher_grid[1] if keep is None else keep
            param = next(self.teacher.parameters())
            tokens = torch.zeros(
                1, vit.num_prefix_tokens + patches, vit.embed_dim,
                device=param.device, dtype=param.dtype,
            )  # fmt: skip
            with torch.no_grad(), flop_counter() as counter:
                for block in vit.vit.blocks[self.tpp_block + 1 :]:
                    tokens = block(tokens)
                vit.vit.norm(tokens)
            self._tpp_macs_cache[keep] = int(counter.get_total_flops()) // 2
        return super().teacher_macs(keep) + self._tpp_macs_cache[keep]

    def feature_loss(
        self, student: ClassifierOutput, teacher: ClassifierOutput, keep_idx: Tensor | None,
        state: StepState,
    ) -> tuple[Tensor | float, dict[str, float | Tensor]]:  # fmt: skip
        assert teacher.tokens is not None and self.teacher_grid is not None
        spatial, frequency, perception = self.heads_call(student_map_of(self.student, student))
        num_patches = spatial.shape[1]
        prefix = self.teacher.vit.num_prefix_tokens
        target, seen = scatter_patches(teacher.tokens[:, prefix:].float(), keep_idx, num_patches)

        # TPP: the teacher's last blocks run on the projected student (kept patches only).
        entry = teacher.block_outputs[self.tpp_block]  # [B, P + k, D_t]
        projected = perception if keep_idx is None else gather_patches(perception, keep_idx, 0)
        tokens = torch.cat([entry[:, :prefix].to(projected.dtype), projected], dim=1)
        for block in self.teacher.vit.vit.blocks[self.tpp_block + 1 :]:
            tokens = block(tokens)
        perceived, _ = scatter_patches(
            self.teacher.vit.vit.norm(tokens)[:, prefix:].float(), keep_idx, num_patches
        )

        visible = seen.unsqueeze(-1).float()  # only the tokens the teacher kept are compared
        h, w = self.teacher_grid

        def grid(tokens: Tensor) -> Tensor:
            return rearrange(tokens.float() * visible, "b (h w) d -> b d h w", h=h, w=w)

        mask = grid(torch.ones_like(target[..., :1]))
        terms = {
            "spatial_loss": spatial_view_loss(grid(spatial), grid(target)),
            "frequency_loss": frequency_view_loss(grid(frequency), grid(target), mask),
            "tpp_spatial_loss": spatial_view_loss(grid(perceived), grid(target)),
            "tpp_frequency_loss": frequency_view_loss(grid(perceived), grid(target), mask),
        }
        loss = self.cfg.spatial_weight * (terms["spatial_loss"] + terms["tpp_spatial_loss"])
        loss = loss + self.cfg.frequency_weight * (
            terms["frequency_loss"] + terms["tpp_frequency_loss"]
        )
        return loss, {name: term.detach() for name, term in terms.items()}


def check_student_map(cfg: Config) -> None:
    """A student that is not a ViT must give a feature map [B, C, h, w] (a CNN's last stage):
    checked on the meta device, before any work."""
    if is_vit_model(cfg.model.name):
        return  # its patch tokens, on their grid
    size = cfg.data.global_crop_size
    with torch.device("meta"):
        model: Any = create_timm_model(cfg.model.name, **dict(cfg.model.kwargs)).eval()
        try:
            features = model.forward_features(torch.empty(1, 3, size, size))
        except (RuntimeError, ValueError, AssertionError) as err:
            raise ConfigError(
                f"model.name={cfg.model.name} cannot run on data.global_crop_size={size} crops: "
                f"{err}"
            ) from None
    if feature_map_of(model, features) is None:
        raise ConfigError(
            f"model.name={cfg.model.name} gives {list(features.shape)} from its last stage, not "
            f"a feature map [B, {model.num_features}, h, w]: ScaleKD's projectors read a CNN's "
            "last feature map or a ViT's patch tokens; use a CNN (e.g. resnet50) or a ViT"
        )


def student_map_of(student: Classifier, out: ClassifierOutput) -> Tensor:
    """The student's last features as a map [B, C, h, w]: a CNN's last stage, or a ViT's
    normed patch tokens on their grid."""
    if out.feature_map is not None:
        return out.feature_map
    assert out.tokens is not None, "a ViT student returns its tokens"
    patches = out.tokens[:, student.vit.num_prefix_tokens :]
    side = int(patches.shape[1] ** 0.5)
    return rearrange(patches, "b (h w) d -> b d h w", h=side, w=patches.shape[1] // side)


def student_map(student: Classifier, images: Tensor) -> Tensor:
    """The student's feature map on `images`, in eval mode, without gradients (its shape)."""
    training = student.training
    student.eval()
    with torch.no_grad():
        out = student(images.to(next(student.parameters()).device))
    student.train(training)
    return student_map_of(student, out)
