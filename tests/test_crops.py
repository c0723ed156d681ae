"""The geometric half of data.transform=fast (ssl_kd/data/crops.py): crop boxes drawn as
torchvision's RandomResizedCrop draws them, flips, reduced-size JPEG decoding only where it
cannot change what a crop sees, and views equal to torchvision's resized crops."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from sklearn.datasets import load_sample_images
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from ssl_kd.data import BatchedMultiCrop, MultiCropSpec
from ssl_kd.data.crops import (
    ViewGroup,
    WorkerCrops,
    draft_factor,
    fallback_box,
    sample_crop_boxes,
)
from ssl_kd.data.images import decode_image, open_image
from ssl_kd.data.photometric import NO_COLOR

DRAWS = 20_000
# Two-sample Kolmogorov–Smirnov critical value at alpha = 0.001 for two samples of 20,000:
# 1.95 · sqrt(2 / 20,000) = 0.0195. A correct sampler stays under it 999 times in 1000 (the
# seeds are fixed, so the test is deterministic); a wrong one lands far above (see the clamp).
KS_LIMIT = 0.0195


def torchvision_boxes(height: int, width: int, scale: tuple[float, float]) -> np.ndarray:
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    ratio = (3 / 4, 4 / 3)
    return np.array(
        [T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(DRAWS)]
    )


def box_statistics(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    """Per box: area fraction, log aspect ratio, relative position of its centre."""
    top, left, crop_h, crop_w = boxes.T.astype(np.float64)
    return {
        "scale": crop_h * crop_w / (height * width),
        "log_ratio": np.log(crop_w / crop_h),
        "centre_y": (top + crop_h / 2) / height,
        "centre_x": (left + crop_w / 2) / width,
    }


@pytest.mark.parametrize(
    ("height", "width", "scale"),
    [
        (375, 500, (0.4, 1.0)),  # DINO's global crops of an ImageNet-sized photo
        (375, 500, (0.05, 0.4)),  # its local crops
        (375, 500, (0.2, 1.0)),  # MAE's crop
        (300, 600, (0.4, 1.0)),  # a panorama: most draws miss, the boxes that fit are smaller
        (100, 1000, (0.4, 1.0)),  # every draw misses: always the fallback
        (640, 200, (0.05, 0.4)),  # a tall image
    ],
)
def test_crop_boxes_are_distributed_as_torchvisions_random_resized_crop(height, width, scale):
    generator = torch.Generator().manual_seed(1)
    ours = sample_crop_boxes(height, width, DRAWS, scale, generator=generator)
    reference = torchvision_boxes(height, width, scale)
    ours_stats = box_statistics(ours.numpy(), height, width)
    reference_stats = box_statistics(reference, height, width)
    for name, values in ours_stats.items():
        distance = stats.ks_2samp(values, reference_stats[name]).statistic
        assert distance < KS_LIMIT, (name, distance)
    fallback = np.array(fallback_box(height, width, (3 / 4, 4 / 3)))
    ours_fallbacks = (ours.numpy() == fallback).all(axis=1).mean()
    reference_fallbacks = (reference == fallback).all(axis=1).mean()
    assert abs(ours_fallbacks - reference_fallbacks) < 0.015  # 3.3 standard deviations
    assert (ours[:, 2:] > 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] + ours[:, 3] <= width).all()


def test_clamping_oversize_crops_instead_of_redrawing_fails_the_comparison():
    """The old BatchedMultiCrop clamped a box's sides to the image instead of drawing again: on
    a panorama that is another distribution, and the comparison above sees it."""
    height, width = 300, 600
    generator = torch.Generator().manual_seed(1)
    area = height * width * (torch.rand(DRAWS, generator=generator) * 0.6 + 0.4)
    ratio = torch.exp((torch.rand(DRAWS, generator=generator) * 2 - 1) * math.log(4 / 3))
    crop_w = torch.sqrt(area * ratio).round().clamp(max=width)
    crop_h = torch.sqrt(area / ratio).round().clamp(max=height)
    clamped = torch.stack([crop_h * 0, crop_w * 0, crop_h, crop_w], dim=1).numpy()
    reference = torchvision_boxes(height, width, (0.4, 1.0))
    distance = stats.ks_2samp(
        box_statistics(clamped, height, width)["scale"],
        box_statistics(reference, height, width)["scale"],
    ).statistic
    assert distance > 10 * KS_LIMIT


def test_the_fallback_is_torchvisions_centre_crop():
    assert fallback_box(100, 1000, (3 / 4, 4 / 3)) == (0, 433, 100, 133)  # widest allowed
    assert fallback_box(1000, 100, (3 / 4, 4 / 3)) == (433, 0, 133, 100)  # tallest allowed
    assert fallback_box(90, 100, (3 / 4, 4 / 3)) == (0, 0, 90, 100)  # the whole image
    boxes = sample_crop_boxes(100, 1000, 50, (0.99, 1.0))  # never fits in 10 attempts
    assert boxes.tolist() == [[0, 433, 100, 133]] * 50


def test_batched_multicrop_redraws_and_falls_back_as_random_resized_crop():
    """A whole-image crop of a 8 × 32 image cannot keep its area at a ratio within [3/4, 4/3]:
    RandomResizedCrop (and now BatchedMultiCrop) falls back to the central 8 × 11 box."""
    images = torch.rand(4, 3, 8, 32, generator=torch.Generator().manual_seed(0))
    spec = MultiCropSpec(8, 8, 0, (1.0, 1.0), (1.0, 1.0), hflip_prob=0.0)
    crop = BatchedMultiCrop(spec, [NO_COLOR] * 2, mean=(0, 0, 0), std=(1, 1, 1))
    view = crop(images, torch.Generator().manual_seed(0))[0]
    top, left, height, width = fallback_box(8, 32, (3 / 4, 4 / 3))
    assert (top, left, height, width) == (0, 10, 8, 11)
    box = images[:, :, top : top + height, left : left + width]
    expected = torch.nn.functional.interpolate(box, size=(8, 8), mode="bilinear")
    assert torch.allclose(view, expected, atol=1e-5)


def test_flips_come_at_the_configured_rate():
    images = torch.rand(DRAWS, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    spec = MultiCropSpec(2, 2, 0, (1.0, 1.0), (1.0, 1.0), hflip_prob=0.5)
    crop = BatchedMultiCrop(spec, [NO_COLOR] * 2, mean=(0, 0, 0), std=(1, 1, 1), aspect=(1, 1))
    view = crop(images, torch.Generator().manual_seed(0))[0]
    flipped = (view - images.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-5
    unchanged = (view - images).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (flipped ^ unchanged).all()
    assert abs(flipped.float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / DRAWS)


# --- the workers' crops ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1280 × 854 JPEG with a photo's fine detail (scikit-learn's two sample photos, tiled)."""
    china, flower = load_sample_images().images  # 427 × 640 each
    top, bottom = np.concatenate([china, flower], 1), np.concatenate([flower, china], 1)
    mosaic = np.concatenate([top, bottom])
    path = tmp_path_factory.mktemp("photo") / "mosaic.jpg"
    Image.fromarray(mosaic).save(path, quality=90)
    return path


