"""Tests for the two training phases: real (tiny) runs of train_frozen and fine_tune."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import mlflow.keras.save
import numpy as np
import pytest

from augmented_fixture import make_augmented
from tlpipe.train import training
from tlpipe.model import outputs
from tlpipe.model import storage
from tlpipe.model.backbones import get_backbone
from tlpipe.core.config import FineTuneParams, TrainFrozenParams
from tlpipe.data.datasets import image_dataset, load_augmented
from tlpipe.core.errors import PipelineError
from tlpipe.train.optimization import encode_labels

BACKBONE = "efficientnet_lite0"
HISTORY_COLUMNS = {"epoch", "loss", "val_loss", "accuracy", "val_accuracy"}
# fine-tuning the top 2 blocks (block15 and the head conv) trains exactly these backbone layers
TOP_TWO_BLOCKS = {"block15_expand_conv", "block15_dwconv", "block15_project_conv", "top_conv"}


@dataclass
class Trained:
    root: Path
    frozen: Path
    frozen_history: Path
    frozen_metrics: dict
    frozen_run: str
    model: Path
    fine_history: Path
    fine_metrics: dict
    fine_run: str


def _train(root: Path, frozen_epochs: int, fine_epochs: int, mlflow_store: str) -> Trained:
    with pytest.MonkeyPatch.context() as mp:
        # module-scoped fixtures run before conftest's per-test MLflow isolation: isolate here too
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_store)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "tlpipe-tests")
        out = root.parent
        frozen_params = TrainFrozenParams(epochs=frozen_epochs, batch_size=8, learning_rate=0.01, patience=5)
        frozen_metrics = training.train_frozen(
            root, frozen_params, out / "frozen.keras", out / "frozen" / "history.csv", out / "ckpt-frozen"
        )
        frozen_run = mlflow.last_active_run().info.run_id
        fine_params = FineTuneParams(
            unfreeze_blocks=2, epochs=fine_epochs, batch_size=8, learning_rate=1e-3, patience=5
        )
        fine_metrics = training.fine_tune(
            root, out / "frozen.keras", fine_params, out / "model.keras", out / "fine" / "history.csv",
            out / "ckpt-fine",
        )  # fmt: skip
        fine_run = mlflow.last_active_run().info.run_id
    return Trained(
        root,
        out / "frozen.keras",
        out / "frozen" / "history.csv",
        frozen_metrics,
        frozen_run,
        out / "model.keras",
        out / "fine" / "history.csv",
        fine_metrics,
        fine_run,
    )


@pytest.fixture(scope="module")
def tri(tmp_path_factory, mlflow_store) -> Trained:
    root = make_augmented(
        tmp_path_factory.mktemp("tri") / "augmented", ["red", "green", "blue"], {"train": 6, "val": 3}
    )
    return _train(root, frozen_epochs=2, fine_epochs=2, mlflow_store=mlflow_store)


@pytest.fixture(scope="module")
def binary(tmp_path_factory, mlflow_store) -> Trained:
    root = make_augmented(
        tmp_path_factory.mktemp("bin") / "augmented", ["red", "green"], {"train": 6, "val": 3}
    )
    return _train(root, frozen_epochs=2, fine_epochs=1, mlflow_store=mlflow_store)


@pytest.fixture(scope="module")
def fresh_backbone() -> keras.Model:
    return training.build_backbone_model(BACKBONE, "imagenet", 32)


def _load(path: Path) -> keras.Model:
    return keras.models.load_model(path)


def _history(path: Path) -> tuple[list[str], list[dict[str, float]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), [{k: float(v) for k, v in row.items()} for row in reader]


# ------------------------------------------------------------------ helpers


@pytest.mark.parametrize(("n_classes", "units", "activation"), [(2, 1, "sigmoid"), (3, 3, "softmax")])
def test_output_spec(n_classes: int, units: int, activation: str) -> None:
    assert outputs.output_spec(n_classes) == outputs.OutputSpec(units, activation)
    assert outputs.output_spec(7).units == 7


@pytest.mark.parametrize("n_classes", [0, 1])
def test_output_spec_needs_two_classes(n_classes: int) -> None:
    with pytest.raises(PipelineError, match=f"at least 2 classes, got {n_classes}"):
        outputs.output_spec(n_classes)


def test_class_probabilities_for_sigmoid_output() -> None:
    probs = outputs.class_probabilities(np.array([[0.2], [0.9], [0.5]], dtype=np.float32))
    np.testing.assert_allclose(probs, [[0.8, 0.2], [0.1, 0.9], [0.5, 0.5]], atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_class_probabilities_for_softmax_output() -> None:
    softmax = keras.ops.convert_to_numpy(
        keras.activations.softmax(np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]))
    )
    probs = outputs.class_probabilities(softmax.astype(np.float32))
    assert probs.shape == (2, 3) and probs.dtype == np.float64
    np.testing.assert_allclose(probs, softmax, rtol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_best_epoch_metrics_picks_lowest_val_loss() -> None:
    rows = [
        {"epoch": 1, "loss": 0.9, "val_loss": 0.8, "val_accuracy": 0.5},
        {"epoch": 2, "loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.7},
        {"epoch": 3, "loss": 0.3, "val_loss": 0.6, "val_accuracy": 0.9},
    ]
    assert training.best_epoch_metrics(rows) == {
        "best_epoch": 2,
        "epochs_run": 3,
        "best_loss": 0.5,
        "best_val_loss": 0.4,
        "best_val_accuracy": 0.7,
    }


def test_find_backbone_requires_a_known_backbone_layer() -> None:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(PipelineError, match=f"no known backbone layer.*{BACKBONE}"):
        outputs.find_backbone(model)


# ----------------------------------------------------------- the frozen phase


def test_frozen_model_loads_with_a_softmax_head(tri: Trained) -> None:
    model = _load(tri.frozen)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 3)
    assert model.get_layer(outputs.HEAD_OUTPUT).get_config()["activation"] == "softmax"
    backbone, name = outputs.find_backbone(model)
    assert name == BACKBONE and backbone.trainable is False
    assert not [p for p in tri.frozen.parent.iterdir() if "partial" in p.name]  # atomic save cleaned up


def test_frozen_backbone_is_exactly_the_pretrained_one(tri: Trained, fresh_backbone: keras.Model) -> None:
    backbone, _ = outputs.find_backbone(_load(tri.frozen))
    compared = 0
    for layer in fresh_backbone.layers:
        for saved, fresh in zip(
            backbone.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True
        ):
            np.testing.assert_array_equal(saved, fresh, err_msg=layer.name)
            compared += 1
    assert compared > 200  # every conv kernel and BN statistic of the backbone


def test_assembled_model_equals_head_on_cached_features(
    tri: Trained, fresh_backbone: keras.Model, tmp_path: Path
) -> None:
    """The frozen phase trains on cached features: the saved model must compute the same thing."""
    val = load_augmented(tri.root).split("val")
    features = training.compute_features(fresh_backbone, val, 4, tmp_path / "val.npy", "key")
    assert features.shape == (9, 1280)
    model = _load(tri.frozen)
    head_on_features = keras.ops.convert_to_numpy(model.get_layer(outputs.HEAD_OUTPUT)(features))
    predictions = model.predict(image_dataset(val, 4, with_labels=False), verbose=0)
    np.testing.assert_allclose(predictions, head_on_features, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-5)


def test_frozen_model_carries_the_best_trained_head(tri: Trained) -> None:
    """Its val loss is the history's best: the trained head (best epoch) was copied, not a fresh one."""
    model = _load(tri.frozen)
    training.compile_for(model, TrainFrozenParams(), 3, 1e-3)
    val = load_augmented(tri.root).split("val")
    loss, _ = model.evaluate(image_dataset(val, 8, targets=encode_labels(val.labels, 3)), verbose=0)
    _, rows = _history(tri.frozen_history)
    assert loss == pytest.approx(min(r["val_loss"] for r in rows), rel=1e-4)
    assert loss == pytest.approx(tri.frozen_metrics["best_val_loss"], rel=1e-4)


