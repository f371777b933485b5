"""The decision that travels with the model: calibration, the decision rule and the class names.

The evaluate stage fits it on the val split and saves it beside the model
(``models/decision.json``); evaluate, ``tlpipe predict`` and the served model all
turn the model's raw probabilities into calibrated ones and a label through
:meth:`Decision.apply`, so for one image they give the same answer.

Calibration is temperature scaling: the model's logits divided by one number ``T``
fitted on val (``T > 1`` softens over-confident probabilities). It keeps each image's
most probable class and, for two classes, the ranking of P(class 1), so ROC-AUC is
unchanged; a two-class threshold is chosen on the calibrated val probabilities and
applies to calibrated probabilities.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tlpipe.core.errors import PipelineError

DECISION_FILE = "decision.json"  # beside the model file
CALIBRATIONS = ("none", "temperature", "platt", "isotonic")  # the last two: two classes only
# what every answer carries besides the label and probabilities (predict's CSV, the served model)
OPERATING_COLUMNS = ("operating_point", "val_sensitivity", "val_specificity")
_EPS = 1e-7  # float32 sigmoids saturate: logits from probabilities are clipped this far from 0 and 1
_LOG_T_RANGE = (-3.0, 5.0)  # temperatures from 0.05 to 150


@dataclass(frozen=True)
class Decided:
    labels: np.ndarray  # class index per image
    probabilities: np.ndarray  # calibrated, (n, n_classes)
    raw: np.ndarray  # the model's own, (n, n_classes)


@dataclass(frozen=True)
class Decision:
    classes: list[str]
    calibration: str = "none"  # none | temperature | platt | isotonic
    temperature: float = 1.0
    platt: list[float] | None = None  # (a, b): P(class 1) = sigmoid(a * logit(p) + b)
    isotonic: list[list[float]] | None = None  # (x, y) knots of the increasing map of P(class 1)
    rule: str = "argmax"  # argmax, or the two-class threshold rule (youden, target_sensitivity, fixed)
    threshold: float | None = None  # on the calibrated P(class 1)
    chosen_on: str = "none"  # val, params, fallback, or none for argmax
    val_sensitivity: float | None = None
    val_specificity: float | None = None

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        if self.calibration == "platt" and self.platt is not None:
            return _two_columns(_sigmoid(self.platt[0] * _logit(raw[:, 1]) + self.platt[1]))
        if self.calibration == "isotonic" and self.isotonic is not None:
            knots_x, knots_y = (np.asarray(k, dtype=np.float64) for k in self.isotonic)
            return _two_columns(np.interp(np.asarray(raw, dtype=np.float64)[:, 1], knots_x, knots_y))
        return scale_temperature(raw, self.temperature)

    def labels(self, calibrated: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            return calibrated.argmax(axis=1)
        return (calibrated[:, 1] >= self.threshold).astype(np.int64)

    def apply(self, raw: np.ndarray) -> Decided:
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != len(self.classes):
            raise PipelineError(
                f"the decision is for {len(self.classes)} classes, the model gave {raw.shape}"
            )
        calibrated = self.calibrate(raw)
        return Decided(self.labels(calibrated), calibrated, raw)

    @property
    def operating_point(self) -> str:
        return self.rule if self.threshold is None else f"{self.rule} (threshold {self.threshold:.4g})"

    def operating_fields(self) -> dict[str, str | float | None]:
        """What every answer carries about the operating point (OPERATING_COLUMNS; None where undefined)."""
        values = (self.operating_point, self.val_sensitivity, self.val_specificity)
        return dict(zip(OPERATING_COLUMNS, values, strict=True))


def argmax_decision(classes: list[str]) -> Decision:
    """What a model without a saved decision gets: its raw probabilities, the most probable class."""
    return Decision(classes=list(classes))


# ------------------------------------------------------------------ temperature scaling


def logits(raw: np.ndarray) -> np.ndarray:
    """Log-probabilities: a softmax of them divided by T is temperature scaling for either head (for a
    sigmoid's [1 - p, p] it gives sigmoid(logit(p) / T))."""
    clipped = np.clip(np.asarray(raw, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(clipped)


def scale_temperature(raw: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with every logit divided by ``temperature`` (1.0 leaves them as they are)."""
    raw = np.asarray(raw, dtype=np.float64)
    if temperature == 1.0:
        return raw
    scaled = logits(raw) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def _targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Labels as one-hot rows; an (n, n_classes) matrix of probabilities (soft targets) as it is."""
    y = np.asarray(y)
    if y.ndim == 2:
        return y.astype(np.float64)
    return np.eye(n_classes)[y.astype(np.int64)]


def _cross_entropy(targets: np.ndarray, probs: np.ndarray) -> float:
    return float(-(targets * np.log(np.clip(probs, 1e-300, None))).sum(axis=1).mean())


def fit_temperature(raw: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the cross-entropy of ``y``: labels (the val labels), or soft targets,
    one row of probabilities per image (out-of-fold probabilities the model is mapped onto)."""
    from scipy.optimize import minimize_scalar

    targets = _targets(y, raw.shape[1])
    result = minimize_scalar(
        lambda log_t: _cross_entropy(targets, scale_temperature(raw, float(np.exp(log_t)))),
        bounds=_LOG_T_RANGE,
        method="bounded",
    )
    return float(np.exp(result.x))


# ------------------------------------------------------------------ Platt scaling and isotonic regression


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p / (1.0 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _two_columns(p1: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - p1, p1], axis=1)


def _positive_share(y: np.ndarray) -> np.ndarray:
    """P(class 1) targets: the labels (0/1), or column 1 of soft targets."""
    y = np.asarray(y, dtype=np.float64)
    return y[:, 1] if y.ndim == 2 else y


def fit_platt(raw: np.ndarray, y: np.ndarray) -> list[float]:
    """(a, b) of a logistic regression on the logit of P(class 1): of the val labels, or of soft targets.

    A plain maximum-likelihood fit (no penalty): sklearn's LogisticRegression takes only hard labels.
    """
    from scipy.optimize import minimize

    x, t = _logit(raw[:, 1]), _positive_share(y)

    def loss(ab: np.ndarray) -> float:
        z = ab[0] * x + ab[1]
        # log(1 + e^z) - t z, the logistic cross-entropy, without overflow
        return float((np.logaddexp(0.0, z) - t * z).mean())

    fitted = minimize(loss, np.array([1.0, 0.0]), method="L-BFGS-B")
    return [float(fitted.x[0]), float(fitted.x[1])]


def fit_isotonic(raw: np.ndarray, y: np.ndarray) -> list[list[float]]:
    """The knots of the increasing map of P(class 1) that best fits the val labels (or soft targets)."""
    from sklearn.isotonic import IsotonicRegression

    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw[:, 1], _positive_share(y))
    return [fitted.X_thresholds_.tolist(), fitted.y_thresholds_.tolist()]


# ------------------------------------------------------------------ the file


def decision_path(model_path: Path) -> Path:
    return Path(model_path).with_name(DECISION_FILE)


def save_decision(decision: Decision, path: Path) -> None:
    from tlpipe.core.files import write_json

    write_json(Path(path), asdict(decision))


def load_decision(path: Path) -> Decision:
    """A saved decision; PipelineError naming the file and the key when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(
            f"{path}: no decision file (the evaluate stage writes it beside the model)"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineError(f"{path}: not a readable decision file: {err}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a decision file holds one JSON object")
    known = set(Decision.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown or "classes" not in data:
        raise PipelineError(
            f"{path}: unknown key(s) {unknown} or no classes; expected keys: {', '.join(sorted(known))}"
        )
    decision = Decision(**data)
    if decision.calibration not in CALIBRATIONS or not decision.temperature > 0:
        raise PipelineError(
            f"{path}: calibration {decision.calibration!r} with temperature {decision.temperature}"
        )
    return decision
