"""Loading a run's config: the shared sections and every registered method's section, merged
from the defaults, a YAML file and `a.b=value` overrides, then checked.

This module sits above the methods (it asks the registry for sections, defaults and checks)
and below the entry points and the engine, which call `load_config`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl_kd.config import merge
from ssl_kd.config.sections import Config
from ssl_kd.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults ← YAML file ← `a.b=value` overrides, checked.

    Raises:
        ConfigError: naming the key and the valid choices.
    """
    # The file and the override syntax are read before the methods (and torch) are imported.
    layers = [(str(path), merge.read_yaml(path))] if path is not None else []
    layers += [(f"override {text!r}", merge.parse_override(text)) for text in overrides or []]
    return _build(layers)


def config_from_dict(values: dict[str, Any], source: str = "saved config") -> Config:
    """A `to_dict` result (a checkpoint's or config.yaml's) → a checked `Config`."""
    return _build([(source, OmegaConf.create(values))])


def _build(layers: list[tuple[str, DictConfig]]) -> Config:
    from ssl_kd.methods import registry

    sections = registry.sections()
    tree = merge.schema(sections)
    free = merge.free_dicts(sections)
    for source, layer in layers:
        tree = merge.merge(tree, layer, source, free)
    cfg = merge.to_config(tree, sections)
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Fills the method's defaults, then every check: shared sections, the model (built on the
    meta device), the method's own, and those that combine sections (crops against the patch
    size, the batch against the data)."""
    from ssl_kd.data import Views, check_batch
    from ssl_kd.methods import DEFAULT_METHOD

    cfg.method = cfg.method or DEFAULT_METHOD
    method = _method(cfg.method)
    method.resolve_defaults(cfg)
    cfg.check()
    check_model(cfg, any_timm_model=method.any_timm_model)
    method.check(cfg)
    _check_crops(cfg, multi_crop=method.views == Views.MULTI_CROP)
    check_batch(cfg.data, cfg.train.batch_size, world_size_from_env())


def check_model(cfg: Config, any_timm_model: bool = False) -> None:
    """The student timm builds from the `model` section, built on the meta device (no memory,
    no init work): a name that is not a ViT (unless the method takes `any_timm_model`), a
    keyword timm refuses, a width not divisible by the heads or an image smaller than a patch
    fails here, before any work."""
    import torch

    from ssl_kd.errors import UserError
    from ssl_kd.models.backbone import check_backbone
    from ssl_kd.models.classifier import create_timm_model, is_vit_model

    model = cfg.model
    try:
        if any_timm_model and not is_vit_model(model.name):
            with torch.device("meta"):
                create_timm_model(model.name, **dict(model.kwargs))
            return
    except UserError as err:
        raise ConfigError(f"model.name / model.kwargs: {err}") from None
    try:
        backbone = check_backbone(model.name, model.img_size, **dict(model.kwargs))
    except UserError as err:
        raise ConfigError(f"model.name / model.kwargs: {err}") from None
    if model.img_size < backbone.patch_size:
        raise ConfigError(
            f"model.img_size={model.img_size} is smaller than the patch size "
            f"{backbone.patch_size} of {model.name}"
        )


def _method(name: str) -> Any:
    from ssl_kd.methods import registry

    return registry.method_class(name)


def patch_size_of(cfg: Config) -> int | None:
    """The student's patch size: model.kwargs.patch_size, else the `patchN` in model.name."""
    if "patch_size" in cfg.model.kwargs:
        return int(cfg.model.kwargs["patch_size"])
    match = re.search(r"patch(\d+)", cfg.model.name)
    return int(match.group(1)) if match else None


def _check_crops(cfg: Config, multi_crop: bool) -> None:
    data = cfg.data
    patch = patch_size_of(cfg)
    crops = {"data.global_crop_size": data.global_crop_size}
    multi_crop = multi_crop and data.num_local_views > 0
    if multi_crop:
        crops["data.local_crop_size"] = data.local_crop_size
    for key, size in crops.items():
        if patch and size % patch:
            raise ConfigError(
                f"{key}={size} is not divisible by the patch size {patch} of {cfg.model.name}: "
                f"use a multiple of {patch} (e.g. {max(patch, size // patch * patch)})"
            )
    if multi_crop and data.local_crop_size > data.global_crop_size:
        raise ConfigError(
            f"data.local_crop_size={data.local_crop_size} is larger than data.global_crop_size="
            f"{data.global_crop_size}: local crops are the small views (DINO: 96 vs 224)"
        )


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun and submitit set it; 1 when unset."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world_size = int(text)
    except ValueError:
        world_size = 0
    if world_size < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={text!r} must be a positive integer")
    return world_size
