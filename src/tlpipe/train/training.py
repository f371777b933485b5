"""The two training phases: a new head on a frozen backbone, then fine-tuning.

The frozen phase runs the backbone once per image to a feature cache and trains
the head on those features: a frozen backbone's output never changes, so every
epoch after the first through the full model would recompute the same numbers.
The trained head is then put back on the backbone and saved as one model.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from tlpipe.core import tracking
from tlpipe.model.backbones import (
    REGISTRY,
    get_backbone,
    resolve_weights,
    set_top_blocks_trainable,
    set_trainable_from,
)
from tlpipe.model.outputs import HEAD_DROPOUT, HEAD_OUTPUT, find_backbone, output_spec
from tlpipe.model.storage import load_model, save_model_atomically
from tlpipe.train.checkpoints import Checkpoint, ResumableEarlyStopping, TrainingState, digest_files, fingerprint
from tlpipe.core.config import FineTuneParams, TrainFrozenParams, TrainingPhaseParams, section_dict
from tlpipe.data.datasets import AugmentedData, SplitData, image_dataset, load_augmented, load_images
from tlpipe.train.devices import apply_precision, distribution_strategy
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import atomic_write
from tlpipe.train.optimization import (
    class_weights,
    encode_labels,
    loss_for,
    lr_factors_for,
    make_optimizer,
    schedule_callbacks,
)

def seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to the active MLflow run, under a phase prefix."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {f"{self.prefix}.{k}": float(v) for k, v in (logs or {}).items()}
        tracking.log_metrics(metrics, step=epoch + 1)  # 1-based, as in the history CSVs


def write_history(rows: list[dict], path: Path) -> None:
    """One row per epoch, across every run that contributed (a resumed run included)."""
    keys = ["epoch", *(k for k in rows[0] if k != "epoch")] if rows else ["epoch"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(Path(path), write)


def best_epoch_metrics(rows: list[dict]) -> dict[str, float]:
    best = min(rows, key=lambda r: r["val_loss"])  # the first of equals, as early stopping keeps it
    return {
        "best_epoch": best["epoch"],
        "epochs_run": len(rows),
        **{f"best_{k}": v for k, v in best.items() if k != "epoch"},
    }


# ------------------------------------------------------------ shared fitting


def compile_for(
    model: keras.Model,
    params: TrainingPhaseParams,
    n_classes: int,
    learning_rate: float,
    lr_factors: dict[int, float] | None = None,
) -> None:
    model.compile(
        optimizer=make_optimizer(params, learning_rate, lr_factors),
        loss=loss_for(n_classes, params.label_smoothing),
        metrics=["accuracy"],
    )


def fit_resumable(
    model: keras.Model,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    epochs: tuple[int, int],
    params: TrainingPhaseParams,
    checkpoint: Checkpoint,
    state: TrainingState,
    class_weight: dict[int, float] | None,
    learning_rate: float,
    prefix: str,
) -> None:
    """Fit from ``state.epochs_done`` up to ``epochs[1]``, checkpointing every epoch.

    ``epochs[0]`` is where this fit's own epochs begin (a gradual-unfreezing step
    starts later than 0); the schedule counts from the phase's first epoch.
    """
    if state.epochs_done >= epochs[1] or state.stopped_early:
        return
    if state.epochs_done > 0:
        restored = checkpoint.restore_last(model)
        print(
            f"{prefix}: resuming after epoch {state.epochs_done} from {checkpoint.directory}"
            f" ({'with' if restored else 'without'} optimizer state)"
        )
    model.fit(
        train,
        validation_data=val,
        initial_epoch=state.epochs_done,
        epochs=epochs[1],
        shuffle=False,  # the datasets shuffle themselves (seeded); Keras cannot shuffle a tf.data input
        class_weight=class_weight,
        callbacks=[
            ResumableEarlyStopping(checkpoint, state, params.patience),
            *schedule_callbacks(params, learning_rate),
            MlflowEpochLogger(prefix),
        ],
        verbose=2,
    )


def describe_class_weight(weights: dict[int, float] | None, classes: list[str]) -> str:
    if weights is None:
        return "class weights: none"
    return "class weights: " + ", ".join(f"{classes[i]}={w:.3f}" for i, w in weights.items())


def data_digest(data: AugmentedData) -> str:
    """A digest of the images and labels a phase trains and validates on."""
    splits = [data.split("train"), data.split("val")]
    return fingerprint(
        data.classes,
        [s.rel_paths for s in splits],
        [s.labels.tolist() for s in splits],
        digest_files(p for s in splits for p in s.paths),
    )


# ------------------------------------------------------------- frozen phase


def compute_features(
    backbone_model: keras.Model, data: SplitData, batch_size: int, cache: Path, key: str
) -> np.ndarray:
    """The backbone's features for every image, streamed to ``cache`` (an .npy file).

    The file is a memory map written batch by batch, with a progress record beside
    it, so memory stays flat with the dataset's size and a killed run continues
    from the last batch written. A cache from other inputs (``key``) is recomputed.
    """
    progress_path = cache.with_suffix(".json")
    n = len(data.paths)
    dim = int(backbone_model.output_shape[-1])
    done = _cached_rows(progress_path, key, n)
    cache.parent.mkdir(parents=True, exist_ok=True)
    if done == 0 or not cache.exists():
        done = 0
        features = np.lib.format.open_memmap(cache, mode="w+", dtype=np.float32, shape=(n, dim))
    else:
        features = np.lib.format.open_memmap(cache, mode="r+")
        print(f"feature cache {cache}: {done} of {n} images already done" + ("" if done < n else ", reused"))
    if done < n:
        # one trace for every batch size (the last batch is smaller): tracing costs seconds
        spec = tf.TensorSpec((None, *backbone_model.input_shape[1:]), tf.float32)
        forward = tf.function(lambda x: backbone_model(x, training=False), input_signature=[spec])
        rest = SplitData(data.paths[done:], data.labels[done:], data.rel_paths[done:])
        batches = image_dataset(rest, batch_size, with_labels=False)
        with tqdm(total=n, initial=done, desc=f"features {cache.stem}", unit="img", mininterval=5) as bar:
            for batch in batches:
                out = forward(batch).numpy()
                features[done : done + len(out)] = out
                features.flush()
                done += len(out)
                progress = json.dumps({"key": key, "rows": done, "total": n})
                atomic_write(progress_path, lambda tmp, text=progress: tmp.write_text(text, encoding="utf-8"))
                bar.update(len(out))
    del features
    return np.load(cache, mmap_mode="r")


def _cached_rows(progress_path: Path, key: str, n: int) -> int:
    try:
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if progress.get("key") != key or progress.get("total") != n:
        return 0
    return int(progress.get("rows", 0))


def feature_dataset(
    features: np.ndarray, targets: np.ndarray, batch_size: int, shuffle_seed: int | None
) -> tf.data.Dataset:
    """Batches of (features, target) read from the (memory-mapped) cache as needed."""
    n = len(features)
    index = tf.data.Dataset.range(n)
    if shuffle_seed is not None:
        index = index.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True)

    def gather(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(features[idx], dtype=np.float32), targets[idx]

    def load(idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(gather, [idx], (tf.float32, tf.float32))
        x.set_shape((None, features.shape[1]))
        y.set_shape((None, *targets.shape[1:]))
        return x, y

    return index.batch(batch_size).map(load).prefetch(tf.data.AUTOTUNE)


def _head_layers(
    n_classes: int, dropout: float, l2: float = 0.0
) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    spec = output_spec(n_classes)
    return (
        keras.layers.Dropout(dropout, name=HEAD_DROPOUT),
        keras.layers.Dense(
            spec.units,
            activation=spec.activation,
            kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
            dtype="float32",  # probabilities in float32 under a mixed-precision policy too
            name=HEAD_OUTPUT,
        ),
    )


def build_head(n_features: int, n_classes: int, dropout: float, l2: float = 0.0) -> keras.Model:
    """The classification head alone, trained on cached backbone features."""
    dropout_layer, dense = _head_layers(n_classes, dropout, l2)
    inputs = keras.Input((n_features,), name="features")
    return keras.Model(inputs, dense(dropout_layer(inputs)), name="head")


def assemble(
    backbone_model: keras.Model, head: keras.Model, n_classes: int, dropout: float, l2: float = 0.0
) -> keras.Model:
    """Backbone and a copy of the trained head as one model that takes raw pixels.

    The head's layers are copied rather than reused: a layer shared by two
    functional models does not survive a save/load of one of them intact.
    """
    backbone_model.trainable = False
    dropout_layer, dense = _head_layers(n_classes, dropout, l2)
    inputs = keras.Input(backbone_model.input_shape[1:], name="image")
    # no training=False here: frozen BatchNormalization runs in inference mode anyway (Keras 3),
    # and a from-scratch fine-tune needs its unfrozen BatchNormalization to learn statistics
    features = backbone_model(inputs)
    outputs = dense(dropout_layer(features))
    dense.set_weights(head.get_layer(HEAD_OUTPUT).get_weights())
    return keras.Model(inputs, outputs, name="classifier")


def build_backbone_model(name: str, weights: str, image_size: int) -> keras.Model:
    backbone = get_backbone(name)
    inner = backbone.build((image_size, image_size, 3), resolve_weights(weights))
    # named after the registry entry so fine-tuning can find it and its block structure
    return keras.Model(inner.input, inner.output, name=backbone.name)


def fit_through_frozen_backbone(
    backbone_model: keras.Model, head: keras.Model, data: AugmentedData, params: TrainFrozenParams
) -> keras.callbacks.History:
    """The usual Keras recipe: every epoch runs the frozen backbone on every image.

    Not used by the pipeline; kept as the reference that the feature-cache path is
    tested against and benchmarked against (benchmarks/training_speed.py).
    """
    n_classes = len(data.classes)
    backbone_model.trainable = False
    inputs = keras.Input(backbone_model.input_shape[1:])
    model = keras.Model(inputs, head(backbone_model(inputs, training=False)))
    compile_for(model, params, n_classes, params.learning_rate)
    train, val = (
        image_dataset(data.split(s), params.batch_size, targets=_targets(data, s)) for s in ("train", "val")
    )
    return model.fit(train, validation_data=val, epochs=params.epochs, verbose=0)


def _targets(data: AugmentedData, split: str) -> np.ndarray:
    return encode_labels(data.split(split).labels, len(data.classes))


def train_frozen(
    augmented_dir: Path,
    params: TrainFrozenParams,
    model_out: Path,
    history_out: Path,
    checkpoint_dir: Path,
) -> dict[str, float]:
    """The train-frozen stage: features cached once, a head trained on them, one model saved."""
    strategy = distribution_strategy(params.distribution)
    seed_everything(params.seed)
    policy = apply_precision(params.mixed_precision)
    data = load_augmented(augmented_dir)
    n_classes = len(data.classes)
    checkpoint_dir = Path(checkpoint_dir)
    with tracking.stage_run("train-frozen", section_dict(params, "train_frozen")):
        backbone_model = build_backbone_model(params.backbone, params.weights, data.image_size)
        features_key = fingerprint(params.backbone, params.weights, policy, data_digest(data))
        start = time.perf_counter()
        feature_dir = checkpoint_dir / "features"
        cached = {
            s: compute_features(
                backbone_model, data.split(s), params.batch_size, feature_dir / f"{s}.npy", features_key
            )
            for s in ("train", "val")
        }
        feature_seconds = time.perf_counter() - start
        print(
            f"train-frozen: {sum(map(len, cached.values()))} feature vectors ready in {feature_seconds:.1f}s"
        )
        weights = class_weights(data.split("train").labels, n_classes, params.class_weight)
        print(f"train-frozen: {describe_class_weight(weights, data.classes)}")
        checkpoint = Checkpoint(checkpoint_dir / "head", fingerprint(features_key, section_dict(params, "")))
        state = checkpoint.load_state() or TrainingState(checkpoint.fingerprint)
        start = time.perf_counter()
        with strategy.scope():
            head = build_head(cached["train"].shape[1], n_classes, params.dropout, params.head_l2)
            compile_for(head, params, n_classes, params.learning_rate)
        fit_resumable(
            head,
            feature_dataset(cached["train"], _targets(data, "train"), params.batch_size, params.seed),
            feature_dataset(cached["val"], _targets(data, "val"), params.batch_size, None),
            (0, params.epochs),
            params,
            checkpoint,
            state,
            weights,
            params.learning_rate,
            "frozen",
        )
        best_weights = checkpoint.best_weights()
        if best_weights is not None:  # None only when every epoch's val_loss was NaN
            head.set_weights(best_weights)
        head_seconds = time.perf_counter() - start
        model = assemble(backbone_model, head, n_classes, params.dropout, params.head_l2)
        save_model_atomically(model, model_out)
        write_history(state.rows, history_out)
        checkpoint.finish(state)
        metrics = {
            **best_epoch_metrics(state.rows),
            "feature_seconds": feature_seconds,
            "head_seconds": head_seconds,
        }
        tracking.log_metrics(metrics)
        tracking.log_keras_model(model, "model", load_images(data.split("val"), 4))
    return metrics


# ------------------------------------------------------------ fine-tuning


@dataclass(frozen=True)
class UnfreezeStep:
    first_epoch: int  # 0-based
    end_epoch: int  # exclusive
    blocks: int | None  # top blocks trainable; None: unfreeze_from (or everything from scratch)


def unfreeze_plan(params: FineTuneParams, block_count: int) -> list[UnfreezeStep]:
    """Which blocks train in which epochs: all at once, or one more every ``unfreeze_every``."""
    if params.unfreeze_from is not None:
        return [UnfreezeStep(0, params.epochs, None)]
    blocks = block_count if params.unfreeze_blocks == "all" else params.unfreeze_blocks
    if not params.unfreeze_every or blocks <= 1:
        return [UnfreezeStep(0, params.epochs, blocks)]
    steps = []
    for i in range(blocks):
        first = i * params.unfreeze_every
        if first >= params.epochs:
            break
        steps.append(UnfreezeStep(first, params.epochs, i + 1))
    bounded = [UnfreezeStep(s.first_epoch, nxt.first_epoch, s.blocks) for s, nxt in itertools.pairwise(steps)]
    return [*bounded, steps[-1]]


def unfreeze(
    backbone_model: keras.Model, name: str, params: FineTuneParams, step: UnfreezeStep, scratch: bool
) -> int:
    if scratch:
        backbone_model.trainable = True
        for layer in backbone_model.layers:
            layer.trainable = True
        return sum(1 for layer in backbone_model.layers if layer.weights)
    if step.blocks is None:
        return set_trainable_from(backbone_model, params.unfreeze_from)
    return set_top_blocks_trainable(backbone_model, get_backbone(name), step.blocks)


def fine_tune(
    augmented_dir: Path,
    model_in: Path,
    params: FineTuneParams,
    model_out: Path,
    history_out: Path,
    checkpoint_dir: Path,
    backbone_weights: str = "imagenet",
) -> dict[str, float]:
    """The fine-tune stage: unfreeze the top of the backbone and train on at a lower rate.

    ``backbone_weights`` is train_frozen.weights: ``none`` (the from-scratch
    baseline) trains every layer, BatchNormalization included, at
    ``scratch_learning_rate``, as there are no pretrained features to protect.
    """
    strategy = distribution_strategy(params.distribution)
    seed_everything(params.seed)
    apply_precision(params.mixed_precision)
    data = load_augmented(augmented_dir)
    n_classes = len(data.classes)
    scratch = resolve_weights(backbone_weights) is None
    learning_rate = phase_learning_rate(params, scratch)
    run_params = {**section_dict(params, "fine_tune"), "train_frozen.weights": backbone_weights}
    checkpoint = Checkpoint(
        Path(checkpoint_dir),
        fingerprint(
            run_params, data_digest(data), digest_files([model_in]) if Path(model_in).exists() else None
        ),
    )
    with tracking.stage_run("fine-tune", run_params):
        with strategy.scope():
            model = load_model(model_in)
        backbone_model, backbone_name = find_backbone(model)
        weights = class_weights(data.split("train").labels, n_classes, params.class_weight)
        print(f"fine-tune: {describe_class_weight(weights, data.classes)}")
        train = image_dataset(
            data.split("train"), params.batch_size, shuffle_seed=params.seed, targets=_targets(data, "train")
        )
        val = image_dataset(data.split("val"), params.batch_size, targets=_targets(data, "val"))
        initial_weights = model.get_weights()
        state = checkpoint.load_state() or TrainingState(checkpoint.fingerprint)
        start = time.perf_counter()
        unfrozen = 0
        for step in unfreeze_plan(params, get_backbone(backbone_name).block_count):
            with strategy.scope():
                unfrozen = unfreeze(backbone_model, backbone_name, params, step, scratch)
                factor = 1.0 if scratch else params.backbone_lr_factor
                compile_for(
                    model, params, n_classes, learning_rate,
                    lr_factors_for(backbone_model.trainable_variables, factor),
                )  # fmt: skip
            print(
                f"fine-tune: epochs {step.first_epoch + 1}-{step.end_epoch}: {unfrozen} backbone layers "
                f"trainable ({_unfreeze_description(params, step, scratch)}), learning rate {learning_rate:g}"
                + (f", backbone x{factor:g}" if factor != 1.0 else "")
            )
            if state.initial_val_loss is None:
                state.initial_val_loss = float(model.evaluate(val, verbose=0, return_dict=True)["loss"])
                checkpoint.save_state(state)
            fit_resumable(
                model, train, val, (step.first_epoch, step.end_epoch), params,
                checkpoint, state, weights, learning_rate, "fine_tune",
            )  # fmt: skip
        seconds = time.perf_counter() - start
        best = best_epoch_metrics(state.rows)
        # never hand on a model worse on validation than the one we started from
        kept_initial = state.best_val_loss >= state.initial_val_loss
        if kept_initial:
            final_weights = initial_weights
            print(
                f"fine-tune: no epoch beat the frozen model's val_loss {state.initial_val_loss:.4f} "
                f"(best {state.best_val_loss:.4f}); keeping the frozen model's weights"
            )
        else:
            final_weights = checkpoint.best_weights()
        # saved from a fresh copy of the input: the trained model carries its optimizer
        # (possibly a per-variable-rate one) that a user loading the file has no use for
        final = load_model(model_in)
        final.set_weights(final_weights)
        save_model_atomically(final, model_out)
        write_history(state.rows, history_out)
        checkpoint.finish(state)
        metrics = {
            **best,
            "initial_val_loss": state.initial_val_loss,
            "kept_initial_weights": int(kept_initial),
            "train_seconds": seconds,
            "trainable_layers": unfrozen,
        }
        tracking.log_metrics(metrics)
        tracking.log_keras_model(final, "model", load_images(data.split("val"), 4))
    return metrics


def phase_learning_rate(params: FineTuneParams, scratch: bool) -> float:
    return params.scratch_learning_rate if scratch else params.learning_rate


def _unfreeze_description(params: FineTuneParams, step: UnfreezeStep, scratch: bool) -> str:
    if scratch:
        return "from scratch: every layer, BatchNormalization included"
    if step.blocks is None:
        return f"from layer {params.unfreeze_from!r} up, BatchNormalization frozen"
    return f"top {step.blocks} blocks, BatchNormalization frozen"