@pytest.mark.parametrize("phase", ["frozen", "fine"])
def test_history_has_one_row_per_epoch(tri: Trained, phase: str) -> None:
    path, metrics = getattr(tri, f"{phase}_history"), getattr(tri, f"{phase}_metrics")
    fields, rows = _history(path)
    assert fields[0] == "epoch" and set(fields) == HISTORY_COLUMNS
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert metrics["epochs_run"] == 2
    assert all(r["loss"] > 0 and 0 <= r["val_accuracy"] <= 1 for r in rows)
    best = min(rows, key=lambda r: r["val_loss"])
    assert metrics["best_epoch"] == best["epoch"] and metrics["best_val_loss"] == best["val_loss"]


# --------------------------------------------------------------- fine-tuning


def test_fine_tune_changes_only_the_top_blocks(tri: Trained) -> None:
    before, _ = outputs.find_backbone(_load(tri.frozen))
    after, _ = outputs.find_backbone(_load(tri.model))
    changed, unchanged_norms = set(), 0
    for layer in after.layers:
        old, new = before.get_layer(layer.name).get_weights(), layer.get_weights()
        same = all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
        if isinstance(layer, keras.layers.BatchNormalization):
            assert same, f"{layer.name}: BatchNormalization weights or moving statistics changed"
            unchanged_norms += 1
        elif not same:
            changed.add(layer.name)
    assert changed == TOP_TWO_BLOCKS
    assert unchanged_norms > 40
    assert tri.fine_metrics["trainable_layers"] == len(TOP_TWO_BLOCKS)


