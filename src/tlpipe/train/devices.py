"""Where training runs: numeric precision and the tf.distribute strategy.

Mixed precision halves memory traffic on GPUs with float16 units; a CPU gains
nothing from it (and is slower), so ``auto`` turns it on only where a GPU is visible.
On a CPU with bf16 units (AMX or AVX-512 BF16) ``auto`` keeps the model in float32
and lets oneDNN compute convolutions in bf16 instead: faster fine-tuning at a test
ROC-AUC within the tolerance set before the runs (docs/speed.md, "bf16 math").
Only the training stages do: evaluate, ``tlpipe predict`` and the served model
compute in float32, so what the pipeline reports is what it serves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf

MIXED = "mixed_float16"
FLOAT = "float32"
BF16_MATH = "float32 with oneDNN bf16 math"
# oneDNN reads it once, when it first builds a primitive (a convolution, say): set it before any op runs.
# Set by the user (BF16, STRICT, ...), it is theirs and left alone.
FPMATH_ENV = "ONEDNN_DEFAULT_FPMATH_MODE"
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")

logger = logging.getLogger(__name__)

_multi_worker: tf.distribute.Strategy | None = None  # this process's, once made


def precision_policy(mode: str, gpus: Sequence[object]) -> str:
    """The Keras dtype policy for ``mixed_precision`` given the visible GPUs."""
    return MIXED if mode == "auto" and len(gpus) > 0 else FLOAT


def cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo``'s text lists a bf16 unit (AMX or AVX-512 BF16) among the CPU's flags."""
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def wants_bf16_math(mode: str, gpus: Sequence[object], cpuinfo: str) -> bool:
    return mode == "auto" and not gpus and cpu_has_bf16(cpuinfo)


def apply_precision(mode: str, cpuinfo: str | None = None) -> str:
    """Set the Keras policy for ``mixed_precision`` (and, on a bf16 CPU, oneDNN's math); what it is.

    Call it before any TensorFlow op, as the training stages do first thing.
    """
    gpus = tf.config.list_physical_devices("GPU")
    policy = precision_policy(mode, gpus)
    keras.mixed_precision.set_global_policy(policy)
    if cpuinfo is None:
        info = Path("/proc/cpuinfo")
        cpuinfo = info.read_text(errors="replace") if info.is_file() else ""
    if FPMATH_ENV not in os.environ and wants_bf16_math(mode, gpus, cpuinfo):
        os.environ[FPMATH_ENV] = "BF16"
        logger.info(
            f"precision: {BF16_MATH} (this CPU has bf16 units; mixed_precision: off for strict float32)"
        )
    return BF16_MATH if os.environ.get(FPMATH_ENV, "").upper() == "BF16" and policy == FLOAT else policy


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
