"""Tests for ``tlpipe predict``: files and folders in, a CSV of classes and probabilities out."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import uuid
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from PIL import Image

from tlpipe.command_line import main
from tlpipe.data.augmentation import resize_transform
from tlpipe.model import storage
from tlpipe.serve.predict import predict
from tlpipe.serve.pyfunc import log_raw_image_model
from tlpipe.train import head as training_head

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["red", "blue"]


pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    keras.utils.set_random_seed(0)
    backbone = training_head.build_backbone_model("efficientnet_lite0", "imagenet", 32)
    model = training_head.assemble(backbone, training_head.build_head(1280, 2, 0.0), 2, 0.0)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    storage.save_model_atomically(model, path)
    return path


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(root / "sub" / "b.jpg")  # grey
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image, not picked up from a folder")
    return root


def _classes_file(tmp_path: Path) -> Path:
    path = tmp_path / "classes.json"
    path.write_text('["red", "blue"]')
    return path


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_folder_and_files_give_one_row_each_and_unreadable_ones_are_listed(model_path, images, tmp_path):
    out = io.StringIO()
    done, failed = predict(
        model_path, [str(images), str(tmp_path / "missing.png")], _classes_file(tmp_path), out
    )
    rows = _rows(out.getvalue())
    assert (done, failed) == (2, 2)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {"a.png", "b.jpg", "broken.png", "missing.png"}
    assert by_name["missing.png"]["error"] == "no such file"
    assert by_name["broken.png"]["error"].startswith("cannot decode image")
    for name in ("a.png", "b.jpg"):
        row = by_name[name]
        assert row["error"] == "" and row["predicted"] in CLASSES
        assert float(row["p_red"]) + float(row["p_blue"]) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == CLASSES[int(float(row["p_blue"]) > float(row["p_red"]))]


def test_probabilities_are_the_models_on_pipeline_preprocessed_pixels(model_path, images, tmp_path):
    out = io.StringIO()
    predict(model_path, [str(images / "a.png")], _classes_file(tmp_path), out)
    (row,) = _rows(out.getvalue())
    pixels = np.asarray(Image.open(images / "a.png").convert("RGB"))
    resized = resize_transform(32)(image=pixels)["image"].astype(np.float32)
    expected = float(keras.models.load_model(model_path).predict(resized[None], verbose=0)[0, 0])
    assert float(row["p_blue"]) == pytest.approx(expected, abs=1e-6)


def test_cli_writes_the_csv_and_a_summary(model_path, images, tmp_path, capsys):
    out_csv = tmp_path / "pred.csv"
    code = main(["predict", str(images), "--model", str(model_path), "--classes", str(_classes_file(tmp_path)),
                 "--out", str(out_csv)])  # fmt: skip
    assert code == 0
    assert len(_rows(out_csv.read_text())) == 3
    assert "2 images classified; 1 unreadable" in capsys.readouterr().err


def test_missing_model_is_one_line_and_exit_1(images, tmp_path, capsys):
    code = main(["predict", str(images), "--model", str(tmp_path / "nope.keras"),
                 "--classes", str(_classes_file(tmp_path))])  # fmt: skip
    assert code == 1
    assert "run the train-frozen stage first" in capsys.readouterr().err


def test_python_dash_m_tlpipe_runs_it(model_path, images, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "tlpipe", "predict", str(images / "a.png"), "--model", str(model_path),
         "--classes", str(_classes_file(tmp_path))],
        check=False, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = _rows(result.stdout)
    assert row["predicted"] in CLASSES


# ---- a model from the MLflow registry -----------------------------------------------------------


@pytest.fixture()
def champion(model_path, images, tmp_path) -> str:
    """The model logged as the raw-image pyfunc, registered and aliased champion: its URI."""
    name = f"classifier-{uuid.uuid4().hex[:8]}"  # the store is shared by the whole session
    with mlflow.start_run():
        info = log_raw_image_model(model_path, _classes_file(tmp_path), (images / "a.png").read_bytes())
    version = mlflow.register_model(info.model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version.version)
    return f"models:/{name}@champion"


def test_registered_champion_gives_the_same_csv_as_the_local_model(model_path, images, tmp_path, champion):
    paths = [str(images), str(tmp_path / "missing.png")]
    local, logged = tmp_path / "local.csv", tmp_path / "logged.csv"
    code = main(["predict", *paths, "--model", str(model_path), "--classes", str(_classes_file(tmp_path)),
                 "--out", str(local)])  # fmt: skip
    assert code == 0
    assert main(["predict", *paths, "--model", champion, "--out", str(logged)]) == 0
    rows = _rows(logged.read_text())
    assert len(rows) == 4 and sum(not r["error"] for r in rows) == 2
    assert logged.read_text() == local.read_text()  # classes, probabilities and reasons alike


def test_unknown_registered_model_is_one_line_naming_it_and_the_store(images, mlflow_store, capsys):
    code = main(["predict", str(images), "--model", "models:/no-such-classifier@champion"])
    err = capsys.readouterr().err
    assert code == 1
    assert (
        "tlpipe predict: error: cannot load model models:/no-such-classifier@champion "
        f"(MLflow tracking URI {mlflow_store}):"
    ) in err
    assert "Traceback" not in err


def test_classes_file_is_refused_with_a_model_uri(images, tmp_path, capsys):
    code = main(["predict", str(images), "--model", "models:/any@champion",
                 "--classes", str(_classes_file(tmp_path))])  # fmt: skip
    assert code == 1
    assert "--classes and --decision are for a .keras model" in capsys.readouterr().err
