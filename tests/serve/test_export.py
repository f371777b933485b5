"""Tests for ``tlpipe export``: the exported network answers as the Keras model does, decision and guard included."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from app_fixtures import CLASSES, SIZE, xray_augmented
from PIL import Image
from serving_models import b64, write_pixel_sensitive_model

from tlpipe.command_line import main
from tlpipe.core.errors import PipelineError
from tlpipe.data.datasets import load_augmented, load_images
from tlpipe.data.pixels import load_pixels
from tlpipe.model import storage
from tlpipe.model.decision import DECISION_FILE, Decision, load_decision, save_decision
from tlpipe.model.guard import GUARD_FILE, feature_model, fit_guard, load_guard, save_guard
from tlpipe.serve import export as export_module
from tlpipe.serve.export import PARITY_TOLERANCE, compare, export_model
from tlpipe.serve.exported import FORMATS, MANIFEST, is_export, load_export, open_runner
from tlpipe.serve.predict import predict
from tlpipe.serve.pyfunc import classify_images
from tlpipe.train import head

NUMBERS = [*(f"p_{c}" for c in CLASSES), *(f"raw_p_{c}" for c in CLASSES)]


@pytest.fixture(scope="module")
def xray(tmp_path_factory) -> dict[str, Path]:
    """A 32 px EfficientNet-Lite0 X-ray classifier (head fitted on the fixture's train features) with a
    calibrated two-class decision and a guard beside it, as the evaluate stage leaves a model, and the
    fixture's test split."""
    root = tmp_path_factory.mktemp("xray")
    _, augmented = xray_augmented(root)
    keras.utils.set_random_seed(0)
    data = load_augmented(augmented)
    train, val = data.split("train"), data.split("val")
    backbone = head.build_backbone_model("efficientnet_lite0", "imagenet", SIZE)
    features = backbone.predict(load_images(train, len(train.paths)), verbose=0)
    classifier = head.build_head(features.shape[1], 2, dropout=0.0)
    classifier.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    classifier.fit(features, train.labels.astype("float32"), epochs=20, verbose=0)
    model = head.assemble(backbone, classifier, 2, dropout=0.0)
    folder = root / "models"
    storage.save_model_atomically(model, folder / "model.keras")
    # a decision that changes answers (temperature and a cut-off off 0.5), so applying it is checked too
    save_decision(Decision(classes=CLASSES, calibration="temperature", temperature=1.7, rule="youden",
                           threshold=0.4, chosen_on="val", val_sensitivity=0.9, val_specificity=0.8),
                  folder / DECISION_FILE)  # fmt: skip
    _, val_features = feature_model(model).predict(load_images(val, len(val.paths)), verbose=0)
    save_guard(fit_guard(features, val_features, 0.9), folder / GUARD_FILE)
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    return {"model": folder / "model.keras", "classes": folder / "classes.json", "test": augmented / "test",
            "xrays": root / "chest_xray" / "test", "root": root}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FORMATS))
def exported(request, xray) -> Path:
    out = xray["root"] / f"export-{request.param}"
    with pytest.MonkeyPatch.context() as mp:
        # OpenVINO's converter keeps its telemetry files under ~/intel: keep them in the test's folder
        mp.setenv("HOME", str(xray["root"]))
        export_model(xray["model"], out, request.param, xray["classes"], check_images=[xray["test"]])
    return out


def _csv(model: Path, paths: list[Path], classes: Path | None = None) -> list[dict[str, str]]:
    buffer = io.StringIO()
    predict(model, [str(p) for p in paths], classes, buffer)
    return list(csv.DictReader(io.StringIO(buffer.getvalue())))


@pytest.mark.slow
def test_export_probabilities_match_keras_within_1e_4_on_the_test_split(xray, exported):
    folder = load_export(exported)
    files = sorted(xray["test"].rglob("*.png"))
    pixels = np.stack([load_pixels(p, SIZE) for p in files])
    keras_model = feature_model(keras.models.load_model(xray["model"]))
    figures = compare(keras_model, folder.model, pixels, folder.guard)
    assert len(files) == 8
    assert figures["max_abs_dp"] <= PARITY_TOLERANCE
    assert figures["max_rel_d_unfamiliarity"] <= PARITY_TOLERANCE
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["parity"]["check_images"] == f"8 images from {xray['test']}"
    assert manifest["parity"]["max_abs_dp"] == pytest.approx(figures["max_abs_dp"], abs=1e-6)


