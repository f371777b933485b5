"""Image decoding and PNG encoding shared by every stage and tool."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tlpipe.core.images import Rejected, decode_image, png_bytes, png_data_uri


def test_png_bytes_round_trip():
    image = np.random.default_rng(1).integers(0, 256, (12, 17, 3), dtype=np.uint8)
    data = png_bytes(image)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), image)
    uri = png_data_uri(image)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == data
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(image.astype(np.float32))


def test_png_bytes_takes_pil_images_and_arrays_alike():
    array = np.random.default_rng(2).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    assert png_bytes(Image.fromarray(array)) == png_bytes(array)


def test_decode_image_gives_the_reason_for_a_file_it_refuses(tmp_path):
    broken = tmp_path / "scan.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(Rejected, match="cannot decode image"):
        decode_image(str(broken), lambda: Image.open(broken), min_size=1, max_pixels=10**6)
    with pytest.raises(Rejected, match="not an image extension"):
        decode_image("notes.txt", lambda: Image.open(broken), min_size=1, max_pixels=10**6)
    big = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(big)
    with pytest.raises(Rejected, match="too many pixels"):
        decode_image(str(big), lambda: Image.open(big), min_size=1, max_pixels=1000)
    with pytest.raises(Rejected, match="too small"):
        decode_image(str(big), lambda: Image.open(big), min_size=31, max_pixels=10**6)
    assert decode_image(str(big), lambda: Image.open(big), min_size=1, max_pixels=10**6).size == (40, 30)
