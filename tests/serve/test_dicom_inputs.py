"""DICOM files classified by ``tlpipe predict`` and the served pyfunc, exactly like their pixels as PNG."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless
from serving_models import CLASSES, b64, log_in_store, write_pixel_sensitive_model

from dicom_fixtures import JPEG_LS, RLE_OF_MR_SMALL, bundled, write_dicom
from tlpipe.serve.predict import predict

pytestmark = pytest.mark.slow  # builds and runs real Keras models, logs one to MLflow


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A Keras model whose output depends on every pixel, and the same pictures as PNG and DICOM."""
    root = tmp_path_factory.mktemp("dicom-serving")
    write_pixel_sensitive_model(root)
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    colour = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(grey).save(root / "grey.png")
    Image.fromarray(colour).save(root / "colour.png")
    write_dicom(root / "grey.dcm", grey)
    write_dicom(root / "inverted.dcm", 255 - grey, "MONOCHROME1")  # reads as `grey`
    write_dicom(root / "colour.dcm", colour, "RGB")
    shutil.copy(root / "grey.dcm", root / "scan")  # no extension: DICOM by its content
    write_dicom(root / "cine.dcm", np.zeros((2, 16, 16), dtype=np.uint8))
    # 16-bit CT values under a window of 40 +- 200 HU (HU = 2 x stored - 1024): -200, 40, 240, -1024 HU
    ct = np.tile(np.array([412, 532, 632, 0], np.uint16), (32, 8))
    write_dicom(root / "ct_windowed.dcm", ct, bits_stored=16, RescaleSlope=2, RescaleIntercept=-1024,
                WindowCenter=40, WindowWidth=400)  # fmt: skip
    Image.fromarray(np.tile(np.array([0, 128, 255, 0], np.uint8), (32, 8))).save(root / "ct_windowed.png")
    for name in (*RLE_OF_MR_SMALL, JPEG_LS):
        shutil.copy(bundled(name), root / name)
    return {p.name: p for p in root.iterdir()}


def _predicted(model: str | Path, paths: list[Path], classes: Path | None) -> dict[str, dict]:
    out = io.StringIO()
    predict(model, [str(p) for p in paths], classes, out)
    return {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(out.getvalue()))}


def _probabilities(row: dict) -> list[float]:
    return [float(row[f"p_{c}"]) for c in CLASSES]


def _same(a: list[float], b: list[float]) -> bool:
    # rows of one batch: equal inputs give equal outputs up to the CSV's 6 decimals
    return a == pytest.approx(b, abs=2e-6)


def test_predict_classifies_a_dicom_file_like_the_same_pixels_as_png(files):
    names = ["grey.png", "grey.dcm", "inverted.dcm", "scan", "colour.png", "colour.dcm", "cine.dcm"]
    rows = _predicted(files["model.keras"], [files[n] for n in names], files["classes.json"])
    for dicom in ("grey.dcm", "inverted.dcm", "scan"):
        assert rows[dicom]["error"] == ""
        assert _same(_probabilities(rows[dicom]), _probabilities(rows["grey.png"])), dicom
    assert rows["colour.dcm"]["error"] == ""
    assert _same(_probabilities(rows["colour.dcm"]), _probabilities(rows["colour.png"]))
    assert not _same(_probabilities(rows["grey.png"]), _probabilities(rows["colour.png"]))  # it can tell
    assert rows["cine.dcm"]["error"] == "DICOM multi-frame (2 frames): not supported"


def test_predict_applies_the_window_to_16_bit_data_and_reads_compressed_files(files):
    rle, plain = RLE_OF_MR_SMALL
    rows = _predicted(files["model.keras"], [files[n] for n in ("ct_windowed.dcm", "ct_windowed.png",
                      rle, plain, JPEG_LS)], files["classes.json"])  # fmt: skip
    assert rows["ct_windowed.dcm"]["error"] == rows[rle]["error"] == ""
    assert _same(_probabilities(rows["ct_windowed.dcm"]), _probabilities(rows["ct_windowed.png"]))
    assert _same(_probabilities(rows[rle]), _probabilities(rows[plain]))  # RLE decoded like the original
    assert rows[JPEG_LS]["error"].startswith("DICOM compressed with JPEG-LS Lossless") or (
        get_decoder(JPEGLSLossless).is_available and rows[JPEG_LS]["error"] == ""
    )


def test_predict_finds_dicom_files_in_a_folder_by_extension_or_content(files, tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(files["grey.dcm"], folder / "one.dcm")
    shutil.copy(files["grey.png"], folder / "one.png")
    shutil.copy(files["grey.dcm"], folder / "IM00042")  # as scanners name them
    shutil.copy(files["grey.dcm"], folder / "two.IMA")
    (folder / "notes.txt").write_text("not an image")
    rows = _predicted(files["model.keras"], [folder], files["classes.json"])
    assert set(rows) == {"one.dcm", "one.png", "IM00042", "two.IMA"}
    assert _same(_probabilities(rows["IM00042"]), _probabilities(rows["one.png"]))
    assert _same(_probabilities(rows["one.dcm"]), _probabilities(rows["one.png"]))


@pytest.fixture(scope="module")
def model_uri(files, mlflow_store) -> str:
    return log_in_store(mlflow_store, files["model.keras"], files["classes.json"], files["grey.png"])


def test_the_served_model_answers_a_dicom_upload_like_the_same_pixels_as_png(files, model_uri):
    model = mlflow.pyfunc.load_model(model_uri)
    uploads = ["grey.png", "grey.dcm", "inverted.dcm", "colour.png", "colour.dcm", "cine.dcm"]
    out = model.predict(pd.DataFrame({"image": [b64(files[n].read_bytes()) for n in uploads]}))
    rows = dict(zip(uploads, out.to_dict("records"), strict=True))
    probs = {name: np.array([row[f"p_{c}"] for c in CLASSES], dtype=float) for name, row in rows.items()}
    for dicom, png in (("grey.dcm", "grey.png"), ("inverted.dcm", "grey.png"), ("colour.dcm", "colour.png")):
        assert rows[dicom]["error"] == ""
        np.testing.assert_allclose(probs[dicom], probs[png], rtol=0, atol=1e-6)
        assert rows[dicom]["predicted"] == rows[png]["predicted"]
    assert not np.allclose(probs["grey.png"], probs["colour.png"])  # the model can tell
    assert rows["cine.dcm"]["error"] == "DICOM multi-frame (2 frames): not supported"
    assert np.isnan(probs["cine.dcm"]).all()


def test_predict_with_the_logged_model_sends_dicom_files_too(files, model_uri, tmp_path):
    odd = tmp_path / "x.IMA"
    shutil.copy(files["grey.dcm"], odd)
    (tmp_path / "notes.txt").write_text("not an image")
    rows = _predicted(model_uri, [files["grey.dcm"], files["grey.png"], odd, tmp_path / "notes.txt"], None)
    for name in ("grey.dcm", "x.IMA"):
        assert rows[name]["error"] == ""
        assert _same(_probabilities(rows[name]), _probabilities(rows["grey.png"]))
    assert rows["notes.txt"]["error"] == "not an image extension (.txt)"


def test_a_logged_model_pins_pydicom_for_its_serving_environment(model_uri):
    requirements = mlflow.pyfunc.get_model_dependencies(model_uri)
    assert "pydicom==" in Path(requirements).read_text()