def test_draft_factor_is_the_least_downscaled_views():
    def boxes(side: int) -> torch.Tensor:
        return torch.tensor([[0, 0, side, side + 50]])

    assert draft_factor([boxes(447)], [224]) == 1  # 1.996× < 2
    assert draft_factor([boxes(448)], [224]) == 2
    assert draft_factor([boxes(900)], [224]) == 4
    assert draft_factor([boxes(2000)], [224]) == 8
    assert draft_factor([boxes(2000), boxes(190)], [224, 96]) == 1  # a local view at 1.98×
    tall = torch.tensor([[0, 0, 1000, 300]])  # the smaller side decides
    assert draft_factor([tall], [100]) == 2


def test_draft_decodes_jpegs_at_a_reduced_size_only(photo: Path, tmp_path: Path):
    with open_image(str(photo)) as image:
        reduced, factor = decode_image(image, str(photo), 4)
    assert factor == 4 and reduced.size == (320, 214)  # ceil(854 / 4) rows
    png = tmp_path / "photo.png"
    Image.open(photo).save(png)
    with open_image(str(png)) as image:
        assert decode_image(image, str(png), 4)[1] == 1
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: crops are drawn on the upright image
    Image.open(photo).save(turned, exif=exif)
    with open_image(str(turned)) as image:
        upright, factor = decode_image(image, str(turned), 4)
    assert factor == 1 and upright.size == (854, 1280)


