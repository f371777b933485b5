"""The classification head's naming and what its outputs mean.

Two classes get one sigmoid unit (P(class 1)), more get a softmax; everything that
reads a model's output (evaluate, predict, the served model, Grad-CAM) turns it into
one probability per class here.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from tlpipe.core.errors import PipelineError
from tlpipe.model.backbones import REGISTRY

HEAD_DROPOUT = "head_dropout"
HEAD_OUTPUT = "head_output"


@dataclass(frozen=True)
class OutputSpec:
    units: int
    activation: str


def output_spec(n_classes: int) -> OutputSpec:
    """Sigmoid with one unit for two classes, softmax otherwise."""
    if n_classes < 2:
        raise PipelineError(f"need at least 2 classes, got {n_classes}")
    if n_classes == 2:
        return OutputSpec(1, "sigmoid")
    return OutputSpec(n_classes, "softmax")


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs as an (n, n_classes) probability matrix, for either head."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        return np.hstack([1.0 - outputs, outputs])
    return outputs


def find_backbone(model: keras.Model) -> tuple[keras.Model, str]:
    for layer in model.layers:
        if layer.name in REGISTRY:
            return layer, layer.name
    raise PipelineError(f"model has no known backbone layer (looked for {', '.join(REGISTRY)})")
