"""Backbone weights from any checkpoint layout, with an exact report of what was loaded.

Layouts recognised (the first that matches wins):

- an ssl_kd export folder, or any folder timm's `save_for_hf` wrote (`config.json` +
  `model.safetensors`): the weights and the model that `config.json` describes;
- an ssl_kd training checkpoint (`method` + `config`): the DINO teacher (default) or student, or
  the MAE/DMAE student encoder;
- an official DINO checkpoint (`teacher` / `student` dicts, `module.` and `backbone.` prefixes,
  `head.*` dropped; facebookresearch/dino `checkpoint.pth`), and DINOv2's
  `eval/<iteration>/teacher_checkpoint.pth` (`{"teacher": ...}`);
- a DINOv2 training checkpoint (`{"model": ...}` with `student.` / `teacher.` parts);
- an official MAE checkpoint (`{"model": ...}`; `decoder_*` and `mask_token` dropped);
- `{"state_dict": ...}`, a bare timm state dict (a released DINOv2 backbone among them), or an
  ssl_kd single-file export (`.safetensors`).

DINOv2 names (chunked blocks, registers, heads) become timm's (`ssl_kd.models.dinov2`).
`.pth` files are read weights-only (`ssl_kd.safe_load`, with the objects official DINO/MAE
checkpoints pickle allowed): a file that would run code when read is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ssl_kd.errors import UserError, key_list
from ssl_kd.models.backbone import ViTBackbone
from ssl_kd.models.dinov2 import TRAINING_ONLY_PREFIXES, dinov2_to_timm, is_dinov2
from ssl_kd.safe_load import describe_load_error, load_weights_only

# Keys a backbone never has: classifier heads, MAE's decoder, MAE's and DINOv2's mask token,
# DINOv2's training heads.
IGNORED_PREFIXES = ("head.", "decoder_", "mask_token", "fc_norm.", *TRAINING_ONLY_PREFIXES)
# What an export folder holds (timm's `local-dir:` layout).
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
# A timm ViT's position embedding: it marks where a backbone sits in a run's state dict.
_MARKER = "vit.pos_embed"
KNOWN_LAYOUTS = (
    "an ssl_kd checkpoint.pth or export, an official DINO, DINOv2 or MAE checkpoint, or a timm "
    "state dict"
)


@dataclass
class BackboneWeights:
    """A backbone state dict with timm names, and where it came from.

    Attributes:
        state: timm parameter name → tensor.
        ignored: keys dropped on purpose (heads, MAE decoder, mask token), sorted.
        layout: which layout the file had, e.g. "official DINO checkpoint (teacher)".
        part: "teacher" or "student" where the file holds both, else None.
        config: the ssl_kd run config saved in the file (or export folder), if any.
        args: the official DINO/MAE `args` (an argparse Namespace), if any.
        timm_config: an export folder's `config.json` (timm's layout), if any.
    """

    state: dict[str, Tensor]
    ignored: list[str]
    layout: str
    part: str | None = None
    config: dict[str, Any] | None = None
    args: Any = None
    path: str = field(default="")
    timm_config: dict[str, Any] | None = None


def read_state(path: Path) -> Any:
    """What a weights file holds: `.safetensors` read as such, `.pth` read weights-only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise UserError(
                f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                f"expected {KNOWN_LAYOUTS}"
            ) from None
    try:
        return load_weights_only(path, official=True)
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({describe_load_error(err)}); it may "
            f"be truncated or not written by torch.save. Expected {KNOWN_LAYOUTS}"
        ) from None


def _read_folder(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, state dict) of an export folder."""
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(
            f"{path} is a folder, not an export: an export folder holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (`ssl-kd export`); expected {KNOWN_LAYOUTS}"
        )
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file} is not JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise UserError(f"{config_file} names no `architecture` (timm's config.json layout)")
    return config, read_state(weights_file)


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds an ssl_kd training checkpoint (the layout `read_backbone_weights`
    reads as one); read weights-only, and a file that cannot be read is not one."""
    try:
        state = load_weights_only(path, mmap=True)
    except Exception:
        return False
    return isinstance(state, dict) and "method" in state and "config" in state


