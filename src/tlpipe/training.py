"""The two training phases: a new head on a frozen backbone, then fine-tuning.

The frozen phase runs the backbone once per image to a feature cache and trains
the head on those features: a frozen backbone's output never changes, so every
epoch after the first through the full model would recompute the same numbers.
The trained head is then put back on the backbone and saved as one model.
"""

from __future__ import annotations

import csv
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlpipe import tracking
from tlpipe.backbones import REGISTRY, get_backbone, resolve_weights, set_top_blocks_trainable
from tlpipe.config import FineTuneParams, TrainFrozenParams, section_dict
from tlpipe.datasets import image_dataset, load_augmented, load_images
from tlpipe.errors import PipelineError

HEAD_DROPOUT = "head_dropout"
HEAD_OUTPUT = "head_output"


@dataclass(frozen=True)
class OutputSpec:
    units: int
    activation: str
    loss: str


def output_spec(n_classes: int) -> OutputSpec:
    """Sigmoid with one unit for two classes, softmax otherwise."""
    if n_classes < 2:
        raise PipelineError(f"need at least 2 classes, got {n_classes}")
    if n_classes == 2:
        return OutputSpec(1, "sigmoid", "binary_crossentropy")
    return OutputSpec(n_classes, "softmax", "sparse_categorical_crossentropy")


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs as an (n, n_classes) probability matrix, for either head."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        return np.hstack([1.0 - outputs, outputs])
    return outputs


def seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to the active MLflow run, under a phase prefix."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {f"{self.prefix}.{k}": v for k, v in (logs or {}).items() if k != "learning_rate"}
        tracking.log_metrics(metrics, step=epoch + 1)  # 1-based, as in the history CSVs


