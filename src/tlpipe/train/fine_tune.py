"""The fine-tune phase: unfreeze the top of the backbone and train on at a lower rate.

All at once, or gradually (one more block every ``unfreeze_every`` epochs); a
from-scratch baseline (backbone weights ``none``) trains every layer instead.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from tlpipe.core import tracking
from tlpipe.core.config import FineTuneParams, section_dict
from tlpipe.core.files import path_digest
from tlpipe.data.datasets import AugmentedData, image_dataset, load_augmented, load_images
from tlpipe.model.backbones import get_backbone, resolve_weights, set_top_blocks_trainable, set_trainable_from
from tlpipe.model.outputs import find_backbone
from tlpipe.model.storage import load_model, save_model_atomically
from tlpipe.train.activation_cache import CannotCut, cached_inputs, cut_at_first_trainable
from tlpipe.train.checkpoints import Checkpoint, fingerprint
from tlpipe.train.devices import apply_precision, distribution_strategy
from tlpipe.train.features import data_digest
from tlpipe.train.fitting import (
    best_epoch_metrics,
    compile_for,
    describe_class_weight,
    fit_resumable,
    seed_everything,
    targets,
    write_history,
)
from tlpipe.train.optimization import class_weights, lr_factors_for
from tlpipe.train.workers import outputs_of, start_state, this_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnfreezeStep:
    first_epoch: int  # 0-based
    end_epoch: int  # exclusive
    blocks: int | None  # top blocks trainable; None: unfreeze_from (or everything from scratch)


def phase_params(params: FineTuneParams, scratch: bool) -> FineTuneParams:
    """``params`` with the rate this phase trains at as ``learning_rate``.

    Resolved once, so the optimizer, the schedule and the log line cannot disagree on it.
    """
    if scratch:
        return params.model_copy(update={"learning_rate": params.scratch_learning_rate})
    return params


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
    """Make ``step``'s layers trainable; the number of backbone layers with weights that train."""
    if scratch:
        backbone_model.trainable = True
        for layer in backbone_model.layers:
            layer.trainable = True
        return sum(1 for layer in backbone_model.layers if layer.weights)
    if step.blocks is None:
        assert params.unfreeze_from is not None  # unfreeze_plan makes a step without blocks only then
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
    Under ``distribution: multi_worker`` only the chief writes the outputs and logs
    (:mod:`tlpipe.train.workers`); the other workers write to scratch.
    """
    strategy = distribution_strategy(params.distribution)
    worker = this_worker(params.distribution)
    seed_everything(params.seed)
    apply_precision(params.mixed_precision)
    data = load_augmented(augmented_dir)
    n_classes = len(data.classes)
    scratch = resolve_weights(backbone_weights) is None
    # the run's params and fingerprint are the section as written, before the rate is resolved
    run_params = {**section_dict(params, "fine_tune"), "train_frozen.weights": backbone_weights}
    model_digest = path_digest(model_in) if Path(model_in).exists() else None
    params = phase_params(params, scratch)
    with outputs_of(worker) as own, tracking.stage_run("fine-tune", run_params, log=worker.is_chief):
        model_out, history_out, checkpoint_dir = own(model_out), own(history_out), own(checkpoint_dir)
        checkpoint = Checkpoint(checkpoint_dir, fingerprint(run_params, data_digest(data), model_digest))
        with strategy.scope():
            model = load_model(model_in)
        backbone_model, backbone_name = find_backbone(model)
        weights = class_weights(data.split("train").labels, n_classes, params.class_weight)
        logger.info(f"fine-tune: {describe_class_weight(weights, data.classes)}")
        plan = unfreeze_plan(params, get_backbone(backbone_name).block_count)
        initial_weights = model.get_weights()
        state = start_state(checkpoint, worker)
        start = time.perf_counter()
        unfrozen = 0
        for step in plan:
            with strategy.scope():
                unfrozen = unfreeze(backbone_model, backbone_name, params, step, scratch)
                # what trains: the whole model on images, or its top on the frozen bottom's cached output
                trainer, train, val = _training_inputs(
                    model, backbone_model, data, params, checkpoint_dir, plan
                )
                factor = 1.0 if scratch else params.backbone_lr_factor
                lr_factors = lr_factors_for(backbone_model.trainable_variables, factor)
                compile_for(trainer, params, n_classes, lr_factors)
            logger.info(
                f"fine-tune: epochs {step.first_epoch + 1}-{step.end_epoch}: {unfrozen} backbone layers "
                f"trainable ({_unfreeze_description(params, step, scratch)}), "
                f"learning rate {params.learning_rate:g}"
                + (f", backbone x{factor:g}" if factor != 1.0 else "")
            )
            if state.initial_val_loss is None:
                state.initial_val_loss = float(trainer.evaluate(val, verbose=0, return_dict=True)["loss"])
                checkpoint.save_state(state)
            fit_resumable(
                trainer, train, val, (step.first_epoch, step.end_epoch), params,
                checkpoint, state, weights, "fine_tune",
            )  # fmt: skip
        seconds = time.perf_counter() - start
        best = best_epoch_metrics(state.rows)
        initial_val_loss = state.initial_val_loss
        assert initial_val_loss is not None  # measured before the first step's fit
        # never hand on a model worse on validation than the one we started from
        kept_initial = state.best_val_loss >= initial_val_loss
        if kept_initial:
            final_weights = initial_weights
            logger.info(
                f"fine-tune: no epoch beat the frozen model's val_loss {initial_val_loss:.4f} "
                f"(best {state.best_val_loss:.4f}); keeping the frozen model's weights"
            )
        else:
            # the checkpoint holds the trainer's weights: set them, and read the whole model's back
            trainer.set_weights(checkpoint.best_weights())
            final_weights = model.get_weights()
        # saved from a fresh copy of the input: the trained model carries its optimizer
        # (possibly a per-variable-rate one) that a user loading the file has no use for
        final = load_model(model_in)
        final.set_weights(final_weights)
        save_model_atomically(final, model_out)
        write_history(state.rows, history_out)
        checkpoint.finish(state)
        metrics = {
            **best,
            "initial_val_loss": initial_val_loss,
            "kept_initial_weights": int(kept_initial),
            "train_seconds": seconds,
            "trainable_layers": unfrozen,
        }
        tracking.log_metrics(metrics)
        tracking.log_keras_model(final, "model", load_images(data.split("val"), 4))
    return metrics


def _training_inputs(
    model: keras.Model,
    backbone_model: keras.Model,
    data: AugmentedData,
    params: FineTuneParams,
    checkpoint_dir: Path,
    plan: list[UnfreezeStep],
) -> tuple[keras.Model, tf.data.Dataset, tf.data.Dataset]:
    """The model that trains and its train and val batches.

    The top on cached activations when the bottom is frozen for the whole phase
    (one unfreezing step: gradual unfreezing moves the cut every step), else the
    whole model on images.
    """
    train_targets, val_targets = targets(data, "train"), targets(data, "val")
    reason = "activation_cache is false"
    if params.activation_cache and len(plan) > 1:
        reason = "gradual unfreezing moves the cut every step"
    elif params.activation_cache:
        try:
            cut = cut_at_first_trainable(model, backbone_model)
        except CannotCut as why:
            reason = str(why)
        else:
            cache = cached_inputs(
                cut, data, {"train": train_targets, "val": val_targets},
                params.batch_size, params.seed, Path(checkpoint_dir) / "activations",
            )  # fmt: skip
            logger.info(
                f"fine-tune: training the top on cached activations entering {cut.cut!r} "
                f"({cut.bottom.output_shape[1:]} per image, {cache.megabytes:.0f} MB); the frozen bottom "
                "ran once per image"
            )
            return cut.top, cache.train, cache.val
    logger.info(f"fine-tune: training through the whole network ({reason})")
    train = image_dataset(
        data.split("train"), params.batch_size, shuffle_seed=params.seed, targets=train_targets
    )
    val = image_dataset(data.split("val"), params.batch_size, targets=val_targets)
    return model, train, val


def _unfreeze_description(params: FineTuneParams, step: UnfreezeStep, scratch: bool) -> str:
    if scratch:
        return "from scratch: every layer, BatchNormalization included"
    if step.blocks is None:
        return f"from layer {params.unfreeze_from!r} up, BatchNormalization frozen"
    return f"top {step.blocks} blocks, BatchNormalization frozen"
