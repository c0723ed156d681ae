"""Export: a prefix-free, head-free backbone state dict that timm loads strictly.

timm.create_model(name, pretrained=True, num_classes=0,
                  pretrained_cfg_overlay=dict(file=FILE))
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from ssl_kd.errors import UserError
from ssl_kd.files import write_atomic
from ssl_kd.models.weights import read_backbone_weights


def export_backbone(checkpoint: str | Path, out: str | Path) -> list[str]:
    """Writes the backbone of `checkpoint` (see `read_backbone_weights`) to `out`.

    `.safetensors` or `.pth` by suffix; the write is atomic. Returns the exported keys.
    """
    out = Path(out)
    if out.suffix not in (".safetensors", ".pth", ".pt"):
        raise UserError(f"--out {out}: use a .safetensors or .pth file name")
    state = read_backbone_weights(checkpoint).state
    state = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        write_atomic(out, lambda handle: handle.write(save(state)))
    else:
        write_atomic(out, lambda handle: torch.save(state, handle))
    return sorted(state)
