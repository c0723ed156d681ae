"""Builds the method a config names, through the registry."""

from __future__ import annotations

from ssl_kd.config import Config
from ssl_kd.errors import ConfigError
from ssl_kd.methods import registry
from ssl_kd.methods.base import Method
from ssl_kd.models.backbone import ViTBackbone, create_backbone
from ssl_kd.models.classifier import create_timm_model, is_vit_model
from ssl_kd.models.weights import load_backbone_weights


def build_backbone(cfg: Config, drop_path_rate: float | None = None) -> ViTBackbone:
    """The student backbone `model` describes, initialised as its method does (MAE: fixed
    sin-cos position embedding, xavier), then from `model.checkpoint` if set."""
    model = cfg.model
    assert model.pos_embed_interpolation is not None, "the method's default fills it on loading"
    backbone = create_backbone(
        model.name,
        model.img_size,
        drop_path_rate=model.drop_path_rate if drop_path_rate is None else drop_path_rate,
        pos_embed_interpolation=model.pos_embed_interpolation,
        **dict(model.kwargs),
    )
    registry.method_class(cfg.method).init_backbone(backbone)
    if model.checkpoint is not None:
        load_backbone_weights(backbone, model.checkpoint)
    return backbone


def build_method(cfg: Config) -> Method:
    method_class = registry.method_class(cfg.method)
    model = cfg.model
    if method_class.any_timm_model and not is_vit_model(model.name):
        if model.checkpoint is not None:
            raise ConfigError(
                f"model.checkpoint starts a ViT from its weights; {model.name} is not a ViT"
            )
        student = create_timm_model(
            model.name, drop_path_rate=model.drop_path_rate, **dict(model.kwargs)
        )
        method = method_class.build_any(cfg, student)
    else:
        method = method_class.build(cfg, build_backbone(cfg))
    if cfg.eval.pictures_every_steps:
        method.picture_every_steps = cfg.eval.pictures_every_steps
    if cfg.train.compile:  # the backbones, a frozen teacher's too (held outside `modules()`)
        teacher = method.frozen_teacher()
        frozen = teacher.modules() if teacher is not None else ()
        for module in {id(m): m for m in (*method.modules(), *frozen)}.values():
            if isinstance(module, ViTBackbone):
                module.compiled = True
    return method
