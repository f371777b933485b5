"""DICOM input: how stored values become 8-bit pixels, and which files are refused and why."""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import JPEGLSLossless

from dicom_fixtures import JPEG_LS, RLE_OF_MR_SMALL, bundled, gradient, write_dicom
from tlpipe.core.dicom import is_dicom
from tlpipe.core.images import Rejected, decode_image, open_image_bytes, open_image_path, open_source_file


def pixels_of(path: Path) -> np.ndarray:
    return np.asarray(open_image_path(path))


def decoded(path: Path, source: str | None = None, max_pixels: int = 10**6, mode: str = "L") -> Image.Image:
    """The file through the download stage's opener and decode_image, named ``source``."""
    return decode_image(
        source or path.name, partial(open_source_file, path), min_size=1, max_pixels=max_pixels, mode=mode
    )


def one_row(*values: int, dtype: type = np.uint16) -> np.ndarray:
    return np.array([values], dtype=dtype)


# ------------------------------------------------------------ recognising DICOM


def test_the_dicm_marker_at_byte_128_makes_a_file_dicom():
    assert is_dicom(b"\0" * 128 + b"DICM")
    assert is_dicom(b"\0" * 128 + b"DICM" + b"\x02\x00")
    assert not is_dicom(b"DICM" + b"\0" * 128)
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 124)
    assert not is_dicom(b"\0" * 130)


@pytest.mark.parametrize("name", ["scan", "x.IMA", "image.dcm"])
def test_a_dicom_file_is_read_by_its_content_whatever_its_name(tmp_path, name):
    path = write_dicom(tmp_path / "written.dcm", gradient())
    shutil.move(path, tmp_path / name)
    image = decoded(tmp_path / name, source=f"class/{name}")
    np.testing.assert_array_equal(np.asarray(image), gradient())


def test_an_odd_extension_is_still_refused_when_the_content_is_not_dicom(tmp_path):
    Image.fromarray(gradient()).save(tmp_path / "x.png")
    shutil.move(tmp_path / "x.png", tmp_path / "x.IMA")
    with pytest.raises(Rejected, match=r"^not an image extension \(\.ima\)$"):
        decoded(tmp_path / "x.IMA")
    (tmp_path / "notes.txt").write_text("DICM, but not at byte 128")
    with pytest.raises(Rejected, match=r"^not an image extension \(\.txt\)$"):
        decoded(tmp_path / "notes.txt")


