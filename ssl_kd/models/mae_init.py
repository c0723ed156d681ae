"""MAE's encoder initialisation, where it differs from timm's (He et al., arXiv:2111.06377).

timm starts a ViT with truncated-normal Linear weights (std 0.02), the patch embedding as a
convolution, a learned position embedding and a near-zero [CLS]. MAE's encoder starts with:

- every Linear weight xavier-uniform, bias 0; every LayerNorm weight 1, bias 0;
- the patch embedding's weight [D, C, p, p] xavier-uniform as the Linear [D, C·p·p] it is
  (on the 4-D tensor xavier would count p·p into both fans and come out p times narrower);
- [CLS] (and register tokens, which MAE has not) normal with std 0.02;
- the position embedding fixed to the 2-D sine-cosine table, [CLS] row 0, never trained.
"""

from __future__ import annotations

from torch import nn

from ssl_kd.models.backbone import ViTBackbone
from ssl_kd.pos_embed import fix_sincos_pos_embed


def init_like_mae(backbone: ViTBackbone) -> None:
    """Re-initialises a freshly built backbone in place as MAE's encoder (see the module)."""
    vit = backbone.vit
    for module in vit.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    weight = vit.patch_embed.proj.weight  # [D, C, p, p]
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    for token in (vit.cls_token, vit.reg_token):
        if token is not None:
            nn.init.normal_(token, std=0.02)
    if vit.pos_embed is None:
        raise ValueError("MAE's encoder adds a position embedding; this ViT has none")
    fix_sincos_pos_embed(vit.pos_embed, tuple(vit.patch_embed.grid_size))
