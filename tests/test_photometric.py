"""The photometric half of data.transform=fast (ssl_kd/data/photometric.py, color.py): DINO's
parameters per view (read from lightly's DINOTransform), their distributions on a large sample,
and the batched ops against torchvision's per-image ops and Pillow's blur."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from sklearn.datasets import load_sample_images
from torchvision.transforms.v2 import functional as TF

from ssl_kd.data import MultiCropSpec, color, lightly_multi_crop, photometric
from ssl_kd.data.crops import dino_view_groups
from ssl_kd.data.photometric import (
    BatchedPhotometric,
    PhotometricParams,
    apply_in_order,
    apply_photometric,
    dino_colors,
    sample_photometric,
)

DRAWS = 20_000
# One-sample Kolmogorov–Smirnov critical value at alpha = 0.001 for 20,000 draws: 1.95 / sqrt(n).
KS_LIMIT = 1.95 / math.sqrt(DRAWS)


def rate_tolerance(p: float) -> float:
    """5 standard deviations of a rate over DRAWS draws (0 for p = 0 or 1: exact)."""
    return 5 * math.sqrt(p * (1 - p) / DRAWS)


def lightly_view_facts(view: object) -> dict[str, object]:
    """What one of lightly's DINOViewTransforms does, read from its parts."""
    parts = {type(part).__name__: part for part in view.transform.transforms}  # type: ignore[attr-defined]
    jitter = parts["RandomApply"].transforms[0]
    return {
        "size": parts["RandomResizedCrop"].size[0],
        "scale": tuple(parts["RandomResizedCrop"].scale),
        "ratio": tuple(parts["RandomResizedCrop"].ratio),
        "hflip": parts["RandomHorizontalFlip"].p,
        "jitter_prob": parts["RandomApply"].p,
        "ranges": [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue],
        "gray_prob": parts["RandomGrayscale"].p,
        "blur_prob": parts["GaussianBlur"].prob,
        "sigma": tuple(parts["GaussianBlur"].sigmas),
        "solarize_prob": parts["RandomSolarization"].prob,
        "mean": tuple(parts["Normalize"].mean),
        "std": tuple(parts["Normalize"].std),
    }


def ours_view_facts(spec: MultiCropSpec) -> list[dict[str, object]]:
    groups = dino_view_groups(
        spec.global_crop_size, spec.local_crop_size, spec.num_local_views,
        spec.global_crop_scale, spec.local_crop_scale,
    )  # fmt: skip
    facts = []
    for group in groups:
        aug = group.color
        facts += [
            {
                "size": group.size,
                "scale": group.scale,
                "ratio": (3 / 4, 4 / 3),
                "hflip": spec.hflip_prob,
                "jitter_prob": aug.jitter_prob,
                "ranges": [
                    (1 - aug.brightness, 1 + aug.brightness),
                    (1 - aug.contrast, 1 + aug.contrast),
                    (1 - aug.saturation, 1 + aug.saturation),
                    (-aug.hue, aug.hue),
                ],
                "gray_prob": aug.gray_prob,
                "blur_prob": aug.blur_prob,
                "sigma": aug.blur_sigma,
                "solarize_prob": aug.solarize_prob,
                "mean": photometric.IMAGENET_MEAN,
                "std": photometric.IMAGENET_STD,
            }
        ] * group.count
    return facts


DINO = MultiCropSpec(224, 96, 8, (0.4, 1.0), (0.05, 0.4))


def test_every_views_parameters_are_those_of_lightlys_dino_transform():
    lightly = [lightly_view_facts(view) for view in lightly_multi_crop(DINO).transforms]
    ours = ours_view_facts(DINO)
    assert len(ours) == len(lightly) == 10
    for view, (mine, theirs) in enumerate(zip(ours, lightly, strict=True)):
        for key in theirs:
            assert np.allclose(mine[key], theirs[key]), (view, key, mine[key], theirs[key])  # type: ignore[arg-type]


@pytest.mark.parametrize("view", [0, 1, 2], ids=["global_1", "global_2", "local"])
def test_drawn_parameters_follow_dinos_distributions(view: int):
    """20,000 draws of one view's parameters: rates within 5 standard deviations of DINO's
    probabilities (exactly 0 or 1 where DINO's is), jitter factors and blur sigmas uniform on
    DINO's ranges (Kolmogorov–Smirnov, alpha = 0.001), jitter orders uniform over the 24
    permutations (chi-square, p > 0.001), as torchvision's ColorJitter draws them."""
    facts = lightly_view_facts(lightly_multi_crop(DINO).transforms[view])
    params = sample_photometric(dino_colors(8)[view], DRAWS, torch.Generator().manual_seed(view))
    for drawn, expected in [
        (params.jitter, facts["jitter_prob"]),
        (params.grayscale, facts["gray_prob"]),
        (params.blur, facts["blur_prob"]),
        (params.solarize, facts["solarize_prob"]),
    ]:
        assert abs(drawn.float().mean().item() - expected) <= rate_tolerance(expected)  # type: ignore[arg-type]
    for column, (low, high) in enumerate(facts["ranges"]):  # type: ignore[arg-type]
        values = params.factors[:, column].double().numpy()
        assert low <= values.min() and values.max() <= high
        assert stats.kstest(values, stats.uniform(low, high - low).cdf).statistic < KS_LIMIT
    low, high = facts["sigma"]  # type: ignore[misc]
    sigmas = params.sigma.double().numpy()
    assert stats.kstest(sigmas, stats.uniform(low, high - low).cdf).statistic < KS_LIMIT
    orders = [tuple(row) for row in params.order.tolist()]
    counts = [orders.count(perm) for perm in itertools.permutations(range(4))]
    assert sum(counts) == DRAWS and stats.chisquare(counts).pvalue > 1e-3


