"""The unfamiliar-input guard: how far an image lies from the images the model was trained on.

The score is the Mahalanobis distance of the image's pooled backbone features (the
input of the model's last layer) from the training images' features, under a shrunk
(Ledoit-Wolf) covariance: 1,280 dimensions fitted on a few thousand images need the
shrinkage to be invertible at all. The cut-off is the ``accept`` quantile of the val
split's scores, so about ``1 - accept`` of in-distribution images are flagged by design.

A flagged image still gets its prediction: the guard adds ``unfamiliar`` and the score
beside it, it never drops or changes the answer. It is saved beside the model
(``models/guard.npz``, plain arrays, nothing pickled) and applied by evaluate,
``tlpipe predict`` and the served model alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlpipe.core.errors import PipelineError

if TYPE_CHECKING:
    import keras

GUARD_FILE = "guard.npz"  # beside the model file
GUARD_COLUMNS = ("unfamiliar", "unfamiliarity")  # what every answer carries when the model has a guard


@dataclass(frozen=True)
class Guard:
    mean: np.ndarray  # (d,) the training features' mean
    precision: np.ndarray  # (d, d) the inverse of their shrunk covariance
    cutoff: float  # scores above it are unfamiliar
    accept: float  # the share of val images the cut-off accepts
    n_fit: int  # training images the mean and covariance come from

    def scores(self, features: np.ndarray) -> np.ndarray:
        centred = np.asarray(features, dtype=np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def unfamiliar(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.cutoff


def guard_columns(guard: Guard, score: float) -> dict[str, object]:
    """One image's ``unfamiliar`` ("yes" or "no") and ``unfamiliarity`` (its score)."""
    return {"unfamiliar": "yes" if score > guard.cutoff else "no", "unfamiliarity": score}


def feature_model(model: keras.Model) -> keras.Model:
    """The model with a second output: the features its last layer (the head) reads."""
    import keras  # here: the guard's arrays are read without TensorFlow

    return keras.Model(model.inputs, [model.outputs[0], model.layers[-1].input])


def fit_guard(train_features: np.ndarray, val_features: np.ndarray, accept: float) -> Guard:
    """Mean and shrunk covariance from training features; the cut-off from val's scores."""
    from sklearn.covariance import LedoitWolf

    train_features = np.asarray(train_features, dtype=np.float64)
    fitted = LedoitWolf().fit(train_features)
    guard = Guard(fitted.location_, fitted.precision_, np.inf, accept, len(train_features))
    cutoff = float(np.quantile(guard.scores(val_features), accept))
    return Guard(guard.mean, guard.precision, cutoff, accept, guard.n_fit)


def guard_path(model_path: Path) -> Path:
    return Path(model_path).with_name(GUARD_FILE)


def save_guard(guard: Guard, path: Path) -> None:
    from tlpipe.core.files import atomic_write

    # through an open file: np.savez would append ".npz" to the temporary name
    atomic_write(Path(path), lambda tmp: _savez(tmp, guard))


def _savez(path: Path, guard: Guard) -> None:
    with open(path, "wb") as fh:
        np.savez(
            fh,
            mean=guard.mean,
            precision=guard.precision,
            cutoff=np.array(guard.cutoff),
            accept=np.array(guard.accept),
            n_fit=np.array(guard.n_fit),
        )


def load_guard(path: Path) -> Guard:
    """A saved guard; PipelineError naming the file when it is missing or not one."""
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            return Guard(
                npz["mean"],
                npz["precision"],
                float(npz["cutoff"]),
                float(npz["accept"]),
                int(npz["n_fit"]),
            )
    except FileNotFoundError:
        raise PipelineError(
            f"{path}: no guard file (the evaluate stage writes it beside the model)"
        ) from None
    except (OSError, ValueError, KeyError) as err:
        raise PipelineError(f"{path}: not a readable guard file: {err}") from None
