"""timm ViT wrapper: masked forward, the last block's [CLS] attention, truncated forward.

`ViTBackbone.forward(x, keep_idx)` adds position embeddings to every patch, then keeps only the
patches in `keep_idx` (prefix tokens, i.e. [CLS] and registers, always stay), so a teacher fed
a subset of patches pays only for those tokens (MaskedKD, arXiv:2302.10494; MAE, arXiv:2111.06377).

Crops on another patch grid than the position embedding's (DINO's 96-px local crops) get it
resampled as official DINO does (`pos_embed_interpolation=DINO_INTERPOLATION`) or as timm does.

The [CLS]→patch attention of the last block is recomputed from that block's own `qkv` output,
captured by a forward hook: one query row against all keys, O(N·d) extra work. timm's fused
attention stays on everywhere; no attention matrix is ever materialised for the other blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import timm
import torch
from einops import rearrange
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn

from ssl_kd.errors import UserError
from ssl_kd.masking import gather_patches
from ssl_kd.pos_embed import (
    DINO_INTERPOLATION,
    INTERPOLATIONS,
    TIMM_INTERPOLATION,
    resample_like_dino,
)


@dataclass
class BackboneOutput:
    """What one forward returns.

    Attributes:
        cls: [B, D] pooled feature after the final norm (the DINO head's input); None when the
            forward stopped before the last block.
        tokens: [B, T, D] tokens after the last block run (normed only if all blocks ran);
            T = prefix tokens + kept patches.
        cls_attention: [B, H, N_kept] last block's post-softmax [CLS]→patch attention per head,
            when requested.
        block_outputs: raw outputs (before the final norm) of the requested blocks, [B, T, D].
    """

    cls: Tensor | None
    tokens: Tensor
    cls_attention: Tensor | None = None
    block_outputs: dict[int, Tensor] = field(default_factory=dict)


class ViTBackbone(nn.Module):
    """A timm `VisionTransformer` with masked and truncated forwards.

    Args:
        vit: built with `dynamic_img_size=True`.
        pos_embed_interpolation: how the position embedding is resampled for a crop on another
            patch grid, named after the code it follows (`INTERPOLATIONS`): official DINO's
            (bicubic by grid + 0.1, no antialiasing) or timm's (bicubic to the grid, antialiased).
    """

    def __init__(self, vit: nn.Module, pos_embed_interpolation: str = TIMM_INTERPOLATION) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
        if not vit.dynamic_img_size:
            raise ValueError("build the ViT with dynamic_img_size=True (multi-crop needs it)")
        if pos_embed_interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"pos_embed_interpolation={pos_embed_interpolation!r}: choose one of "
                f"{', '.join(INTERPOLATIONS)}"
            )
        self.vit: VisionTransformer = vit
        self.pos_embed_interpolation = pos_embed_interpolation
        self.compiled = False  # run the blocks compiled (`train.compile`, `compiled_run_blocks`)

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def num_blocks(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_heads(self) -> int:
        return int(_block_attention(self.vit.blocks[-1]).num_heads)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    def grid(self, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) for an input of this size."""
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        return h // self.patch_size, w // self.patch_size

    def embed(self, x: Tensor) -> Tensor:
        """Pixels [B, C, H, W] → tokens [B, P + N, D] with position embeddings, prefix first."""
        x = self.vit.patch_embed(x)  # [B, h, w, D] (dynamic_img_size)
        other_grid = tuple(x.shape[1:3]) != tuple(self.vit.patch_embed.grid_size)
        like_dino = self.pos_embed_interpolation == DINO_INTERPOLATION
        if like_dino and other_grid and self.vit.pos_embed is not None:
            x = self._pos_embed_like_dino(x)
        else:
            x = self.vit._pos_embed(x)  # timm resamples antialiased for another grid
        x = self.vit.patch_drop(x)
        return self.vit.norm_pre(x)

    def _pos_embed_like_dino(self, patches: Tensor) -> Tensor:
        """timm's `_pos_embed` with official DINO's resampling: patches [B, h, w, D] → tokens
        [B, P + h·w, D]. Resampled in every forward: the table is learned (cost: one
        [D, 14, 14] bicubic per call)."""
        vit = self.vit
        assert vit.pos_embed is not None
        batch, rows, columns, dim = patches.shape
        prefix_rows = 0 if vit.no_embed_class else self.num_prefix_tokens
        patch_table = resample_like_dino(
            vit.pos_embed[:, prefix_rows:], tuple(vit.patch_embed.grid_size), (rows, columns)
        )  # [1, h·w, D]
        tokens = patches.reshape(batch, rows * columns, dim)
        prefix = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if vit.no_embed_class:  # the table has no prefix rows
            tokens = torch.cat([*prefix, tokens + patch_table], dim=1)
        else:
            table = torch.cat([vit.pos_embed[:, :prefix_rows], patch_table], dim=1)
            tokens = torch.cat([*prefix, tokens], dim=1) + table
        return vit.pos_drop(tokens)

    def forward(
        self,
        x: Tensor,
        keep_idx: Tensor | None = None,
        *,
        cls_attention: bool = False,
        stop_after_block: int | None = None,
        return_blocks: Sequence[int] = (),
    ) -> BackboneOutput:
        """Runs the ViT on all patches or on the kept ones.

        Args:
            x: [B, C, H, W] images (any size divisible by the patch size).
            keep_idx: [B, k] patch-space indices to keep (sorted); None keeps all.
            cls_attention: also return the last run block's [CLS]→patch attention.
            stop_after_block: run blocks 0..j only (a truncated teacher); None runs all.
            return_blocks: indices of blocks whose raw outputs to return.
        """
        tokens = self.embed(x)
        if keep_idx is not None:
            tokens = gather_patches(tokens, keep_idx, self.num_prefix_tokens)
        last = self.num_blocks - 1 if stop_after_block is None else stop_after_block
        if not 0 <= last < self.num_blocks:
            raise ValueError(f"stop_after_block={last} outside 0..{self.num_blocks - 1}")
        wanted = set(return_blocks)
        if any(not 0 <= j <= last for j in wanted):
            raise ValueError(f"return_blocks={sorted(wanted)} must lie in 0..{last}")

        # The block that also yields the [CLS] attention runs eager, outside: its qkv hook.
        stop = last if cls_attention else last + 1
        run = compiled_run_blocks if self.compiled else run_blocks
        tokens, block_outputs = run(self.vit.blocks, tokens, stop, tuple(sorted(wanted)))
        attention = None
        if cls_attention:
            tokens, attention = self._block_with_cls_attention(self.vit.blocks[last], tokens)
            if last in wanted:
                block_outputs[last] = tokens

        cls = None
        if last == self.num_blocks - 1:
            tokens = self.vit.norm(tokens)
            cls = self.vit.fc_norm(self.vit.pool(tokens))
        return BackboneOutput(cls, tokens, attention, block_outputs)

    def _block_with_cls_attention(self, block: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Runs one block and recomputes its [CLS] attention row from the block's own qkv.

        The row is computed inside the hook, so the full qkv tensor is not kept alive.
        """
        attn = _block_attention(block)
        captured: list[Tensor] = []

        def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], qkv: Tensor) -> None:
            captured.append(cls_attention_from_qkv(qkv, attn, self.num_prefix_tokens))

        handle = attn.qkv.register_forward_hook(hook)
        try:
            tokens = block(tokens)
        finally:
            handle.remove()
        return tokens, captured[0]


def run_blocks(
    blocks: nn.Sequential, tokens: Tensor, stop: int, wanted: tuple[int, ...]
) -> tuple[Tensor, dict[int, Tensor]]:
    """Blocks 0..stop-1 over tokens [B, T, D] → the tokens after them, and the raw outputs of
    the `wanted` blocks."""
    outputs: dict[int, Tensor] = {}
    for j in range(stop):
        tokens = blocks[j](tokens)
        if j in wanted:
            outputs[j] = tokens
    return tokens, outputs


# `train.compile`: one graph for a backbone's blocks. Batch and token count are symbolic from the
# first compile (dynamic=True), so no keep ratio (adaptive ones included), crop size or batch
# recompiles it; a new graph comes only with another backbone (student, teacher), train/eval
# mode or `stop`/`wanted`: a handful per run, under dynamo's recompile limit (8 per function).
# Compiled per block instead, each block's own drop-path rate would be a graph of its own.
compiled_run_blocks = torch.compile(run_blocks, dynamic=True)


def _block_attention(block: nn.Module) -> Attention:
    """A timm ViT block's `attn`, which has the interface of timm's `Attention` (num_heads, qkv,
    q_norm, k_norm, scale); `nn.Module.__getattr__` types it as `Tensor | Module`."""
    return cast(Attention, block.attn)


def cls_attention_from_qkv(qkv: Tensor, attn: Attention, num_prefix_tokens: int) -> Tensor:
    """Post-softmax attention of the [CLS] query over all keys, patch columns only.

    Args:
        qkv: [B, T, 3 * H * d] output of a timm `Attention.qkv`.

    Returns:
        [B, H, T - num_prefix_tokens] (softmax taken over all T keys, as in the block itself).
    """
    qkv = rearrange(qkv.detach(), "b t (three h d) -> three b h t d", three=3, h=attn.num_heads)
    query = attn.q_norm(qkv[0][:, :, :1])  # [B, H, 1, d]: the [CLS] row only
    keys = attn.k_norm(qkv[1])  # [B, H, T, d]
    logits = (query.float() @ keys.float().transpose(-2, -1)) * attn.scale  # [B, H, 1, T]
    return logits.softmax(dim=-1)[:, :, 0, num_prefix_tokens:]


def create_backbone(
    name: str,
    img_size: int,
    *,
    drop_path_rate: float = 0.0,
    pos_embed_interpolation: str = TIMM_INTERPOLATION,
    **kwargs: Any,
) -> ViTBackbone:
    """Builds any timm ViT by name, never downloading weights.

    Args:
        name: timm model name, e.g. `vit_small_patch16_224`.
        img_size: size the position embedding is built for (other sizes are resampled).
        pos_embed_interpolation: one of `INTERPOLATIONS`, see `ViTBackbone`.
        kwargs: overrides for timm (patch_size, embed_dim, depth, num_heads, ...).

    Raises:
        UserError: an unknown name, a model that is not a ViT, or keyword arguments timm
            refuses (an unknown one, embed_dim not divisible by num_heads, ...).
    """
    try:
        vit = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
    except (RuntimeError, TypeError, AssertionError, ValueError) as err:
        # timm's own words: "Unknown model (x)", "unexpected keyword argument 'bogus'",
        # "dim should be divisible by num_heads".
        raise UserError(_build_problem(name, kwargs, err)) from None
    if not isinstance(vit, VisionTransformer):
        raise UserError(_not_a_vit(name, vit))
    return ViTBackbone(vit, pos_embed_interpolation)


def _build_problem(name: str, kwargs: dict[str, Any], err: Exception) -> str:
    """What to tell the user when timm refuses: a non-ViT refuses ViT keywords (a ResNet has
    no img_size), which would hide the real problem, so the bare model is tried once more."""
    if timm.is_model(name):
        try:
            with torch.device("meta"):
                bare = timm.create_model(name, pretrained=False)
        except Exception:  # the bare model needs arguments: report the first error
            bare = None
        if bare is not None and not isinstance(bare, VisionTransformer):
            return _not_a_vit(name, bare)
    with_kwargs = f" with {kwargs}" if kwargs else ""
    return f"timm cannot build {name!r}{with_kwargs}: {err}"


def _not_a_vit(name: str, model: nn.Module) -> str:
    return (
        f"{name!r} is a timm {type(model).__name__}, not a VisionTransformer: ssl_kd masks the "
        "patch tokens of ViTs (vit_*, deit_*, ...)"
    )


def check_backbone(name: str, img_size: int, **kwargs: Any) -> ViTBackbone:
    """`create_backbone` on the meta device: the same errors, no memory and no init work
    (about 0.1 s for ViT-S, 0.5 s for ViT-g), so a config can be checked before any work. The
    result has the real structure (patch size, width, depth) and no data."""
    with torch.device("meta"):
        return create_backbone(name, img_size, **kwargs)
