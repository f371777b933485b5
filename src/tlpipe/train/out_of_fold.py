"""Out-of-fold predictions over train and val: k heads cross-fitted on the cached frozen features.

The frozen backbone never trained on these images, so a head that did not see an image gives an
out-of-sample prediction for it; over train+val that is several times the val split's labelled images,
with the errors an easy val split lacks. Evaluate fits the ``oof`` decision rule on them
(docs/decision.md). Folds are stratified by class and grouped by the split's groups (a patient stays
in one fold) and by source image (augmented copies follow their original); only originals are scored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from tlpipe.core.config import TrainFrozenParams
from tlpipe.core.constants import TRAIN, VAL
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import read_csv
from tlpipe.data.datasets import AugmentedData
from tlpipe.model.oof_file import OutOfFold
from tlpipe.model.outputs import class_probabilities
from tlpipe.train.fitting import compile_for
from tlpipe.train.head import build_head
from tlpipe.train.optimization import class_weights, encode_labels, schedule_callbacks

logger = logging.getLogger(__name__)


def image_groups(data: AugmentedData) -> tuple[list[str], np.ndarray]:
    """Per train-then-val row: the group it is folded by, and whether it is an original (not a copy)."""
    by_path = {r["path"]: r for r in read_csv(data.root / "manifest.csv")}
    groups, originals = [], []
    for split in (TRAIN, VAL):
        for rel in data.split(split).rel_paths:
            row = by_path[rel]
            source = row.get("source") or rel
            # the split's group (a patient) when it has one; else the source image, shared by its copies
            groups.append(row.get("group") or f"source:{source}")
            originals.append(Path(rel).stem == Path(source).stem)
    return groups, np.array(originals, dtype=bool)


def assign_folds(
    labels: np.ndarray, groups: list[str], originals: np.ndarray, k: int, seed: int
) -> np.ndarray:
    """A fold per row: stratified by the originals' labels, one group never in two folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    group_ids = np.unique(groups, return_inverse=True)[1]
    n_groups = len(np.unique(group_ids[originals]))
    if n_groups < k:
        raise PipelineError(
            f"train_frozen.oof_folds: {k} folds need at least {k} groups of images, train+val has {n_groups}; "
            "lower it, or set it to 0 with evaluate.decision_data: val"
        )
    folds = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    index = np.flatnonzero(originals)
    for fold, (_, held) in enumerate(splitter.split(index, labels[index], group_ids[index])):
        folds[index[held]] = fold
    # copies follow their group's fold (a copy's group is its original's)
    fold_of_group = dict(zip(group_ids[index], folds[index], strict=True))
    return np.array([fold_of_group[g] for g in group_ids], dtype=np.int64)


def cross_fit(
    data: AugmentedData,
    features: dict[str, np.ndarray],
    params: TrainFrozenParams,
    folds_k: int,
    epochs: int,
) -> OutOfFold:
    """Train ``folds_k`` heads, each without one fold, for ``epochs``; each scores its fold's originals."""
    n_classes = len(data.classes)
    x = np.concatenate([np.asarray(features[TRAIN]), np.asarray(features[VAL])]).astype(np.float32)
    labels = np.concatenate([data.split(TRAIN).labels, data.split(VAL).labels]).astype(np.int64)
    paths = [*data.split(TRAIN).rel_paths, *data.split(VAL).rel_paths]
    splits = [TRAIN] * len(data.split(TRAIN).rel_paths) + [VAL] * len(data.split(VAL).rel_paths)
    groups, originals = image_groups(data)
    folds = assign_folds(labels, groups, originals, folds_k, params.seed)
    probabilities = np.zeros((len(labels), n_classes))
    # a plateau schedule watches val_loss, which a fold head has none of: it trains at the set rate
    callbacks = [] if params.schedule == "plateau" else schedule_callbacks(params)
    for fold in range(folds_k):
        fit_rows, held = folds != fold, (folds == fold) & originals
        keras.utils.set_random_seed(params.seed + 1 + fold)
        head = build_head(x.shape[1], n_classes, params.dropout, params.head_l2)
        compile_for(head, params, n_classes)
        head.fit(
            x[fit_rows],
            encode_labels(labels[fit_rows], n_classes),
            batch_size=params.batch_size,
            epochs=epochs,
            class_weight=class_weights(labels[fit_rows], n_classes, params.class_weight),
            callbacks=callbacks,
            verbose=0,
        )
        probabilities[held] = class_probabilities(head.predict(x[held], batch_size=1024, verbose=0))
        logger.info(f"train-frozen: out-of-fold head {fold + 1}/{folds_k} scored {int(held.sum())} images")
    keep = np.flatnonzero(originals)
    return OutOfFold(
        paths=[paths[i] for i in keep],
        splits=[splits[i] for i in keep],
        folds=folds[keep],
        labels=labels[keep],
        probabilities=probabilities[keep],
    )
