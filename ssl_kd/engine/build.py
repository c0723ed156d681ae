"""Builds the parts a config names: backbone, teacher, method."""

from __future__ import annotations

from ssl_kd.config import Config
from ssl_kd.methods.base import Method
from ssl_kd.methods.dino import DINO
from ssl_kd.methods.dmae import DMAE
from ssl_kd.models.backbone import ViTBackbone, create_backbone, load_backbone_weights


def build_backbone(cfg: Config, drop_path_rate: float | None = None) -> ViTBackbone:
    model = cfg.model
    return create_backbone(
        model.name,
        model.img_size,
        drop_path_rate=model.drop_path_rate if drop_path_rate is None else drop_path_rate,
        checkpoint=model.checkpoint,
        **dict(model.kwargs),
    )


def build_teacher(cfg: Config) -> ViTBackbone:
    """DMAE's frozen teacher, loaded from a local file (never downloaded)."""
    dmae = cfg.dmae
    teacher = create_backbone(dmae.teacher_name, cfg.model.img_size, **dict(dmae.teacher_kwargs))
    assert dmae.teacher_checkpoint is not None
    ignored = load_backbone_weights(teacher, dmae.teacher_checkpoint)
    if ignored:
        shown = ", ".join(ignored[:6]) + (
            f" and {len(ignored) - 6} more" if len(ignored) > 6 else ""
        )
        print(f"teacher {dmae.teacher_checkpoint}: ignored {len(ignored)} keys ({shown})")
    return teacher


def build_method(cfg: Config) -> Method:
    method: Method
    if cfg.method == "dino":
        method = DINO(
            build_backbone(cfg), cfg.dino, cfg.masking, cfg.data.global_crop_size, cfg.train.epochs
        )
    elif cfg.method in ("mae", "dmae"):
        teacher = build_teacher(cfg) if cfg.method == "dmae" else None
        method = DMAE(
            build_backbone(cfg), teacher, cfg.dmae, cfg.masking, cfg.data.global_crop_size
        )
    else:
        raise ValueError(f"unknown method {cfg.method!r}")
    if cfg.eval.pictures_every_steps:
        method.picture_every_steps = cfg.eval.pictures_every_steps
    return method
