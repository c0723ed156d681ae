"""Which timm ViT a weights file holds, so that it can be rebuilt and loaded strictly.

The architecture comes from, in order: the caller (`--model`, `--model-kwargs`), an export
folder's `config.json` (timm's layout: `architecture`, `model_args`), the ssl_kd run config saved
in a checkpoint, or the official DINO/MAE `args` saved in it (`arch` + `patch_size`, `model`).
The position-embedding size is read from the weights, so a checkpoint trained at any resolution
loads strictly (the backbone still runs at any size).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ssl_kd.errors import UserError
from ssl_kd.models.weights import BackboneWeights

# timm.create_model arguments that `create_backbone` sets itself; a timm config.json records
# them among the model's arguments.
_SET_BY_CREATE_BACKBONE = ("img_size", "num_classes", "dynamic_img_size", "drop_path_rate")


@dataclass(frozen=True)
class Architecture:
    """A timm ViT: `create_backbone(name, img_size, **kwargs)` rebuilds it.

    Attributes:
        name: timm model name, e.g. `vit_small_patch16_224`.
        kwargs: overrides of that model's defaults (patch_size, embed_dim, depth, ...).
        img_size: the size its position embedding is built for.
        source: where the name came from, e.g. "the run's config", for messages.
        pos_embed_interpolation: how crops of another size resample the position embedding
            (`model.pos_embed_interpolation`): the run's setting; `timm` for files of other
            origin and for runs saved before the key existed.
    """

    name: str
    kwargs: dict[str, Any]
    img_size: int
    source: str
    pos_embed_interpolation: str = "timm"


def architecture_from_args(args: Any) -> str | None:
    """timm name of an official DINO (`arch`, `patch_size`) or MAE (`model`) run, if known."""
    arch = getattr(args, "arch", None)
    if isinstance(arch, str) and re.fullmatch(r"vit_(tiny|small|base|large)", arch):
        return f"{arch}_patch{getattr(args, 'patch_size', 16)}_224"
    model = getattr(args, "model", None)
    if isinstance(model, str):
        match = re.fullmatch(r"(?:mae_)?(vit_(?:base|large|huge)_patch\d+)", model)
        if match:
            return f"{match.group(1)}_224"
    return None


def img_size_from_weights(state: dict[str, Tensor], patch_size: int | None) -> int | None:
    """Training resolution implied by pos_embed [1, (1 +) N, D] and the patch size."""
    pos_embed = state.get("pos_embed")
    proj = state.get("patch_embed.proj.weight")  # [D, 3, p, p]
    if pos_embed is None or (proj is None and patch_size is None):
        return None
    patch = int(proj.shape[-1]) if proj is not None else int(patch_size or 16)
    for prefix in (1, 0):
        side = math.isqrt(pos_embed.shape[1] - prefix)
        if side * side == pos_embed.shape[1] - prefix and side > 0:
            return side * patch
    return None


def architecture_from_timm_config(config: dict[str, Any]) -> tuple[str, dict[str, Any], int | None]:
    """(name, create_backbone kwargs, img_size) from a timm `config.json`."""
    model_args = dict(config.get("model_args") or {})
    size = model_args.get("img_size")
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise UserError(
                f"config.json: img_size {size} is not square; ssl_kd builds square ViTs"
            )
        size = size[0]
    kwargs = {k: v for k, v in model_args.items() if k not in _SET_BY_CREATE_BACKBONE}
    return str(config["architecture"]), kwargs, None if size is None else int(size)


def resolve_architecture(
    weights: BackboneWeights,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Architecture:
    """The timm ViT `weights` belong to (see the module docstring for the order).

    `model_kwargs` are merged over what the file says, unless `model` names another model.

    Raises:
        UserError: nothing says which model it is (the message says how to tell).
    """
    kwargs = dict(model_kwargs or {})
    img_size = None
    source = "--model"
    if model is None and weights.timm_config is not None:
        model, saved, img_size = architecture_from_timm_config(weights.timm_config)
        kwargs, source = {**saved, **kwargs}, "config.json"
    elif model is None and weights.config is not None:
        saved_model = weights.config["model"]
        model, img_size = saved_model["name"], int(saved_model["img_size"])
        kwargs, source = {**saved_model.get("kwargs", {}), **kwargs}, "the run's config"
    elif model is None:
        model, source = architecture_from_args(weights.args), "the file's args"
    if model is None:
        raise UserError(
            f"{weights.path} ({weights.layout}) does not say which model it holds: pass --model "
            "NAME (a timm ViT, e.g. vit_small_patch16_224) and, for a non-standard size, "
            "--model-kwargs '{patch_size: 4, embed_dim: 96, depth: 4, num_heads: 3}'"
        )
    img_size = img_size_from_weights(weights.state, kwargs.get("patch_size")) or img_size or 224
    interpolation = "timm"
    if weights.config is not None:
        interpolation = weights.config["model"].get("pos_embed_interpolation") or interpolation
    return Architecture(model, kwargs, img_size, source, interpolation)
