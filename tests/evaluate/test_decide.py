"""The decision fitted on val: temperature first, then the threshold on calibrated probabilities;
and the test probabilities' quality before and after."""

from __future__ import annotations

import numpy as np
import pytest

from tlpipe.core.config import EvaluateParams
from tlpipe.evaluate.decide import calibration_document, fit_decision, probability_quality
from tlpipe.evaluate.document import evaluation_metrics


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes whose true P(1) is sigmoid(z), scored by a model whose logit is 4z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.5, 1.5, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    p = 1 / (1 + np.exp(-4 * z))
    return y, np.stack([1 - p, p], axis=1)


def test_temperature_fitted_on_val_improves_the_test_probabilities():
    y_val, raw_val = _overconfident(3000, 0)
    y_test, raw_test = _overconfident(3000, 1)
    params = EvaluateParams(decision_data="val", bootstrap_resamples=200)
    decision, threshold = fit_decision(params, ["neg", "pos"], y_val, raw_val)
    assert decision.calibration == "temperature" and decision.temperature == pytest.approx(4.0, rel=0.15)
    assert threshold is not None and threshold["chosen_on"] == "val"
    # the threshold is on the calibrated scale: it decides val as the calibrated probabilities say
    decided = decision.apply(raw_val)
    assert ((decided.probabilities[:, 1] >= decision.threshold) == decided.labels.astype(bool)).all()
    calibrated = decision.apply(raw_test).probabilities
    test_metrics = evaluation_metrics(y_test, calibrated, ["neg", "pos"], params, threshold)
    doc = calibration_document(decision, len(y_val), y_test, raw_test, test_metrics, params)
    # "after" is read from the test metrics: the same figures and intervals a fresh computation gives
    assert doc["after"] == probability_quality(y_test, calibrated, params)
    before, after = doc["before"], doc["after"]
    assert after["ece"] < 0.03 < 0.1 < before["ece"]
    assert after["log_loss"] < before["log_loss"] and after["brier"] < before["brier"]
    for figures in (before, after):
        for name in ("brier", "log_loss"):  # means: the point estimate lies inside its interval
            assert figures["ci"][name]["low"] <= figures[name] <= figures["ci"][name]["high"]
        assert figures["ci"]["ece"]["low"] < figures["ci"]["ece"]["high"]
    assert after["ci"]["ece"]["high"] < before["ci"]["ece"]["low"]  # the intervals do not overlap


def test_no_calibration_when_asked_or_without_val():
    y_val, raw_val = _overconfident(200, 2)
    none, _ = fit_decision(
        EvaluateParams(decision_data="val", calibration="none"), ["neg", "pos"], y_val, raw_val
    )
    assert (none.calibration, none.temperature) == ("none", 1.0)
    fixed, _ = fit_decision(
        EvaluateParams(decision_data="val", threshold="fixed"), ["neg", "pos"], None, None
    )
    assert (fixed.calibration, fixed.threshold, fixed.chosen_on) == ("none", 0.5, "params")
    three, no_threshold = fit_decision(
        EvaluateParams(
            decision_data="val",
        ),
        ["a", "b", "c"],
        None,
        None,
    )
    assert three.rule == "argmax" and three.threshold is None and no_threshold is None


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_platt_and_isotonic_calibrate_two_classes_and_travel_in_the_decision(method, tmp_path):
    from tlpipe.model.decision import load_decision, save_decision

    y_val, raw_val = _overconfident(3000, 5)
    y_test, raw_test = _overconfident(3000, 6)
    params = EvaluateParams(decision_data="val", calibration=method, bootstrap_resamples=0)
    decision, _ = fit_decision(params, ["neg", "pos"], y_val, raw_val)
    assert decision.calibration == method
    calibrated = decision.apply(raw_test).probabilities
    doc = calibration_document(
        decision, len(y_val), y_test, raw_test, probability_quality(y_test, calibrated, params), params
    )
    assert doc["after"]["ece"] < 0.04 < 0.1 < doc["before"]["ece"]
    # increasing in the raw P(class 1): the ranking, and so ROC-AUC, are kept (isotonic may tie)
    order = np.argsort(raw_test[:, 1])
    assert (np.diff(calibrated[order, 1]) >= -1e-12).all()
    save_decision(decision, tmp_path / "decision.json")
    np.testing.assert_allclose(
        load_decision(tmp_path / "decision.json").apply(raw_test).probabilities, calibrated
    )


def test_platt_and_isotonic_are_refused_for_more_classes():
    from tlpipe.core.errors import PipelineError

    probs = np.full((6, 3), 1 / 3)
    with pytest.raises(PipelineError, match=r"evaluate\.calibration: isotonic is for two classes"):
        fit_decision(
            EvaluateParams(decision_data="val", calibration="isotonic"),
            ["a", "b", "c"],
            np.arange(6) % 3,
            probs,
        )