def run_backbones(state: dict[str, Any]) -> tuple[dict[str, str], str]:
    """(part → state-dict prefix, default part) of an ssl_kd training checkpoint.

    The checkpoint declares them (`backbones`, `default_backbone`, written from the method's
    declaration); older checkpoints are read by where their ViTs sit: `teacher.*` is the
    teacher, `student.*` the student, and the teacher is the default when there is one.
    """
    if "backbones" in state:
        return dict(state["backbones"]), str(state["default_backbone"])
    prefixes = sorted(k[: -len("pos_embed")] for k in state["method"] if k.endswith(_MARKER))
    backbones = {prefix.split(".")[0]: prefix for prefix in prefixes}
    return backbones, "teacher" if "teacher" in backbones else "student"


def _strip(state: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    cleaned = {}
    for key, value in state.items():
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def read_backbone_weights(path: str | Path, part: str | None = None) -> BackboneWeights:
    """Reads the backbone weights of any supported file or export folder (see the module
    docstring).

    Args:
        path: the file or export folder.
        part: "teacher" or "student" for files holding both (ssl_kd DINO runs, official DINO and
            DINOv2); None takes the teacher of those and the encoder of MAE/DMAE runs.

    Raises:
        UserError: the file does not exist, is unreadable, holds no backbone, or lacks the
            requested part.
    """
    path = Path(path)
    if part not in (None, "teacher", "student"):
        raise ValueError(f"part={part!r}: choose 'teacher' or 'student'")
    timm_config = None
    if path.is_dir():
        timm_config, state = _read_folder(path)
    elif path.is_file():
        state = read_state(path)
    else:
        raise UserError(f"checkpoint {path} does not exist")
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    found = _select(path, state, part, timm_config)
    if part is not None and found.part is None:
        raise UserError(
            f"{path} is a {found.layout} holding one backbone, so --{part} does not apply; drop it"
        )
    cleaned = _strip(found.state, ("module.", "backbone."))
    tensors = {k: v for k, v in cleaned.items() if isinstance(v, Tensor)}
    if not tensors:
        raise UserError(
            f"{path} ({found.layout}) holds no backbone tensors (keys: {sorted(cleaned)[:8]}); "
            f"expected {KNOWN_LAYOUTS}"
        )
    if any("flat_param" in key for key in tensors):
        raise UserError(
            f"{path} holds flattened FSDP shards (as DINOv2's model_<iteration>.rank_<r>.pth "
            "files do), not one tensor per parameter: load the eval/<iteration>/"
            "teacher_checkpoint.pth that DINOv2 writes instead"
        )
    found.ignored = sorted(k for k in tensors if k.startswith(IGNORED_PREFIXES))
    found.state = {k: v for k, v in tensors.items() if k not in found.ignored}
    if is_dinov2(tensors):
        found.state = dinov2_to_timm(found.state)
        found.layout = found.layout.replace("official DINO ", "official DINOv2 ")
        if found.layout.endswith("state dict"):
            found.layout = f"official DINOv2 backbone ({found.layout})"
    return found


def _select(
    path: Path, state: dict[str, Any], part: str | None, timm_config: dict[str, Any] | None
) -> BackboneWeights:
    """The backbone's part of a file's state dict, by layout (keys not yet cleaned)."""
    found = BackboneWeights(state, [], "", path=str(path), timm_config=timm_config)
    if timm_config is not None:
        saved = timm_config.get("ssl_kd")
        found.config = saved.get("run_config") if isinstance(saved, dict) else None
        found.layout = f"export folder ({timm_config['architecture']})"
    elif "method" in state and "config" in state:  # an ssl_kd training checkpoint
        found.config = state["config"]
        method = state["config"]["method"]
        backbones, default = run_backbones(state)
        found.part = part or default
        if not backbones:
            raise UserError(
                f"{path} is an ssl_kd {method} run of {state['config']['model']['name']}, which "
                "is not a ViT: it has no backbone to evaluate or export (its summary.json holds "
                "its classification scores)"
            )
        if found.part not in backbones:
            raise UserError(
                f"{path} is an ssl_kd {method} run that saves no {found.part} backbone (it "
                f"holds: {', '.join(backbones)}); evaluate the {default} (the default), or load "
                f"the {found.part}'s own file"
            )
        prefix = backbones[found.part]
        found.state = {
            k[len(prefix) :]: v for k, v in state["method"].items() if k.startswith(prefix)
        }
        found.layout = f"ssl_kd {method} run checkpoint ({found.part})"
    elif isinstance(state.get("teacher"), dict) or isinstance(state.get("student"), dict):
        found.part = part or "teacher"
        if not isinstance(state.get(found.part), dict):
            raise UserError(f"{path} has no {found.part!r} state dict (keys: {sorted(state)})")
        found.args = state.get("args")
        found.state = state[found.part]
        found.layout = f"official DINO checkpoint ({found.part})"  # DINOv2: renamed later
    elif isinstance(state.get("model"), dict) and _has_parts(state["model"]):
        # DINOv2's training checkpoint: the state dict of its meta-architecture, whose
        # `student` and `teacher` each hold a `backbone` and heads.
        found.part = part or "teacher"
        prefix = f"{found.part}."
        found.state = {
            k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)
        }
        if not found.state:
            raise UserError(f"{path} holds no {found.part!r} model (DINOv2 training checkpoint)")
        found.layout = f"official DINOv2 training checkpoint ({found.part})"
    elif isinstance(state.get("model"), dict):
        found.args = state.get("args")
        found.state = state["model"]
        found.layout = "MAE-style checkpoint ({'model': ...})"
    elif isinstance(state.get("state_dict"), dict):
        found.state = state["state_dict"]
        found.layout = "{'state_dict': ...} checkpoint"
    else:
        suffix = "safetensors" if path.suffix == ".safetensors" else "bare"
        found.layout = f"{suffix} state dict"
    return found


