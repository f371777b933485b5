"""Where training runs: numeric precision and the tf.distribute strategy.

Mixed precision halves memory traffic on GPUs with float16 units; a CPU gains
nothing from it (and is slower), so ``auto`` turns it on only where a GPU is visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

MIXED = "mixed_float16"
FLOAT = "float32"


def precision_policy(mode: str, gpus: Sequence[object]) -> str:
    """The Keras dtype policy for ``mixed_precision`` given the visible GPUs."""
    return MIXED if mode == "auto" and len(gpus) > 0 else FLOAT


def apply_precision(mode: str) -> str:
    policy = precision_policy(mode, tf.config.list_physical_devices("GPU"))
    keras.mixed_precision.set_global_policy(policy)
    return policy


def distribution_strategy(name: str) -> tf.distribute.Strategy:
    """The ``distribution`` param's strategy; build and train models in its ``scope()``.

    ``mirrored`` replicates over every local GPU (or the CPU when there is none);
    ``multi_worker`` reads the cluster from the ``TF_CONFIG`` environment variable
    (one worker when it is unset). Create it before other TensorFlow work: a
    multi-worker strategy must exist before the first op runs.
    """
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown distribution {name!r}; allowed: none, mirrored, multi_worker")
