"""DICOM files read with pydicom into 8-bit PIL images, or refused with a reason.

A file is DICOM when its bytes 128-131 are ``DICM`` (whatever its name: ``scan``,
``x.IMA``), or when it is named ``*.dcm`` (then it may lack the 128-byte preamble,
and pydicom reads it with ``force=True``). Only single-frame images are read.

How the stored values become 8 bits (0-255):

* Colour (3 samples): YBR_FULL and YBR_FULL_422 are converted to RGB; RGB values
  are scaled linearly from 0..2**BitsStored-1 to 0..255. PALETTE COLOR indices go
  through the palette, whose 8- or 16-bit entries are scaled to 0..255. Result: mode "RGB".
* Grayscale (MONOCHROME1, MONOCHROME2), result mode "L", in DICOM's order:

  1. modality: the Modality LUT Sequence, or else Rescale Slope and Intercept
     (when both are present), gives the modality values;
  2. VOI: the first item of the VOI LUT Sequence when present, and its output range
     (the lowest to the highest entry of the LUT) is mapped linearly to 0..255;
     otherwise the first Window Center/Width pair (VOI LUT Function LINEAR,
     LINEAR_EXACT or SIGMOID, as pydicom's ``apply_windowing``), whose output range
     is the stored range below, mapped linearly to 0..255; otherwise (or when the
     window is invalid, e.g. a width under 1) the stored range itself is mapped
     linearly to 0..255, values outside it clipped;
  3. MONOCHROME1 (low values bright) is inverted (255 - v), so bright means dense
     as in MONOCHROME2 and in every other image the model sees.

  The stored range is 0..2**BitsStored-1 (unsigned, PixelRepresentation 0) or
  -2**(BitsStored-1)..2**(BitsStored-1)-1 (signed), passed through the rescale
  (slope x value + intercept), or 0..2**n-1 for a Modality LUT of n-bit entries.

Refused (:class:`UnusableDicom`, whose message is the quarantine reason): no pixel
data, several frames, more pixels (Rows x Columns, read from the header before any
decoding) than allowed, a transfer syntax no installed decoder reads (JPEG-LS,
JPEG Lossless, ... without pylibjpeg or GDCM), pixel data that fails to decode,
an unsupported photometric interpretation, and files pydicom cannot parse.

pydicom is imported inside the functions: stages that never meet a DICOM file do
not pay its import time.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

logger = logging.getLogger(__name__)

DICOM_FORMAT = "DICOM"  # the ``format`` of the images read here, as Pillow names a file's format
DICOM_EXTENSIONS = frozenset({".dcm"})
HEAD_BYTES = 132  # the 128-byte preamble and the "DICM" marker
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class UnusableDicom(Exception):
    """A DICOM file that cannot become an image; the message is the reason."""


def is_dicom(head: bytes) -> bool:
    """Whether a file's first bytes (at least :data:`HEAD_BYTES`) carry the DICOM marker."""
    return head[128:HEAD_BYTES] == b"DICM"


def is_dicom_file(path: Path) -> bool:
    """Whether the file at ``path`` carries the DICOM marker (OSError if it cannot be read)."""
    with open(path, "rb") as fh:
        return is_dicom(fh.read(HEAD_BYTES))


def read_dicom(source: Path | bytes, *, max_pixels: int | None = None, force: bool = False) -> Image.Image:
    """A single-frame DICOM image as an 8-bit PIL image ("L" or "RGB"); raises UnusableDicom.

    ``max_pixels`` is checked against Rows x Columns before any pixel data is decoded;
    ``force`` reads a file without the preamble and marker (a ``.dcm`` written bare).
    """
    with warnings.catch_warnings(record=True) as caught:
        # pydicom warns about every odd element of a real-world file: log them, don't print them
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            ds = _read_dataset(source, force)
            _check_header(ds, max_pixels)
            image = _to_image(ds, _decode(ds, max_pixels))
        except UnusableDicom:
            raise
        except Exception as err:  # a malformed element must never crash the stage
            raise UnusableDicom(f"broken DICOM file ({_detail(err, source)})") from None
        finally:
            for warning in caught:
                logger.debug("pydicom: %s", warning.message)
    image.format = DICOM_FORMAT
    return image


def _read_dataset(source: Path | bytes, force: bool) -> Dataset:
    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, force=force)
    except Exception as err:  # InvalidDicomError, but a truncated header raises anything
        raise UnusableDicom(f"broken DICOM file ({_detail(err, source)})") from None


def _check_header(ds: Dataset, max_pixels: int | None) -> None:
    if "PixelData" not in ds:
        kind = "float pixel data" if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else None
        raise UnusableDicom(f"DICOM {kind}: not supported" if kind else "DICOM without pixel data")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise UnusableDicom(f"DICOM multi-frame ({frames} frames): not supported")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise UnusableDicom("DICOM without an image size (Rows, Columns)")
    if max_pixels is not None and int(rows) * int(columns) > max_pixels:
        # the same words as decode_image's check of any other file's header
        raise UnusableDicom(f"too many pixels ({columns}x{rows} > {max_pixels})")