@pytest.mark.slow
def test_export_carries_the_decision_and_guard_byte_for_byte(xray, exported):
    manifest = json.loads((exported / MANIFEST).read_text())
    assert (exported / manifest["model_file"]).is_file()
    assert manifest["outputs"] == ["probabilities", "features"]
    assert manifest["decision_fitted"] is True and manifest["guard"] is True
    for name in (DECISION_FILE, GUARD_FILE):
        assert (exported / name).read_bytes() == (xray["model"].parent / name).read_bytes()


@pytest.mark.slow
def test_predict_on_the_export_gives_the_keras_csv_within_1e_4(xray, exported):
    paths = [xray["xrays"], xray["root"] / "missing.png"]
    local = _csv(xray["model"], paths, xray["classes"])
    ours = _csv(exported, paths)
    assert list(ours[0]) == list(local[0])  # the same columns in the same order
    assert len(ours) == len(local) == 9
    for mine, theirs in zip(ours, local, strict=True):
        assert mine["path"] == theirs["path"] and mine["error"] == theirs["error"]
        assert mine["predicted"] == theirs["predicted"]
        assert mine["unfamiliar"] == theirs["unfamiliar"]
        if not mine["error"]:
            assert mine["operating_point"] == theirs["operating_point"] == "youden (threshold 0.4)"
            for column in NUMBERS:
                assert float(mine[column]) == pytest.approx(float(theirs[column]), abs=PARITY_TOLERANCE)
            score = float(theirs["unfamiliarity"])
            assert float(mine["unfamiliarity"]) == pytest.approx(score, rel=PARITY_TOLERANCE)
    assert ours[-1]["error"] == "no such file"


@pytest.mark.slow
def test_served_model_logged_by_export_answers_like_keras(xray, tmp_path, capsys):
    out = tmp_path / "served"
    code = main(["export", "--model", str(xray["model"]), "--classes", str(xray["classes"]),
                 "--out", str(out), "--check-images", str(xray["test"]), "--log-model"])  # fmt: skip
    assert code == 0
    uri = capsys.readouterr().out.strip().splitlines()[-1]
    assert uri.startswith("models:/")
    files = sorted(xray["xrays"].rglob("*.jpeg"))
    images = pd.DataFrame({"image": [b64(p.read_bytes()) for p in files] + ["not base64!"]})
    answers = mlflow.pyfunc.load_model(uri).predict(images)
    # what the Keras model, its decision and its guard answer: the code path the evaluate stage logs
    folder = xray["model"].parent
    expected = classify_images(feature_model(storage.load_model(xray["model"])),
                               load_decision(folder / DECISION_FILE), images["image"],
                               load_guard(folder / GUARD_FILE))  # fmt: skip
    assert list(answers.columns) == list(expected.columns)
    assert list(answers["predicted"]) == list(expected["predicted"])
    assert list(answers["unfamiliar"]) == list(expected["unfamiliar"])
    assert answers["error"].iloc[-1].startswith("not base64")
    np.testing.assert_allclose(answers[NUMBERS].to_numpy(float)[:-1], expected[NUMBERS].to_numpy(float)[:-1],
                               atol=PARITY_TOLERANCE)  # fmt: skip
    requirements = (Path(mlflow.artifacts.download_artifacts(uri)) / "requirements.txt").read_text().split()
    assert any(r.startswith("onnxruntime==") for r in requirements), requirements


