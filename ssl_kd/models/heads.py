"""Heads: the MAE decoder and the DMAE feature projections.

The MAE decoder (He et al., arXiv:2111.06377) wraps lightly's `MaskedVisionTransformerDecoderTIMM`
(mask token, fixed sine-cosine position embedding, timm blocks, norm) between an input projection
and a pixel prediction layer; only the masked positions are predicted.
"""

from __future__ import annotations

from lightly.models import utils as lightly_utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM
from torch import Tensor, nn

from ssl_kd.masking import to_sequence_index


class MAEDecoder(nn.Module):
    """Encoder tokens of the visible patches → pixels of the masked patches.

    Args:
        num_patches: N, patches per image; encoder_dim: encoder width;
        patch_pixels: values per patch (3 · p²).
    """

    def __init__(
        self,
        num_patches: int,
        encoder_dim: int,
        patch_pixels: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=num_patches,
            embed_dim=dim,
            depth=depth,
            num_heads=num_heads,
            num_prefix_tokens=num_prefix_tokens,
        )
        self.predict = nn.Linear(dim, patch_pixels)
        nn.init.xavier_uniform_(self.embed.weight)
        nn.init.xavier_uniform_(self.predict.weight)
        nn.init.zeros_(self.embed.bias)
        nn.init.zeros_(self.predict.bias)

    def forward(self, encoded: Tensor, keep_idx: Tensor, mask_idx: Tensor) -> Tensor:
        """encoded: [B, P + k, D] (prefix first); keep_idx [B, k], mask_idx [B, N - k] patch
        indices → predicted pixels [B, N - k, 3 · p²] of the masked patches."""
        tokens = self.embed(encoded)  # [B, P + k, d]
        batch = tokens.shape[0]
        sequence = lightly_utils.repeat_token(
            self.decoder.mask_token, (batch, self.decoder.sequence_length)
        ).to(tokens.dtype)
        visible = to_sequence_index(keep_idx, self.num_prefix_tokens)  # [B, P + k]
        sequence = lightly_utils.set_at_index(sequence, visible, tokens)
        decoded = self.decoder.decode(self.decoder.add_pos_embed(sequence))  # [B, P + N, d]
        masked = lightly_utils.get_at_index(decoded, mask_idx + self.num_prefix_tokens)
        return self.predict(masked)  # only the masked positions are predicted


PROJECTIONS = ("linear", "mlp")


def alignment_projection(student_dim: int, teacher_dim: int, kind: str = "linear") -> nn.Module:
    """DMAE's projection of a student block's tokens to the teacher's width."""
    if kind == "linear":
        return nn.Linear(student_dim, teacher_dim)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(student_dim, teacher_dim), nn.GELU(), nn.Linear(teacher_dim, teacher_dim)
        )
    raise ValueError(f"unknown projection {kind!r}; choose linear or mlp")
