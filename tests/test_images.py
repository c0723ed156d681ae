"""`load_image` on real files written by PIL: the pixels a person sees, or a DataError."""

import warnings

import numpy as np
import pytest
from PIL import Image

from ssl_kd.data import ALPHA_BACKGROUND, DataError, load_image
from ssl_kd.errors import RunFailed


def pixels(path):
    return np.asarray(load_image(str(path)), dtype=np.int64)  # [H, W, 3]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path, suffix):
    # A gradient over the whole 16-bit range; convert("RGB") alone clips all of it above 255.
    gradient = np.linspace(0, 65535, 64 * 256).round().astype(np.uint16).reshape(64, 256)
    path = tmp_path / f"gradient{suffix}"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode == "I;16"  # the file really is 16-bit
    loaded = pixels(path)
    assert loaded.shape == (64, 256, 3)
    assert (loaded == loaded[..., :1]).all()  # grey stays grey
    assert np.abs(loaded[..., 0] - gradient / 257).max() <= 0.5  # proportional: v / 257
    assert loaded.min() == 0 and loaded.max() == 255
    assert (loaded == 255).mean() < 0.01


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide, 20 high, left half red; orientation 6 = shown turned 90° clockwise.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    loaded = pixels(path)
    assert loaded.shape == (40, 20, 3)  # upright: 20 wide, 40 high
    top, bottom = loaded[5, 10], loaded[35, 10]  # the stored left half is now the top
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def transparent_image(mode):
    """8×8: columns 0-3 fully transparent red, 4-5 opaque blue, 6-7 half-transparent black."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 0)
    rgba[:, 4:6] = (0, 0, 255, 255)
    rgba[:, 6:] = (0, 0, 0, 128)
    image = Image.fromarray(rgba)
    if mode == "LA":
        return image.convert("LA")
    if mode == "P":  # a palette with one transparent entry (as GIFs and small PNGs hold it)
        palette = Image.new("P", (8, 8))
        palette.putpalette([255, 0, 0, 0, 0, 255, 0, 0, 0])
        palette.putdata([0, 0, 0, 0, 1, 1, 2, 2] * 8)
        palette.info["transparency"] = 0
        return palette
    return image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_on_the_documented_background(tmp_path, mode):
    path = tmp_path / f"{mode}.png"
    image = transparent_image(mode)
    image.save(path, **({"transparency": 0} if mode == "P" else {}))
    assert Image.open(path).mode == mode
    loaded = pixels(path)
    assert (loaded[:, :4] == ALPHA_BACKGROUND).all()  # transparent: the background
    if mode == "RGBA":
        assert (loaded[:, 4:6] == (0, 0, 255)).all()  # opaque: unchanged
        half = np.array(ALPHA_BACKGROUND) * (1 - 128 / 255)  # black over it at alpha 128
        assert np.abs(loaded[:, 6:] - half).max() <= 1


def test_corrupt_image_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*broken.jpg") as err:
        load_image(str(bad))
    assert err.value.path == str(bad)
    assert isinstance(err.value, RunFailed) and err.value.exit_code == 1


@pytest.mark.parametrize(("side", "by_whom"), [(40, "ssl_kd"), (50, "PIL")])
def test_image_over_the_pixel_limit_is_refused_from_its_header(
    tmp_path, monkeypatch, side, by_whom
):
    # PIL itself refuses over twice its limit (DecompressionBombError) and only warns between
    # once and twice; both are a DataError here. A limit of 1000 px instead of 89.5 Mpx makes
    # the two cases 40² and 50² px (tests/test_faults.py trains past a real 14000² px file).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning on the way
        with pytest.raises(DataError, match=r"huge.png: .*over PIL's limit of 1000 pixels") as err:
            load_image(str(path))
    assert err.value.path == str(path) and "not downscaled" in str(err.value)
    assert (f"{side}×{side} px" in str(err.value)) == (by_whom == "ssl_kd")
