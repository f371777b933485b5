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
        EvaluateParams(decision_data="val"),
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


def _oof(labels: np.ndarray, p1: np.ndarray, splits: list[str]):
    from tlpipe.model.oof_file import OutOfFold

    paths = [f"{s}/img{k}.png" for k, s in enumerate(splits)]
    return OutOfFold(paths, splits, np.arange(len(labels)) % 5, labels, np.stack([1 - p1, p1], axis=1))


def test_oof_rule_chooses_the_cut_off_out_of_fold_and_maps_the_model_through_val():
    """An easy val split (the model separates it with saturated scores) leaves the val rule's cut-off
    anywhere in a wide gap; the out-of-fold predictions have errors, and the oof rule's cut-off is
    Youden's on them, applied to the model mapped onto their scale."""
    from tlpipe.evaluate.thresholds import youden_threshold

    rng = np.random.default_rng(7)
    n_train, n_val = 2000, 300
    y = (rng.uniform(size=n_train + n_val) < 0.7).astype(np.int64)
    z = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.2, len(y))  # out of fold: the classes overlap
    oof = _oof(y, 1 / (1 + np.exp(-z)), ["train"] * n_train + ["val"] * n_val)
    y_val = y[n_train:]
    # the fine-tuned model on val: the same ranking as the out-of-fold scores, saturated
    p_val = 1 / (1 + np.exp(-4 * z[n_train:]))
    raw_val = np.stack([1 - p_val, p_val], axis=1)
    val_paths = oof.paths[n_train:]
    params = EvaluateParams(bootstrap_resamples=0)
    decision, threshold = fit_decision(params, ["neg", "pos"], y_val, raw_val, oof, val_paths)

    assert decision.chosen_on == threshold["chosen_on"] == "oof" and threshold["n_oof"] == len(y)
    from tlpipe.evaluate.decide import calibrate_oof

    calibrated_oof = calibrate_oof(params, ["neg", "pos"], oof)[1][:, 1]
    assert decision.threshold == youden_threshold(calibrated_oof, y == 1)
    from tlpipe.model.decision import fit_temperature

    # the out-of-fold scale is sigmoid(z / T_oof); the model's is sigmoid(4 z): the map divides by 4 T_oof
    t_oof = fit_temperature(oof.probabilities, y)
    assert decision.temperature == pytest.approx(4 * t_oof, rel=0.03)
    mapped = decision.calibrate(raw_val)
    np.testing.assert_allclose(mapped[:, 1], calibrated_oof[n_train:], atol=0.02)
    # the val figures are those of the served decision on val, beside the out-of-fold ones it was chosen on
    called = mapped[:, 1] >= decision.threshold
    assert decision.val_sensitivity == pytest.approx(called[y_val == 1].mean())
    assert (
        threshold["oof_sensitivity"] is not None and threshold["val_specificity"] == decision.val_specificity
    )


def test_oof_rule_refuses_out_of_fold_predictions_from_other_images():
    from tlpipe.core.errors import PipelineError

    y = np.array([0, 1] * 20)
    oof = _oof(y, np.where(y == 1, 0.7, 0.3), ["train"] * 30 + ["val"] * 10)
    raw_val = np.tile([0.4, 0.6], (10, 1))
    with pytest.raises(
        PipelineError, match=r"10 val images have no out-of-fold prediction.*rerun train-frozen"
    ):
        fit_decision(
            EvaluateParams(), ["a", "b"], y[30:], raw_val, oof, [f"val/other{k}.png" for k in range(10)]
        )
    with pytest.raises(PipelineError, match="decision_data: oof needs the out-of-fold predictions"):
        fit_decision(EvaluateParams(), ["a", "b"], y[30:], raw_val, None, None)
