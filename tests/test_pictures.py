import numpy
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_kd.cli import main
from ssl_kd.data.transforms import normalize_images
from ssl_kd.engine.trainer import train
from ssl_kd.evaluation.pictures import (
    GAP,
    LABEL_HEIGHT,
    attention_and_keep,
    panel_box,
    write_attention_png,
)
from ssl_kd.masking import num_kept, select
from ssl_kd.visualize import DROPPED_BRIGHTNESS, RAMP, colormap, teacher_view, upsample_patches
from tests.helpers import tiny_backbone, tiny_config


def test_colormap_ends_and_upsampling_to_patch_squares():
    assert torch.allclose(colormap(torch.tensor([[0.0, 1.0]])).squeeze(-2).T, RAMP[[0, -1]])
    values = torch.arange(4.0).reshape(1, 4)  # grid 2x2, patch 3
    pixels = upsample_patches(values, (2, 2), 3)[0]
    assert pixels.shape == (6, 6) and pixels[4, 1] == 2.0 and pixels[2, 5] == 1.0


def test_teacher_view_keeps_selected_patches_and_dims_the_rest():
    images = torch.rand(2, 3, 8, 8)
    keep_idx = torch.tensor([[0, 3], [1, 2]])
    view = teacher_view(images, keep_idx, (2, 2), 4)
    assert torch.equal(view[0, :, :4, :4], images[0, :, :4, :4])  # patch 0 kept, exactly
    assert torch.allclose(view[0, :, :4, 4:], DROPPED_BRIGHTNESS * images[0, :, :4, 4:])
    assert torch.equal(view[1, :, :4, 4:], images[1, :, :4, 4:])


def patch_is_kept(panel, original, grid, patch):
    """Per patch: True if the panel shows the original pixels there (uint8 tolerance 1)."""
    kept = []
    for row in range(grid[0]):
        for col in range(grid[1]):
            box = (slice(None), slice(row * patch, (row + 1) * patch),
                   slice(col * patch, (col + 1) * patch))  # fmt: skip
            kept.append(bool((panel[box] - original[box]).abs().max() <= 1))
    return torch.tensor(kept)


def test_png_shows_exactly_the_patches_the_masking_module_selects(tmp_path):
    backbone, student = tiny_backbone(), tiny_backbone(depth=3)
    generator = torch.Generator().manual_seed(1)
    pixels = (torch.rand(40, 40, 3, generator=generator) * 200 + 40).byte()  # no black pixels
    image = Image.fromarray(pixels.numpy())
    path = write_attention_png(
        backbone, image, tmp_path / "x.png", img_size=32, keep_ratio=0.25, selector=student
    )
    png = torch.from_numpy(numpy.array(Image.open(path))).permute(2, 0, 1).int()
    heads = backbone.num_heads
    assert png.shape == (3, LABEL_HEIGHT + 32, (heads + 3) * 32 + (heads + 2) * GAP)

    left, top, right, bottom = panel_box(0, 32)
    original = png[:, top:bottom, left:right]
    left, top, right, bottom = panel_box(heads + 2, 32)
    teacher_panel = png[:, top:bottom, left:right]
    # what the masking module picks from the *student's* mean [CLS] attention on that crop
    crop = original.float().div(255).unsqueeze(0)
    scores = student.eval()(normalize_images(crop), cls_attention=True).cls_attention.mean(1)
    expected = torch.zeros(64, dtype=torch.bool)
    expected[select(scores, num_kept(64, 0.25), "attention_topk")[0]] = True
    assert expected.sum() == 16
    assert torch.equal(patch_is_kept(teacher_panel, original, (8, 8), 4), expected)
    # and the teacher's own attention would have picked differently (the selector matters)
    own = backbone(normalize_images(crop), cls_attention=True).cls_attention.mean(1)
    assert not torch.equal(
        select(own, 16, "attention_topk")[0], select(scores, 16, "attention_topk")[0]
    )


def test_attention_panels_are_the_per_head_maps_and_their_mean():
    backbone = tiny_backbone()
    images = torch.rand(2, 3, 32, 32)
    panels, attention, keep_idx = attention_and_keep(backbone, images, 0.5)
    assert panels.shape == (2, backbone.num_heads + 3, 3, 32, 32)
    assert attention.shape == (2, backbone.num_heads, 64) and keep_idx.shape == (2, 32)
    assert (attention.sum(-1) <= 1 + 1e-6).all()  # softmax over [CLS] + patches, patches shown
    assert torch.equal(panels[:, 0], images)
    # the brightest patch of head 0's overlay is the patch head 0 attends to most
    top_patch = attention[0, 0].argmax()
    row, col = divmod(int(top_patch), 8)
    overlay_brightness = panels[0, 1].sum(0)  # high attention → pale yellow end of the ramp
    expected = 0.4 * images[0].sum(0) + 0.6 * RAMP[-1].sum()
    assert torch.allclose(overlay_brightness[row * 4, col * 4], expected[row * 4, col * 4])


def test_cli_attention_on_the_sklearn_photo_with_a_random_init_model(tmp_path, capsys):
    argv = ["eval", "attention", "sklearn:china.jpg", "--model", "vit_tiny_patch16_224",
            "--model-kwargs", "{patch_size: 16, embed_dim: 64, depth: 2, num_heads: 2}",
            "--img-size", "96", "--keep-ratio", "0.5", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert "random initial weights" in capsys.readouterr().out
    picture = Image.open(tmp_path / "china_attention.png")
    assert picture.format == "PNG" and picture.size == (5 * 96 + 4 * GAP, LABEL_HEIGHT + 96)
    assert main([*argv[:2], "sklearn:nope.jpg", *argv[3:]]) == 2
    assert main([*argv, "--keep-ratio", "1.5"]) == 2
    assert "keep_ratio=1.5 is impossible" in capsys.readouterr().err


def test_dino_training_logs_attention_pictures(tmp_path):
    train(tiny_config(tmp_path, **{"train.max_steps": 2, "eval.pictures_every_steps": 2}))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    picture = events.Images("dino/attention")[0]
    # 4 global views x (image, 2 heads, mean, teacher input), 32 px crops drawn at 96 px
    assert (picture.step, picture.width, picture.height) == (2, 5 * 98 + 2, 4 * 98 + 2)


def test_pictures_every_steps_must_not_be_negative(tmp_path):
    from ssl_kd.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval\.pictures_every_steps=-1 must be >= 0"):
        tiny_config(tmp_path, **{"eval.pictures_every_steps": -1})
