"""Small hand-checkable label/probability sets shared by the evaluate tests."""

from __future__ import annotations

import numpy as np

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

# val: negatives score 0.1, 0.4, 0.6 and positives 0.35, 0.7, 0.8. Thresholds from the top,
# (sensitivity, specificity): 0.8 (1/3, 1), 0.7 (2/3, 1), 0.6 (2/3, 2/3), 0.4 (2/3, 1/3),
# 0.35 (1, 1/3), 0.1 (1, 0); Youden's J = sens + spec - 1 peaks at 2/3 at 0.7
VAL_Y = np.array([0, 0, 0, 1, 1, 1])
VAL_P1 = np.array([0.1, 0.4, 0.6, 0.35, 0.7, 0.8])


def softmax_data(n: int, n_classes: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and class probabilities a moderately good classifier would give."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + signal * np.eye(n_classes)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs
