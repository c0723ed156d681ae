"""Backbone weights from any checkpoint layout, with an exact report of what was loaded.

Layouts recognised (the first that matches wins):

- an ssl_kd training checkpoint (`method` + `config`): the DINO teacher (default) or student, or
  the MAE/DMAE student encoder;
- an official DINO checkpoint (`teacher` / `student` dicts, `module.` and `backbone.` prefixes,
  `head.*` dropped; facebookresearch/dino `checkpoint.pth`);
- an official MAE checkpoint (`{"model": ...}`; `decoder_*` and `mask_token` dropped);
- `{"state_dict": ...}`, a bare timm state dict, or an ssl_kd export (`.safetensors`).

`.pth` files are read weights-only (`ssl_kd.safe_load`, with the objects official DINO/MAE
checkpoints pickle allowed): a file that would run code when read is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ssl_kd.errors import UserError, key_list
from ssl_kd.models.backbone import ViTBackbone
from ssl_kd.safe_load import describe_load_error, load_weights_only

# Keys a backbone never has: classifier heads, MAE's decoder and mask token.
IGNORED_PREFIXES = ("head.", "decoder_", "mask_token", "fc_norm.")
# A timm ViT's position embedding: it marks where a backbone sits in a run's state dict.
_MARKER = "vit.pos_embed"
KNOWN_LAYOUTS = (
    "an ssl_kd checkpoint.pth or export, an official DINO or MAE checkpoint, or a timm state dict"
)


@dataclass
class BackboneWeights:
    """A backbone state dict with timm names, and where it came from.

    Attributes:
        state: timm parameter name → tensor.
        ignored: keys dropped on purpose (heads, MAE decoder, mask token), sorted.
        layout: which layout the file had, e.g. "official DINO checkpoint (teacher)".
        part: "teacher" or "student" where the file holds both, else None.
        config: the ssl_kd run config saved in the file, if any.
        args: the official DINO/MAE `args` (an argparse Namespace), if any.
    """

    state: dict[str, Tensor]
    ignored: list[str]
    layout: str
    part: str | None = None
    config: dict[str, Any] | None = None
    args: Any = None
    path: str = field(default="")


def _read(path: Path) -> Any:
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
    """Reads the backbone weights of any supported file (see the module docstring).

    Args:
        path: the file.
        part: "teacher" or "student" for files holding both (ssl_kd DINO runs, official DINO);
            None takes the teacher of DINO files and the encoder of MAE/DMAE runs.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, holds no backbone, or lacks the requested part.
    """
    path = Path(path)
    if part not in (None, "teacher", "student"):
        raise ValueError(f"part={part!r}: choose 'teacher' or 'student'")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    state = _read(path)
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    config = args = None
    chosen: str | None = None
    if "method" in state and "config" in state:  # an ssl_kd training checkpoint
        config = state["config"]
        method = config["method"]
        backbones, default = run_backbones(state)
        chosen = part or default
        if chosen not in backbones:
            raise UserError(
                f"{path} is an ssl_kd {method} run that saves no {chosen} backbone (it holds: "
                f"{', '.join(backbones)}); evaluate the {default} (the default), or load the "
                f"{chosen}'s own file"
            )
        prefix = backbones[chosen]
        state = {k[len(prefix) :]: v for k, v in state["method"].items() if k.startswith(prefix)}
        layout = f"ssl_kd {method} run checkpoint ({chosen})"
    elif isinstance(state.get("teacher"), dict) or isinstance(state.get("student"), dict):
        chosen = part or "teacher"
        if not isinstance(state.get(chosen), dict):
            raise UserError(f"{path} has no {chosen!r} state dict (keys: {sorted(state)})")
        args = state.get("args")
        state = state[chosen]
        layout = f"official DINO checkpoint ({chosen})"
    elif isinstance(state.get("model"), dict):
        args = state.get("args")
        state = state["model"]
        layout = "MAE-style checkpoint ({'model': ...})"
    elif isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
        layout = "{'state_dict': ...} checkpoint"
    else:
        layout = "safetensors state dict" if path.suffix == ".safetensors" else "bare state dict"
    if part is not None and chosen is None:
        raise UserError(
            f"{path} is a {layout} holding one backbone, so --{part} does not apply; drop it"
        )
    cleaned = _strip(state, ("module.", "backbone."))
    tensors = {k: v for k, v in cleaned.items() if isinstance(v, Tensor)}
    if not tensors:
        raise UserError(
            f"{path} ({layout}) holds no backbone tensors (keys: {sorted(cleaned)[:8]}); "
            f"expected {KNOWN_LAYOUTS}"
        )
    ignored = sorted(k for k in tensors if k.startswith(IGNORED_PREFIXES))
    kept = {k: v for k, v in tensors.items() if k not in ignored}
    return BackboneWeights(kept, ignored, layout, chosen, config, args, str(path))


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


def check_fit(backbone: ViTBackbone, weights: BackboneWeights) -> None:
    """Raises a ValueError naming the file and the missing/unexpected/mis-shaped keys, if any."""
    missing, unexpected, mismatched = fit_problems(backbone, weights)
    if missing or unexpected or mismatched:
        raise UserError(
            f"{weights.path} ({weights.layout}) does not fit {type(backbone.vit).__name__} "
            f"(depth {backbone.num_blocks}, width {backbone.embed_dim}): "
            f"missing keys {key_list(missing, 8, quoted=True)}, unexpected keys "
            f"{key_list(unexpected, 8, quoted=True)}, shape mismatches "
            f"{key_list(mismatched, 8, quoted=True)}. Check "
            "the model name and kwargs (model.name / model.kwargs, --model / --model-kwargs, "
            "dmae.teacher_name) against the checkpoint, or pass --strict false to load the "
            "tensors that fit."
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