def worker_output(crops: WorkerCrops, path: Path, seed: int) -> tuple[list[torch.Tensor], ...]:
    torch.manual_seed(seed)
    views, _ = crops(str(path))
    torch.manual_seed(seed)  # the same draws again: boxes first, then flips
    width, height = Image.open(path).size
    boxes = torch.cat(crops.sample_boxes(width, height)).tolist()
    flips = (torch.rand(len(boxes)) < crops.hflip_prob).tolist()
    return views, boxes, flips


def test_worker_views_are_torchvisions_resized_crops(photo: Path):
    """Without a reduced decode, a view is exactly what DINO's RandomResizedCrop (bicubic, PIL)
    and RandomHorizontalFlip make of the same box: uint8, bit for bit."""
    groups = [ViewGroup(224, (0.4, 1.0), 2, NO_COLOR), ViewGroup(96, (0.05, 0.4), 4, NO_COLOR)]
    crops = WorkerCrops(groups, hflip_prob=0.5, draft=False)
    image = Image.open(photo).convert("RGB")
    for seed in range(3):
        views, boxes, flips = worker_output(crops, photo, seed)
        for view, (top, left, height, width), flip, size in zip(
            views, boxes, flips, crops.sizes, strict=True
        ):
            expected = TF.resized_crop(
                image, top, left, height, width, [size, size], T.InterpolationMode.BICUBIC
            )
            if flip:
                expected = TF.horizontal_flip(expected)
            assert view.dtype == torch.uint8 and torch.equal(view, TF.pil_to_tensor(expected))


def test_a_reduced_decode_leaves_downscaled_crops_as_they_were(photo: Path):
    """Crops downscaled ≥ 2× (global 224 of ≥ 448 px, local 64 of ≥ 128 px) from the JPEG
    decoded at 1/2 or 1/4: the same region, pixels within 1.5/255 on average of the full
    decode's (measured: 1.07 at most, 0.48 on average). The same reduction for a crop shown at
    its own size (no downscale) changes it by 11/255: that is why the factor follows the least
    downscaled view."""
    groups = [ViewGroup(224, (0.5, 1.0), 2, NO_COLOR), ViewGroup(64, (0.1, 0.3), 6, NO_COLOR)]
    drafted = WorkerCrops(groups, hflip_prob=0.5)
    full = WorkerCrops(groups, hflip_prob=0.5, draft=False)
    width, height = Image.open(photo).size
    factors, errors = [], []
    for seed in range(8):
        torch.manual_seed(seed)
        factors.append(draft_factor(drafted.sample_boxes(width, height), [224, 64]))
        torch.manual_seed(seed)
        reduced_views, _ = drafted(str(photo))
        torch.manual_seed(seed)
        full_views, _ = full(str(photo))
        for a, b in zip(reduced_views, full_views, strict=True):
            errors.append((a.float() - b.float()).abs().mean().item())
    assert min(factors) >= 2  # the draft was used in every sample
    assert max(errors) < 1.5, max(errors)
    # no downscale: a 200-px box shown at 200 px, from the half-size decode
    box = [300, 400, 200, 200]
    with open_image(str(photo)) as image:
        half, factor = decode_image(image, str(photo), 2)
    whole = Image.open(photo).convert("RGB")
    blurred = WorkerCrops.cut(half, box, 200, factor, flip=False).float()
    sharp = WorkerCrops.cut(whole, box, 200, 1, flip=False).float()
    assert (blurred - sharp).abs().mean().item() > 3 * 1.5
