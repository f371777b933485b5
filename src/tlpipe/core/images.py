"""Image files in and out: decoding an input safely, encoding PNG bytes and data URIs.

Every stage and tool that reads a user's image (download, ``tlpipe predict``, the
served model) decodes it here, so they accept and reject the same files for the
same reasons; every PNG the pipeline writes or embeds is encoded here.
"""

from __future__ import annotations

import base64
import io
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class Rejected(Exception):
    """An input that cannot enter the manifest; the message is the reason."""


def decode_image(
    source: str, open_image: Callable[[], Image.Image], min_size: int, max_pixels: int, mode: str = "RGB"
) -> Image.Image:
    """Decode fully, apply EXIF orientation and convert to ``mode`` (RGB or L), or raise Rejected.

    ``source`` is the file's name (its extension is checked; empty for uploaded bytes),
    ``open_image`` opens it lazily and may raise on a broken file.
    """
    suffix = Path(source).suffix.lower()
    if suffix and suffix not in IMAGE_EXTENSIONS and not source.startswith("demo/"):
        raise Rejected(f"not an image extension ({suffix})")
    try:
        with warnings.catch_warnings(), _pillow_pixel_limit(None):
            # data.max_image_pixels is the limit, checked below from the header before any
            # decoding; Pillow's own (fixed, ~89 Mpx) limit would otherwise override it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = open_image()
            width, height = img.size
            if width * height > max_pixels:
                raise Rejected(f"too many pixels ({width}x{height} > {max_pixels})")
            img.load()
            img = ImageOps.exif_transpose(img)
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Rejected(f"too many pixels ({err})") from None
    except OSError as err:
        # Pillow quotes the file's full path; the quarantine lists the path already
        raise Rejected("cannot decode image: " + re.sub(r" '[^']*'", "", str(err))) from None
    except Exception as err:  # a broken file must never crash the stage
        raise Rejected(f"cannot decode image: {type(err).__name__}: {err}") from None
    if min(img.size) < min_size:
        raise Rejected(f"too small ({img.size[0]}x{img.size[1]} < {min_size} px)")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        span = max(arr.max() - arr.min(), 1.0)
        img = Image.fromarray(((arr - arr.min()) / span * 255).round().astype(np.uint8))
    return img.convert(mode)


@contextmanager
def _pillow_pixel_limit(limit: int | None) -> Iterator[None]:
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """A PIL image, or a uint8 array (H, W), (H, W, 3) or (H, W, 4), as PNG bytes.

    No metadata is written, so the same pixels always give the same bytes.
    """
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"png_bytes needs a uint8 array, got {array.dtype}")
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    """Bytes as a ``data:`` URI, for an HTML <img> that needs no file beside the page."""
    return f"data:{media_type};base64," + base64.b64encode(data).decode("ascii")


def png_data_uri(image: Image.Image | np.ndarray) -> str:
    """An image as a ``data:image/png;base64,...`` URI."""
    return data_uri(png_bytes(image))
