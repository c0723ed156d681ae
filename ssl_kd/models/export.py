"""Export: a prefix-free, head-free backbone state dict that timm loads strictly.

timm.create_model(name, pretrained=True, num_classes=0,
                  pretrained_cfg_overlay=dict(file=FILE))

Export never replaces the file it reads nor a training checkpoint, and replaces any other
existing file only when forced (a training checkpoint replaced by a backbone loses the run).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from safetensors.torch import save

from ssl_kd.errors import UserError
from ssl_kd.files import write_atomic
from ssl_kd.models.weights import is_training_checkpoint, read_backbone_weights


def export_backbone(checkpoint: str | Path, out: str | Path, force: bool = False) -> list[str]:
    """Writes the backbone of `checkpoint` (see `read_backbone_weights`) to `out`.

    `.safetensors` or `.pth` by suffix; the write is atomic. Returns the exported keys.

    Raises:
        UserError: `out` is a directory, has another suffix, exists (without `force`), is
            `checkpoint` itself or a training checkpoint (even with `force`), or cannot be
            written (read-only, full); nothing is left behind then.
    """
    out = Path(out)
    check_target(Path(checkpoint), out, force)
    state = read_backbone_weights(checkpoint).state
    state = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    if out.suffix == ".safetensors":
        data = save(state)
    else:  # serialised first: torch.save into a file that fills up fails with a RuntimeError
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda handle: handle.write(data))
    except OSError as err:
        raise UserError(f"--out {out}: cannot write it ({err.strerror or err})") from None
    return sorted(state)


def check_target(checkpoint: Path, out: Path, force: bool) -> None:
    """Refuses an `out` that export must not write (see `export_backbone`)."""
    if out.is_dir():
        example = out / "backbone.safetensors"
        raise UserError(f"--out {out} is a directory: name a file in it, e.g. {example}")
    if out.suffix not in (".safetensors", ".pth", ".pt"):
        raise UserError(f"--out {out}: use a .safetensors or .pth file name")
    if not os.path.lexists(out):
        return
    if out.exists() and checkpoint.exists() and out.samefile(checkpoint):
        raise UserError(
            f"--out {out} is the file being exported: export never replaces its input; name "
            "another file, e.g. backbone.safetensors beside it"
        )
    if is_training_checkpoint(out):
        raise UserError(
            f"--out {out} is an ssl_kd training checkpoint: export never replaces one, not even "
            "with --force (the run could not resume); name another file. To discard it, "
            "delete it yourself"
        )
    if not force:
        raise UserError(f"--out {out} exists: pass --force to replace it, or name another file")
