"""Out-of-fold predictions: folds that keep a patient and an image's copies together, and heads that
score only images they did not train on."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from phase_fixtures import Trained

from tlpipe.core.config import TrainFrozenParams
from tlpipe.core.errors import PipelineError
from tlpipe.data.datasets import AugmentedData, SplitData
from tlpipe.model.oof_file import read_out_of_fold
from tlpipe.train.out_of_fold import assign_folds, cross_fit, image_groups


def test_a_group_and_its_copies_sit_in_one_fold_and_every_fold_has_both_classes():
    rng = np.random.default_rng(0)
    groups = [f"patient{k // 3}" for k in range(60)]  # three images per patient
    labels = np.array([int(g[-1]) % 2 for g in groups])
    originals = rng.uniform(size=60) < 0.8  # the rest are augmented copies of their patient's images
    originals[::3] = True
    folds = assign_folds(labels, groups, originals, 4, seed=1)
    for group in set(groups):
        assert len({folds[i] for i, g in enumerate(groups) if g == group}) == 1
    assert set(folds) == {0, 1, 2, 3}
    for fold in range(4):
        assert set(labels[(folds == fold) & originals]) == {0, 1}


def test_fewer_groups_than_folds_is_an_error_naming_the_key():
    with pytest.raises(PipelineError, match=r"train_frozen\.oof_folds: 5 folds need at least 5 groups"):
        assign_folds(np.array([0, 1, 0, 1]), ["a", "a", "b", "c"], np.ones(4, bool), 5, seed=0)


def _augmented(root: Path, rows: list[dict]) -> AugmentedData:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "label_index", "split", "source", "group"])
        writer.writeheader()
        writer.writerows(rows)
    splits = {
        s: SplitData(
            [str(root / r["path"]) for r in rows if r["split"] == s],
            np.array([r["label_index"] for r in rows if r["split"] == s], dtype=np.int32),
            [r["path"] for r in rows if r["split"] == s],
        )
        for s in ("train", "val", "test")
    }
    return AugmentedData(root, ["a", "b"], 8, splits)


def test_groups_come_from_the_split_else_the_source_and_copies_are_not_originals(tmp_path):
    rows = [
        {"path": "train/a/x.png", "label": "a", "label_index": 0, "split": "train", "source": "images/a/x.png", "group": "p1"},
        {"path": "train/a/x_aug0.png", "label": "a", "label_index": 0, "split": "train", "source": "images/a/x.png", "group": "p1"},
        {"path": "train/b/y.png", "label": "b", "label_index": 1, "split": "train", "source": "images/b/y.png", "group": ""},
        {"path": "val/b/z.png", "label": "b", "label_index": 1, "split": "val", "source": "images/b/z.png", "group": "p2"},
    ]  # fmt: skip
    groups, originals = image_groups(_augmented(tmp_path, rows))
    assert groups == ["p1", "p1", "source:images/b/y.png", "p2"]
    assert originals.tolist() == [True, False, True, True]


def test_held_out_heads_do_not_remember_the_images_they_score(tmp_path):
    """Random labels on random features: a head learns them by heart (training accuracy near 1), but
    out of fold it can only guess, so the out-of-fold accuracy sits near chance."""
    rng = np.random.default_rng(3)
    n_train, n_val = 240, 60
    rows = [
        {"path": f"{s}/{'ab'[y]}/i{k}.png", "label": "ab"[y], "label_index": y, "split": s,
         "source": f"images/i{k}.png", "group": ""}
        for k, (s, y) in enumerate([("train", int(rng.integers(2))) for _ in range(n_train)]
                                   + [("val", int(rng.integers(2))) for _ in range(n_val)])
    ]  # fmt: skip
    data = _augmented(tmp_path, rows)
    features = {"train": rng.normal(size=(n_train, 400)), "val": rng.normal(size=(n_val, 400))}
    params = TrainFrozenParams(dropout=0.0, learning_rate=0.01, batch_size=32, class_weight="none")
    oof = cross_fit(data, features, params, 5, epochs=60)
    assert len(oof.paths) == n_train + n_val and set(oof.splits) == {"train", "val"}
    assert sorted(set(oof.folds.tolist())) == [0, 1, 2, 3, 4]
    accuracy = float((oof.probabilities.argmax(axis=1) == oof.labels).mean())
    assert 0.35 < accuracy < 0.65
    # the same recipe scoring its own training images remembers them: the out-of-fold split is what matters
    from tlpipe.train.fitting import compile_for
    from tlpipe.train.head import build_head
    from tlpipe.train.optimization import encode_labels

    x = np.concatenate([features["train"], features["val"]]).astype(np.float32)
    head = build_head(400, 2, 0.0)
    compile_for(head, params, 2)
    head.fit(x, encode_labels(oof.labels, 2), batch_size=32, epochs=60, verbose=0)
    assert float(((head.predict(x, verbose=0)[:, 0] >= 0.5) == oof.labels).mean()) > 0.95


def test_train_frozen_writes_out_of_fold_predictions_for_every_original(binary: Trained) -> None:
    oof = read_out_of_fold(binary.oof, ["red", "green"])
    with open(binary.root / "manifest.csv", newline="") as fh:
        expected = {r["path"] for r in csv.DictReader(fh) if r["split"] in ("train", "val")}
    assert set(oof.paths) == expected and len(oof.paths) == len(expected)
    assert np.allclose(oof.probabilities.sum(axis=1), 1.0)
    assert set(oof.folds.tolist()) == set(range(TrainFrozenParams().oof_folds))