def test_fine_tune_also_trains_the_head(tri: Trained) -> None:
    old = _load(tri.frozen).get_layer(outputs.HEAD_OUTPUT).get_weights()
    new = _load(tri.model).get_layer(outputs.HEAD_OUTPUT).get_weights()
    assert not np.array_equal(old[0], new[0])


def test_fine_tune_rejects_too_many_blocks(tri: Trained, tmp_path: Path) -> None:
    params = FineTuneParams(unfreeze_blocks=get_backbone(BACKBONE).block_count + 1, epochs=1)
    with pytest.raises(PipelineError, match=r"allowed: 0\.\.17"):
        training.fine_tune(
            tri.root, tri.frozen, params, tmp_path / "m.keras", tmp_path / "h.csv", tmp_path / "c"
        )
    assert not (tmp_path / "m.keras").exists()


def test_fine_tune_without_a_frozen_model_says_which_stage_to_run(tri: Trained, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the train-frozen stage first"):
        training.fine_tune(
            tri.root,
            tmp_path / "nope.keras",
            FineTuneParams(),
            tmp_path / "m.keras",
            tmp_path / "h",
            tmp_path / "c",
        )


# --------------------------------------------------------------------- binary


def test_two_classes_train_a_one_unit_sigmoid_head(binary: Trained) -> None:
    val = load_augmented(binary.root).split("val")
    for path in (binary.frozen, binary.model):
        model = _load(path)
        assert model.output_shape == (None, 1)
        assert model.get_layer(outputs.HEAD_OUTPUT).get_config()["activation"] == "sigmoid"
        raw = model.predict(image_dataset(val, 8, with_labels=False), verbose=0)
        assert raw.shape == (6, 1) and ((raw > 0) & (raw < 1)).all()
        np.testing.assert_allclose(outputs.class_probabilities(raw).sum(axis=1), 1.0)
    assert len(_history(binary.frozen_history)[1]) == 2
    fields, rows = _history(binary.fine_history)
    assert set(fields) == HISTORY_COLUMNS and len(rows) == 1


# --------------------------------------------------------------------- MLflow


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


@pytest.mark.parametrize(
    ("phase", "stage", "prefix", "section", "param_value"),
    [
        ("frozen", "train-frozen", "frozen", "train_frozen", ("train_frozen.learning_rate", "0.01")),
        ("fine", "fine-tune", "fine_tune", "fine_tune", ("fine_tune.unfreeze_blocks", "2")),
    ],
)
def test_each_stage_logs_a_run_with_params_epoch_metrics_and_model(
    tri: Trained, phase: str, stage: str, prefix: str, section: str, param_value: tuple[str, str]
) -> None:
    client = _client()
    run_id = getattr(tri, f"{phase}_run")
    run = client.get_run(run_id)
    tagged = client.search_runs([run.info.experiment_id], filter_string=f"tags.`tlpipe.stage` = '{stage}'")
    assert run_id in {r.info.run_id for r in tagged}
    assert all(r.data.tags["tlpipe.stage"] == stage for r in tagged)

    key, value = param_value
    assert run.data.params[key] == value
    assert run.data.params[f"{section}.epochs"] == "2" and f"{section}.seed" in run.data.params

    _, rows = _history(getattr(tri, f"{phase}_history"))
    for name in ("loss", "val_loss", "accuracy", "val_accuracy"):
        logged = sorted(client.get_metric_history(run_id, f"{prefix}.{name}"), key=lambda m: m.step)
        assert [m.step for m in logged] == [r["epoch"] for r in rows] == [1, 2], name
        np.testing.assert_allclose([m.value for m in logged], [r[name] for r in rows], rtol=1e-6)
    assert run.data.metrics["epochs_run"] == 2
    assert run.data.metrics["best_val_loss"] == pytest.approx(
        getattr(tri, f"{phase}_metrics")["best_val_loss"]
    )

    models = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == run_id]
    assert [m.name for m in models] == ["model"]
    assert str(models[0].status).endswith("READY")


