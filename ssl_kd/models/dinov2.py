"""Official DINOv2 files → timm names (facebookresearch/dinov2; DINOv2, arXiv:2304.07193;
registers, arXiv:2309.16588).

A DINOv2 state dict differs from a timm ViT's in four ways:

- training builds the blocks in `block_chunks` groups (for FSDP), saved as
  `blocks.<chunk>.<block>.*`; the block index already counts across chunks (a chunk's first
  slots are parameter-free placeholders for the earlier chunks' blocks), so dropping the chunk
  index gives timm's `blocks.<block>.*`. Released backbones have plain `blocks.<block>.*`;
- `mask_token` (iBOT's embedding of masked patches) and the `dino_head` / `ibot_head`
  projection heads only serve training: they are dropped, and reported as ignored;
- with registers, the file holds `register_tokens` and a position embedding with a [CLS] row but
  no register rows, where timm's `vit_*_reg4_dinov2` adds the [CLS] row into `cls_token` and
  embeds patches only (`no_embed_class`);
- ViT-g's fused SwiGLU MLP is `mlp.w12` / `mlp.w3` where timm has `mlp.fc1` / `mlp.fc2`.

The last two are timm's own conversion (`timm.models.vision_transformer`), applied as is, so a
file loads here exactly as `timm.create_model(..., pretrained=True)` would load it.
"""

from __future__ import annotations

import re

from torch import Tensor

from ssl_kd.errors import UserError

# Training-only parts of a DINOv2 state dict (ignored, like other heads).
TRAINING_ONLY_PREFIXES = ("dino_head.", "ibot_head.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def is_dinov2(state: dict[str, Tensor]) -> bool:
    """Whether a prefix-free state dict has DINOv2's layout (see the module docstring).

    DINOv2's `mask_token` is [1, D]; MAE's, which ssl_kd also reads, is [1, 1, D].
    """
    mask_token = state.get("mask_token")
    return (
        "register_tokens" in state
        or (mask_token is not None and mask_token.dim() == 2)
        or any(_CHUNKED_BLOCK.match(key) or key.startswith(TRAINING_ONLY_PREFIXES) for key in state)
    )


def dinov2_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A DINOv2 backbone state dict (heads and mask token already dropped) with timm's names.

    Raises:
        UserError: chunked block keys that name the same block twice.
    """
    from timm.models.vision_transformer import _convert_dinov2

    unchunked: dict[str, Tensor] = {}
    source: dict[str, str] = {}  # timm name → the file's key
    for key, value in state.items():
        name = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
        if name in source:
            raise UserError(
                f"the DINOv2 file holds block parameter {name!r} twice ({source[name]!r} and "
                f"{key!r}): it is not one DINOv2 model"
            )
        unchunked[name], source[name] = value, key
    # timm's conversion takes the target model in its signature and reads nothing from it.
    return _convert_dinov2(unchunked, None)  # type: ignore[arg-type]