def _has_parts(state: dict[str, Any]) -> bool:
    """Whether a state dict holds `student.*` / `teacher.*` models (DINOv2's training layout)."""
    return any(key.startswith(("student.backbone.", "teacher.backbone.")) for key in state)


def fit_problems(
    backbone: ViTBackbone, weights: BackboneWeights
) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, "key: file shape vs model shape" mismatches)."""
    expected = backbone.vit.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in weights.state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = sorted(set(expected) - set(weights.state))
    unexpected = sorted(set(weights.state) - set(expected))
    return missing, unexpected, mismatched


def check_fit(backbone: ViTBackbone, weights: BackboneWeights, relaxable: bool = True) -> None:
    """Raises a UserError naming the file and the missing/unexpected/mis-shaped keys, if any.

    `relaxable`: the caller offers `--strict false` (export does not: it never drops a tensor).
    """
    missing, unexpected, mismatched = fit_problems(backbone, weights)
    if missing or unexpected or mismatched:
        relaxed = ", or pass --strict false to load the tensors that fit" if relaxable else ""
        raise UserError(
            f"{weights.path} ({weights.layout}) does not fit {type(backbone.vit).__name__} "
            f"(depth {backbone.num_blocks}, width {backbone.embed_dim}): "
            f"missing keys {key_list(missing, 8, quoted=True)}, unexpected keys "
            f"{key_list(unexpected, 8, quoted=True)}, shape mismatches "
            f"{key_list(mismatched, 8, quoted=True)}. Check "
            "the model name and kwargs (model.name / model.kwargs, --model / --model-kwargs, "
            f"dmae.teacher_name) against the checkpoint{relaxed}."
        )


def load_backbone_weights(
    backbone: ViTBackbone, path: str | Path, part: str | None = None
) -> list[str]:
    """Loads weights strictly apart from the keys ignored on purpose (which it returns).

    Raises:
        ValueError: naming the file and the missing and unexpected keys, or mismatched shapes.
    """
    weights = read_backbone_weights(path, part)
    check_fit(backbone, weights)
    backbone.vit.load_state_dict(weights.state, strict=True)
    return weights.ignored
