"""DICOM files in a folder source: read into the manifest as PNGs, or quarantined with their reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless

from dicom_fixtures import JPEG_LS, RLE_OF_MR_SMALL, bundled, gradient, write_dicom
from tlpipe.core.config import DataParams, FolderParams
from tlpipe.core.constants import SOURCES_DIR
from tlpipe.core.files import read_csv
from tlpipe.core.images import open_image_path
from tlpipe.data.local_sources import folder_candidates
from tlpipe.data.sources import ingest


@pytest.fixture(autouse=True)
def _repo_root(tmp_path, monkeypatch):
    # params paths are relative to the repository root, where dvc repro runs every stage
    monkeypatch.chdir(tmp_path)


RGB = np.random.default_rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8)
JPEG_LS_REASON = (
    "DICOM compressed with JPEG-LS Lossless (1.2.840.10008.1.2.4.80): no installed decoder can read it"
)


@pytest.fixture
def dicom_tree(tmp_path) -> Path:
    """normal/ and pneumonia/ of DICOM files: readable ones under many names, and refused ones."""
    root = tmp_path / SOURCES_DIR / "scans"
    write_dicom(root / "normal" / "plain.dcm", gradient())
    write_dicom(root / "normal" / "inverted", gradient(), "MONOCHROME1")  # no extension: by its content
    twelve_bit = np.tile(np.array([0, 1365, 2730, 4095], np.uint16), (8, 2))  # 8 x 8: min_image_size
    write_dicom(root / "normal" / "twelve_bit.IMA", twelve_bit, bits_stored=12)
    # CT-like, 16-bit: HU = 2 x stored - 1024, a soft-tissue window of 40 +- 200 HU
    ct = np.tile(np.array([412, 532, 632, 0], np.uint16), (8, 2))  # -200, 40, 240, -1024 HU
    write_dicom(root / "normal" / "ct_windowed.dcm", ct, bits_stored=16, RescaleSlope=2,
                RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)  # fmt: skip
    shutil.copy(bundled(RLE_OF_MR_SMALL[0]), root / "normal" / "mr_rle.dcm")
    write_dicom(root / "pneumonia" / "colour.dcm", RGB, "RGB")
    write_dicom(root / "pneumonia" / "cine.dcm", np.zeros((4, 16, 16), dtype=np.uint8))
    write_dicom(root / "pneumonia" / "huge.dcm", np.zeros((100, 100), dtype=np.uint8))  # 10000 px > 5000
    shutil.copy(bundled(JPEG_LS), root / "pneumonia" / "mr_jpeg_ls.dcm")
    return root


def _ingest(root: Path, out: Path, **kw) -> tuple[dict[str, dict], dict[str, str]]:
    params = DataParams(
        source="folder",
        folder=FolderParams(path=root.relative_to(Path.cwd()).as_posix()),
        max_rejected_fraction=1.0,
        max_image_pixels=5000,
        **kw,
    )
    ingest(folder_candidates(root), params, out)
    kept = {r["source"]: r for r in read_csv(out / "manifest.csv")}
    rejected = {r["path"]: r["reason"] for r in read_csv(out / "quarantine.csv")}
    return kept, rejected


def _png(out: Path, row: dict) -> np.ndarray:
    with Image.open(out / row["path"]) as img:
        assert (img.format, row["path"][-4:]) == ("PNG", ".png")
        return np.asarray(img).astype(int)


def test_dicom_files_become_pngs_in_the_manifest_whatever_their_name(dicom_tree, tmp_path):
    out = tmp_path / "raw"
    kept, _ = _ingest(dicom_tree, out)
    assert set(kept) == {
        "normal/plain.dcm",
        "normal/inverted",
        "normal/twelve_bit.IMA",
        "normal/ct_windowed.dcm",
        "normal/mr_rle.dcm",
        "pneumonia/colour.dcm",
    }
    grey = np.repeat(gradient()[..., None], 3, axis=2)  # channels: rgb (the default)
    np.testing.assert_array_equal(_png(out, kept["normal/plain.dcm"]), grey)
    np.testing.assert_array_equal(_png(out, kept["normal/inverted"]), 255 - grey)
    assert _png(out, kept["normal/twelve_bit.IMA"])[0, :, 0].tolist() == [0, 85, 170, 255] * 2
    assert _png(out, kept["normal/ct_windowed.dcm"])[0, :, 0].tolist() == [0, 128, 255, 0] * 2  # the window
    np.testing.assert_array_equal(_png(out, kept["pneumonia/colour.dcm"]), RGB)
    rle = kept["normal/mr_rle.dcm"]
    assert (int(rle["width"]), int(rle["height"])) == (64, 64)
    mr = np.asarray(open_image_path(bundled(RLE_OF_MR_SMALL[1]))).astype(int)
    np.testing.assert_array_equal(_png(out, rle)[..., 0], mr)


def test_unusable_dicom_files_are_quarantined_with_their_reason(dicom_tree, tmp_path):
    _, rejected = _ingest(dicom_tree, tmp_path / "raw")
    expected = {
        "pneumonia/cine.dcm": "DICOM multi-frame (4 frames): not supported",
        "pneumonia/huge.dcm": "too many pixels (100x100 > 5000)",
    }
    if not get_decoder(JPEGLSLossless).is_available:
        expected["pneumonia/mr_jpeg_ls.dcm"] = JPEG_LS_REASON
    assert {path: rejected[path] for path in expected} == expected
    assert set(rejected) <= {*expected, "pneumonia/mr_jpeg_ls.dcm"}


def test_grayscale_channels_keep_dicom_grey_values_in_one_channel(dicom_tree, tmp_path):
    out = tmp_path / "raw"
    kept, _ = _ingest(dicom_tree, out, channels="grayscale")
    np.testing.assert_array_equal(_png(out, kept["normal/plain.dcm"]), gradient())
    colour = _png(out, kept["pneumonia/colour.dcm"])
    assert colour.shape == RGB.shape[:2]  # colour converted to L like any colour image
