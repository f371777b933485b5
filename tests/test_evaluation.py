"""Tests for the test-split metrics and the evaluate stage."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from augmented_fixture import make_augmented
from tlpipe.config import EvaluateParams
from tlpipe.evaluation import classification_metrics, evaluate, flat_metrics, metric_key, roc_points

# y = [0, 0, 0, 1, 1] with P(class 1) below: predictions [0, 0, 1, 1, 1]
BIN_Y = np.array([0, 0, 0, 1, 1])
BIN_P1 = np.array([0.1, 0.3, 0.7, 0.8, 0.6])
BIN_PROBS = np.column_stack([1 - BIN_P1, BIN_P1])

# y = [0, 0, 1, 1, 2, 2]; argmax predictions [0, 1, 1, 2, 2, 0]
TRI_Y = np.array([0, 0, 1, 1, 2, 2])
TRI_PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.4, 0.3],
        [0.2, 0.6, 0.2],
        [0.1, 0.3, 0.6],
        [0.1, 0.1, 0.8],
        [0.5, 0.2, 0.3],
    ]
)


def test_binary_metrics_by_hand() -> None:
    m = classification_metrics(BIN_Y, BIN_PROBS, ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["n_test"] == 5
    assert m["per_class"]["neg"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert m["per_class"]["pos"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert m["macro_f1"] == pytest.approx(0.8)
    # positives score 0.8 and 0.6 against negatives 0.1, 0.3, 0.7: 5 of 6 pairs ranked right
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[2, 1], [0, 2]]
    json.dumps(m)  # plain Python types only: it is written as metrics.json


def test_three_class_metrics_by_hand() -> None:
    m = classification_metrics(TRI_Y, TRI_PROBS, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    for cls in "abc":
        assert m["per_class"][cls] == pytest.approx(
            {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
        )
    assert m["macro_f1"] == pytest.approx(0.5)
    # one-vs-rest pairs ranked right out of 2x4: a 7, b 7, c 6.5 (a tie counts half); macro average
    assert m["roc_auc"] == pytest.approx((7 / 8 + 7 / 8 + 6.5 / 8) / 3)


def test_uneven_per_class_metrics() -> None:
    # true [0, 1, 2, 2], predicted [0, 0, 2, 1]
    probs = np.array([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    m = classification_metrics(np.array([0, 1, 2, 2]), probs, ["a", "b", "c"])
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert m["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("y_true", "probs", "classes", "absent"),
    [
        (np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]]), ["neg", "pos"], "neg"),
        (np.array([0, 0, 1]), TRI_PROBS[:3], ["a", "b", "c"], "c"),
    ],
)
def test_auc_is_null_when_a_class_is_missing(y_true, probs, classes, absent: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn UndefinedMetricWarning either
        m = classification_metrics(y_true, probs, classes)
    assert m["roc_auc"] is None
    assert m["per_class"][absent]["support"] == 0
    assert "roc_auc" not in flat_metrics(m)
    assert flat_metrics(m)["accuracy"] == m["accuracy"]


def test_roc_points_binary_has_only_the_positive_class() -> None:
    curves = roc_points(BIN_Y, BIN_PROBS, ["neg", "pos"])
    assert list(curves) == ["pos"]
    points = curves["pos"]
    assert points[0] == {"fpr": 0.0, "tpr": 0.0}
    assert points[-1] == {"fpr": 1.0, "tpr": 1.0}
    assert {"fpr": 0.0, "tpr": 0.5} in points  # 0.8 alone above every negative
    fprs = [p["fpr"] for p in points]
    assert fprs == sorted(fprs)


def test_roc_points_one_curve_per_present_class() -> None:
    assert list(roc_points(TRI_Y, TRI_PROBS, ["a", "b", "c"])) == ["a", "b", "c"]
    assert list(roc_points(np.array([0, 0, 1]), TRI_PROBS[:3], ["a", "b", "c"])) == ["a", "b"]
    assert roc_points(np.array([1, 1]), np.array([[0.3, 0.7], [0.6, 0.4]]), ["n", "p"]) == {}


def test_flat_metrics_are_scalar_and_dotted() -> None:
    flat = flat_metrics(classification_metrics(TRI_Y, TRI_PROBS, ["a", "b", "c"]))
    assert flat["a.precision"] == pytest.approx(0.5)
    assert flat["c.support"] == 2
    assert {"accuracy", "macro_f1", "roc_auc", "n_test"} <= set(flat)
    assert "per_class" not in flat and "confusion_matrix" not in flat
    assert all(isinstance(v, (int, float)) for v in flat.values())


# ------------------------------------------------------------------ the stage


def _colour_model(n_classes: int, path: Path) -> Path:
    """Mean colour -> class: the fixture's classes are red, green, blue images, so this is always right."""
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    if n_classes == 2:  # red vs green through one sigmoid unit
        dense = keras.layers.Dense(1, activation="sigmoid")
        outputs = dense(pooled)
        dense.set_weights([np.array([[-0.05], [0.05], [0.0]]), np.zeros(1)])
    else:
        dense = keras.layers.Dense(3, activation="softmax")
        outputs = dense(pooled)
        dense.set_weights([np.eye(3) * 0.05, np.zeros(3)])
    keras.Model(inputs, outputs).save(path)
    return path


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_writes_metrics_plots_and_predictions(tmp_path: Path) -> None:
    classes = ["red", "green", "blue"]
    data = make_augmented(tmp_path / "aug", classes, {"train": 1, "test": 3})
    model = _colour_model(3, tmp_path / "model.keras")
    out = tmp_path / "results"
    (out / "roc").mkdir(parents=True)
    (out / "roc" / "stale.csv").write_text("fpr,tpr\n")  # a previous run's output is replaced, not merged

    metrics = evaluate(data, model, EvaluateParams(batch_size=4), out)

    assert metrics["accuracy"] == 1.0 and metrics["n_test"] == 9
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["confusion_matrix"] == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
    confusion = _read(out / "confusion.csv")
    assert len(confusion) == 9
    assert all(
        list(row) == ["actual", "predicted"] and row["actual"] == row["predicted"] for row in confusion
    )
    assert sorted(p.name for p in (out / "roc").iterdir()) == ["blue.csv", "green.csv", "red.csv"]
    roc = _read(out / "roc" / "red.csv")
    assert list(roc[0]) == ["fpr", "tpr"] and roc[-1] == {"fpr": "1.0", "tpr": "1.0"}

    predictions = _read(out / "predictions.csv")
    manifest = [r for r in _read(data / "manifest.csv") if r["split"] == "test"]
    assert [r["path"] for r in predictions] == [r["path"] for r in manifest]
    assert [r["label"] for r in predictions] == [r["label"] for r in manifest]
    for row in predictions:
        probs = np.array([float(row[f"p_{c}"]) for c in classes])
        assert probs.sum() == pytest.approx(1.0, abs=1e-6)
        assert row["predicted"] == classes[probs.argmax()] == row["label"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results")]  # no scratch left


def test_evaluate_binary_sigmoid_model(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"test": 4})
    metrics = evaluate(
        data, _colour_model(2, tmp_path / "m.keras"), EvaluateParams(batch_size=3), tmp_path / "out"
    )
    assert metrics["accuracy"] == 1.0 and metrics["roc_auc"] == 1.0
    assert [p.name for p in (tmp_path / "out" / "roc").iterdir()] == ["green.csv"]
    for row in _read(tmp_path / "out" / "predictions.csv"):
        p_red, p_green = float(row["p_red"]), float(row["p_green"])
        assert p_red + p_green == pytest.approx(1.0, abs=1e-9)
        assert (p_green > 0.5) == (row["label"] == "green")


