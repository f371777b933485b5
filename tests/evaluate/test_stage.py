"""Tests for the evaluate stage: its outputs, its MLflow run and the flat metric names it logs."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from evaluate_cases import BIN_P1, BIN_PROBS, BIN_Y, TRI_PROBS, TRI_Y, VAL_P1, VAL_Y

from augmented_fixture import make_augmented
from tlpipe.core.config import EvaluateParams
from tlpipe.core.errors import PipelineError
from tlpipe.evaluate.document import classification_metrics, evaluation_metrics
from tlpipe.evaluate.stage import evaluate, flat_metrics, metric_key
from tlpipe.evaluate.thresholds import choose_threshold, operating_points

# what MLflow should get of each operating point, spelled out rather than read from the module
OPERATING_POINT_FIELDS = (
    "value",
    "val_sensitivity",
    "val_specificity",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
)


pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


def test_flat_metrics_are_scalar_and_dotted() -> None:
    flat = flat_metrics(classification_metrics(TRI_Y, TRI_PROBS, ["a", "b", "c"]))
    assert flat["a.precision"] == pytest.approx(0.5)
    assert flat["c.support"] == 2
    assert {"accuracy", "macro_f1", "roc_auc", "n_test", "top_2_accuracy", "ece"} <= set(flat)
    assert "per_class" not in flat and "confusion_matrix" not in flat
    assert all(isinstance(v, (int, float)) for v in flat.values())


def test_flat_metrics_of_the_binary_document() -> None:
    params = EvaluateParams(
        decision_data="val", threshold="fixed", fixed_threshold=0.75, bootstrap_resamples=50
    )
    threshold = choose_threshold(params, None, None)
    flat = flat_metrics(evaluation_metrics(BIN_Y, BIN_PROBS, ["neg", "pos"], params, threshold))
    assert flat["threshold.value"] == 0.75 and "threshold.rule" not in flat
    assert flat["at_0.5.sensitivity"] == 1.0
    assert flat["ci.accuracy.low"] <= flat["accuracy"] <= flat["ci.accuracy.high"]
    assert not {"ci_level", "bootstrap_resamples", "at_0.5.confusion_matrix"} & set(flat)
    assert all(re.fullmatch(r"[\w\-. /]+", k) for k in flat)
    assert not [k for k in flat if k.startswith("operating_points")]


def test_flat_metrics_log_the_operating_points_briefly() -> None:
    params = EvaluateParams(decision_data="val", operating_sensitivities=[0.9])
    points = operating_points(params, VAL_Y, VAL_P1, BIN_Y, BIN_P1)
    threshold = choose_threshold(params, VAL_Y, VAL_P1)
    metrics = evaluation_metrics(BIN_Y, BIN_PROBS, ["neg", "pos"], params, threshold, points)
    assert metrics["operating_points"] == points
    flat = flat_metrics(metrics)
    logged = {k for k in flat if k.startswith("operating_points.")}
    assert logged == {
        f"operating_points.{name}.{k}"
        for name in ("youden", "sensitivity_0.9")
        for k in OPERATING_POINT_FIELDS
    }
    assert flat["operating_points.sensitivity_0.9.value"] == 0.35
    assert flat["operating_points.sensitivity_0.9.accuracy"] == pytest.approx(0.8)


def test_metric_key_keeps_only_what_mlflow_accepts() -> None:
    assert metric_key("c++") == "c__"
    assert metric_key("pepper (red)") == "pepper _red_"
    assert metric_key("café.au-lait_2") == "café.au-lait_2"
    flat = flat_metrics(classification_metrics(TRI_Y, TRI_PROBS, ["c++", "a&b", "ok"]))
    assert {"c__.f1", "a_b.f1", "ok.f1"} <= set(flat)


def _colour_model(n_classes: int, path: Path, bias: float = 0.0) -> Path:
    """Mean colour -> class: the fixture's classes are red, green, blue images, so this ranks them right;
    a ``bias`` (two classes) makes it call red images green at 0.5."""
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    if n_classes == 2:  # red vs green through one sigmoid unit
        dense = keras.layers.Dense(1, activation="sigmoid")
        outputs = dense(pooled)
        # weak weights keep P(green) away from 0 and 1, so val and test scores spread
        dense.set_weights([np.array([[-0.01], [0.01], [0.0]]), np.full(1, bias)])
    else:
        dense = keras.layers.Dense(3, activation="softmax")
        outputs = dense(pooled)
        dense.set_weights([np.eye(3) * 0.05, np.zeros(3)])
    keras.Model(inputs, outputs).save(path)
    return path


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _columns(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def test_evaluate_writes_metrics_plots_and_predictions(tmp_path: Path) -> None:
    classes = ["red", "green", "blue"]
    data = make_augmented(tmp_path / "aug", classes, {"train": 1, "test": 3})
    model = _colour_model(3, tmp_path / "model.keras")
    out = tmp_path / "results"
    (out / "roc").mkdir(parents=True)
    (out / "roc" / "stale.csv").write_text("fpr,tpr\n")  # a previous run's output is replaced, not merged

    metrics = evaluate(
        data, model, EvaluateParams(decision_data="val", batch_size=4, bootstrap_resamples=200), out
    )

    assert metrics["accuracy"] == 1.0 and metrics["n_test"] == 9
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert list(metrics) == [
        "accuracy",
        "balanced_accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "weighted_precision",
        "weighted_recall",
        "weighted_f1",
        "top_2_accuracy",
        "roc_auc",
        "pr_auc",
        "log_loss",
        "brier",
        "ece",
        "n_test",
        "per_class",
        "confusion_matrix",
        "ci",
        "ci_level",
        "bootstrap_resamples",
        "calibration",
        "guard",
    ]
    assert metrics["ci"]["accuracy"] == {"low": 1.0, "high": 1.0}
    assert metrics["confusion_matrix"] == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
    confusion = _read(out / "confusion.csv")
    assert len(confusion) == 9
    assert all(
        list(row) == ["actual", "predicted"] and row["actual"] == row["predicted"] for row in confusion
    )
    for folder, fields in (("roc", ["fpr", "tpr"]), ("pr", ["recall", "precision"])):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["blue.csv", "green.csv", "red.csv"]
        assert all(_columns(p) == fields for p in (out / folder).iterdir())
    roc = _read(out / "roc" / "red.csv")
    assert roc[-1] == {"fpr": "1.0", "tpr": "1.0"}
    calibration = _read(out / "calibration.csv")
    assert _columns(out / "calibration.csv") == ["bin", "confidence", "accuracy", "count"]
    assert sum(int(r["count"]) for r in calibration) == 9

    predictions = _read(out / "predictions.csv")
    assert _columns(out / "predictions.csv") == [
        "path", "label", "predicted", "p_red", "p_green", "p_blue", "raw_p_red", "raw_p_green", "raw_p_blue",
        "unfamiliar", "unfamiliarity",
    ]  # fmt: skip
    assert _columns(out / "calibration_raw.csv") == ["bin", "confidence", "accuracy", "count"]
    manifest = [r for r in _read(data / "manifest.csv") if r["split"] == "test"]
    assert [r["path"] for r in predictions] == [r["path"] for r in manifest]
    assert [r["label"] for r in predictions] == [r["label"] for r in manifest]
    for row in predictions:
        probs = np.array([float(row[f"p_{c}"]) for c in classes])
        assert probs.sum() == pytest.approx(1.0, abs=1e-6)
        assert row["predicted"] == classes[probs.argmax()] == row["label"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results")]  # no scratch left


def test_evaluate_binary_chooses_the_threshold_on_val(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"val": 4, "test": 5})
    out = tmp_path / "out"
    params = EvaluateParams(
        decision_data="val", batch_size=3, threshold="target_sensitivity", target_sensitivity=1.0
    )
    metrics = evaluate(data, _colour_model(2, tmp_path / "m.keras"), params, out)

    val_rows = [r for r in _read(data / "manifest.csv") if r["split"] == "val"]
    threshold = metrics["threshold"]
    assert threshold["rule"] == "target_sensitivity" and threshold["chosen_on"] == "val"
    assert threshold["n_val"] == len(val_rows) == 8
    assert threshold["val_sensitivity"] == 1.0
    assert 0.5 < threshold["value"] < 1.0  # the lowest P(green) of a green val image
    assert {"sensitivity", "specificity", "at_0.5", "ci"} <= set(metrics)
    assert metrics["at_0.5"]["accuracy"] == 1.0 and metrics["roc_auc"] == 1.0
    assert {"sensitivity", "specificity"} <= set(metrics["ci"])
    assert json.loads((out / "metrics.json").read_text()) == metrics

    points = metrics["operating_points"]
    assert list(points) == ["youden", "sensitivity_0.9", "sensitivity_0.95", "sensitivity_0.99"]
    assert all(p["chosen_on"] == "val" and p["n_val"] == 8 for p in points.values())
    # the target 1.0 rule in use and the 0.99 point both need every green val image: one cut-off
    assert points["sensitivity_0.99"]["value"] == threshold["value"]
    assert points["sensitivity_0.99"]["accuracy"] == metrics["accuracy"]

    assert [p.name for p in (out / "roc").iterdir()] == ["green.csv"]
    assert [p.name for p in (out / "pr").iterdir()] == ["green.csv"]
    predictions = _read(out / "predictions.csv")
    for row in predictions:
        p_red, p_green = float(row["p_red"]), float(row["p_green"])
        assert p_red + p_green == pytest.approx(1.0, abs=1e-9)
        # the test decisions use the val threshold, not 0.5
        assert (row["predicted"] == "green") == (p_green >= threshold["value"])
    called_green = sum(r["predicted"] == "green" for r in predictions)
    assert metrics["confusion_matrix"][0][1] + metrics["confusion_matrix"][1][1] == called_green


def test_evaluate_binary_youden_on_a_real_run(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"val": 3, "test": 3})
    metrics = evaluate(
        data,
        _colour_model(2, tmp_path / "m.keras"),
        EvaluateParams(decision_data="val", batch_size=8),
        tmp_path / "out",
    )
    assert metrics["threshold"]["rule"] == "youden" and metrics["threshold"]["chosen_on"] == "val"
    # red and green separate perfectly on val: J = 1 at the lowest green score
    assert metrics["threshold"]["val_sensitivity"] == metrics["threshold"]["val_specificity"] == 1.0
    assert metrics["operating_points"]["youden"]["value"] == metrics["threshold"]["value"]


def test_evaluate_fixed_threshold_needs_no_val_split(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"test": 4})
    params = EvaluateParams(
        decision_data="val", threshold="fixed", fixed_threshold=0.5, bootstrap_resamples=0
    )
    metrics = evaluate(data, _colour_model(2, tmp_path / "m.keras"), params, tmp_path / "out")
    assert metrics["accuracy"] == 1.0 and metrics["roc_auc"] == 1.0
    assert metrics["threshold"] == {"rule": "fixed", "value": 0.5, "chosen_on": "params"}
    assert metrics["at_0.5"]["accuracy"] == metrics["accuracy"]
    assert metrics["ci"] == {} and metrics["bootstrap_resamples"] == 0
    assert "operating_points" not in metrics  # they need a val split


def test_evaluate_fixed_threshold_still_shows_val_operating_points(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"val": 3, "test": 4})
    params = EvaluateParams(
        decision_data="val", threshold="fixed", fixed_threshold=0.5, bootstrap_resamples=0
    )
    metrics = evaluate(data, _colour_model(2, tmp_path / "m.keras"), params, tmp_path / "out")
    assert metrics["threshold"] == {"rule": "fixed", "value": 0.5, "chosen_on": "params"}
    assert metrics["operating_points"]["youden"]["chosen_on"] == "val"
    assert metrics["operating_points"]["youden"]["n_val"] == 6


def test_evaluate_logs_an_mlflow_run(tmp_path: Path) -> None:
    # folder names MLflow would refuse as metric names: the stage must still log its run
    classes = ["red (dark)", "green+", "blue"]
    data = make_augmented(tmp_path / "aug", classes, {"test": 2})
    params = EvaluateParams(decision_data="val", batch_size=8, bootstrap_resamples=100)
    evaluate(data, _colour_model(3, tmp_path / "m.keras"), params, tmp_path / "out", "none")
    assert sorted(p.name for p in (tmp_path / "out" / "roc").iterdir()) == [
        "blue.csv",
        "green+.csv",
        "red (dark).csv",
    ]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(mlflow.last_active_run().info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tlpipe.stage"] == "evaluate"
    assert run.data.tags["tlpipe.weights"] == "none"  # a from-scratch baseline, for the report
    assert run.data.params == {
        **{f"evaluate.{k}": str(v) for k, v in params.model_dump().items()},
        "train_frozen.weights": "none",
    }
    assert run.data.metrics["accuracy"] == 1.0
    assert run.data.metrics["red _dark_.recall"] == run.data.metrics["green_.precision"] == 1.0
    assert run.data.metrics["blue.support"] == 2
    assert run.data.metrics["ci.accuracy.low"] == 1.0
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]


def test_evaluate_without_a_model_is_file_not_found(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["a", "b"], {"val": 1, "test": 1})
    with pytest.raises(FileNotFoundError, match="run the train-frozen stage first"):
        evaluate(
            data,
            tmp_path / "missing.keras",
            EvaluateParams(decision_data="val"),
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_evaluate_binary_without_val_names_the_missing_split(tmp_path: Path) -> None:
    from tlpipe.core.errors import PipelineError

    data = make_augmented(tmp_path / "aug", ["a", "b"], {"test": 1})
    with pytest.raises(PipelineError, match="no 'val' images"):
        evaluate(
            data,
            tmp_path / "missing.keras",
            EvaluateParams(decision_data="val"),
            tmp_path / "out",
        )


def test_evaluate_logs_a_warning_and_falls_back_when_val_lacks_a_class(tmp_path: Path, caplog) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"val": 2, "test": 2})
    rows = _read(data / "manifest.csv")
    with open(data / "manifest.csv", "w", newline="") as fh:  # val keeps its green (positive) images only
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if not (r["split"] == "val" and r["label"] == "red"))
    caplog.set_level(logging.INFO, logger="tlpipe")

    metrics = evaluate(
        data,
        _colour_model(2, tmp_path / "m.keras"),
        EvaluateParams(decision_data="val"),
        tmp_path / "out",
    )

    assert metrics["threshold"]["chosen_on"] == "fallback" and metrics["threshold"]["value"] == 0.5
    logged = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("tlpipe.eval")]
    assert (
        "tlpipe.evaluate.stage",
        logging.WARNING,
        "evaluate: warning: threshold 0.5 used: the val predictions have no negative images",
    ) in logged
    summary = [m for _, level, m in logged if level == logging.INFO and m.startswith("evaluate: test ")]
    assert len(summary) == 1
    assert summary[0].startswith("evaluate: test accuracy 1.0000 [1.0000, 1.0000], macro F1 1.0000")
    assert summary[0].endswith("at threshold 0.5000 (youden) on 4 images")


def test_predict_and_the_served_model_answer_exactly_as_evaluate_decided(tmp_path: Path) -> None:
    import base64
    import io

    import pandas as pd

    from tlpipe.core.constants import LOGGED_MODEL_TAG
    from tlpipe.model.decision import load_decision
    from tlpipe.serve.predict import predict

    data = make_augmented(tmp_path / "aug", ["red", "green"], {"train": 8, "val": 6, "test": 6})
    model = _colour_model(2, tmp_path / "m.keras", bias=3.0)
    out = tmp_path / "out"
    metrics = evaluate(data, model, EvaluateParams(decision_data="val", bootstrap_resamples=0), out)
    decision = load_decision(tmp_path / "decision.json")  # beside the model
    assert decision.calibration == "temperature" and decision.threshold == metrics["threshold"]["value"]
    assert decision.temperature == metrics["calibration"]["temperature"] != 1.0
    expected = _read(out / "predictions.csv")
    # the raw argmax calls every test image green; the decision fitted on val does not
    assert {r["predicted"] for r in expected} == {"red", "green"}
    assert all(float(r["raw_p_green"]) > 0.5 for r in expected)

    files = [data / r["path"] for r in expected]
    buffer = io.StringIO()
    predict(model, [str(f) for f in files], data / "classes.json", buffer)
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in expected]
    numbers = ["p_red", "p_green", "raw_p_red", "raw_p_green", "unfamiliarity"]
    assert metrics["guard"]["fitted"] and {r["unfamiliar"] for r in expected} <= {"yes", "no"}
    assert [r["unfamiliar"] for r in rows] == [r["unfamiliar"] for r in expected]
    gap = max(abs(float(r[k]) - float(e[k])) for r, e in zip(rows, expected, strict=True) for k in numbers)
    assert gap <= 1e-6, gap
    assert {r["operating_point"] for r in rows} == {decision.operating_point}
    assert {float(r["val_sensitivity"]) for r in rows} == {decision.val_sensitivity}

    served = mlflow.pyfunc.load_model(f"models:/{mlflow.last_active_run().data.tags[LOGGED_MODEL_TAG]}")
    images = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]
    answer = served.predict(pd.DataFrame({"image": images}))
    assert list(answer["predicted"]) == [r["predicted"] for r in expected]
    np.testing.assert_allclose(answer[numbers].to_numpy(), [[float(e[k]) for k in numbers] for e in expected],
                               rtol=0, atol=1e-6)  # fmt: skip
    assert set(answer["operating_point"]) == {decision.operating_point}
    assert list(answer["unfamiliar"]) == [r["unfamiliar"] for r in expected]


def _write_oof(data: Path, path: Path, classes: list[str]) -> int:
    """Out-of-fold predictions for every train and val image: right mostly, wrong sometimes."""
    from tlpipe.model.oof_file import OutOfFold, write_out_of_fold

    rows = [r for r in _read(data / "manifest.csv") if r["split"] in ("train", "val")]
    labels = np.array([classes.index(r["label"]) for r in rows])
    rng = np.random.default_rng(0)
    p1 = np.clip(np.where(labels == 1, 0.7, 0.3) + rng.normal(0, 0.25, len(rows)), 0.02, 0.98)
    oof = OutOfFold([r["path"] for r in rows], [r["split"] for r in rows], np.arange(len(rows)) % 5, labels,
                    np.stack([1 - p1, p1], axis=1))  # fmt: skip
    write_out_of_fold(path, oof, classes)
    return len(rows)


def test_the_default_oof_rule_is_served_exactly_and_compared_with_the_val_rule(tmp_path: Path) -> None:
    """Under the default rule (out of fold) evaluate's decision is what predict applies, label for label and
    probability for probability; metrics.json shows both rules on the same model."""
    import io

    from tlpipe.model.decision import load_decision
    from tlpipe.serve.predict import predict

    classes = ["red", "green"]
    data = make_augmented(tmp_path / "aug", classes, {"train": 8, "val": 6, "test": 6})
    n_oof = _write_oof(data, tmp_path / "oof.csv", classes)
    model = _colour_model(2, tmp_path / "m.keras", bias=3.0)
    out = tmp_path / "out"
    metrics = evaluate(data, model, EvaluateParams(bootstrap_resamples=0), out, oof_path=tmp_path / "oof.csv")

    threshold, calibration = metrics["threshold"], metrics["calibration"]
    assert threshold["chosen_on"] == "oof" and threshold["n_oof"] == n_oof == 28 and threshold["n_val"] == 12
    assert calibration["fitted_on"] == "oof" and calibration["n_oof"] == n_oof
    assert all(p["chosen_on"] == "oof" for p in metrics["operating_points"].values())
    rules = metrics["decision_rules"]
    assert set(rules) == {"val", "oof"}
    assert rules["oof"]["threshold"] == threshold["value"] and rules["oof"]["accuracy"] == metrics["accuracy"]
    assert rules["val"]["temperature"] != rules["oof"]["temperature"]
    decision = load_decision(tmp_path / "decision.json")
    assert decision.chosen_on == "oof" and decision.threshold == threshold["value"]

    expected = _read(out / "predictions.csv")
    buffer = io.StringIO()
    predict(model, [str(data / r["path"]) for r in expected], data / "classes.json", buffer)
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in expected]
    for k in ("p_red", "p_green", "raw_p_green"):
        np.testing.assert_allclose(
            [float(r[k]) for r in rows], [float(e[k]) for e in expected], rtol=0, atol=1e-6
        )
    assert {r["operating_point"] for r in rows} == {decision.operating_point}


def test_the_oof_rule_without_out_of_fold_predictions_says_what_to_do(tmp_path: Path) -> None:
    data = make_augmented(tmp_path / "aug", ["red", "green"], {"train": 2, "val": 2, "test": 2})
    with pytest.raises(PipelineError, match="decision_data: oof needs"):
        evaluate(data, _colour_model(2, tmp_path / "m.keras"), EvaluateParams(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
