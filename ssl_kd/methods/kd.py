"""Logit distillation from a frozen teacher, with MaskedKD's cheaper teacher.

Knowledge distillation: Hinton et al., arXiv:1503.02531; in DeiT's setting (Touvron et al.,
arXiv:2012.12877): loss = (1 − α) · CE(student, labels) + α · τ² · KL(teacher/τ ‖ student/τ),
or DeiT's hard distillation (cross-entropy against the teacher's top class).
MaskedKD: Son et al., "The Role of Masking for Efficient Supervised Knowledge Distillation of
Vision Transformers", arXiv:2302.10494. With masking.keep_ratio < 1 the teacher (a ViT) sees
only k of its patches: by default those the student's last-block [CLS] attention (mean over
heads) ranks highest on the same image, so the teacher's cost falls with the keep ratio; the
paper's ablations are `random` and `attention_bottomk`. A teacher on another patch grid gets
the student's scores resampled to its grid (paper appendix, Table 6).

The student sees every image whole and learns as `supervised` does (label smoothing, Mixup or
CutMix, whose mixed images the teacher sees too, as in DeiT and MaskedKD).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kd.config.sections import (
    Config,
    MaskingConfig,
    check_choice,
    check_file,
    check_positive,
    check_unit_interval,
)
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.flops import forward_macs
from ssl_kd.losses import distribution_gap, hard_distillation_loss, soft_distillation_loss
from ssl_kd.masking import interpolate_scores, num_kept, select
from ssl_kd.methods.base import (
    KeepRatioSchedule,
    StepOutput,
    StepState,
    adaptive_controller,
    masking_strategy,
    param_groups_without_wd_on_1d,
)
from ssl_kd.methods.registry import register
from ssl_kd.methods.supervised import Supervised, SupervisedConfig, classes_of
from ssl_kd.models.backbone import check_backbone
from ssl_kd.models.classifier import (
    Classifier,
    ClassifierOutput,
    create_classifier,
    create_timm_model,
    is_vit_model,
    load_classifier_weights,
)


@dataclass
class KDConfig(SupervisedConfig):
    """The `kd` section: the student's training (every key of `supervised`) and the teacher.

    MaskedKD's README command: soft distillation, α = 0.5, τ = 1, 98 of 196 patches.
    """

    teacher_name: str = "deit_base_patch16_224"  # any timm model; a ViT to be masked
    teacher_checkpoint: str | None = None  # local file: an ssl_kd run, a DeiT or timm release
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_img_size: int | None = None  # the teacher's input size; None: the student's crops
    distillation: str = "soft"  # soft (KL at τ) or hard (CE against the teacher's top class)
    alpha: float = 0.5  # weight of the distillation term; 1 − α on the labels
    tau: float = 1.0  # temperature of the soft term

    def check(self) -> None:
        self.check_keys("kd")

    def check_keys(self, section: str) -> None:
        super().check_keys(section)
        check_choice(f"{section}.distillation", self.distillation, ("soft", "hard"))
        check_unit_interval({f"{section}.alpha": self.alpha})
        check_positive({f"{section}.tau": self.tau})
        if self.teacher_img_size is not None:
            check_positive({f"{section}.teacher_img_size": self.teacher_img_size})


@register
class KD(Supervised):
    """A student classifier distilled from a frozen teacher classifier.

    Args:
        student, teacher: classifiers of the same classes; the teacher is frozen, in eval mode,
            and not part of the state dict (never saved, trained or wrapped in DDP).
        cfg: the `kd` section; masking: which of its patches the teacher sees.
        img_size: the student's input size.
    """

    names = ("kd",)
    section = "kd"
    config_class = KDConfig
    default_keep_ratio = 1.0  # plain logit distillation; MaskedKD below 1
    # KL in nats between the full and the masked teacher's soft labels at τ: the mean gap at
    # keep 0.5 (top-k) over the second half of the calibration runs (learning.py --calibrate,
    # eval/bench/RESULTS.md), the median over three seeds' teachers: 0.0103, 0.0855, 0.0312.
    # ViTKD and ScaleKD measure the same.
    default_tolerance = 0.03
    default_strategy = "attention_topk"

    cfg: KDConfig
    teacher: Classifier

    @classmethod
    def check_masking(cls, cfg: Config) -> None:
        kd: KDConfig = cfg.section(cls.section)
        if not kd.teacher_checkpoint:
            raise ConfigError(
                f"{cls.section}.teacher_checkpoint is not set: point it at a local file holding "
                "the teacher classifier (an ssl_kd supervised run's checkpoint.pth, a DeiT "
                "release or a timm state dict); nothing is ever downloaded"
            )
        check_file(f"{cls.section}.teacher_checkpoint", kd.teacher_checkpoint)
        size = kd.teacher_img_size or cfg.data.global_crop_size
        teacher_patch = 1
        try:  # on the meta device: names, keywords and grids, before any work
            teacher_vit = is_vit_model(kd.teacher_name)
            with torch.device("meta"):
                if teacher_vit:
                    teacher_patch = check_backbone(
                        kd.teacher_name, size, **dict(kd.teacher_kwargs)
                    ).patch_size
                else:
                    create_timm_model(kd.teacher_name, **dict(kd.teacher_kwargs))
            student_vit = is_vit_model(cfg.model.name)
        except UserError as err:
            raise ConfigError(
                f"{cls.section}.teacher_name / {cls.section}.teacher_kwargs: {err}"
            ) from None
        if teacher_vit and size % teacher_patch:
            raise ConfigError(
                f"the teacher's input size {size} ({cls.section}.teacher_img_size, else "
                f"data.global_crop_size) is not a multiple of its patch size {teacher_patch}"
            )
        assert cfg.masking.keep_ratio is not None and cfg.masking.strategy is not None
        if cfg.masking.keep_ratio == 1.0 and not cfg.masking.adaptive:
            return
        if not teacher_vit:
            masks, fix = f"masking.keep_ratio={cfg.masking.keep_ratio}", "use 1.0"
            if cfg.masking.adaptive:
                masks, fix = "masking.adaptive=true", "set it to false"
            raise ConfigError(
                f"{masks} masks the teacher's patches, but {cls.section}.teacher_name="
                f"{kd.teacher_name} is not a ViT; {fix}"
            )
        if cfg.masking.strategy.startswith("attention") and not student_vit:
            raise ConfigError(
                f"masking.strategy={cfg.masking.strategy} ranks patches by the student's "
                f"[CLS] attention, but model.name={cfg.model.name} is not a ViT; use random"
            )

    @classmethod
    def adapted_ratio(cls, cfg: Config) -> tuple[str, float] | None:
        assert cfg.masking.keep_ratio is not None  # resolved when loading
        return "masking.keep_ratio", cfg.masking.keep_ratio

    @classmethod
    def build_any(cls, cfg: Config, model: nn.Module) -> KD:
        kd: KDConfig = cfg.section(cls.section)
        num_classes = classes_of(cfg, kd)
        teacher_size = kd.teacher_img_size or cfg.data.global_crop_size
        teacher = create_classifier(
            kd.teacher_name, teacher_size, num_classes, **dict(kd.teacher_kwargs)
        )
        assert kd.teacher_checkpoint is not None  # checked with the config
        layout = load_classifier_weights(teacher, kd.teacher_checkpoint)
        print(f"teacher {kd.teacher_name} from {kd.teacher_checkpoint} ({layout})", flush=True)
        student = Classifier(model, num_classes)
        return cls(student, teacher, kd, cfg.masking, cfg.data.global_crop_size)

    def __init__(
        self,
        student: Classifier,
        teacher: Classifier,
        cfg: KDConfig,
        masking: MaskingConfig,
        img_size: int,
    ) -> None:
        super().__init__(student, cfg)
        self.masking = masking
        self.img_size = img_size
        self.teacher_size = cfg.teacher_img_size or img_size
        self.hold_frozen_teacher(teacher)
        self.teacher_grid = teacher.vit.grid(self.teacher_size) if teacher.is_vit else None
        self.student_grid = student.vit.grid(img_size) if student.is_vit else None
        assert masking.keep_ratio is not None  # resolved when loading
        self.adaptive = adaptive_controller(masking, masking.keep_ratio)
        self.keep_ratio = KeepRatioSchedule(masking, self.adaptive)
        self._macs_cache: dict[int | None, int] = {}

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        self.keep_ratio.set_schedule(total_steps, steps_per_epoch)

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "keep_ratio": self.keep_ratio.final,
            "masking_strategy": self.masking.strategy,
            "teacher": self.cfg.teacher_name,
        }

    def forward(self, views: list[Tensor], state: StepState) -> StepOutput:
        """views: [images [B, C, H, W], labels [B]]."""
        images, labels = views
        batch = len(images)
        targets, images = self.targets(images, labels, state)
        num_patches = self.teacher_grid[0] * self.teacher_grid[1] if self.teacher_grid else 0
        keep_ratio = self.keep_ratio(state.step)
        keep = num_kept(num_patches, keep_ratio) if num_patches else 0
        masked = keep < num_patches
        strategy = masking_strategy(self.masking)
        needs_scores = masked and strategy.startswith("attention")
        student = self.student_call(
            images, cls_attention=needs_scores, return_blocks=self.student_blocks
        )

        # The teacher sees the same (mixed) images, reduced to the patches the student chose.
        with torch.no_grad():
            keep_idx = self.teacher_patches(student.cls_attention, keep, state, images)
            teacher_images = images
            if self.teacher_size != self.img_size:
                teacher_images = F.interpolate(
                    images, size=self.teacher_size, mode="bicubic", antialias=True
                )
            teacher = self.teacher(teacher_images, keep_idx, return_blocks=self.teacher_blocks)
        teacher_logits = teacher.logits.float()

        student_logits = student.logits.float()
        base = self.classification_loss(student_logits, labels, targets)
        if self.cfg.distillation == "soft":
            distill = soft_distillation_loss(student_logits, teacher_logits, self.cfg.tau)
        else:
            distill = hard_distillation_loss(student_logits, teacher_logits)
        loss = (1 - self.cfg.alpha) * base + self.cfg.alpha * distill
        features, metrics = self.feature_loss(student, teacher, keep_idx, state)
        loss = loss + features
        metrics |= {
            "ce_loss": base.detach(),
            "distill_loss": distill.detach(),
            "keep_ratio": keep_ratio,
            "teacher_agreement": (student_logits.argmax(1) == teacher_logits.argmax(1))
            .float()
            .mean(),
        }
        if self.teacher.is_vit:
            metrics["teacher_tokens_kept"] = keep + self.teacher.vit.num_prefix_tokens
        gap, probe_macs = None, 0.0
        if self.adaptive is not None and self.adaptive.probe_due(state.step):
            gap, probe_macs = self.probe(teacher_images, teacher_logits, keep_idx)
        return StepOutput(
            loss,
            metrics,
            teacher_macs=batch * self.teacher_macs(keep if masked else None) + probe_macs,
            teacher_macs_unmasked=batch * self.teacher_macs(None),
            images=batch,
            keep_ratio=keep_ratio,
            keep_ratio_gap=gap,
            probe_macs=probe_macs,
        )

    @torch.no_grad()
    def probe(
        self, teacher_images: Tensor, teacher_logits: Tensor, keep_idx: Tensor | None
    ) -> tuple[float, float]:
        """The adaptive keep ratio's gap on the probe's images (the first of the batch): KL at
        τ between the full and the masked teacher's soft labels; and the full teacher's
        multiply-adds (its forward alone: no feature terms run on the probe). Both 0 when the
        teacher saw every patch."""
        if keep_idx is None:
            return 0.0, 0.0
        assert self.adaptive is not None
        probe = self.adaptive.probe_size(len(teacher_images))
        full_logits = self.teacher(teacher_images[:probe]).logits.float()
        tau = self.cfg.tau
        gap = distribution_gap(full_logits / tau, teacher_logits[:probe] / tau)
        return gap.item(), probe * KD.teacher_macs(self, None)

    # Feature distillation (subclasses): the blocks whose raw outputs each network returns.
    student_blocks: tuple[int, ...] = ()
    teacher_blocks: tuple[int, ...] = ()

    def feature_loss(
        self, student: ClassifierOutput, teacher: ClassifierOutput, keep_idx: Tensor | None,
        state: StepState,
    ) -> tuple[Tensor | float, dict[str, float | Tensor]]:  # fmt: skip
        """Feature terms added to the loss, and their metrics; plain logit distillation: none.

        `keep_idx` [B, k]: the patches the teacher saw (None: all), so that features are
        aligned on the tokens the teacher has.
        """
        return 0.0, {}

    def teacher_patches(
        self, cls_attention: Tensor | None, keep: int, state: StepState, images: Tensor
    ) -> Tensor | None:
        """keep_idx [B, k] on the teacher's grid (None: every patch): the top (bottom) k of the
        student's [CLS] attention, mean over heads, resampled to the teacher's grid, or k at
        random (or in a block)."""
        if self.teacher_grid is None:
            return None
        num_patches = self.teacher_grid[0] * self.teacher_grid[1]
        if keep >= num_patches:
            return None
        scores = None
        if cls_attention is not None:
            assert self.student_grid is not None
            scores = interpolate_scores(
                cls_attention.mean(dim=1), self.student_grid, self.teacher_grid
            )  # [B, N_teacher]
        return select(
            scores, keep, masking_strategy(self.masking), num_patches=num_patches,
            batch_size=len(images), grid=self.teacher_grid, generator=state.generator,
            device=images.device, shard=state.shard,
        )  # fmt: skip

    def teacher_macs(self, keep: int | None) -> int:
        """Teacher multiply-adds per image with `keep` patches (None: all), measured once."""
        if keep not in self._macs_cache:
            self._macs_cache[keep] = forward_macs(self.teacher, self.teacher_size, keep)
        return self._macs_cache[keep]


class FeatureKD(KD):
    """`kd` plus trainable feature heads (`self.heads`, set by the subclass: ViTKD's, ScaleKD's)
    that train with the student, in the student's parameter groups and a DDP wrapper of their
    own (the frozen teacher stays outside DDP)."""

    heads: nn.Module

    @property
    def heads_call(self) -> nn.Module:
        """The heads' forward: their DDP wrapper once `wrap_trainable` ran."""
        return self.__dict__.get("_heads_wrapper", self.heads)

    def wrap_trainable(self, wrap: Any) -> None:
        super().wrap_trainable(wrap)
        self.__dict__["_heads_wrapper"] = wrap(self.heads)

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        for group, extra in zip(groups, param_groups_without_wd_on_1d(self.heads), strict=True):
            assert group["apply_wd"] == extra["apply_wd"]
            group["params"] = [*group["params"], *extra["params"]]
        return groups