def write_history(history: keras.callbacks.History, path: Path) -> list[dict]:
    keys = [k for k in history.history if k != "learning_rate"]
    rows = [
        {"epoch": i + 1, **{k: float(history.history[k][i]) for k in keys}} for i in range(len(history.epoch))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", *keys], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def save_model_atomically(model: keras.Model, path: Path) -> None:
    """Save so that a kill leaves the previous file or none, never a truncated one.

    The archive is also made byte-reproducible, so the same weights give the same
    file and DVC sees an unchanged model as unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.keras")
    model.save(tmp)
    make_archive_reproducible(tmp)
    os.replace(tmp, path)


def make_archive_reproducible(path: Path) -> None:
    """Drop the save time from a .keras archive: fixed entry dates, no ``date_saved``."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                data = json.dumps(renumber_shared_objects(json.loads(data))).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type = info.compress_type
            fixed.external_attr = info.external_attr
            archive.writestr(fixed, data)


def renumber_shared_objects(config: object) -> object:
    """Replace Keras's ``shared_object_id`` values (Python ``id()``s) by 1, 2, 3... in order.

    The ids only link the places one object is shared between, so consistent
    renumbering keeps their meaning and drops the memory addresses that differ per run.
    """
    numbers: dict[object, int] = {}

    def walk(node: object) -> object:
        if isinstance(node, dict):
            return {
                k: numbers.setdefault(v, len(numbers) + 1) if k == "shared_object_id" else walk(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(config)


def best_epoch_metrics(rows: list[dict]) -> dict[str, float]:
    best = min(rows, key=lambda r: r["val_loss"])
    return {
        "best_epoch": best["epoch"],
        "epochs_run": len(rows),
        **{f"best_{k}": v for k, v in best.items() if k != "epoch"},
    }


# ------------------------------------------------------------- frozen phase


def compute_features(backbone_model: keras.Model, data, batch_size: int) -> np.ndarray:
    ds = image_dataset(data, batch_size, with_labels=False)
    return backbone_model.predict(ds, verbose=0)


def _head_layers(n_classes: int, dropout: float) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    spec = output_spec(n_classes)
    return (
        keras.layers.Dropout(dropout, name=HEAD_DROPOUT),
        keras.layers.Dense(spec.units, activation=spec.activation, name=HEAD_OUTPUT),
    )


def build_head(n_features: int, n_classes: int, dropout: float) -> keras.Model:
    """The classification head alone, trained on cached backbone features."""
    dropout_layer, dense = _head_layers(n_classes, dropout)
    inputs = keras.Input((n_features,), name="features")
    return keras.Model(inputs, dense(dropout_layer(inputs)), name="head")


def assemble(backbone_model: keras.Model, head: keras.Model, n_classes: int, dropout: float) -> keras.Model:
    """Backbone and a copy of the trained head as one model that takes raw pixels.

    The head's layers are copied rather than reused: a layer shared by two
    functional models does not survive a save/load of one of them intact.
    """
    backbone_model.trainable = False
    dropout_layer, dense = _head_layers(n_classes, dropout)
    inputs = keras.Input(backbone_model.input_shape[1:], name="image")
    features = backbone_model(inputs, training=False)
    outputs = dense(dropout_layer(features))
    dense.set_weights(head.get_layer(HEAD_OUTPUT).get_weights())
    return keras.Model(inputs, outputs, name="classifier")


def compile_for(model: keras.Model, n_classes: int, learning_rate: float) -> None:
    model.compile(
        # named: Keras would number it by how many optimizers this process made ("adam_2"),
        # and the saved file would then depend on what ran before in the same process
        optimizer=keras.optimizers.Adam(learning_rate, name="adam"),
        loss=output_spec(n_classes).loss,
        metrics=["accuracy"],
    )


def fit_head_on_features(
    head: keras.Model, train: tuple, val: tuple, params: TrainFrozenParams, n_classes: int, callbacks: list
) -> keras.callbacks.History:
    compile_for(head, n_classes, params.learning_rate)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=params.patience, restore_best_weights=True
    )
    return head.fit(
        *train,
        validation_data=val,
        epochs=params.epochs,
        batch_size=params.batch_size,
        shuffle=True,
        callbacks=[stop, *callbacks],
        verbose=2,
    )


def build_backbone_model(name: str, weights: str, image_size: int) -> keras.Model:
    backbone = get_backbone(name)
    inner = backbone.build((image_size, image_size, 3), resolve_weights(weights))
    # named after the registry entry so fine-tuning can find it and its block structure
    return keras.Model(inner.input, inner.output, name=backbone.name)


def train_frozen(
    augmented_dir: Path, params: TrainFrozenParams, model_out: Path, history_out: Path
) -> dict[str, float]:
    """The train-frozen stage."""
    seed_everything(params.seed)
    data = load_augmented(augmented_dir)
    n_classes = len(data.classes)
    with tracking.stage_run("train-frozen", section_dict(params, "train_frozen")):
        backbone_model = build_backbone_model(params.backbone, params.weights, data.image_size)
        start = time.perf_counter()
        train_x = compute_features(backbone_model, data.split("train"), params.batch_size)
        val_x = compute_features(backbone_model, data.split("val"), params.batch_size)
        feature_seconds = time.perf_counter() - start
        print(f"train-frozen: cached {len(train_x) + len(val_x)} feature vectors in {feature_seconds:.1f}s")
        head = build_head(train_x.shape[1], n_classes, params.dropout)
        start = time.perf_counter()
        history = fit_head_on_features(
            head,
            (train_x, data.split("train").labels),
            (val_x, data.split("val").labels),
            params,
            n_classes,
            [MlflowEpochLogger("frozen")],
        )
        head_seconds = time.perf_counter() - start
        model = assemble(backbone_model, head, n_classes, params.dropout)
        save_model_atomically(model, model_out)
        rows = write_history(history, history_out)
        metrics = {
            **best_epoch_metrics(rows),
            "feature_seconds": feature_seconds,
            "head_seconds": head_seconds,
        }
        tracking.log_metrics(metrics)
        tracking.log_keras_model(model, "model", load_images(data.split("val"), 4))
    return metrics


# ------------------------------------------------------------ fine-tuning


def find_backbone(model: keras.Model) -> tuple[keras.Model, str]:
    for layer in model.layers:
        if layer.name in REGISTRY:
            return layer, layer.name
    raise PipelineError(f"model has no known backbone layer (looked for {', '.join(REGISTRY)})")


def load_model(path: Path) -> keras.Model:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: not found; run the train-frozen stage first")
    return keras.models.load_model(path, safe_mode=True)


def fine_tune(
    augmented_dir: Path, model_in: Path, params: FineTuneParams, model_out: Path, history_out: Path
) -> dict[str, float]:
    """The fine-tune stage: unfreeze the top blocks and train on at a lower rate."""
    seed_everything(params.seed)
    data = load_augmented(augmented_dir)
    n_classes = len(data.classes)
    model = load_model(model_in)
    backbone_model, backbone_name = find_backbone(model)
    with tracking.stage_run("fine-tune", section_dict(params, "fine_tune")):
        unfrozen = set_top_blocks_trainable(
            backbone_model, get_backbone(backbone_name), params.unfreeze_blocks
        )
        print(
            f"fine-tune: {unfrozen} backbone layers trainable "
            f"(top {params.unfreeze_blocks} blocks, BatchNormalization frozen)"
        )
        compile_for(model, n_classes, params.learning_rate)
        train = image_dataset(data.split("train"), params.batch_size, shuffle_seed=params.seed)
        val = image_dataset(data.split("val"), params.batch_size)
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=params.patience, restore_best_weights=True
        )
        start = time.perf_counter()
        initial_val_loss = float(model.evaluate(val, verbose=0, return_dict=True)["loss"])
        initial_weights = model.get_weights()
        history = model.fit(
            train,
            validation_data=val,
            epochs=params.epochs,
            shuffle=False,  # the dataset reshuffles itself each epoch (seeded); Keras ignores it for datasets
            callbacks=[stop, MlflowEpochLogger("fine_tune")],
            verbose=2,
        )
        seconds = time.perf_counter() - start
        rows = write_history(history, history_out)
        best = best_epoch_metrics(rows)
        # never hand on a model worse on validation than the one we started from
        kept_initial = best["best_val_loss"] >= initial_val_loss
        if kept_initial:
            model.set_weights(initial_weights)
            print(
                f"fine-tune: no epoch beat the frozen model's val_loss {initial_val_loss:.4f} "
                f"(best {best['best_val_loss']:.4f}); keeping the frozen model's weights"
            )
        save_model_atomically(model, model_out)
        metrics = {
            **best,
            "initial_val_loss": initial_val_loss,
            "kept_initial_weights": int(kept_initial),
            "train_seconds": seconds,
            "trainable_layers": unfrozen,
        }
        tracking.log_metrics(metrics)
        tracking.log_keras_model(model, "model", load_images(data.split("val"), 4))
    return metrics