def test_fine_tune_that_only_hurts_keeps_the_frozen_weights(tri: Trained, tmp_path: Path) -> None:
    # a huge learning rate wrecks the weights in one step: no epoch can beat the start
    params = FineTuneParams(unfreeze_blocks=2, epochs=1, batch_size=8, learning_rate=50.0, patience=1)
    metrics = training.fine_tune(
        tri.root, tri.frozen, params, tmp_path / "model.keras", tmp_path / "history.csv", tmp_path / "c"
    )
    assert metrics["kept_initial_weights"] == 1
    assert metrics["best_val_loss"] > metrics["initial_val_loss"]
    kept, frozen = _load(tmp_path / "model.keras"), _load(tri.frozen)
    for a, b in zip(kept.get_weights(), frozen.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_fine_tune_that_helps_keeps_its_weights(tri: Trained) -> None:
    assert tri.fine_metrics["kept_initial_weights"] == 0
    assert tri.fine_metrics["best_val_loss"] < tri.fine_metrics["initial_val_loss"]


def test_saved_model_is_byte_reproducible(tri: Trained, tmp_path: Path) -> None:
    model = _load(tri.frozen)
    first, second = tmp_path / "a.keras", tmp_path / "b.keras"
    storage.save_model_atomically(model, first)
    time.sleep(1.1)  # zip entry dates have 2-second resolution; metadata has seconds
    storage.save_model_atomically(model, second)
    assert first.read_bytes() == second.read_bytes()
    reloaded = _load(first)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert not list(tmp_path.glob(".*partial*"))


def test_shared_object_ids_are_renumbered_consistently() -> None:
    config = {"a": {"shared_object_id": 140187974294480, "x": [{"shared_object_id": 99}]},
              "b": {"shared_object_id": 140187974294480}}  # fmt: skip
    assert storage.renumber_shared_objects(config) == {
        "a": {"shared_object_id": 1, "x": [{"shared_object_id": 2}]},
        "b": {"shared_object_id": 1},
    }


SAVE_A_FRESH_MODEL = """
import sys
padding = [bytearray(int(sys.argv[2])) for _ in range(200)]  # moves where later objects land
import keras
from tlpipe.train import training
from tlpipe.model import outputs
from tlpipe.model import storage
keras.utils.set_random_seed(1)
backbone = training.build_backbone_model("efficientnet_lite0", "none", 32)
model = training.assemble(backbone, training.build_head(1280, 3, 0.2), 3, 0.2)
storage.save_model_atomically(model, sys.argv[1])
"""


def test_saved_bytes_do_not_depend_on_memory_addresses(tmp_path: Path) -> None:
    """A freshly built model's config.json names shared objects by id(): their address in memory."""
    for name, padding in (("a.keras", "10"), ("b.keras", "100000")):
        subprocess.run([sys.executable, "-c", SAVE_A_FRESH_MODEL, str(tmp_path / name), padding], check=True)
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()


def test_same_params_and_data_give_byte_identical_models_on_cpu(tri: Trained, tmp_path: Path) -> None:
    """Seeds plus TensorFlow op determinism: a rerun reproduces both phases' files exactly."""
    frozen_params = TrainFrozenParams(epochs=2, batch_size=8, learning_rate=0.01, patience=5)
    training.train_frozen(
        tri.root, frozen_params, tmp_path / "frozen.keras", tmp_path / "frozen.csv", tmp_path / "c1"
    )
    assert (tmp_path / "frozen.keras").read_bytes() == tri.frozen.read_bytes()
    assert (tmp_path / "frozen.csv").read_bytes() == tri.frozen_history.read_bytes()
    fine_params = FineTuneParams(unfreeze_blocks=2, epochs=2, batch_size=8, learning_rate=1e-3, patience=5)
    training.fine_tune(
        tri.root, tri.frozen, fine_params, tmp_path / "model.keras", tmp_path / "fine.csv", tmp_path / "c2"
    )
    assert (tmp_path / "model.keras").read_bytes() == tri.model.read_bytes()
    assert (tmp_path / "fine.csv").read_bytes() == tri.fine_history.read_bytes()


# ------------------------------------------------------------ the feature cache


def test_training_on_cached_features_equals_training_through_the_frozen_backbone(
    tri: Trained, fresh_backbone: keras.Model, tmp_path: Path
) -> None:
    """Same initial head, same batches in the same order: the same trained head, either way."""
    data = load_augmented(tri.root)
    params = TrainFrozenParams(epochs=3, batch_size=4, learning_rate=0.01, dropout=0.0)
    keras.utils.set_random_seed(3)
    cached_head = training.build_head(1280, 3, 0.0)
    naive_head = training.build_head(1280, 3, 0.0)
    naive_head.set_weights(cached_head.get_weights())
    initial = cached_head.get_weights()

    features = {s: training.compute_features(fresh_backbone, data.split(s), 4, tmp_path / f"{s}.npy", "k")
                for s in ("train", "val")}  # fmt: skip
    targets = {s: encode_labels(data.split(s).labels, 3) for s in ("train", "val")}
    training.compile_for(cached_head, params, 3, params.learning_rate)
    cached_head.fit(
        training.feature_dataset(features["train"], targets["train"], 4, None),
        validation_data=training.feature_dataset(features["val"], targets["val"], 4, None),
        epochs=3, verbose=0,
    )  # fmt: skip
    training.fit_through_frozen_backbone(fresh_backbone, naive_head, data, params)

    for cached, naive, start in zip(cached_head.get_weights(), naive_head.get_weights(), initial):
        assert not np.allclose(cached, start)  # both trained
        np.testing.assert_allclose(cached, naive, rtol=1e-4, atol=1e-5)


def test_feature_cache_is_reused_while_backbone_and_images_are_unchanged(
    tri: Trained, tmp_path: Path, capsys
):
    ckpt = tmp_path / "ckpt"
    first = TrainFrozenParams(epochs=1, batch_size=8)
    training.train_frozen(tri.root, first, tmp_path / "a.keras", tmp_path / "a.csv", ckpt)
    capsys.readouterr()
    cache = ckpt / "features" / "train.npy"
    stamp = cache.stat().st_mtime_ns
    # head params changed: the features stay valid
    second = TrainFrozenParams(epochs=1, batch_size=8, dropout=0.5, learning_rate=0.02)
    training.train_frozen(tri.root, second, tmp_path / "b.keras", tmp_path / "b.csv", ckpt)
    assert "18 of 18 images already done, reused" in capsys.readouterr().out
    assert cache.stat().st_mtime_ns == stamp
    # other backbone weights: recomputed
    third = TrainFrozenParams(epochs=1, batch_size=8, weights="none")
    training.train_frozen(tri.root, third, tmp_path / "c.keras", tmp_path / "c.csv", ckpt)
    assert "already done" not in capsys.readouterr().out
    assert cache.stat().st_mtime_ns != stamp


# ------------------------------------------------------------ fine-tuning recipes


def test_gradual_unfreezing_plan() -> None:
    plan = training.unfreeze_plan(FineTuneParams(unfreeze_blocks=3, unfreeze_every=2, epochs=7), 17)
    assert plan == [
        training.UnfreezeStep(0, 2, 1),
        training.UnfreezeStep(2, 4, 2),
        training.UnfreezeStep(4, 7, 3),
    ]
    # more steps than epochs allow: the plan stops where the epochs do
    short = training.unfreeze_plan(FineTuneParams(unfreeze_blocks=5, unfreeze_every=2, epochs=3), 17)
    assert short == [training.UnfreezeStep(0, 2, 1), training.UnfreezeStep(2, 3, 2)]
    assert training.unfreeze_plan(FineTuneParams(unfreeze_blocks=4, epochs=3), 17) == [
        training.UnfreezeStep(0, 3, 4)
    ]
    assert training.unfreeze_plan(FineTuneParams(unfreeze_from="top_conv", epochs=3), 17) == [
        training.UnfreezeStep(0, 3, None)
    ]
    # "all" means the backbone's own block count
    assert training.unfreeze_plan(FineTuneParams(unfreeze_blocks="all", epochs=3), 5) == [
        training.UnfreezeStep(0, 3, 5)
    ]


def _changed_layers(before: Path, after: Path) -> set[str]:
    old, _ = outputs.find_backbone(_load(before))
    new, _ = outputs.find_backbone(_load(after))
    return {
        layer.name
        for layer in new.layers
        if not all(
            np.array_equal(a, b) for a, b in zip(old.get_layer(layer.name).get_weights(), layer.get_weights())
        )
    }


def test_gradual_unfreezing_trains_one_more_block_per_step(tri: Trained, tmp_path: Path, capsys) -> None:
    params = FineTuneParams(unfreeze_blocks=2, unfreeze_every=1, epochs=2, batch_size=8, learning_rate=1e-3)
    metrics = training.fine_tune(
        tri.root, tri.frozen, params, tmp_path / "m.keras", tmp_path / "h.csv", tmp_path / "c"
    )
    out = capsys.readouterr().out
    assert "epochs 1-1: 1 backbone layers trainable (top 1 blocks" in out
    assert "epochs 2-2: 4 backbone layers trainable (top 2 blocks" in out
    assert len(_history(tmp_path / "h.csv")[1]) == 2
    # the saved weights are the best epoch's: block15 has moved only if that is the second
    expected = TOP_TWO_BLOCKS if metrics["best_epoch"] == 2 else {"top_conv"}
    assert _changed_layers(tri.frozen, tmp_path / "m.keras") == expected


def test_unfreeze_from_a_named_layer(tri: Trained, tmp_path: Path) -> None:
    params = FineTuneParams(unfreeze_from="block15_project_conv", epochs=1, batch_size=8, learning_rate=1e-4)
    metrics = training.fine_tune(
        tri.root, tri.frozen, params, tmp_path / "m.keras", tmp_path / "h.csv", tmp_path / "c"
    )
    assert metrics["trainable_layers"] == 2
    assert _changed_layers(tri.frozen, tmp_path / "m.keras") == {"block15_project_conv", "top_conv"}


def test_from_scratch_trains_every_layer_batchnorm_included(tri: Trained) -> None:
    params = FineTuneParams(epochs=1, batch_size=8, scratch_learning_rate=2e-3)
    step = training.unfreeze_plan(params, 17)[0]
    assert training.phase_learning_rate(params, scratch=True) == 2e-3
    assert training.phase_learning_rate(params, scratch=False) == params.learning_rate
    assert "BatchNormalization included" in training._unfreeze_description(params, step, scratch=True)

    # the preparation fine_tune makes, then one training step: every layer moves, BN statistics too
    model = _load(tri.frozen)
    backbone, name = outputs.find_backbone(model)
    count = training.unfreeze(backbone, name, params, step, scratch=True)
    assert count == sum(1 for layer in backbone.layers if layer.weights)
    training.compile_for(model, params, 3, 2e-3)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in backbone.layers}
    data = load_augmented(tri.root).split("train")
    model.fit(image_dataset(data, 8, targets=encode_labels(data.labels, 3)).take(1), verbose=0)
    for layer in backbone.layers:
        if layer.weights:
            moved = [not np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights())]
            assert all(moved), f"{layer.name}: some weights did not move"  # BN: gamma, beta, mean, var


