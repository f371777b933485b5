"""The out-of-fold predictions file: written by the train-frozen stage, read by evaluate.

One row per original train and val image (augmented copies are trained on, never scored), with
the probabilities of the cross-fitted head that did not see it. Evaluate fits the ``oof`` decision
rule on these (docs/decision.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlpipe.core.errors import PipelineError
from tlpipe.core.files import read_csv, write_csv


@dataclass(frozen=True)
class OutOfFold:
    paths: list[str]  # the augmented manifest's paths
    splits: list[str]  # train or val
    folds: np.ndarray  # the fold each image was held out in
    labels: np.ndarray  # class indices
    probabilities: np.ndarray  # (n, n_classes), the held-out head's


def _fields(classes: list[str]) -> list[str]:
    return ["path", "split", "fold", "label", *(f"p_{c}" for c in classes)]


def write_out_of_fold(path: Path, oof: OutOfFold, classes: list[str]) -> None:
    rows = (
        {
            "path": p,
            "split": s,
            "fold": int(f),
            "label": classes[int(y)],
            **{f"p_{c}": float(v) for c, v in zip(classes, probs, strict=True)},
        }
        for p, s, f, y, probs in zip(
            oof.paths, oof.splits, oof.folds, oof.labels, oof.probabilities, strict=True
        )
    )
    write_csv(Path(path), rows, _fields(classes))


def read_out_of_fold(path: Path, classes: list[str]) -> OutOfFold:
    """The file, checked against ``classes``; PipelineError naming what is wrong when it does not match."""
    rows = read_csv(Path(path))
    if not rows:
        raise PipelineError(
            f"{path}: no out-of-fold predictions (train_frozen.oof_folds is 0?); "
            "set train_frozen.oof_folds >= 2 or evaluate.decision_data: val"
        )
    missing = [f for f in _fields(classes) if f not in rows[0]]
    if missing:
        raise PipelineError(f"{path}: columns {missing} missing; it is for other classes than {classes}")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r["label"] for r in rows} - set(index))
    if unknown:
        raise PipelineError(f"{path}: labels {unknown} are not among the classes {classes}")
    return OutOfFold(
        paths=[r["path"] for r in rows],
        splits=[r["split"] for r in rows],
        folds=np.array([int(r["fold"]) for r in rows], dtype=np.int64),
        labels=np.array([index[r["label"]] for r in rows], dtype=np.int64),
        probabilities=np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64),
    )
