"""The decision saved with the model: temperature scaling, the decision rule, the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tlpipe.core.errors import PipelineError
from tlpipe.model.decision import (
    Decision,
    argmax_decision,
    decision_path,
    fit_temperature,
    load_decision,
    save_decision,
    scale_temperature,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_temperature_on_a_sigmoid_head_divides_its_logit():
    p = np.array([0.02, 0.3, 0.5, 0.9, 0.999])
    raw = np.stack([1 - p, p], axis=1)
    logit = np.log(p / (1 - p))
    scaled = scale_temperature(raw, 2.5)
    np.testing.assert_allclose(scaled[:, 1], 1 / (1 + np.exp(-logit / 2.5)), rtol=1e-9)
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0)
    assert scale_temperature(raw, 1.0) is not None and np.array_equal(scale_temperature(raw, 1.0), raw)


def test_temperature_keeps_each_images_top_class_and_the_two_class_ranking():
    rng = np.random.default_rng(0)
    raw = _softmax(rng.normal(0, 3, (50, 4)))
    p = rng.uniform(0.01, 0.99, 50)
    binary = np.stack([1 - p, p], axis=1)
    for t in (0.3, 4.0):
        assert (scale_temperature(raw, t).argmax(axis=1) == raw.argmax(axis=1)).all()
        assert (np.argsort(scale_temperature(binary, t)[:, 1]) == np.argsort(p)).all()  # ROC-AUC unchanged


@pytest.mark.parametrize("true_t", [0.5, 3.0])
def test_fitted_temperature_recovers_how_over_or_under_confident_a_model_is(true_t):
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (20000, 3))
    y = np.array([rng.choice(3, p=row) for row in _softmax(z)])  # labels drawn from softmax(z)
    raw = _softmax(z * true_t)  # the model's logits are true_t times too large
    assert fit_temperature(raw, y) == pytest.approx(true_t, rel=0.05)


def test_the_decision_applies_its_threshold_to_calibrated_probabilities():
    decision = Decision(classes=["normal", "pneumonia"], calibration="temperature", temperature=2.0,
                        rule="youden", threshold=0.7, chosen_on="val", val_sensitivity=0.9,
                        val_specificity=0.8)  # fmt: skip
    p = np.array([0.6, 0.8, 0.9])
    decided = decision.apply(np.stack([1 - p, p], axis=1))
    calibrated = decided.probabilities[:, 1]  # 0.55, 0.67, 0.75
    assert list(decided.labels) == [0, 0, 1] == list((calibrated >= 0.7).astype(int))
    np.testing.assert_array_equal(decided.raw[:, 1], p)
    assert argmax_decision(["a", "b"]).apply(np.array([[0.4, 0.6]])).labels.tolist() == [1]
    with pytest.raises(PipelineError, match="for 2 classes, the model gave"):
        decision.apply(np.ones((2, 3)) / 3)


def test_a_decision_saved_beside_the_model_loads_back_the_same(tmp_path):
    decision = Decision(classes=["a", "b"], calibration="temperature", temperature=1.7, rule="youden",
                        threshold=0.42, chosen_on="val", val_sensitivity=1.0, val_specificity=0.5)  # fmt: skip
    path = decision_path(tmp_path / "models" / "model.keras")
    assert path == tmp_path / "models" / "decision.json"
    save_decision(decision, path)
    assert load_decision(path) == decision


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable decision file"),
        ("[1, 2]", "holds one JSON object"),
        (json.dumps({"classes": ["a", "b"], "treshold": 0.5}), r"unknown key\(s\) \['treshold'\]"),
        (json.dumps({"classes": ["a", "b"], "calibration": "beta"}), "calibration 'beta'"),
        (json.dumps({"classes": ["a", "b"], "temperature": 0}), "temperature 0"),
    ],
)
def test_a_broken_decision_file_is_an_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "decision.json"
    path.write_text(content)
    with pytest.raises(PipelineError, match=message) as err:
        load_decision(path)
    assert str(path) in str(err.value)
    with pytest.raises(PipelineError, match="no decision file"):
        load_decision(tmp_path / "missing.json")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_each_calibration_fits_soft_targets_as_well_as_labels():
    """The oof rule maps the model onto other probabilities (no labels): each method recovers the map."""
    from tlpipe.model.decision import fit_isotonic, fit_platt, fit_temperature, scale_temperature

    rng = np.random.default_rng(4)
    z = rng.normal(0, 0.8, (500, 3))  # unsaturated: logits from clipped probabilities would bias T
    raw, targets = _softmax(4 * z), _softmax(z)
    assert fit_temperature(raw, targets) == pytest.approx(4.0, rel=1e-3)
    np.testing.assert_allclose(scale_temperature(raw, 4.0), targets, atol=1e-6)

    logit = rng.normal(0, 3, 500)
    raw2 = np.stack([1 / (1 + np.exp(logit)), 1 / (1 + np.exp(-logit))], axis=1)
    soft = 1 / (1 + np.exp(-(0.3 * logit - 0.5)))
    a, b = fit_platt(raw2, np.stack([1 - soft, soft], axis=1))
    assert (a, b) == (pytest.approx(0.3, abs=1e-3), pytest.approx(-0.5, abs=1e-3))
    knots_x, knots_y = fit_isotonic(raw2, np.stack([1 - soft, soft], axis=1))
    np.testing.assert_allclose(np.interp(raw2[:, 1], knots_x, knots_y), soft, atol=1e-9)
