"""The train-frozen phase: a new head on a frozen backbone.

The backbone runs once per image to a feature cache (:mod:`tlpipe.train.features`)
and the head trains on those features; the trained head is then put back on the
backbone and saved as one model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from tlpipe.core import tracking
from tlpipe.core.config import TrainFrozenParams, section_dict
from tlpipe.data.datasets import AugmentedData, load_augmented, load_images
from tlpipe.model.oof_file import OutOfFold, write_out_of_fold
from tlpipe.model.storage import save_model_atomically
from tlpipe.train.checkpoints import Checkpoint, fingerprint
from tlpipe.train.devices import apply_precision, distribution_strategy
from tlpipe.train.features import compute_features, data_digest, feature_dataset
from tlpipe.train.fitting import (
    best_epoch_metrics,
    compile_for,
    describe_class_weight,
    fit_resumable,
    seed_everything,
    targets,
    write_history,
)
from tlpipe.train.head import assemble, build_backbone_model, build_head
from tlpipe.train.optimization import class_weights
from tlpipe.train.out_of_fold import cross_fit
from tlpipe.train.workers import outputs_of, start_state, this_worker

logger = logging.getLogger(__name__)


def train_frozen(
    augmented_dir: Path,
    params: TrainFrozenParams,
    model_out: Path,
    history_out: Path,
    checkpoint_dir: Path,
    oof_out: Path | None = None,
) -> dict[str, float]:
    """The train-frozen stage: features cached once, a head trained on them, one model saved; and, with
    ``params.oof_folds``, out-of-fold predictions over train+val (``oof_out``) for the decision rule.

    Under ``distribution: multi_worker`` only the chief writes these paths and logs
    (:mod:`tlpipe.train.workers`); the other workers write to scratch."""
    strategy = distribution_strategy(params.distribution)
    worker = this_worker(params.distribution)
    seed_everything(params.seed)
    policy = apply_precision(params.mixed_precision)
    data = load_augmented(augmented_dir)
    n_classes = len(data.classes)
    run_params = section_dict(params, "train_frozen")
    with outputs_of(worker) as own, tracking.stage_run("train-frozen", run_params, log=worker.is_chief):
        model_out, history_out, checkpoint_dir = own(model_out), own(history_out), own(checkpoint_dir)
        oof_out = None if oof_out is None else own(oof_out)
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
        logger.info(
            f"train-frozen: {sum(map(len, cached.values()))} feature vectors ready in {feature_seconds:.1f}s"
        )
        weights = class_weights(data.split("train").labels, n_classes, params.class_weight)
        logger.info(f"train-frozen: {describe_class_weight(weights, data.classes)}")
        checkpoint = Checkpoint(checkpoint_dir / "head", fingerprint(features_key, section_dict(params, "")))
        state = start_state(checkpoint, worker)
        start = time.perf_counter()
        with strategy.scope():
            head = build_head(cached["train"].shape[1], n_classes, params.dropout, params.head_l2)
            compile_for(head, params, n_classes)
        fit_resumable(
            head,
            feature_dataset(cached["train"], targets(data, "train"), params.batch_size, params.seed),
            feature_dataset(cached["val"], targets(data, "val"), params.batch_size, None),
            (0, params.epochs),
            params,
            checkpoint,
            state,
            weights,
            "frozen",
        )
        best_weights = checkpoint.best_weights()
        if best_weights is not None:  # None only when every epoch's val_loss was NaN
            head.set_weights(best_weights)
        head_seconds = time.perf_counter() - start
        metrics = {
            **best_epoch_metrics(state.rows),
            "feature_seconds": feature_seconds,
            "head_seconds": head_seconds,
        }
        start = time.perf_counter()
        # no collective op in it, and a non-chief worker's file would be thrown away: only the chief
        oof = out_of_fold(data, cached, params, int(metrics["best_epoch"])) if worker.is_chief else None
        metrics["oof_seconds"] = time.perf_counter() - start
        model = assemble(backbone_model, head, n_classes, params.dropout, params.head_l2)
        save_model_atomically(model, model_out)
        write_history(state.rows, history_out)
        # after the model: a failed save leaves no new file beside the old model
        if oof_out is not None and oof is not None:
            write_out_of_fold(Path(oof_out), oof, data.classes)
            logger.info(f"train-frozen: out-of-fold predictions for {len(oof.paths)} images in {oof_out}")
        checkpoint.finish(state)
        tracking.log_metrics(metrics)
        tracking.log_keras_model(model, "model", load_images(data.split("val"), 4))
    return metrics


def out_of_fold(
    data: AugmentedData, features: dict[str, np.ndarray], params: TrainFrozenParams, epochs: int
) -> OutOfFold:
    """Out-of-fold predictions over train+val; none with ``oof_folds`` 0 (the file is then empty: DVC
    expects the output)."""
    if params.oof_folds == 0:
        return OutOfFold(
            [], [], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, len(data.classes)))
        )
    return cross_fit(data, features, params, params.oof_folds, max(epochs, 1))
