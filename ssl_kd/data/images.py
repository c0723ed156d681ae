"""One image file → one 8-bit RGB picture, as the person who saved it sees it.

`load_image` is the only way ssl_kd opens an image file (training, k-NN and linear splits,
`ssl-kd eval attention`), so every path sees the same pixels:

- 16-bit greyscale (PNG/TIFF mode `I;16`, or `I`) is scaled to 8 bits (÷257, so 65535 → 255),
  where `convert("RGB")` would clip everything above 255 to white;
- the EXIF orientation is applied (a phone photo stored sideways is loaded upright);
- transparency (RGBA, LA, palette or single-colour transparency) is composited on
  `ALPHA_BACKGROUND`, where `convert("RGB")` would show whatever colour the transparent pixels
  happen to store (often black);
- an image over PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, 89.5 Mpx) is refused from its
  header, before any pixel is decoded: a `DataError`, skipped and counted like an unreadable
  file under `data.on_error=skip`. It is not downscaled: only JPEG can decode at a reduced size
  (`Image.draft`); a PNG or TIFF that large would first be decoded whole (3 bytes a pixel, per
  DataLoader worker), and a file that claims such a size is as likely a decompression bomb.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ssl_kd.errors import RunFailed

# Transparent pixels become white: a transparent PNG (a logo, a product cut-out) is made to be
# seen on a white page, and that is how browsers and document viewers show it.
ALPHA_BACKGROUND = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DataError(RunFailed, ValueError):
    """An unreadable image (training or evaluation); the message names the file, `path` holds
    it.

    A `RunFailed`: exit status 1, the run failed, not its command line. Also a ValueError, as
    before, because `ssl-kd`'s error handler catches ValueError (and not yet UserError).
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def load_image(path: str) -> Image.Image:
    """Opens an image file as 8-bit RGB (16-bit scaled, EXIF orientation applied, transparency
    composited on `ALPHA_BACKGROUND`).

    Raises:
        DataError: the file cannot be read, or has more pixels than `Image.MAX_IMAGE_PIXELS`;
            the message names the file.
    """
    with open_image(path) as image:
        return decode_image(image, path)[0]


def open_image(path: str) -> Image.Image:
    """Opens an image file and reads its header only (size, format, a JPEG's EXIF): nothing is
    decoded yet. Use it as a context manager, and `decode_image` for the pixels.

    Raises:
        DataError: the file cannot be read, or is over `Image.MAX_IMAGE_PIXELS`.
    """
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x its limit and raises above: both are refused here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as err:  # over 2x the limit: PIL refuses to open it
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(pixels[1])} px" if pixels else None
        raise DataError(pixel_limit_message(path, size), path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}", path) from None
    width, height = image.size  # from the header: nothing is decoded yet
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        image.close()
        raise DataError(pixel_limit_message(path, f"{width}×{height} px"), path)
    return image


def is_draftable(image: Image.Image) -> bool:
    """Whether `decode_image` can reduce this opened image while decoding it: a JPEG stored
    upright (its EXIF, in the header, names no rotation or mirroring), so that the stored pixel
    grid is the one crops are drawn on."""
    if image.format != "JPEG":
        return False
    try:
        return image.getexif().get(0x0112, 1) in (None, 1)
    except Exception:  # a malformed EXIF block: decode it whole, as `upright` keeps it
        return False


def decode_image(image: Image.Image, path: str, reduce: int = 1) -> tuple[Image.Image, int]:
    """The pixels of an image from `open_image`, as `load_image` returns them, and the factor
    they were reduced by: with `reduce` in (2, 4, 8) a draftable JPEG (`is_draftable`) is
    decoded at 1/reduce of its size by libjpeg's scaled inverse DCT (`Image.draft`), pixel k
    of the result covering pixels [k·reduce, (k + 1)·reduce) of the full image.

    Raises:
        DataError: the file cannot be decoded (e.g. cut short); the message names the file.
    """
    applied = 1
    if reduce > 1 and is_draftable(image):
        width, height = image.size
        drafted = image.draft(None, (width // reduce, height // reduce))
        if drafted is not None:
            applied = round(width / drafted[1][2])  # the box of the full image, in draft pixels
    try:
        image.load()
        return to_rgb(upright(image)), applied
    except (OSError, SyntaxError, ValueError) as err:  # e.g. a truncated file
        raise DataError(f"cannot read image {path}: {err}", path) from None


def pixel_limit_message(path: str, size: str | None) -> str:
    return (
        f"cannot read image {path}: {size or 'its size'} is over PIL's limit of "
        f"{Image.MAX_IMAGE_PIXELS} pixels (Image.MAX_IMAGE_PIXELS, a guard against "
        "decompression bombs); it is not downscaled: resize the file to use it"
    )


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (unchanged without one)."""
    try:
        orientation = image.getexif().get(0x0112, 1)  # EXIF tag 274, Orientation
    except Exception:  # a malformed EXIF block: the pixels are still good, keep them as stored
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit scaled down, transparency composited on `ALPHA_BACKGROUND`."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64) / 257.0  # 65535 / 255
        image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    if image.mode in ALPHA_MODES or image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")
