"""Supervised training of any timm model: the teachers and the no-distillation baselines.

DeiT: Touvron et al., "Training data-efficient image transformers & distillation through
attention", arXiv:2012.12877. Cross-entropy with label smoothing; timm's training transform
(RandAugment, colour jitter, random erasing) on image folders; optional Mixup/CutMix (Zhang et
al., arXiv:1710.09412; Yun et al., arXiv:1905.04899) through timm's `Mixup`, whose soft targets
carry the smoothing, with timm's `SoftTargetCrossEntropy`.

On the bundled data the stream augments in memory instead (a random resized crop of
`data.global_crop_scale`, flips and brightness/contrast jitter on whole batches): timm's PIL
pipeline would dominate the step on 32-px images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from ssl_kd.config.sections import (
    Config,
    DataConfig,
    check_choice,
    check_not_negative,
    check_positive,
    check_unit_interval,
)
from ssl_kd.data import Views, labelled_classes
from ssl_kd.errors import ConfigError
from ssl_kd.methods.base import Method, StepOutput, StepState
from ssl_kd.methods.registry import register
from ssl_kd.models.backbone import ViTBackbone
from ssl_kd.models.classifier import Classifier


@dataclass
class SupervisedConfig:
    """The `supervised` section: loss, Mixup/CutMix and the image-folder augmentation. The
    defaults are DeiT's main.py defaults except Mixup/CutMix, off unless asked for."""

    num_classes: int | None = None  # None: the data's (10 digits; an ImageFolder's classes)
    smoothing: float = 0.1  # label smoothing (DeiT --smoothing)
    mixup: float = 0.0  # Mixup's beta(α, α); 0: off (DeiT --mixup 0.8)
    cutmix: float = 0.0  # CutMix's beta(α, α); 0: off (DeiT --cutmix 1.0)
    mixup_prob: float = 1.0  # chance that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # chance of CutMix rather than Mixup when both are on
    mixup_mode: str = "batch"  # one λ per batch, pair or element
    # timm's create_transform on image folders (DeiT's --aa, --color-jitter, ...)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    interpolation: str = "bicubic"
    random_erasing: float = 0.25  # probability
    random_erasing_mode: str = "pixel"
    random_erasing_count: int = 1
    clip_grad: float = 0.0  # gradient norm clip over all parameters; 0: none (DeiT's default)

    def check(self) -> None:
        self.check_keys("supervised")

    def check_keys(self, section: str) -> None:
        """The checks of these keys, named as under `section` (kd's section extends this one)."""
        key = f"{section}.{{}}".format
        check_choice(key("mixup_mode"), self.mixup_mode, ("batch", "pair", "elem"))
        check_choice(
            key("random_erasing_mode"), self.random_erasing_mode, ("const", "rand", "pixel")
        )
        check_choice(key("interpolation"), self.interpolation, ("bilinear", "bicubic", "random"))
        check_not_negative(
            {
                key("mixup"): self.mixup,
                key("cutmix"): self.cutmix,
                key("color_jitter"): self.color_jitter,
                key("clip_grad"): self.clip_grad,
            }
        )
        check_unit_interval(
            {
                key("smoothing"): self.smoothing,
                key("mixup_prob"): self.mixup_prob,
                key("mixup_switch_prob"): self.mixup_switch_prob,
                key("random_erasing"): self.random_erasing,
            }
        )
        check_positive({key("random_erasing_count"): self.random_erasing_count})
        if self.num_classes is not None:
            check_positive({key("num_classes"): self.num_classes})

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def image_folder_transform(cfg: SupervisedConfig, data: DataConfig) -> Callable:
    """timm's training transform, as DeiT builds it: random resized crop (area fraction in
    data.global_crop_scale; DeiT keeps timm's 0.08-1), flip (data.hflip_prob), RandAugment,
    colour jitter, normalisation, random erasing."""
    return create_transform(
        input_size=data.global_crop_size,
        is_training=True,
        scale=(data.global_crop_scale[0], data.global_crop_scale[1]),
        hflip=data.hflip_prob,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        re_prob=cfg.random_erasing,
        re_mode=cfg.random_erasing_mode,
        re_count=cfg.random_erasing_count,
    )