def test_recipe_options_run_together_under_a_mirrored_strategy(tri: Trained, tmp_path: Path, capsys) -> None:
    params = FineTuneParams(
        epochs=2, batch_size=8, learning_rate=1e-3, backbone_lr_factor=0.1, optimizer="sgd_nesterov",
        schedule="cosine", warmup_epochs=1, clip_norm=1.0, label_smoothing=0.1, weight_decay=1e-4,
        class_weight="balanced", distribution="mirrored", unfreeze_blocks=1,
    )  # fmt: skip
    metrics = training.fine_tune(
        tri.root, tri.frozen, params, tmp_path / "m.keras", tmp_path / "h.csv", tmp_path / "c"
    )
    out = capsys.readouterr().out
    assert "backbone x0.1" in out and "class weights: red=1.000, green=1.000, blue=1.000" in out
    assert metrics["epochs_run"] == 2
    model = _load(tmp_path / "m.keras")
    assert getattr(model, "optimizer", None) is None  # saved without the training-only optimizer
    assert _changed_layers(tri.frozen, tmp_path / "m.keras") == {"top_conv"}


def test_mixed_precision_only_with_a_gpu() -> None:
    from tlpipe.train.devices import precision_policy

    assert precision_policy("auto", []) == "float32"
    assert precision_policy("auto", ["GPU:0"]) == "mixed_float16"
    assert precision_policy("off", ["GPU:0"]) == "float32"


