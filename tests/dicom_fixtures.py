"""Small DICOM files written by the tests with pydicom, and the ones bundled with its wheel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

# bundled in the installed wheel (nothing is downloaded): JPEG-LS needs a decoder this
# environment lacks (pyjpegls, pylibjpeg or GDCM); RLE is decoded by pydicom itself
JPEG_LS = "MR_small_jpeg_ls_lossless.dcm"
RLE_OF_MR_SMALL = ("MR_small_RLE.dcm", "MR_small.dcm")  # the same image, compressed and not


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in the installed pydicom wheel"
    return Path(str(path))


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    *,
    preamble: bool = True,
    **elements: object,
) -> Path:
    """``pixels`` (uint8/uint16/int16; frames first when 3-D grey) as an uncompressed DICOM file.

    ``elements`` are set on the dataset (RescaleSlope=..., WindowCenter=...). Without
    ``preamble`` the file has neither the 128 bytes nor the DICM marker nor a meta header.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        dcmwrite(path, ds, enforce_file_format=True)
    else:
        ds.preamble = None  # a bare dataset: only a .dcm name says it is DICOM
        ds.file_meta = FileMetaDataset()
        dcmwrite(path, ds, implicit_vr=False, little_endian=True)
    return path


def gradient(height: int = 24, width: int = 32) -> np.ndarray:
    """Grey uint8 pixels, every value different along a row, so a wrong mapping shows."""
    row = np.linspace(0, 255, width).round().astype(np.uint8)
    return np.tile(row, (height, 1))
