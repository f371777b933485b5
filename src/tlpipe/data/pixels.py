"""An image file as the model's input: decoded, converted to RGB and resized as in training.

``tlpipe predict`` and the served model prepare every image here, the way the
augment stage prepared the test images (EXIF orientation, RGB, its interpolation),
so a file gets the same probabilities whichever way it is classified.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from tlpipe.core.images import Rejected, decode_image, open_image_bytes, open_image_path
from tlpipe.data.augmentation import resize_transform

MAX_PIXELS = 50_000_000  # larger images are refused from their header, before decoding


def decode_pixels(
    open_image: Callable[[], Image.Image], size: int, source: str = "", max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Raw RGB pixels as the model saw them in training; raises Rejected with the reason.

    ``source`` is the file name, whose extension is checked; empty for uploaded bytes. An image whose
    header declares more than ``max_pixels`` is refused before it is decoded.
    """
    image = decode_image(source, open_image, min_size=1, max_pixels=max_pixels, mode="RGB")
    pixels = np.asarray(image, dtype=np.uint8)
    return resize_transform(size)(image=pixels)["image"].astype(np.float32)


def load_pixels(path: Path, size: int) -> np.ndarray:
    """An image file's pixels (DICOM included), preprocessed as in training; raises Rejected."""
    if not path.is_file():
        raise Rejected("no such file")
    return decode_pixels(lambda: open_image_path(path), size, str(path))


def bytes_pixels(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file's bytes (PNG, JPEG, DICOM, ...), preprocessed as in training; raises Rejected."""
    return decode_pixels(lambda: open_image_bytes(data), size, max_pixels=max_pixels)