@pytest.mark.slow
def test_export_without_decision_or_guard_on_purpose_answers_raw_argmax_like_keras(tmp_path):
    model, classes = write_pixel_sensitive_model(tmp_path)  # three classes, softmax, every pixel counts
    out = tmp_path / "export"
    export_model(model, out, "onnx", classes, with_decision=False, with_guard=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["decision_fitted"] is False and manifest["guard"] is False
    assert manifest["outputs"] == ["probabilities"] and not (out / GUARD_FILE).exists()
    rng = np.random.default_rng(3)
    image = tmp_path / "x.jpg"
    Image.fromarray(rng.integers(0, 255, (50, 44, 3), dtype=np.uint8)).save(image, quality=90)
    (local,) = _csv(model, [image], classes)
    (ours,) = _csv(out, [image])
    assert ours["operating_point"] == local["operating_point"] == "argmax"
    assert ours["unfamiliar"] == local["unfamiliar"] == ""
    assert ours["predicted"] == local["predicted"]
    for column in ("p_normal", "p_pneumonia", "p_covid"):
        assert float(ours[column]) == pytest.approx(float(local[column]), abs=PARITY_TOLERANCE)


@pytest.mark.slow
def test_an_export_that_drifts_from_keras_is_refused_and_nothing_is_written(xray, tmp_path, monkeypatch):
    real = export_module.open_runner

    def drifting(fmt, path):
        run = real(fmt, path)
        return lambda batch: [run(batch)[0] + 2 * PARITY_TOLERANCE, *run(batch)[1:]]

    monkeypatch.setattr(export_module, "open_runner", drifting)
    out = tmp_path / "export"
    with pytest.raises(
        PipelineError, match=r"differs from the Keras model by up to 0\.0002\d* in a probability"
    ):
        export_model(xray["model"], out, "onnx", xray["classes"])
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_guard_of_another_width_is_refused(xray, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("model.keras", DECISION_FILE):
        (folder / name).write_bytes((xray["model"].parent / name).read_bytes())
    guard = load_guard(xray["model"].parent / GUARD_FILE)
    np.savez(folder / GUARD_FILE, mean=guard.mean[:10], precision=guard.precision[:10, :10],
             cutoff=guard.cutoff, accept=guard.accept, n_fit=guard.n_fit)  # fmt: skip
    with pytest.raises(PipelineError, match="the guard is for 10 features, the model's head reads 1280"):
        export_model(folder / "model.keras", tmp_path / "export", "onnx", xray["classes"])


@pytest.mark.slow
def test_a_mixed_precision_model_is_refused_naming_the_param(tmp_path):
    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D(dtype="mixed_float16")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", dtype="float32")(pooled))
    storage.save_model_atomically(model, tmp_path / "model.keras")
    (tmp_path / "classes.json").write_text('["a", "b"]')
    with pytest.raises(PipelineError, match=r"mixed_float16.*mixed_precision: off"):
        export_model(tmp_path / "model.keras", tmp_path / "export", "onnx", tmp_path / "classes.json",
                     with_decision=False, with_guard=False)  # fmt: skip


# ---- refusals before any model is read -------------------------------------------------------------------


@pytest.fixture()
def bare_model(tmp_path) -> dict[str, Path]:
    """A model folder as train-frozen leaves it: no decision or guard yet (the model file is not read)."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"not read by these tests")
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    return {"model": folder / "model.keras", "classes": folder / "classes.json"}


def test_missing_decision_is_refused_naming_evaluate_and_no_decision(bare_model, tmp_path, capsys):
    code = main(["export", "--model", str(bare_model["model"]), "--classes", str(bare_model["classes"]),
                 "--out", str(tmp_path / "export")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert f"no decision at {bare_model['model'].parent / DECISION_FILE}: run the evaluate stage" in err
    assert "--no-decision" in err
    assert not (tmp_path / "export").exists()


def test_missing_guard_is_refused_naming_no_guard(bare_model, tmp_path):
    save_decision(Decision(classes=CLASSES), bare_model["model"].parent / DECISION_FILE)
    with pytest.raises(PipelineError, match=r"no guard at .*guard\.npz: run the evaluate stage.*--no-guard"):
        export_model(bare_model["model"], tmp_path / "export", "onnx", bare_model["classes"])


def test_a_decision_for_other_classes_is_refused(bare_model, tmp_path):
    save_decision(Decision(classes=["cat", "dog"]), bare_model["model"].parent / DECISION_FILE)
    with pytest.raises(PipelineError, match=r"is for classes \['cat', 'dog'\], the model's are"):
        export_model(
            bare_model["model"], tmp_path / "export", "onnx", bare_model["classes"], with_guard=False
        )


def test_a_folder_with_other_content_is_never_replaced(bare_model, tmp_path):
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(PipelineError, match="a folder with other content"):
        export_model(bare_model["model"], other, "onnx", bare_model["classes"], with_decision=False,
                     with_guard=False)  # fmt: skip
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(PipelineError, match="holds the model"):
        export_model(bare_model["model"], tmp_path, "onnx", bare_model["classes"], with_decision=False,
                     with_guard=False)  # fmt: skip


def test_predict_refuses_classes_and_decision_files_for_an_export(tmp_path, capsys):
    (tmp_path / MANIFEST).write_text("{}")
    assert is_export(tmp_path)
    code = main(["predict", str(tmp_path), "--model", str(tmp_path), "--classes", str(tmp_path / "c.json")])
    assert code == 1
    assert "--classes and --decision are for a .keras model" in capsys.readouterr().err


def test_an_export_missing_its_network_file_is_refused_naming_it(tmp_path):
    manifest = {"format": "onnx", "image_size": 32, "outputs": ["probabilities"], "decision_fitted": True,
                "guard": False}  # fmt: skip
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match=r"the onnx export's model\.onnx is missing"):
        load_export(tmp_path)


def test_a_missing_runtime_is_refused_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it raises
    with pytest.raises(
        PipelineError, match=r"needs the package onnxruntime \(pip install -c constraints.txt -e \.\)"
    ):
        open_runner("onnx", tmp_path / "model.onnx")