def test_a_refused_dicom_with_an_odd_extension_gives_its_own_reason(tmp_path):
    write_dicom(tmp_path / "cine.IMA", np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(Rejected, match=r"^DICOM multi-frame \(3 frames\): not supported$"):
        decoded(tmp_path / "cine.IMA")


def test_a_dcm_file_written_without_preamble_is_read_by_its_name(tmp_path):
    path = write_dicom(tmp_path / "bare.dcm", gradient(), preamble=False)
    assert not is_dicom(path.read_bytes()[:132])
    np.testing.assert_array_equal(pixels_of(path), gradient())


def test_uploaded_dicom_bytes_decode_like_the_file(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", gradient(), "MONOCHROME1")
    np.testing.assert_array_equal(np.asarray(open_image_bytes(path.read_bytes())), pixels_of(path))


# ------------------------------------------------------------ grey values to 8 bits


def test_monochrome2_bytes_come_through_unchanged_as_a_grey_image(tmp_path):
    image = open_image_path(write_dicom(tmp_path / "a.dcm", gradient()))
    assert image.mode == "L" and image.size == (32, 24)
    np.testing.assert_array_equal(np.asarray(image), gradient())


def test_monochrome1_is_inverted_so_that_bright_means_dense(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", gradient(), "MONOCHROME1")
    np.testing.assert_array_equal(pixels_of(path), 255 - gradient())


def test_without_a_window_the_bits_stored_range_fills_0_to_255(tmp_path):
    values = one_row(0, 1365, 2730, 4095)
    twelve = write_dicom(tmp_path / "12.dcm", values, bits_stored=12)
    sixteen = write_dicom(tmp_path / "16.dcm", values, bits_stored=16)
    assert pixels_of(twelve).tolist() == [[0, 85, 170, 255]]  # v / 4095 x 255
    assert pixels_of(sixteen).tolist() == [[0, 5, 11, 16]]  # v / 65535 x 255


def test_signed_values_span_the_signed_range_after_the_rescale(tmp_path):
    full = write_dicom(tmp_path / "s16.dcm", one_row(-32768, -16384, 0, 32767, dtype=np.int16))
    assert pixels_of(full).tolist() == [[0, 64, 128, 255]]  # (v + 32768) / 65535 x 255
    # 12 bits signed: -2048..2047, rescaled by +1000 to -1048..3047
    shifted = write_dicom(
        tmp_path / "s12.dcm",
        one_row(-2048, 0, 2047, dtype=np.int16),
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=1000,
    )
    assert pixels_of(shifted).tolist() == [[0, 128, 255]]  # (v + 2048) / 4095 x 255


def test_the_window_applies_to_rescaled_values(tmp_path):
    # CT-like: HU = 2 x stored - 1024; a soft-tissue window of 40 +- 200 HU
    path = write_dicom(
        tmp_path / "ct.dcm",
        one_row(412, 532, 632, 0),  # -200 HU, 40 HU, 240 HU, -1024 HU
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )
    assert pixels_of(path).tolist() == [[0, 128, 255, 0]]


def test_the_first_of_several_windows_is_used(tmp_path):
    path = write_dicom(
        tmp_path / "a.dcm",
        one_row(1000, 3000),
        bits_stored=12,
        WindowCenter=[1000, 3000],
        WindowWidth=[200, 200],
    )
    assert pixels_of(path).tolist() == [[128, 255]]  # the second window would give [[0, 128]]


def test_an_invalid_window_falls_back_to_the_stored_range(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", one_row(0, 4095), bits_stored=12, WindowCenter=2048, WindowWidth=0)
    assert pixels_of(path).tolist() == [[0, 255]]


def test_a_voi_lut_is_preferred_to_the_window_and_its_entries_fill_0_to_255(tmp_path):
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new("LUTData", "US", [round(v * 1000 / 4095) for v in range(4096)])  # 0..1000
    path = write_dicom(
        tmp_path / "a.dcm",
        one_row(0, 1024, 4095),
        bits_stored=12,
        VOILUTSequence=Sequence([lut]),
        WindowCenter=100,
        WindowWidth=10,  # would make 1024 white
    )
    assert pixels_of(path).tolist() == [[0, 64, 255]]  # lut[1024] = 250 -> 250 / 1000 x 255


# ------------------------------------------------------------ colour


def test_rgb_and_ybr_colour_become_rgb(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    image = open_image_path(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), rgb)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    back = pixels_of(write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL")).astype(int)
    assert np.abs(back - rgb).max() <= 3  # two roundings through YCbCr


def test_16_bit_colour_is_scaled_by_its_bits_stored(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    stored = ((rgb.astype(np.int64) * 4095 + 127) // 255).astype(np.uint16)
    back = pixels_of(write_dicom(tmp_path / "a.dcm", stored, "RGB", bits_stored=12)).astype(int)
    assert np.abs(back - rgb).max() <= 1


def test_palette_colour_becomes_rgb():
    image = open_image_path(bundled("examples_palette.dcm"))
    pixels = np.asarray(image).astype(int)
    assert image.mode == "RGB" and (pixels[..., 0] != pixels[..., 2]).any()


# ------------------------------------------------------------ compressed files


def test_rle_compressed_pixels_decode_like_the_uncompressed_file():
    rle, plain = (pixels_of(bundled(name)) for name in RLE_OF_MR_SMALL)
    assert rle.std() > 10
    np.testing.assert_array_equal(rle, plain)


def test_jpeg_baseline_is_decoded_with_pillow_like_the_lossless_copy():
    jpeg = pixels_of(bundled("SC_rgb_jpeg_dcmtk.dcm")).astype(int)
    lossless = pixels_of(bundled("SC_rgb_rle.dcm")).astype(int)
    assert jpeg.shape == lossless.shape == (100, 100, 3)
    assert np.abs(jpeg - lossless).max() <= 8  # JPEG loss only


def test_a_syntax_no_installed_decoder_reads_is_refused_with_its_name(tmp_path):
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = shutil.copy(bundled(JPEG_LS), tmp_path / "mr.dcm")
    with pytest.raises(Rejected) as refused:
        decoded(Path(path))
    assert str(refused.value) == (
        "DICOM compressed with JPEG-LS Lossless (1.2.840.10008.1.2.4.80): no installed decoder can read it"
    )


# ------------------------------------------------------------ refused files


def test_a_multi_frame_file_is_refused_with_its_frame_count(tmp_path):
    path = write_dicom(tmp_path / "cine.dcm", np.zeros((12, 8, 8), dtype=np.uint8))
    with pytest.raises(Rejected, match=r"^DICOM multi-frame \(12 frames\): not supported$"):
        decoded(path)


def test_a_file_without_pixel_data_is_refused(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", gradient())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(Rejected, match=r"^DICOM without pixel data$"):
        decoded(path)


def test_the_pixel_limit_refuses_from_the_header_before_decoding(tmp_path):
    # the header claims 5000 x 4000 but holds 32 x 24 pixels: decoding it would fail
    path = write_dicom(tmp_path / "a.dcm", gradient(), Rows=4000, Columns=5000)
    with pytest.raises(Rejected, match=r"^too many pixels \(5000x4000 > 1000000\)$"):
        decoded(path, max_pixels=10**6)
    with pytest.raises(Rejected, match=r"^DICOM pixel data: cannot decode"):
        decoded(path, max_pixels=10**8)


def test_damaged_headers_are_refused_with_a_reason(tmp_path):
    head = b"\0" * 128 + b"DICM"
    cut_value = head + b"\x02\x00\x00\x00UL\x04\x00\x10\x00"  # a 4-byte value cut at 2
    bad_vr = head + b"\x02\x00\x10\x00ZZ\x04\x00abcd"
    for data in (cut_value, bad_vr):
        (tmp_path / "bad.dcm").write_bytes(data)
        with pytest.raises(Rejected, match=r"^broken DICOM file \("):
            decoded(tmp_path / "bad.dcm")


def test_corrupted_files_are_refused_or_read_but_never_crash(tmp_path):
    original = bundled("MR_small.dcm").read_bytes()
    rng = np.random.default_rng(7)
    outcomes = set()
    for trial in range(60):
        data = bytearray(original[: int(rng.integers(132, len(original) + 1))])
        for at in rng.integers(132, min(len(data), 1200), 4):
            data[at] = int(rng.integers(0, 256))
        path = tmp_path / f"c{trial}.dcm"
        path.write_bytes(bytes(data))
        try:  # the reader itself, not decode_image, which turns any exception into a reason
            open_image_path(path)
            outcomes.add("read")
        except Rejected as why:
            assert str(why).strip(), "an empty reason"
            outcomes.add("refused")
    assert "refused" in outcomes


# ------------------------------------------------------------ cost for everyone else


def test_pydicom_is_imported_only_when_a_dicom_file_is_read(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(gradient()).save(png)
    code = (
        "import sys; from pathlib import Path\n"
        "from tlpipe.core.images import decode_image, open_image_path\n"
        f"decode_image('a.png', lambda: open_image_path(Path({str(png)!r})), 1, 10**6)\n"
        "assert 'pydicom' not in sys.modules, 'pydicom imported for a PNG'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
