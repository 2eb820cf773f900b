"""Image bytes -> an RGB picture, safely: any mode, no decompression bomb, a truncated file an error, never grey pixels.

Labeling's decode tasks, training's decode stage, the thumbnails of the report and
the contact sheets all decode through :func:`decode_rgb`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# 8K UHD is 33 Mpx; anything past 64 Mpx in a frame dump is a decompression bomb,
# and rejecting it by header keeps a worker from allocating gigabytes.
MAX_PIXELS = 64_000_000


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image: empty, truncated, corrupt or a bomb."""


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode bytes into an RGB PIL image, whatever the mode (L, LA, P, RGBA, CMYK, I;16)."""
    if not data:
        raise ImageDecodeError("empty file")
    # No global state is touched: decode tasks call this from several threads. A
    # truncated file is an error because PIL's ImageFile.LOAD_TRUNCATED_IMAGES is
    # False (its default; checked below), and bombs are refused by our own pixel limit,
    # read from the header, before PIL's own warnings or errors would come into it.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated frames would decode "
                           "as grey pixels; leave it False")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size  # header only, nothing decoded yet
        if width * height > max_pixels:
            raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the {max_pixels:,}-pixel limit")
        img.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        # PIL's own message names the BytesIO object's address, different every run.
        raise ImageDecodeError("cannot decode image: not a recognised image format") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise ImageDecodeError(f"cannot decode image: {exc}") from None
    picture: Image.Image = img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels over white, as a viewer shows them, not over black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(background, rgba)
    if picture.mode == "I;16" or picture.mode == "I":
        picture = Image.fromarray((np.asarray(picture, dtype=np.float32) / 256).clip(0, 255).astype(np.uint8))
    return picture.convert("RGB")


def is_plain_jpeg(data: bytes, max_pixels: int = MAX_PIXELS) -> bool:
    """True for a complete baseline RGB or greyscale JPEG, judged from its header and end marker.

    Those are the frames that ``torchvision.io.decode_jpeg`` decodes on a GPU as
    PIL would; anything else (PNG, CMYK, progressive, truncated) is decoded with
    PIL on the CPU. Raises ImageDecodeError for an image bomb, as decode_rgb does.
    """
    if not (data.startswith(b"\xff\xd8\xff") and data.rstrip(b"\x00").endswith(b"\xff\xd9")):
        return False
    try:
        img = Image.open(io.BytesIO(data))  # the header only
    except Exception:
        return False  # decode_rgb gives the error its sentence
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the {max_pixels:,}-pixel limit")
    return img.format == "JPEG" and img.mode in ("RGB", "L") and not img.info.get("progressive")
