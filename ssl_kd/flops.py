"""Cost accounting: multiply-adds of a (masked, truncated) ViT forward, measured not modelled.

Counts come from `torch.utils.flop_counter.FlopCounterMode` on the real forward. On CPU, PyTorch
dispatches fused attention to `_scaled_dot_product_flash_attention_for_cpu`, which the counter
does not know (ViT-S/16 reads 4.24 instead of 4.60 GMACs), so it is registered here with the
same formula PyTorch uses for the GPU kernels. MACs are what the papers call FLOPs (DeiT-S 4.6
"GFLOPs"); where this project says FLOPs it means 2 × MACs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ssl_kd.errors import UserError
from ssl_kd.masking import num_kept
from ssl_kd.models.backbone import create_backbone


def _cpu_sdpa_flops(
    query_shape: torch.Size,
    key_shape: torch.Size,
    value_shape: torch.Size,
    *args: Any,
    **kwargs: Any,
) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU fused attention."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)


@torch.no_grad()
def forward_macs(module: nn.Module, img_size: int, keep: int | None = None, **kwargs: Any) -> int:
    """Multiply-adds of one image through `module(image, keep_idx=..., **kwargs)`.

    `module` is a `ViTBackbone` or anything with its calling convention (a backbone + head);
    `keep` patches are kept (None: all).
    """
    param = next(module.parameters())
    image = torch.zeros(1, 3, img_size, img_size, device=param.device, dtype=param.dtype)
    keep_idx = None
    if keep is not None:
        keep_idx = torch.arange(keep, device=param.device).unsqueeze(0)
    # Per-module flags are restored, not just the root's: a DINO teacher keeps its head's
    # BatchNorm in training mode inside an otherwise eval-mode network.
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        with flop_counter() as counter:
            module(image, keep_idx=keep_idx, **kwargs)
    finally:
        for child, training in modes:
            child.training = training
    return int(counter.get_total_flops()) // 2


def cost_report(
    model: str,
    keep_ratio: float = 1.0,
    img_size: int = 224,
    stop_after_block: int | None = None,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """Full vs masked cost of one image, as `ssl-kd flops` prints it.

    The model is built on the meta device: the counter needs shapes, not values (a ViT-L costs
    no memory and under a second).

    Without `stop_after_block`: `gmacs_full` (all tokens), `gmacs_masked` (kept tokens) and
    their `ratio`. With it there are two baselines, named apart: `gmacs_whole_teacher` (every
    block, all tokens: what the official DMAE runs, decoder aside) and `gmacs_truncated_full`
    (blocks 0..J, all tokens), and `ratio_vs_whole_teacher` / `ratio_vs_truncated_full` of the
    masked, truncated forward to each.

    Raises:
        UserError: not a timm ViT, an image size that is not a multiple of its patch size, a
            keep ratio outside (0, 1] or a block it does not have (named as the options).
    """
    with torch.device("meta"):
        backbone = create_backbone(model, img_size, **model_kwargs)
    patch = backbone.patch_size
    if img_size < patch or img_size % patch:
        raise UserError(
            f"--img-size {img_size} is not a multiple of the patch size {patch} of {model}; "
            f"use e.g. {max(patch, img_size // patch * patch)}"
        )
    last = backbone.num_blocks - 1
    if stop_after_block is not None and not 0 <= stop_after_block <= last:
        raise UserError(
            f"--stop-after-block {stop_after_block}: {model} has blocks 0..{last} (0-based)"
        )
    h, w = backbone.grid(img_size)
    try:
        keep = num_kept(h * w, keep_ratio)
    except ValueError as err:
        raise UserError(f"--keep-ratio: {err}") from None
    whole = forward_macs(backbone, img_size)
    masked = forward_macs(backbone, img_size, keep, stop_after_block=stop_after_block)
    prefix = backbone.num_prefix_tokens
    report = {
        "model": model,
        "img_size": img_size,
        "keep_ratio": keep_ratio,
        "blocks": backbone.num_blocks,
        "blocks_run": backbone.num_blocks if stop_after_block is None else stop_after_block + 1,
        "tokens_full": h * w + prefix,
        "tokens_kept": keep + prefix,
    }
    if stop_after_block is None:
        return {**report, "gmacs_full": whole / 1e9, "gmacs_masked": masked / 1e9,
                "ratio": masked / whole}  # fmt: skip
    truncated = forward_macs(backbone, img_size, stop_after_block=stop_after_block)
    return {
        **report,
        "gmacs_whole_teacher": whole / 1e9,
        "gmacs_truncated_full": truncated / 1e9,
        "gmacs_masked": masked / 1e9,
        "ratio_vs_whole_teacher": masked / whole,
        "ratio_vs_truncated_full": masked / truncated,
    }
