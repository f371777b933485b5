"""Both decision rules side by side on the test split: what ``evaluate.decision_data`` changes.

Evaluate serves the configured rule; this table shows the other beside it on the same model, so the
two differ only in the decision (docs/decision.md). It informs; it does not pick the rule.
"""

from __future__ import annotations

import numpy as np

from tlpipe.core.config import EvaluateParams
from tlpipe.core.errors import PipelineError
from tlpipe.evaluate.decide import fit_decision
from tlpipe.evaluate.metrics import (
    calibration_table,
    expected_calibration_error,
    ranking_metrics,
    threshold_metrics,
)
from tlpipe.model.decision import Decision
from tlpipe.model.oof_file import OutOfFold

RULES = ("val", "oof")


def compare_rules(
    params: EvaluateParams,
    classes: list[str],
    val: tuple[np.ndarray, np.ndarray, list[str]],
    oof: OutOfFold | None,
    y_test: np.ndarray,
    raw_test: np.ndarray,
    served: Decision,
) -> dict[str, dict]:
    """Per rule that can be fitted here: its cut-off, calibration parameter and test figures.

    ``val`` is the val labels, the model's raw val probabilities and their paths. ``served`` is the
    decision fitted by ``params.decision_data``: its row is that decision's, not a second fit. A rule that
    cannot be fitted (no out-of-fold predictions; ``none`` calibration under ``oof``) says why instead.
    """
    y_val, raw_val, val_paths = val
    table: dict[str, dict] = {}
    for rule in RULES:
        if rule == params.decision_data:
            decision = served
        elif rule == "oof" and params.calibration == "none":
            table[rule] = {"skipped": "calibration none has no map onto the out-of-fold scale"}
            continue
        else:
            try:
                decision, _ = fit_decision(
                    params.model_copy(update={"decision_data": rule}), classes, y_val, raw_val, oof, val_paths
                )
            except PipelineError as err:
                table[rule] = {"skipped": str(err)}
                continue
        decided = decision.apply(raw_test)
        figures = threshold_metrics(np.asarray(y_test), decided.labels, len(classes))
        table[rule] = {
            "threshold": decision.threshold,
            "temperature": decision.temperature,
            "accuracy": figures["accuracy"],
            "sensitivity": figures.get("sensitivity"),
            "specificity": figures.get("specificity"),
            "roc_auc": ranking_metrics(np.asarray(y_test), decided.probabilities)["roc_auc"],
            "ece": expected_calibration_error(
                calibration_table(y_test, decided.probabilities, params.calibration_bins)
            ),
            "val_sensitivity": decision.val_sensitivity,
            "val_specificity": decision.val_specificity,
        }
    return table
