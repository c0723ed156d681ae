"""A checkpoint file → the backbone to evaluate, built with the right architecture.

The architecture comes from, in order: the caller (`--model`, `--model-kwargs`), the ssl_kd run
config saved in the checkpoint, or the official DINO/MAE `args` saved in it (`arch` +
`patch_size`, `model`). The position-embedding size is read from the weights, so a checkpoint
trained at any resolution loads strictly (the backbone still runs at any size).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_kd.errors import UserError, key_list
from ssl_kd.models.backbone import ViTBackbone, create_backbone
from ssl_kd.models.weights import BackboneWeights, check_fit, fit_problems, read_backbone_weights


@dataclass
class LoadReport:
    """What was loaded, for the console and the result files."""

    path: str
    layout: str
    part: str | None
    model: str
    model_kwargs: dict[str, Any]
    img_size: int
    loaded: int
    ignored: list[str]
    run_config: dict[str, Any] | None = None  # the ssl_kd run config saved in the file
    # Only with strict=False: keys that did not load (missing keep their initial values).
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        ignored = key_list(self.ignored)
        not_loaded = ""
        if self.missing or self.unexpected:
            not_loaded = (
                f" (--strict false: missing {key_list(self.missing)}; not loaded "
                f"{key_list(self.unexpected)})"
            )
        return (
            f"loaded {self.loaded} tensors into {self.model} {self.model_kwargs or ''} from "
            f"{self.path} ({self.layout}); missing {len(self.missing)}, unexpected "
            f"{len(self.unexpected)}{not_loaded}, ignored {len(self.ignored)}"
            + (f" ({ignored})" if self.ignored else "")
        )


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


def _img_size_from_weights(weights: BackboneWeights, patch_size: int | None) -> int | None:
    """Training resolution implied by pos_embed [1, (1 +) N, D] and the patch size."""
    pos_embed = weights.state.get("pos_embed")
    proj = weights.state.get("patch_embed.proj.weight")  # [D, 3, p, p]
    if pos_embed is None or (proj is None and patch_size is None):
        return None
    patch = int(proj.shape[-1]) if proj is not None else int(patch_size or 16)
    for prefix in (1, 0):
        side = math.isqrt(pos_embed.shape[1] - prefix)
        if side * side == pos_embed.shape[1] - prefix and side > 0:
            return side * patch
    return None


def load_backbone(
    path: str | Path,
    *,
    part: str | None = None,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    strict: bool = True,
) -> tuple[ViTBackbone, LoadReport]:
    """Builds the backbone a checkpoint holds and loads it strictly (heads etc. ignored).

    Args:
        path: any file `read_backbone_weights` accepts.
        part: "teacher" / "student" for files holding both; None: what the run evaluates.
        model, model_kwargs: timm name and overrides; default: from the file's saved config.
        strict: False loads the tensors that fit and reports the others instead of raising.

    Raises:
        ValueError: the architecture is unknown, or the weights do not fit it (keys named).
    """
    weights = read_backbone_weights(path, part)
    kwargs = dict(model_kwargs or {})
    img_size = None
    interpolation = "timm"
    if model is None and weights.config is not None:
        saved = weights.config["model"]
        model, img_size = saved["name"], int(saved["img_size"])
        kwargs = {**saved.get("kwargs", {}), **kwargs}
        # Runs saved before the key existed resampled as timm does.
        interpolation = saved.get("pos_embed_interpolation") or interpolation
    if model is None:
        model = architecture_from_args(weights.args)
    if model is None:
        raise UserError(
            f"{path} ({weights.layout}) does not say which model it holds: pass --model NAME "
            "(a timm ViT, e.g. vit_small_patch16_224) and, for a non-standard size, "
            "--model-kwargs '{patch_size: 4, embed_dim: 96, depth: 4, num_heads: 3}'"
        )
    img_size = _img_size_from_weights(weights, kwargs.get("patch_size")) or img_size or 224
    try:
        backbone = create_backbone(model, img_size, pos_embed_interpolation=interpolation, **kwargs)
    except TypeError as err:
        raise UserError(f"--model-kwargs {kwargs} do not fit {model}: {err}") from None
    missing, unexpected, mismatched = fit_problems(backbone, weights)
    if strict:
        check_fit(backbone, weights)
    mismatched_keys = {entry.split(":")[0] for entry in mismatched}
    fitting = {k: v for k, v in weights.state.items() if k not in set(unexpected) | mismatched_keys}
    backbone.vit.load_state_dict(fitting, strict=strict)
    report = LoadReport(
        str(path),
        weights.layout,
        weights.part,
        model,
        kwargs,
        img_size,
        len(fitting),
        weights.ignored,
        weights.config,
        missing + sorted(mismatched_keys),
        unexpected + mismatched,
    )
    return backbone.eval(), report