def test_head_outputs_float32_under_mixed_precision() -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = training.build_head(8, 3, 0.1)
        out = head(np.ones((2, 8), "float32"))
        assert head.get_layer(outputs.HEAD_OUTPUT).compute_dtype == "float32"
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_a_keras_applications_backbone_trains_through_both_phases(tmp_path: Path) -> None:
    """The zoo's models go through the same code: features, assembly, block-aware unfreezing."""
    root = make_augmented(tmp_path / "augmented", ["red", "green"], {"train": 4, "val": 2})
    frozen_params = TrainFrozenParams(backbone="mobilenet_v3_small", weights="none", epochs=1, batch_size=4)
    training.train_frozen(root, frozen_params, tmp_path / "f.keras", tmp_path / "f.csv", tmp_path / "c1")
    backbone, name = outputs.find_backbone(_load(tmp_path / "f.keras"))
    assert name == "mobilenet_v3_small"
    params = FineTuneParams(unfreeze_blocks=1, epochs=1, batch_size=4, learning_rate=1e-4)
    # "imagenet" here only says "treat the backbone as pretrained": top-block unfreezing, not from scratch
    metrics = training.fine_tune(
        root,
        tmp_path / "f.keras",
        params,
        tmp_path / "m.keras",
        tmp_path / "h.csv",
        tmp_path / "c2",
        "imagenet",
    )
    blocks = get_backbone(name).layer_blocks(backbone)
    top = get_backbone(name).block_count - 1
    expected = sum(
        1
        for layer in backbone.layers
        if blocks[layer.name] == top
        and layer.weights
        and not isinstance(layer, keras.layers.BatchNormalization)
    )
    assert metrics["trainable_layers"] == expected > 0
    assert _load(tmp_path / "m.keras").output_shape == (None, 1)
