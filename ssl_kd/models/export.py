"""Export: a prefix-free, head-free backbone state dict that timm loads strictly.

timm.create_model(name, pretrained=True, num_classes=0,
                  pretrained_cfg_overlay=dict(file=FILE))
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ssl_kd.models.weights import backbone_state_dict


def export_backbone(checkpoint: str | Path, out: str | Path) -> list[str]:
    """Writes the backbone of `checkpoint` (see `backbone_state_dict`) to `out`.

    `.safetensors` or `.pth` by suffix; the write is atomic. Returns the exported keys.
    """
    out = Path(out)
    if out.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"--out {out}: use a .safetensors or .pth file name")
    state, _ignored = backbone_state_dict(checkpoint)
    state = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".safetensors":
        save_file(state, str(tmp))
    else:
        torch.save(state, tmp)
    tmp.replace(out)
    return sorted(state)
