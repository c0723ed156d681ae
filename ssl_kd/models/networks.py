"""The networks two methods train, each a backbone with its heads: DINO's multi-crop wrapper
(backbone + projection head) and MAE's student (encoder + decoder + DMAE's alignment
projections). Pure modules: the methods in ssl_kd/methods/ build and drive them.
"""

from __future__ import annotations

import torch
from lightly.models.modules import DINOProjectionHead
from torch import Tensor, nn

from ssl_kd.models.backbone import ViTBackbone
from ssl_kd.models.heads import MAEDecoder


class DINONetwork(nn.Module):
    """Backbone + DINO head over a list of views (DINO's MultiCropWrapper).

    Views of one resolution run as one batch; the global views also yield the last block's
    [CLS] attention when asked.
    """

    def __init__(self, backbone: ViTBackbone, head: DINOProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        global_views: Tensor,
        local_views: Tensor | None = None,
        keep_idx: Tensor | None = None,
        cls_attention: bool = False,
        images_per_forward: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Global views [G·B, C, H, W] (masked by keep_idx [G·B, k] if given), local views
        [L·B, C, h, w] → logits [(G + L)·B, K], the global views' [CLS] features [G·B, D] and
        their last-block [CLS] attention [G·B, heads, N_kept].

        `images_per_forward`: the global views run through the backbone in forwards of at most
        this many images (the same results; smaller activations, see `DINO.forward`)."""
        size = images_per_forward or global_views.shape[0]
        index_chunks = keep_idx.split(size) if keep_idx is not None else None
        outs = [
            self.backbone(chunk, None if index_chunks is None else index_chunks[i],
                          cls_attention=cls_attention)
            for i, chunk in enumerate(global_views.split(size))
        ]  # fmt: skip
        cls = torch.cat([out.cls for out in outs])
        attention = torch.cat([out.cls_attention for out in outs]) if cls_attention else None
        features = cls
        if local_views is not None:
            features = torch.cat([features, self.backbone(local_views).cls])
        return self.head(features), cls, attention


class MAEStudent(nn.Module):
    """Encoder, decoder and alignment projections: everything DMAE trains (what DDP wraps)."""

    def __init__(
        self, encoder: ViTBackbone, decoder: MAEDecoder, projections: nn.ModuleList
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.projections = projections

    def forward(
        self,
        images: Tensor,
        keep_idx: Tensor,
        mask_idx: Tensor,
        student_blocks: list[int],
        cls_attention: bool,
    ) -> tuple[Tensor, dict[int, Tensor], Tensor | None]:
        """→ predicted pixels of the masked patches [B, N - k, 3p²], raw block outputs of the
        aligned student blocks [B, 1 + k, D], the last block's [CLS] attention [B, H, k]."""
        out = self.encoder(
            images, keep_idx, cls_attention=cls_attention, return_blocks=student_blocks
        )
        return self.decoder(out.tokens, keep_idx, mask_idx), out.block_outputs, out.cls_attention
