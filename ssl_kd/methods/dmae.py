"""MAE pretraining, and DMAE: MAE with feature distillation from a frozen, larger MAE teacher.

MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377.
DMAE: Bai et al., "Masked Autoencoders Enable Efficient Knowledge Distillers", arXiv:2208.12256.

The teacher sees exactly the student's visible patches and runs only blocks 0..j for the deepest
aligned block j: no later block, no decoder, no head. With `teacher_keep_ratio < 1` it sees only
the visible patches the student's last-block [CLS] attention ranks highest (the DMAE counterpart
of MaskedKD), and the alignment covers just those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from lightly.models.utils import patchify
from torch import Tensor, nn
from torchvision.utils import make_grid

from ssl_kd.config.sections import (
    Config,
    MaskingConfig,
    check_choice,
    check_file,
    check_not_negative,
    check_positive,
    check_ratio,
)
from ssl_kd.data import Views
from ssl_kd.data.transforms import to_unit_range
from ssl_kd.errors import ConfigError, UserError, key_list
from ssl_kd.flops import forward_macs
from ssl_kd.losses import feature_alignment_loss, mae_pixel_loss
from ssl_kd.masking import complement, gather_patches, num_kept, select
from ssl_kd.methods.base import (
    KeepRatioSchedule,
    Method,
    StepOutput,
    StepState,
    adaptive_controller,
    masking_strategy,
)
from ssl_kd.methods.registry import register
from ssl_kd.models.backbone import ViTBackbone, check_backbone, create_backbone
from ssl_kd.models.heads import PROJECTIONS, MAEDecoder, alignment_projection
from ssl_kd.models.mae_init import init_like_mae
from ssl_kd.models.networks import MAEStudent
from ssl_kd.models.weights import load_backbone_weights
from ssl_kd.visualize import unpatchify


@dataclass
class DmaeConfig:
    """The `dmae` section: MAE pretraining (method=mae) and DMAE distillation (method=dmae)."""

    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    teacher_name: str = "vit_large_patch16_224"  # any timm ViT with the student's patch grid
    teacher_checkpoint: str | None = None  # local file: MAE release, timm state dict, ssl_kd run
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    # (student block, teacher block) pairs, 0-based; the teacher stops after the deepest one.
    aligned_blocks: list[list[int]] = field(default_factory=lambda: [[8, 17]])
    projection: str = "linear"
    distill_weight: float = 1.0  # times the sum of the pairs' alignment losses
    # Fraction of the student's visible patches the teacher sees (top of the student's [CLS]
    # attention); 1.0: all visible patches, as in DMAE.
    teacher_keep_ratio: float = 1.0
    recon_images_every_steps: int = 0  # reconstruction pictures to TensorBoard; 0: never

    def check(self) -> None:
        check_choice("dmae.projection", self.projection, PROJECTIONS)
        check_ratio("dmae.teacher_keep_ratio", self.teacher_keep_ratio)
        check_positive(
            {
                "dmae.decoder_dim": self.decoder_dim,
                "dmae.decoder_depth": self.decoder_depth,
                "dmae.decoder_heads": self.decoder_heads,
            }
        )
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(
                f"dmae.decoder_dim={self.decoder_dim} is not divisible by dmae.decoder_heads="
                f"{self.decoder_heads}"
            )
        check_not_negative(
            {
                "dmae.distill_weight": self.distill_weight,
                "dmae.recon_images_every_steps": self.recon_images_every_steps,
            }
        )


@register
class DMAE(Method):
    """MAE (teacher=None) or DMAE (a frozen teacher backbone given).

    `method: mae` trains the encoder and decoder alone; `method: dmae` adds the alignment to
    the frozen teacher of `dmae.teacher_checkpoint`. Both read the `dmae` section.

    Args:
        encoder: the student encoder; teacher: frozen pretrained backbone or None (plain MAE).
        cfg: the `dmae` section; masking: the `masking` section (keep ratio of the encoder).
        img_size: input size.
    """

    names = ("mae", "dmae")
    section = "dmae"
    config_class = DmaeConfig
    views = Views.SINGLE_CROP  # MAE: one random resized crop, no multi-crop
    default_keep_ratio = 0.25  # MAE's 75% masking
    default_tolerance = 0.04  # masking.adaptive: the gap at teacher keep 0.5 (calibration.py)
    default_strategy = "random"
    # The frozen teacher is not in the state dict: the encoder is what a run exports.
    backbones: ClassVar[dict[str, str]] = {"student": "student.encoder"}
    default_backbone = "student"

    student: MAEStudent
    teacher: ViTBackbone | None

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        dmae: DmaeConfig = cfg.section(cls.section)
        strategy = cfg.masking.strategy
        if strategy is not None and strategy.startswith("attention"):
            raise ConfigError(
                f"masking.strategy={strategy} needs a student attention map, which "
                f"{cfg.method}'s encoder mask is drawn before; use random (or block). The DMAE "
                "teacher's own top-k is dmae.teacher_keep_ratio"
            )
        if cfg.masking.keep_ratio == 1.0:
            raise ConfigError(
                f"masking.keep_ratio=1.0 leaves nothing for {cfg.method} to reconstruct; "
                "use 0.25 (MAE, DMAE) or 0.05"
            )
        if not cls.distils(cfg):
            return
        if not dmae.teacher_checkpoint:
            raise ConfigError(
                "dmae.teacher_checkpoint is not set: DMAE distils from a frozen pretrained MAE "
                "teacher; point it at a local checkpoint (MAE release, timm state dict or an "
                "ssl_kd run's checkpoint.pth)"
            )
        check_file("dmae.teacher_checkpoint", dmae.teacher_checkpoint)
        pairs = dmae.aligned_blocks
        if not pairs or any(len(pair) != 2 or min(pair) < 0 for pair in pairs):
            raise ConfigError(
                f"dmae.aligned_blocks={pairs} must be a non-empty list of [student_block, "
                "teacher_block] pairs of 0-based block indices, e.g. [[8, 17]]"
            )
        try:  # both networks on the meta device: the teacher's grid and depth, before any work
            teacher = check_backbone(
                dmae.teacher_name, cfg.model.img_size, **dict(dmae.teacher_kwargs)
            )
        except UserError as err:
            raise ConfigError(f"dmae.teacher_name / dmae.teacher_kwargs: {err}") from None
        student = check_backbone(cfg.model.name, cfg.model.img_size, **dict(cfg.model.kwargs))
        check_teacher_fits(student, teacher, cfg.data.global_crop_size, pairs)

    @classmethod
    def init_backbone(cls, backbone: ViTBackbone) -> None:
        init_like_mae(backbone)  # MAE's encoder: fixed sin-cos table, xavier, [CLS] std 0.02

    @classmethod
    def adapted_ratio(cls, cfg: Config) -> tuple[str, float] | None:
        dmae: DmaeConfig = cfg.section(cls.section)
        if not cls.distils(cfg) or dmae.distill_weight == 0:
            return None  # no teacher runs
        return "dmae.teacher_keep_ratio", dmae.teacher_keep_ratio

    @classmethod
    def distils(cls, cfg: Config) -> bool:
        """`dmae` distils from a teacher; `mae` (the first name) does not."""
        return cfg.method != cls.names[0]

    @classmethod
    def build(cls, cfg: Config, backbone: ViTBackbone) -> DMAE:
        dmae: DmaeConfig = cfg.section(cls.section)
        teacher = None
        if cls.distils(cfg):
            # The frozen teacher, from a local file (never downloaded).
            teacher = create_backbone(
                dmae.teacher_name, cfg.model.img_size, **dict(dmae.teacher_kwargs)
            )
            assert dmae.teacher_checkpoint is not None
            ignored = load_backbone_weights(teacher, dmae.teacher_checkpoint)
            if ignored:
                print(
                    f"teacher {dmae.teacher_checkpoint}: ignored {len(ignored)} keys "
                    f"({key_list(ignored)})"
                )
        return cls(backbone, teacher, dmae, cfg.masking, cfg.data.global_crop_size)

    def __init__(
        self,
        encoder: ViTBackbone,
        teacher: ViTBackbone | None,
        cfg: DmaeConfig,
        masking: MaskingConfig,
        img_size: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.masking = masking
        self.img_size = img_size
        self.grid = encoder.grid(img_size)
        num_patches = self.grid[0] * self.grid[1]
        self.pairs = [tuple(pair) for pair in cfg.aligned_blocks] if teacher is not None else []
        projections = nn.ModuleList()
        if teacher is not None:
            check_teacher_fits(encoder, teacher, img_size, cfg.aligned_blocks)
            projections.extend(
                alignment_projection(encoder.embed_dim, teacher.embed_dim, cfg.projection)
                for _ in self.pairs
            )
        decoder = MAEDecoder(
            num_patches,
            encoder.embed_dim,
            3 * encoder.patch_size**2,
            cfg.decoder_dim,
            cfg.decoder_depth,
            cfg.decoder_heads,
            encoder.num_prefix_tokens,
        )
        self.student = MAEStudent(encoder, decoder, projections)
        self.hold_frozen_teacher(teacher)
        self.teacher_last_block = max((t for _, t in self.pairs), default=-1)
        self.picture_every_steps = cfg.recon_images_every_steps
        self._macs_cache: dict[tuple[int, int | None], int] = {}
        self.keep_ratio = KeepRatioSchedule(masking)
        # masking.adaptive controls the teacher's share of the visible patches
        self.adaptive = adaptive_controller(masking, cfg.teacher_keep_ratio)

    # --- contract -------------------------------------------------------------------------
    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        self.keep_ratio.set_schedule(total_steps, steps_per_epoch)

    def summary(self) -> dict[str, Any]:
        return {
            "keep_ratio": self.keep_ratio.final,
            "masking_strategy": self.masking.strategy,
            "teacher_keep_ratio": self.cfg.teacher_keep_ratio,
        }

    def forward(self, views: list[Tensor], state: StepState) -> StepOutput:
        images = views[0]  # [B, 3, H, W]: MAE uses one view
        batch = images.shape[0]
        num_patches = self.grid[0] * self.grid[1]
        keep_ratio = self.keep_ratio(state.step)
        keep = num_kept(num_patches, keep_ratio)
        keep_idx = select(
            None, keep, masking_strategy(self.masking), num_patches=num_patches, batch_size=batch,
            grid=self.grid, generator=state.generator, device=images.device, shard=state.shard,
        )  # fmt: skip
        mask_idx = complement(keep_idx, num_patches)
        distilling = self.teacher is not None and self.cfg.distill_weight > 0
        teacher_ratio = self.adaptive.ratio if self.adaptive else self.cfg.teacher_keep_ratio
        teacher_keep = num_kept(keep, teacher_ratio)
        pred, student_blocks, cls_attention = self.student_call(
            images, keep_idx, mask_idx, [s for s, _ in self.pairs],
            cls_attention=distilling and teacher_keep < keep,
        )  # fmt: skip
        target = patchify(images, self.student.encoder.patch_size)
        target = target.gather(1, mask_idx.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        recon = mae_pixel_loss(pred.float(), target.float(), self.cfg.norm_pix_loss)
        metrics: dict[str, float | Tensor] = dict(recon_loss=recon.detach(), keep_ratio=keep_ratio)
        if not distilling:
            return StepOutput(recon, metrics, images=batch, keep_ratio=keep_ratio)
        assert self.teacher is not None  # distilling

        # The teacher sees the student's visible patches (or their top fraction by the student's
        # [CLS] attention) and stops at the deepest aligned block.
        visible_pos = None
        teacher_idx = keep_idx
        if cls_attention is not None:
            visible_pos = select(cls_attention.mean(dim=1), teacher_keep, "attention_topk")
            teacher_idx = keep_idx.gather(1, visible_pos)
        with torch.no_grad():
            teacher_out = self.teacher(
                images, teacher_idx, stop_after_block=self.teacher_last_block,
                return_blocks=[t for _, t in self.pairs],
            )  # fmt: skip
        prefix = self.student.encoder.num_prefix_tokens
        distill = images.new_zeros(())
        for (s_block, t_block), projection in zip(
            self.pairs, self.student.projections, strict=True
        ):
            student_tokens = student_blocks[s_block]  # [B, P + k, D_s]
            if visible_pos is not None:
                student_tokens = gather_patches(student_tokens, visible_pos, prefix)
            # Summed, each pair with weight 1, as the official DMAE code adds its pair losses.
            distill = distill + feature_alignment_loss(
                projection(student_tokens).float(), teacher_out.block_outputs[t_block].float()
            )
        metrics.update(distill_loss=distill.detach(), teacher_tokens_kept=teacher_keep + prefix,
                       teacher_keep_ratio=teacher_ratio)  # fmt: skip
        gap, probe_macs = None, 0.0
        if self.adaptive is not None and self.adaptive.probe_due(state.step):
            gap, probe_macs = self._probe(images, keep_idx, visible_pos, teacher_out)
        return StepOutput(
            recon + self.cfg.distill_weight * distill,
            metrics,
            teacher_macs=batch * self.teacher_macs(teacher_keep, self.teacher_last_block)
            + probe_macs,
            teacher_macs_unmasked=batch * self.teacher_macs(keep, None),
            images=batch,
            keep_ratio=keep_ratio,
            keep_ratio_gap=gap,
            probe_macs=probe_macs,
        )

    @torch.no_grad()
    def _probe(
        self, images: Tensor, keep_idx: Tensor, visible_pos: Tensor | None, teacher_out: Any
    ) -> tuple[float, float]:
        """The adaptive keep ratio's gap on the probe's (first) images: the alignment loss
        between the teacher's features on its kept tokens and on all visible patches, at the
        kept tokens, summed over the pairs; and the full teacher's multiply-adds (or 0, 0)."""
        if visible_pos is None:
            return 0.0, 0.0
        assert self.teacher is not None and self.adaptive is not None
        probe = self.adaptive.probe_size(len(images))
        full = self.teacher(
            images[:probe], keep_idx[:probe], stop_after_block=self.teacher_last_block,
            return_blocks=[t for _, t in self.pairs],
        )  # fmt: skip
        prefix = self.teacher.num_prefix_tokens
        gap = 0.0
        for _, t_block in self.pairs:
            full_tokens = gather_patches(full.block_outputs[t_block], visible_pos[:probe], prefix)
            kept_tokens = teacher_out.block_outputs[t_block][:probe]  # [n, P + k', D_t]
            gap += feature_alignment_loss(kept_tokens.float(), full_tokens.float()).item()
        return gap, probe * self.teacher_macs(keep_idx.shape[1], self.teacher_last_block)

    def teacher_macs(self, keep: int, stop_after_block: int | None) -> int:
        """Teacher multiply-adds per image, measured once per (tokens, depth).

        `teacher_macs_unmasked` uses (visible patches, all blocks): what a teacher costs that
        runs to its end on the same visible patches, before its decoder.
        """
        key = (keep, stop_after_block)
        if key not in self._macs_cache:
            assert self.teacher is not None
            self._macs_cache[key] = forward_macs(
                self.teacher, self.img_size, keep, stop_after_block=stop_after_block
            )
        return self._macs_cache[key]

    @torch.no_grad()
    def pictures(self, views: list[Tensor], state: StepState) -> dict[str, Tensor]:
        """Rows of (original, masked input, reconstruction) for up to 4 images."""
        images = views[0][:4]
        batch, patch = images.shape[0], self.student.encoder.patch_size
        num_patches = self.grid[0] * self.grid[1]
        keep = num_kept(num_patches, self.keep_ratio(state.step))
        keep_idx = select(
            None, keep, masking_strategy(self.masking), num_patches=num_patches, batch_size=batch,
            grid=self.grid, generator=state.generator, device=images.device,
        )  # fmt: skip
        mask_idx = complement(keep_idx, num_patches)
        was_training = self.student.training
        self.student.eval()
        pred = self.student(images, keep_idx, mask_idx, [], False)[0].float()
        self.student.train(was_training)
        patches = patchify(images, patch).float()  # [B, N, p²·3]
        masked_patches = patches.gather(1, mask_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        if self.cfg.norm_pix_loss:  # predictions are in per-patch normalised units
            mean = masked_patches.mean(-1, keepdim=True)
            std = (masked_patches.var(-1, keepdim=True) + 1e-6).sqrt()
            pred = pred * std + mean
        index = mask_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        masked_input = patches.scatter(1, index, torch.zeros_like(masked_patches))
        reconstruction = patches.scatter(1, index, pred)
        rows = [unpatchify(p, patch, self.grid) for p in (patches, masked_input, reconstruction)]
        grid = torch.stack(rows, dim=1).flatten(0, 1)  # [B·3, 3, H, W]
        return {"dmae/reconstruction": make_grid(to_unit_range(grid), nrow=3)}


def check_teacher_fits(
    student: ViTBackbone, teacher: ViTBackbone, img_size: int, pairs: list[list[int]]
) -> None:
    """Raises a ConfigError when the teacher cannot be aligned with the student: another patch
    grid, or an aligned block beyond either network's depth."""
    if teacher.grid(img_size) != student.grid(img_size):
        raise ConfigError(
            f"teacher patch grid {teacher.grid(img_size)} differs from the student's "
            f"{student.grid(img_size)}: DMAE feeds both the same visible patches, so their "
            "patch sizes must match (dmae.teacher_name / dmae.teacher_kwargs.patch_size)"
        )
    for student_block, teacher_block in pairs:
        if student_block >= student.num_blocks or teacher_block >= teacher.num_blocks:
            raise ConfigError(
                f"dmae.aligned_blocks pair [{student_block}, {teacher_block}] is out of range: "
                f"the student has blocks 0..{student.num_blocks - 1}, the teacher "
                f"0..{teacher.num_blocks - 1}"
            )