def test_metric_key_keeps_only_what_mlflow_accepts() -> None:
    assert metric_key("c++") == "c__"
    assert metric_key("pepper (red)") == "pepper _red_"
    assert metric_key("café.au-lait_2") == "café.au-lait_2"
    flat = flat_metrics(classification_metrics(TRI_Y, TRI_PROBS, ["c++", "a&b", "ok"]))
    assert {"c__.f1", "a_b.f1", "ok.f1"} <= set(flat)


def test_evaluate_logs_an_mlflow_run(tmp_path: Path) -> None:
    # folder names MLflow would refuse as metric names: the stage must still log its run
    classes = ["red (dark)", "green+", "blue"]
    data = make_augmented(tmp_path / "aug", classes, {"test": 2})
    evaluate(data, _colour_model(3, tmp_path / "m.keras"), EvaluateParams(batch_size=8), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "roc").iterdir()) == [
        "blue.csv",
        "green+.csv",
        "red (dark).csv",
    ]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(mlflow.last_active_run().info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tlpipe.stage"] == "evaluate"
    assert run.data.params == {"evaluate.batch_size": "8"}
    assert run.data.metrics["accuracy"] == 1.0
    assert run.data.metrics["red _dark_.recall"] == run.data.metrics["green_.precision"] == 1.0
    assert run.data.metrics["blue.support"] == 2
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]


def test_evaluate_without_a_model_is_file_not_found(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["a", "b"], {"test": 1})
    with pytest.raises(FileNotFoundError, match="run the train-frozen stage first"):
        evaluate(data, tmp_path / "missing.keras", EvaluateParams(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
