"""Image files in and out: opening and decoding an input safely, encoding PNG bytes and data URIs.

Every stage and tool that reads a user's image (download, ``tlpipe predict``, the
served model) opens it with :func:`open_image_path` or :func:`open_image_bytes`
and decodes it with :func:`decode_image`, so they accept and reject the same files
for the same reasons; every PNG the pipeline writes or embeds is encoded here.
DICOM files are recognised by their content (or a ``.dcm`` name) and read by
:mod:`tlpipe.core.dicom`; anything else is Pillow's.
"""

from __future__ import annotations

import base64
import io
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from tlpipe.core.dicom import (
    DICOM_EXTENSIONS,
    DICOM_FORMAT,
    HEAD_BYTES,
    UnusableDicom,
    is_dicom,
    is_dicom_file,
    read_dicom,
)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", *DICOM_EXTENSIONS}

# decode_image's pixel limit, for the DICOM reader an opener calls: it must refuse a
# large image from its header, and openers take no arguments (None: Pillow's own limit)
_max_pixels: ContextVar[int | None] = ContextVar("tlpipe_max_pixels", default=None)


class Rejected(Exception):
    """An input that cannot enter the manifest; the message is the reason."""


class DicomRejected(Rejected):
    """A DICOM file (by its content or ``.dcm`` name) that cannot be used; its reason beats its extension."""


def decode_image(
    source: str, open_image: Callable[[], Image.Image], min_size: int, max_pixels: int, mode: str = "RGB"
) -> Image.Image:
    """Decode fully, apply EXIF orientation and convert to ``mode`` (RGB or L), or raise Rejected.

    ``source`` is the file's name (its extension is checked; empty for uploaded bytes),
    ``open_image`` opens it lazily and may raise on a broken file. A file with no
    image's extension is still read when it is DICOM by its content (``scan``, ``x.IMA``).
    """
    suffix = Path(source).suffix.lower()
    odd_suffix = bool(suffix) and suffix not in IMAGE_EXTENSIONS and not source.startswith("demo/")
    try:
        with warnings.catch_warnings(), _pillow_pixel_limit(None), _header_pixel_limit(max_pixels):
            # data.max_image_pixels is the limit, checked below from the header before any
            # decoding; Pillow's own (fixed, ~89 Mpx) limit would otherwise override it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open_checking_suffix(open_image, suffix) if odd_suffix else open_image()
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


def _open_checking_suffix(open_image: Callable[[], Image.Image], suffix: str) -> Image.Image:
    """Open a file whose extension is no image's: only DICOM (``scan``, ``x.IMA``) is read.

    A DICOM file's own reason (multi-frame, ...) says more than its extension; for
    anything else the extension is the reason, as it was before the file was opened.
    """
    try:
        img = open_image()
    except DicomRejected:
        raise
    except Exception:
        raise Rejected(f"not an image extension ({suffix})") from None
    if img.format != DICOM_FORMAT:
        img.close()
        raise Rejected(f"not an image extension ({suffix})")
    return img


@contextmanager
def _pillow_pixel_limit(limit: int | None) -> Iterator[None]:
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@contextmanager
def _header_pixel_limit(limit: int) -> Iterator[None]:
    token = _max_pixels.set(limit)
    try:
        yield
    finally:
        _max_pixels.reset(token)


# ------------------------------------------------------------------- openers


def open_image_path(path: Path) -> Image.Image:
    """Open an image file for :func:`decode_image`: DICOM (by content or ``.dcm``) or Pillow's.

    DICOM is decoded at once (to 8 bits, see :mod:`tlpipe.core.dicom`), after its
    header passed decode_image's pixel limit; Pillow's images open lazily. Pillow's
    errors are left to decode_image; a DICOM file's raise :class:`DicomRejected`.
    """
    path = Path(path)
    marked = is_dicom_file(path)
    if marked or path.suffix.lower() in DICOM_EXTENSIONS:
        return _read_dicom(path, marked=marked)
    return Image.open(path)


def open_source_file(path: Path) -> Image.Image:
    """:func:`open_image_path` for the download stage, with a specific reason for the usual failures."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise Rejected("empty file (0 bytes)")
        return open_image_path(path)
    except PermissionError:
        raise Rejected("unreadable file (permission denied)") from None
    except Image.UnidentifiedImageError:
        raise Rejected("not an image (unrecognised format)") from None


class _Upload(io.BytesIO):
    # Pillow's errors quote the file's repr; a quoted one is stripped by decode_image like a
    # path, so bytes and files give the same reason (no memory address in it)
    def __repr__(self) -> str:
        return "'upload'"


def open_image_bytes(data: bytes) -> Image.Image:
    """An uploaded file's bytes opened like :func:`open_image_path` opens a file (DICOM by content)."""
    if is_dicom(data[:HEAD_BYTES]):
        return _read_dicom(data, marked=True)
    return Image.open(_Upload(data))


def _read_dicom(source: Path | bytes, marked: bool) -> Image.Image:
    limit = _max_pixels.get()
    if limit is None and Image.MAX_IMAGE_PIXELS is not None:
        limit = 2 * Image.MAX_IMAGE_PIXELS  # where Pillow itself refuses an image, outside decode_image
    try:
        return read_dicom(source, max_pixels=limit, force=not marked)
    except UnusableDicom as err:
        raise DicomRejected(str(err)) from None


# ------------------------------------------------------------------- encoding


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
