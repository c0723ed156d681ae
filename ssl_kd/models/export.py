"""Export: the backbone a run evaluates, as a folder that timm and Hugging Face tools load with no
arguments, or as one state-dict file.

A folder (`--out DIR`, the default) holds `config.json`, written by timm's own
`save_config_for_hf` (the timm name, the model arguments that rebuild the model exactly, and a
`pretrained_cfg` with the input size, mean, std, interpolation and centre crop of ssl_kd's
evaluation transform), and `model.safetensors`:

    timm.create_model("local-dir:DIR", pretrained=True)

A file (`--out FILE.safetensors`, `.pth` or `.pt`) holds the state dict alone; timm then needs
the name and arguments (`pretrained_cfg_overlay=dict(file=FILE)` plus the kwargs).

Either way the weights are first loaded strictly into the model they describe: a tensor that
does not map to it stops the export with the keys named; keys dropped on purpose (heads, MAE's
decoder, DINOv2's mask token) are reported. Export never replaces its input nor a training
checkpoint, replaces an earlier export only when forced, and a folder only if it holds nothing
but an export.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save

from ssl_kd.errors import UserError, key_list
from ssl_kd.files import replace_file, replace_folder
from ssl_kd.models.architecture import Architecture, resolve_architecture
from ssl_kd.models.backbone import ViTBackbone, create_backbone
from ssl_kd.models.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    BackboneWeights,
    check_fit,
    is_training_checkpoint,
    read_backbone_weights,
)

FILE_SUFFIXES = (".safetensors", ".pth", ".pt")
# What the registry's default `pretrained_cfg` says about *its* weights, not about these.
_NOT_OURS = ("tag", "license", "label_names", "label_descriptions", "notes", "paper_ids")


@dataclass
class ExportReport:
    """What an export wrote, for the console."""

    out: Path
    folder: bool
    architecture: Architecture
    weights: BackboneWeights

    def __str__(self) -> str:
        arch = self.architecture
        what = f"{CONFIG_NAME} + {WEIGHTS_NAME}" if self.folder else "state dict"
        lines = [
            f"wrote {len(self.weights.state)} tensors of {arch.name} {arch.kwargs or ''} "
            f"(img_size {arch.img_size}, from {arch.source}) to {self.out} ({what}); source: "
            f"{self.weights.path} ({self.weights.layout})",
            f"dropped on purpose ({len(self.weights.ignored)}): {key_list(self.weights.ignored)}",
        ]
        if self.folder:
            lines.append(f'timm: timm.create_model("local-dir:{self.out}", pretrained=True)')
        return "\n".join(lines)


def export_backbone(
    checkpoint: str | Path,
    out: str | Path,
    force: bool = False,
    *,
    part: str | None = None,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> ExportReport:
    """Writes the backbone of `checkpoint` (see `read_backbone_weights`) to `out`.

    A folder unless `out` ends in `.safetensors`, `.pth` or `.pt` (one file, by suffix); the
    write is atomic (see `replace_file`, `replace_folder`).

    Args:
        part: "teacher" / "student" of a file holding both; None: what the run evaluates.
        model, model_kwargs: the timm model, where the file does not say (`resolve_architecture`).

    Raises:
        UserError: `out` is the input, a training checkpoint (even with `force`), a folder
            holding anything but an export (even with `force`), or exists (without `force`);
            the weights do not fit the model (keys named); `out` cannot be written (read-only,
            full): nothing is left behind then.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    folder = out.suffix not in FILE_SUFFIXES
    check_target(checkpoint, out, force, folder)
    weights = read_backbone_weights(checkpoint, part)
    arch = resolve_architecture(weights, model, model_kwargs)
    backbone = create_backbone(arch.name, arch.img_size, **arch.kwargs)
    check_fit(backbone, weights, relaxable=False)
    backbone.vit.load_state_dict(weights.state, strict=True)
    state = {key: value.detach().contiguous() for key, value in backbone.vit.state_dict().items()}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            config = _timm_config(weights, arch)
            replace_folder(out, lambda tmp: _write_folder(tmp, backbone, state, config))
        else:
            data = _serialise(state, out.suffix)
            replace_file(out, lambda handle: handle.write(data))
    except OSError as err:
        raise UserError(f"--out {out}: cannot write it ({err.strerror or err})") from None
    return ExportReport(out, folder, arch, weights)


