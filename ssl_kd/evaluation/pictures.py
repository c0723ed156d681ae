"""Attention and masked-teacher pictures of image files, saved as labelled PNG strips.

Each PNG is one row: the image, the last-block [CLS]→patch attention of every head and their
mean (overlaid on the image), and the patches a masked teacher would see at keep ratio R, chosen
by `masking.select` from the student's head-averaged [CLS] attention (MaskedKD, arXiv:2302.10494).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms import functional as TF

from ssl_kd.data.datasets import load_image
from ssl_kd.data.transforms import normalize_images
from ssl_kd.errors import UserError
from ssl_kd.masking import num_kept, select
from ssl_kd.models.backbone import ViTBackbone
from ssl_kd.visualize import attention_panels

LABEL_HEIGHT = 16  # pixels above each panel for its caption
GAP = 4  # pixels between panels
SKLEARN_PREFIX = "sklearn:"  # scikit-learn's bundled photos: sklearn:china.jpg, sklearn:flower.jpg


def open_image(spec: str) -> tuple[str, Image.Image]:
    """(name, RGB image) of a file path or of `sklearn:china.jpg` / `sklearn:flower.jpg`."""
    if spec.startswith(SKLEARN_PREFIX):
        from sklearn.datasets import load_sample_image

        name = spec[len(SKLEARN_PREFIX) :]
        try:
            return Path(name).stem, Image.fromarray(load_sample_image(name)).convert("RGB")
        except (AttributeError, ValueError):  # sklearn's check of the name is a ValueError
            raise UserError(f"{spec}: scikit-learn bundles china.jpg and flower.jpg") from None
    if not Path(spec).is_file():
        raise UserError(f"image {spec} does not exist")
    return Path(spec).stem, load_image(spec)


def square_crop(image: Image.Image, size: int, patch: int) -> Tensor:
    """Shorter side resized to `size` rounded down to whole patches, centre crop → [3, S, S]."""
    side = max(patch, size // patch * patch)
    image = TF.resize(image, side, interpolation=TF.InterpolationMode.BICUBIC)
    return TF.to_tensor(TF.center_crop(image, side))


@torch.no_grad()
def attention_and_keep(
    backbone: ViTBackbone,
    images: Tensor,
    keep_ratio: float,
    strategy: str = "attention_topk",
    selector: ViTBackbone | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Panels, attention and kept patches for images [B, 3, S, S] in [0, 1].

    Args:
        backbone: whose per-head attention is drawn.
        selector: whose head-averaged attention ranks the patches (the student); default:
            `backbone` itself.

    Returns:
        panels [B, heads + 3, 3, S, S], attention [B, heads, N], keep_idx [B, k].
    """
    grid = backbone.grid(tuple(images.shape[-2:]))  # type: ignore[arg-type]
    normalised = normalize_images(images)
    attention = backbone.eval()(normalised, cls_attention=True).cls_attention
    scores = attention
    if selector is not None:
        scores = selector.eval()(normalised, cls_attention=True).cls_attention
    keep_idx = select(
        scores.mean(dim=1),
        num_kept(grid[0] * grid[1], keep_ratio),
        strategy,
        grid=grid,
        generator=generator,
    )
    panels = attention_panels(images, attention, keep_idx, grid, backbone.patch_size)
    return panels, attention, keep_idx


def panel_box(index: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of panel `index` in a strip of `size`-pixel panels."""
    left = index * (size + GAP)
    return left, LABEL_HEIGHT, left + size, LABEL_HEIGHT + size


def compose(panels: Tensor, labels: list[str]) -> Image.Image:
    """Panels [M, 3, S, S] in [0, 1] side by side on white, each with its caption above."""
    count, size = panels.shape[0], panels.shape[-1]
    strip = Image.new("RGB", (count * size + (count - 1) * GAP, LABEL_HEIGHT + size), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for index, (panel, label) in enumerate(zip(panels, labels, strict=True)):
        pixels = (panel.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        left, top, _, _ = panel_box(index, size)
        strip.paste(Image.fromarray(pixels), (left, top))
        while label and draw.textlength(label, font=font) > size:
            label = label[:-1]
        draw.text((left + 1, 2), label, fill="black", font=font)
    return strip


def panel_labels(heads: int, keep: int, num_patches: int) -> list[str]:
    return [
        "image",
        *(f"head {h + 1}" for h in range(heads)),
        "mean of heads",
        f"teacher {keep}/{num_patches}",
    ]


def write_attention_png(
    backbone: ViTBackbone,
    image: Image.Image,
    out: str | Path,
    *,
    img_size: int,
    keep_ratio: float,
    strategy: str = "attention_topk",
    selector: ViTBackbone | None = None,
) -> Path:
    """Writes the labelled strip of one image to `out` (PNG)."""
    crop = square_crop(image, img_size, backbone.patch_size).unsqueeze(0)
    panels, attention, keep_idx = attention_and_keep(
        backbone, crop, keep_ratio, strategy, selector, torch.Generator().manual_seed(0)
    )
    labels = panel_labels(attention.shape[1], keep_idx.shape[1], attention.shape[2])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compose(panels[0], labels).save(out, format="PNG")
    return out
