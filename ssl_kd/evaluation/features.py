"""Frozen-backbone features for the k-NN and linear-probe protocols, extracted in batches.

- k-NN (DINO): the [CLS] token after the final norm, L2-normalised.
- Linear (DINO, arXiv:2104.14294 App. eval_linear): the [CLS] token of each of the last n blocks,
  each passed through the final norm, concatenated; optionally the average patch token of the
  last block appended (DINO's ViT-B setting).
- Linear (MAE, arXiv:2111.06377 §A.2): the [CLS] token after the final norm (n = 1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ssl_kd.errors import UserError
from ssl_kd.models.backbone import ViTBackbone


@dataclass(frozen=True)
class FeatureSpec:
    """Which tokens form a feature vector.

    Attributes:
        n_last_blocks: [CLS] of the last n blocks (each through the final norm), concatenated.
        avgpool: also the last block's average patch token.
        normalize: L2-normalise the result (k-NN).
    """

    n_last_blocks: int = 1
    avgpool: bool = False
    normalize: bool = False

    def dim(self, embed_dim: int) -> int:
        return embed_dim * (self.n_last_blocks + int(self.avgpool))


@torch.no_grad()
def backbone_features(backbone: ViTBackbone, images: Tensor, spec: FeatureSpec) -> Tensor:
    """images [B, C, H, W] → features [B, spec.dim(D)] float32 (backbone in eval mode)."""
    if not 1 <= spec.n_last_blocks <= backbone.num_blocks:
        raise UserError(
            f"n_last_blocks={spec.n_last_blocks}: the backbone has {backbone.num_blocks} blocks"
        )
    blocks = list(range(backbone.num_blocks - spec.n_last_blocks, backbone.num_blocks))
    out = backbone(images, return_blocks=blocks)
    normed = [backbone.vit.norm(out.block_outputs[j]) for j in blocks]  # each [B, T, D]
    parts = [tokens[:, 0] for tokens in normed]
    if spec.avgpool:
        parts.append(normed[-1][:, backbone.num_prefix_tokens :].mean(dim=1))
    features = torch.cat(parts, dim=-1).float()
    return F.normalize(features, dim=-1) if spec.normalize else features


@torch.no_grad()
def extract(
    backbone: ViTBackbone,
    batches: Iterable[Tensor],
    spec: FeatureSpec,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> Tensor:
    """Features of every image, in order: [N, spec.dim(D)] on the CPU.

    Args:
        batches: image batches [B, C, H, W] (labels, if any, already stripped).
        progress: a description to show a progress bar with; None shows none.
    """
    was_training = backbone.training
    backbone.eval()
    features = []
    try:
        for images in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            features.append(backbone_features(backbone, images.to(device), spec).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(features)
