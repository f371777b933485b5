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

_multi_worker: tf.distribute.Strategy | None = None  # this process's, once made


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
    multi-worker strategy must exist before the first op runs. A process has one: a
    second call returns the first's, since a second strategy would number its collective
    operations afresh and TensorFlow matches them across workers by those numbers.
    """
    global _multi_worker
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if _multi_worker is None:
            _multi_worker = tf.distribute.MultiWorkerMirroredStrategy()
            fix_keras_for_multi_worker()
        return _multi_worker
    raise ValueError(f"unknown distribution {name!r}; allowed: none, mirrored, multi_worker")


def fix_keras_for_multi_worker() -> None:
    """What Keras 3's TensorFlow trainer needs to ``fit`` and ``evaluate`` on several workers.

    Unfixed, it fails under a ``MultiWorkerMirroredStrategy`` of two or more workers
    (keras-team/keras#20585, open):

    - before the first step it learns the batch's shapes by taking the first batch and
      reducing it across workers with ``strategy.reduce``, which under this strategy takes
      one tensor, not the (x, y) pair, and raises. The shapes are read from the dataset's
      element spec instead: no collective op, and no batch taken. Taking one starts an extra
      pass over a dataset that reshuffles on every pass, so every epoch would see the order
      the epoch after it sees without a strategy; without it a worker's epoch k has the
      batches of a one-worker run's epoch k.
    - it averages each step's metrics across workers with ``strategy.reduce("MEAN", v,
      axis=0)``, which also reduces along the first axis of the (scalar) metric and raises;
      ``axis=None`` is the average across workers, so every worker logs, and stops early
      on, the same cluster-wide loss.

    Other reductions, and a model without a strategy or one built from a single batch
    (``train_on_batch``), go to Keras's own code. ``tests/train/test_multi_worker.py`` trains
    two workers against one: it fails if a Keras upgrade changes what these replace.
    """
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_tlpipe_multi_worker_fixed", False):
        return
    keras_reduce = trainer.reduce_per_replica
    keras_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return keras_reduce(values, strategy, reduction)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or strategy is None:
            return keras_build(self, iterator=iterator, data_batch=data_batch)
        spec = iterator.data_adapter.get_tf_dataset().element_spec
        data_batch = tf.nest.map_structure(lambda s: keras.KerasTensor(tuple(s.shape), s.dtype.name), spec)
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer._tlpipe_multi_worker_fixed = True
