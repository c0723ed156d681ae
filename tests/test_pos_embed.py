"""Position embeddings against the originals' formulas, written out here in numpy: MAE's 2-D
sin-cos table (facebookresearch/mae util/pos_embed.py) and official DINO's bicubic resampling
of the table for local crops (facebookresearch/dino vision_transformer.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_kd.models.backbone import create_backbone
from ssl_kd.pos_embed import resample_like_dino, sincos_2d_table
from tests.helpers import mae_sincos_reference


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 neighbours i-1, i, i+1, i+2 at offset t."""

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_by_scale_reference(image: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Bicubic, align_corners=False, no antialiasing, sampled at (o + 0.5) / scale - 0.5 with
    the output size floor(n · scale) and the border replicated: [C, H, W] → [C, h, w]."""

    def matrix(n: int, s: float) -> np.ndarray:  # [n_out, n] interpolation along one axis
        out = math.floor(n * s)
        weights = np.zeros((out, n))
        for o in range(out):
            source = (o + 0.5) / s - 0.5
            first = min(math.floor(source), n - 1)
            t = min(max(source - first, 0.0), 1.0)
            for k, w in zip(range(first - 1, first + 3), cubic_weights(t), strict=True):
                weights[o, min(max(k, 0), n - 1)] += w
        return weights

    rows, columns = matrix(image.shape[1], scale[0]), matrix(image.shape[2], scale[1])
    return np.einsum("oh,chw,pw->cop", rows, image.astype(np.float64), columns)


@pytest.mark.parametrize(("dim", "size"), [(64, 8), (192, 14), (768, 14)])
def test_sincos_table_equals_maes_formula(dim, size):
    reference = torch.from_numpy(mae_sincos_reference(dim, size)).float()
    table = sincos_2d_table(dim, (size, size))
    assert table.shape == (size * size, dim)
    assert torch.allclose(table, reference, rtol=0, atol=1e-7)
    # row-major patches; the first half of the channels follows the column: patch (0, 1)
    assert table[1, 0] == pytest.approx(math.sin(1.0)) and table[1, dim // 2] == 0.0


def test_sincos_table_needs_a_width_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_table(66, (4, 4))


@pytest.mark.parametrize(("source", "target"), [(14, 6), (8, 4), (4, 8)])
def test_dino_resampling_equals_the_official_formula(source, target):
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(1, source * source, 8, generator=generator)
    resampled = resample_like_dino(table, (source, source), (target, target))
    image = table[0].T.reshape(8, source, source).numpy()
    scale = (target + 0.1) / source
    reference = bicubic_by_scale_reference(image, (scale, scale))  # [8, target, target]
    expected = torch.from_numpy(reference).float().reshape(8, -1).T[None]
    assert resampled.shape == (1, target * target, 8)
    assert torch.allclose(resampled, expected, rtol=0, atol=1e-5)
    # timm's resampling (to the size, antialiased) is another function
    timm_like = F.interpolate(
        table[0].T.reshape(1, 8, source, source), size=(target, target), mode="bicubic",
        antialias=True,
    ).reshape(8, -1).T[None]  # fmt: skip
    assert not torch.allclose(resampled, timm_like, atol=1e-3)


def test_dino_interpolation_gives_official_dinos_cls_on_a_96px_crop():
    torch.manual_seed(0)
    tiny = {"embed_dim": 64, "depth": 2, "num_heads": 2}
    dino = create_backbone("vit_small_patch16_224", 224, pos_embed_interpolation="dino", **tiny)
    timm_like = create_backbone("vit_small_patch16_224", 224, **tiny)
    with torch.no_grad():
        dino.vit.pos_embed.mul_(20)  # a learned table's scale, not timm's std 0.02 start
    timm_like.load_state_dict(dino.state_dict())
    dino.eval(), timm_like.eval()
    crop = torch.randn(2, 3, 96, 96)
    vit = dino.vit

    # official DINO by hand: the 14×14 table resampled to 6×6 by the formula, [CLS] row kept
    table = vit.pos_embed[0, 1:].detach().T.reshape(64, 14, 14).numpy()
    resampled = bicubic_by_scale_reference(table, (6.1 / 14, 6.1 / 14))  # [64, 6, 6]
    patch_rows = torch.from_numpy(resampled).float().reshape(64, 36).T[None]
    with torch.no_grad():
        patches = vit.patch_embed(crop).reshape(2, 36, 64)
        tokens = torch.cat([vit.cls_token.expand(2, -1, -1), patches], dim=1)
        tokens = tokens + torch.cat([vit.pos_embed[:, :1], patch_rows], dim=1)
        for block in vit.blocks:
            tokens = block(tokens)
        expected = vit.norm(tokens)[:, 0]
        cls, timm_cls = dino(crop).cls, timm_like(crop).cls
        assert torch.allclose(cls, expected, atol=1e-5)
        assert (cls - timm_cls).norm() > 2e-3 * cls.norm()  # timm resamples otherwise
        full = torch.randn(2, 3, 224, 224)  # on the table's own grid nothing is resampled
        assert torch.equal(dino(full).cls, timm_like(full).cls)


def test_dino_resampling_passes_gradients_to_the_learned_table():
    backbone = create_backbone(
        "vit_small_patch16_224", 224, pos_embed_interpolation="dino", embed_dim=64, depth=1,
        num_heads=2,
    )  # fmt: skip
    backbone(torch.randn(2, 3, 96, 96)).cls.sum().backward()
    grad = backbone.vit.pos_embed.grad
    assert grad is not None and bool((grad[0, 1:].abs().sum(-1) > 0).all())