def _serialise(state: dict[str, torch.Tensor], suffix: str) -> bytes:
    if suffix == ".safetensors":
        return save(state)
    # serialised first: torch.save into a file that fills up fails with a RuntimeError
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _timm_config(weights: BackboneWeights, arch: Architecture) -> dict[str, Any]:
    """The arguments of timm's `save_config_for_hf` that describe these weights."""
    from ssl_kd.data.transforms import eval_preprocessing

    run = weights.config or {}
    input_size = int(run.get("data", {}).get("global_crop_size") or arch.img_size)
    return {
        # What rebuilds the model exactly: create_backbone's arguments.
        "model_args": {
            **arch.kwargs,
            "img_size": arch.img_size,
            "dynamic_img_size": True,
            "num_classes": 0,
        },
        "model_config": {
            "pretrained_cfg": {**eval_preprocessing(input_size), "num_classes": 0},
            # Not read by timm: where the weights came from, and the run's config, whose data
            # section `ssl-kd eval` takes its defaults from (digits, seed, held-out fraction).
            "ssl_kd": {
                "source": str(weights.path),
                "layout": weights.layout,
                "part": weights.part,
                "run_config": weights.config,
            },
        },
    }


def _write_folder(
    folder: Path, backbone: ViTBackbone, state: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    from timm.models._hub import save_config_for_hf

    # Serialised in memory and written with `open`: safetensors' own `save_file` writes files
    # 0o600 and words a full disk as its own error type, not as an OSError.
    (folder / WEIGHTS_NAME).write_bytes(save(state))
    vit = backbone.vit
    registry_cfg = cast(dict[str, Any], vit.pretrained_cfg)
    ours = {k: v for k, v in registry_cfg.items() if k not in _NOT_OURS}
    vit.pretrained_cfg = ours  # type: ignore[assignment]
    save_config_for_hf(vit, folder / CONFIG_NAME, **config)  # type: ignore[arg-type]


def check_target(checkpoint: Path, out: Path, force: bool, folder: bool) -> None:
    """Refuses an `out` that export must not write (see `export_backbone`)."""
    if not os.path.lexists(out):
        return
    if out.exists() and checkpoint.exists() and out.samefile(checkpoint):
        raise UserError(
            f"--out {out} is the {'folder' if out.is_dir() else 'file'} being exported: export "
            "never replaces its input; name another one, e.g. export/ beside it"
        )
    if folder:
        _check_folder_target(out, force)
        return
    if out.is_dir():
        raise UserError(
            f"--out {out} is a folder: name a new file, or drop the suffix to write an export "
            "folder"
        )
    if is_training_checkpoint(out):
        raise UserError(
            f"--out {out} is an ssl_kd training checkpoint: export never replaces one, not even "
            "with --force (the run could not resume); name another file. To discard it, "
            "delete it yourself"
        )
    if not force:
        raise UserError(f"--out {out} exists: pass --force to replace it, or name another file")


def _check_folder_target(out: Path, force: bool) -> None:
    if not out.is_dir():
        raise UserError(
            f"--out {out} is a file: name a new folder for the export (or a .safetensors / .pth "
            "file name for a single file)"
        )
    entries = sorted(os.listdir(out))
    others = [name for name in entries if name not in (CONFIG_NAME, WEIGHTS_NAME)]
    if others:
        raise UserError(
            f"--out {out} is a folder holding more than an export ({key_list(others)}): export "
            "replaces only an earlier export folder, not even with --force; name a new folder"
        )
    if entries and not force:
        raise UserError(
            f"--out {out} holds an earlier export: pass --force to replace it, or name another "
            "folder"
        )