# --- the batched ops ------------------------------------------------------------------------
def images(count: int = 12, seed: int = 0) -> torch.Tensor:
    """Random colour images [count, 3, 20, 24] with a grey one and flat patches (ties, zero
    chroma) among them."""
    batch = torch.rand(count, 3, 20, 24, generator=torch.Generator().manual_seed(seed))
    batch[0] = batch[0, :1]  # grey
    batch[1, :, :5] = 0.5
    batch[2, 0] = batch[2, 1]  # red = green
    return batch


@pytest.mark.parametrize(
    ("ours", "reference", "low", "high"),
    [
        (color.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (color.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (color.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
        (color.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_batched_jitter_ops_equal_torchvisions_per_image_ops(ours, reference, low, high):
    batch = images()
    factors = torch.rand(len(batch), generator=torch.Generator().manual_seed(1))
    factors = factors * (high - low) + low
    expected = torch.stack(
        [reference(image, float(factor)) for image, factor in zip(batch, factors, strict=True)]
    )
    assert torch.allclose(ours(batch, factors), expected, atol=2e-6)
    assert not torch.allclose(expected, batch, atol=1e-2)  # the op did something


def test_grayscale_and_solarize_equal_torchvisions():
    batch = images()
    gray = color.grayscale(batch).repeat(1, 3, 1, 1)
    assert torch.allclose(gray, TF.rgb_to_grayscale(batch, num_output_channels=3), atol=1e-6)
    assert torch.equal(color.solarize(batch), TF.solarize(batch, threshold=128 / 255))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.5, 2.0])
def test_blur_is_pillows_gaussian_blur(sigma: float):
    """DINO blurs PIL images with `ImageFilter.GaussianBlur(radius=sigma)` (three extended box
    blurs, not torchvision's sampled Gaussian). On photo crops the batched float blur is within
    3/255 of Pillow's 8-bit one everywhere, edges included, and 0.75/255 on average (Pillow
    rounds after each of its six passes); the blur itself moves pixels by 9–26/255 on average
    for sigma >= 0.5."""
    photo = load_sample_images().images[0]
    crops = [photo[100:196, 200:296], photo[300:340, 10:90], photo[0:64, 576:640]]
    for crop in crops:
        expected = np.asarray(Image.fromarray(crop).filter(ImageFilter.GaussianBlur(sigma)))
        tensor = torch.from_numpy(crop.copy()).permute(2, 0, 1).unsqueeze(0).float()
        blurred = color.pil_gaussian_blur(tensor, torch.tensor([sigma]))[0].permute(1, 2, 0)
        difference = (blurred - torch.from_numpy(expected.astype(np.float32))).abs()
        assert difference.max() < 3 and difference.mean() < 0.75, (difference.max(), sigma)


def reference_photometric(batch: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
    """One image at a time, torchvision's ops in the drawn order (ColorJitter's loop)."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for index, image in enumerate(batch):
        if params.jitter[index]:
            for op_index in params.order[index].tolist():
                image = ops[op_index](image, float(params.factors[index, op_index]))
        if params.grayscale[index]:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if params.blur[index]:
            image = color.pil_gaussian_blur(image[None], params.sigma[index : index + 1])[0]
        if params.solarize[index]:
            image = TF.solarize(image, threshold=128 / 255)
        out.append(image)
    return torch.stack(out)


def test_batched_application_equals_per_image_ops_in_each_views_order(monkeypatch):
    batch = torch.cat([images(12, seed) for seed in range(4)])  # 48 views
    params = PhotometricParams.cat(
        [
            sample_photometric(color_aug, 16, torch.Generator().manual_seed(i))
            for i, color_aug in enumerate(dino_colors(1))  # global 1, global 2, local
        ]
    )
    expected = reference_photometric(batch, params)
    assert params.jitter.any() and params.blur.any() and params.solarize.any()
    whole = apply_in_order(batch.clone(), params)  # as on a GPU: the whole batch at once
    assert torch.allclose(whole, expected, atol=1e-5)
    monkeypatch.setattr(photometric, "CPU_PIECE_BYTES", 3 * batch[0].nbytes)  # pieces of 3
    assert torch.allclose(apply_photometric(batch.clone(), params), expected, atol=1e-5)


def test_batched_photometric_colours_each_view_with_its_own_parameters():
    """Collated worker output (V × [B, 3, S, S] uint8, params [B, V]) → each view coloured with
    the parameters drawn for it, then normalised; views of one size coloured together."""
    generator = torch.Generator().manual_seed(0)
    sizes = [16, 16, 8, 8, 8]
    batch = 3
    views = [torch.randint(0, 256, (batch, 3, s, s), generator=generator).byte() for s in sizes]
    colors = dino_colors(3)
    per_image = [
        PhotometricParams.cat([sample_photometric(c, 1, generator) for c in colors])
        for _ in range(batch)
    ]
    params = PhotometricParams(*(torch.stack(fields) for fields in zip(*per_image, strict=True)))
    out = BatchedPhotometric()(views, params)
    mean = torch.tensor(photometric.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(photometric.IMAGENET_STD).view(1, 3, 1, 1)
    for index, view in enumerate(views):
        mine = params.rows((slice(None), index))  # [B] parameters of this view
        expected = reference_photometric(view.float() / 255, mine)
        assert out[index].shape == view.shape and out[index].dtype == torch.float32
        assert torch.allclose(out[index], (expected - mean) / std, atol=1e-4)