def mixer(cfg: SupervisedConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix (targets smoothed by `cfg.smoothing`), or None when both are off."""
    if not cfg.mixes:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )  # fmt: skip


def seed_numpy(state: StepState) -> None:
    """timm's Mixup draws λ and the CutMix box from numpy's global generator: seeded from the
    step's generator, so that a resumed step mixes exactly as the uninterrupted run did."""
    if state.generator is not None:
        np.random.seed(int(torch.randint(2**32 - 1, (1,), generator=state.generator)))


def classes_of(cfg: Config, section: SupervisedConfig) -> int:
    return section.num_classes or labelled_classes(cfg.data)


def check_labelled(cfg: Config, section: SupervisedConfig, key: str) -> None:
    """Checks shared by the supervised methods: an even batch for Mixup/CutMix (timm mixes
    each image with the batch's mirror image), labelled data, enough classes for top-5."""
    if section.mixes and cfg.train.batch_size % 2:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is odd: {key}.mixup / {key}.cutmix "
            "pair each image with another of its batch (timm's Mixup), so it must be even"
        )
    if section.num_classes is None:
        labelled_classes(cfg.data)  # a flat folder fails here, before any work


def no_weight_decay(classifier: Classifier) -> list[dict[str, Any]]:
    """Two groups, as timm's optimizer factory (which DeiT uses) makes them: no weight decay on
    biases, norms and what the model names in `no_weight_decay()` (ViT: position embedding,
    [CLS] token); weight decay on the rest."""
    model = classifier.timm_model
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}]


@register
class Supervised(Method):
    """A timm classifier trained on labelled images.

    Args:
        student: the classifier; cfg: the `supervised` section.
    """

    names = ("supervised",)
    section = "supervised"
    config_class = SupervisedConfig
    views = Views.LABELLED
    backbones: ClassVar[dict[str, str]] = {"student": "student.backbone"}
    default_backbone = "student"
    any_timm_model = True

    student: Classifier

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        check_labelled(cfg, cfg.section(cls.section), cls.section)
        cls.check_masking(cfg)

    @classmethod
    def check_masking(cls, cfg: Config) -> None:
        if cfg.masking.keep_ratio != 1.0:
            raise ConfigError(
                f"masking.keep_ratio={cfg.masking.keep_ratio}: {cfg.method} trains on whole "
                "images, it masks nothing (a distillation teacher's patches are masked by the "
                "kd method); leave it at 1.0"
            )

    @classmethod
    def build(cls, cfg: Config, backbone: ViTBackbone) -> Supervised:
        return cls.build_any(cfg, backbone)

    @classmethod
    def build_any(cls, cfg: Config, model: nn.Module) -> Supervised:
        section: SupervisedConfig = cfg.section(cls.section)
        return cls(Classifier(model, classes_of(cfg, section)), section)

    @classmethod
    def train_transform(cls, cfg: Config) -> Callable:
        return image_folder_transform(cfg.section(cls.section), cfg.data)

    def __init__(self, student: Classifier, cfg: SupervisedConfig) -> None:
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.mixup = mixer(cfg, student.num_classes)
        self.soft_target_loss = SoftTargetCrossEntropy()

    def forward(self, views: list[Tensor], state: StepState) -> StepOutput:
        """views: [images [B, C, H, W], labels [B]]."""
        images, labels = views
        targets, images = self.targets(images, labels, state)
        logits = self.student_call(images).logits
        loss = self.classification_loss(logits.float(), labels, targets)
        return StepOutput(loss, {"ce_loss": loss.detach()}, images=len(images))

    def targets(
        self, images: Tensor, labels: Tensor, state: StepState
    ) -> tuple[Tensor | None, Tensor]:
        """(soft targets [B, K] of mixed images, or None; the images, mixed if Mixup is on)."""
        if self.mixup is None:
            return None, images
        seed_numpy(state)
        images, targets = self.mixup(images.clone(), labels)  # timm mixes in place
        return targets, images

    def classification_loss(self, logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
        """Cross-entropy: against Mixup's soft targets (smoothing included), or against the
        labels with label smoothing."""
        if targets is not None:
            return self.soft_target_loss(logits, targets)
        return F.cross_entropy(logits, labels, label_smoothing=self.cfg.smoothing)

    def param_groups(self) -> list[dict[str, Any]]:
        return no_weight_decay(self.student)

    def before_optimizer_step(self, state: StepState) -> dict[str, float | Tensor]:
        clip = self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), clip)
        return {"grad_norm": norm}

    def classifier(self) -> Classifier:
        return self.student

    @property
    def has_vit_backbone(self) -> bool:
        return self.student.is_vit

    def summary(self) -> dict[str, Any]:
        return {"num_classes": self.student.num_classes}