def _decode(ds: Dataset, max_pixels: int | None) -> tuple[np.ndarray, str]:
    """The decoded pixel values and the photometric interpretation they are in now."""
    from pydicom.pixels import as_pixel_options, get_decoder

    syntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:  # video, JPIP, or a UID that is no transfer syntax
        decoder = None
    if decoder is None or not decoder.is_available:
        raise UnusableDicom(f"DICOM {_syntax_text(syntax)}: no installed decoder can read it")
    try:
        # a JPEG or JPEG 2000 stream inside may claim more pixels than the header:
        # Pillow, which decodes those, gets the same limit
        with _pillow_pixel_limit(max_pixels):
            pixels, meta = decoder.as_array(ds, validate=True, raw=False, **as_pixel_options(ds))
    except Exception as err:
        what = _syntax_text(syntax) if syntax.is_compressed else "pixel data"
        raise UnusableDicom(f"DICOM {what}: cannot decode ({_detail(err)})") from None
    return pixels, str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))


def _transfer_syntax(ds: Dataset) -> UID:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(meta.TransferSyntaxUID)
    # a file written without its meta header is native: how it was encoded says which syntax
    implicit, little = ds.original_encoding
    if little is None:
        raise UnusableDicom("DICOM without a transfer syntax")
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return syntax


def _syntax_text(syntax: UID) -> str:
    """The transfer syntax as a reason names it: ``compressed with JPEG-LS Lossless (1.2.840...80)``."""
    uid = "".join(c if c.isprintable() else "?" for c in str(syntax)[:64])  # a damaged header
    if not syntax.is_transfer_syntax:
        return f"with an unknown transfer syntax ({uid})"
    name = syntax.name.removesuffix(" Image Compression")
    return f"compressed with {name} ({uid})" if syntax.is_compressed else f"in {name} ({uid})"


def _to_image(ds: Dataset, decoded: tuple[np.ndarray, str]) -> Image.Image:
    pixels, photometric = decoded
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples == 3:
        return Image.fromarray(_rgb_8bit(pixels, ds, photometric))
    if samples == 1 and photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(pixels, ds)
        return Image.fromarray(_scaled(rgb, 0, np.iinfo(rgb.dtype).max))
    if samples == 1 and photometric in _MONOCHROME:
        return Image.fromarray(_grey_8bit(pixels, ds, photometric))
    raise UnusableDicom(f"DICOM {photometric or 'image'} with {samples} samples per pixel: not supported")


def _rgb_8bit(pixels: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        from pydicom.pixels import convert_color_space

        pixels = convert_color_space(pixels, photometric, "RGB")
    elif photometric != "RGB":
        raise UnusableDicom(f"DICOM colour space {photometric}: not supported")
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    return _scaled(pixels, 0, 2**bits - 1)


def _grey_8bit(pixels: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(pixels, ds)
    low, high = _stored_range(ds)
    if _has_voi_lut(ds):
        # the LUT maps integers; rescaled values are floats that stand for integers
        values = apply_voi(np.rint(values).astype(np.int64), ds, index=0)
        low, high = _voi_lut_range(ds)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        try:
            values = apply_windowing(values, ds, index=0)  # its output spans the stored range
        except ValueError as err:
            logger.info("DICOM window ignored, stored range used instead: %s", err)
            low, high = min(low, high), max(low, high)
    else:
        low, high = min(low, high), max(low, high)
    grey = _scaled(values, low, high)
    return 255 - grey if photometric == "MONOCHROME1" else grey


def _stored_range(ds: Dataset) -> tuple[float, float]:
    """The modality values' range, as pydicom's windowing takes it (low before high unless
    a negative slope swaps them)."""
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        return low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return float(low), float(high)


def _has_voi_lut(ds: Dataset) -> bool:
    items = ds.get("VOILUTSequence")
    return bool(items) and items[0].get("LUTDescriptor") is not None and items[0].get("LUTData") is not None


def _voi_lut_range(ds: Dataset) -> tuple[float, float]:
    """The lowest and highest entry of the first VOI LUT: every input it maps, through it."""
    from pydicom.pixels import apply_voi

    entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
    lut = apply_voi(np.arange(first, first + (entries or 2**16)), ds, index=0)
    return float(lut.min()), float(lut.max())


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``low``..``high`` mapped linearly to 0..255 (values outside clipped), as uint8."""
    span = (high - low) or 1.0
    scaled = (np.asarray(values, dtype=np.float64) - low) * (255.0 / span)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@contextmanager
def _pillow_pixel_limit(limit: int | None) -> Iterator[None]:
    saved = Image.MAX_IMAGE_PIXELS
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _detail(err: Exception, source: Any = None) -> str:
    """An exception as a short reason: its type and message on one line, without the file's path."""
    text = " ".join(str(err).split())
    if isinstance(source, Path):
        text = text.replace(str(source), source.name)
    kind = type(err).__name__
    if kind.islower():  # struct.error, zlib.error: the module says what failed
        kind = f"{type(err).__module__}.{kind}"
    detail = f"{kind}: {text}" if text else kind
    return detail if len(detail) <= 160 else detail[:157] + "..."
