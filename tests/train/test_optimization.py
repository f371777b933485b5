"""Tests for optimizers, schedules, losses and class weights."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

from tlpipe.core.config import FineTuneParams, TrainFrozenParams
from tlpipe.core.errors import PipelineError
from tlpipe.train import optimization

# ------------------------------------------------------------ schedules


def test_constant_schedule_keeps_the_rate() -> None:
    params = FineTuneParams(epochs=5, schedule="constant", warmup_epochs=0, learning_rate=0.1)
    assert [optimization.epoch_learning_rate(params, e) for e in range(5)] == [0.1] * 5
    assert optimization.schedule_callbacks(params) == []


def test_warmup_then_constant() -> None:
    params = FineTuneParams(epochs=4, schedule="constant", warmup_epochs=1, learning_rate=0.1)
    assert [optimization.epoch_learning_rate(params, e) for e in range(4)] == [0.05, 0.1, 0.1, 0.1]


def test_step_schedule_drops_by_the_factor_every_n_epochs() -> None:
    params = FineTuneParams(
        epochs=7, schedule="step", decay_every=3, decay_factor=0.5, warmup_epochs=0, learning_rate=0.8
    )
    rates = [optimization.epoch_learning_rate(params, e) for e in range(7)]
    assert rates == [0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2]
    warm = FineTuneParams(
        epochs=5, schedule="step", decay_every=2, decay_factor=0.5, warmup_epochs=1, learning_rate=0.8
    )
    assert [optimization.epoch_learning_rate(warm, e) for e in range(5)] == [0.4, 0.8, 0.8, 0.4, 0.4]


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    params = TrainFrozenParams(
        epochs=6, schedule="cosine", warmup_epochs=2, min_learning_rate=0.01, learning_rate=1.0
    )
    rates = [optimization.epoch_learning_rate(params, e) for e in range(6)]
    np.testing.assert_allclose(rates[:2], [1 / 3, 2 / 3])  # linear warm-up, never 0
    assert rates[2] == pytest.approx(1.0)  # peak right after warm-up
    assert all(a > b for a, b in itertools.pairwise(rates[2:]))  # then strictly decreasing
    # epoch 4 starts half-way through the 4 decay epochs: the mean of peak and floor
    assert rates[4] == pytest.approx((1.0 + 0.01) / 2)
    assert 0.01 < rates[-1] < 0.2  # the last epoch still learns, a little
    assert optimization.epoch_learning_rate(params, 6) == pytest.approx(0.01)  # the floor


def test_warmup_fits_the_epochs_and_not_plateau() -> None:
    with pytest.raises(ValueError, match="does not combine with schedule: plateau"):
        FineTuneParams(epochs=5, warmup_epochs=1, schedule="plateau")
    with pytest.raises(ValueError, match=r"warmup_epochs \(6\) must not exceed epochs \(5\)"):
        FineTuneParams(epochs=5, warmup_epochs=6)


def _tiny_fit(params, callbacks, epochs: int) -> list[float]:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimization.make_optimizer(params), loss="mse")
    x = np.zeros((8, 2), "float32")
    history = model.fit(x, np.ones((8, 1)), validation_data=(x, np.ones((8, 1))), epochs=epochs,
                        callbacks=callbacks, verbose=0)  # fmt: skip
    return [float(v) for v in history.history["learning_rate"]]


def test_schedule_callbacks_set_the_rate_keras_trains_with() -> None:
    params = FineTuneParams(
        epochs=4, schedule="step", decay_every=2, decay_factor=0.5, optimizer="sgd", warmup_epochs=0,
        learning_rate=0.1,
    )  # fmt: skip
    rates = _tiny_fit(params, optimization.schedule_callbacks(params), 4)
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.05, 0.05], rtol=1e-6)


def test_plateau_schedule_reduces_after_patience_without_improvement() -> None:
    params = FineTuneParams(
        epochs=6, schedule="plateau", plateau_patience=1, decay_factor=0.5, optimizer="sgd", warmup_epochs=0,
        learning_rate=0.1,
    )  # fmt: skip
    (callback,) = optimization.schedule_callbacks(params)
    assert isinstance(callback, keras.callbacks.ReduceLROnPlateau)
    assert callback.factor == 0.5 and callback.patience == 1


# ------------------------------------------------------------ optimizers


@pytest.mark.parametrize(
    ("name", "cls", "extra"),
    [
        ("adam", keras.optimizers.Adam, {}),
        ("adamw", keras.optimizers.AdamW, {}),
        ("sgd", keras.optimizers.SGD, {"momentum": 0.8, "nesterov": False}),
        ("sgd_nesterov", keras.optimizers.SGD, {"momentum": 0.8, "nesterov": True}),
        ("rmsprop", keras.optimizers.RMSprop, {"momentum": 0.8}),
    ],
)
def test_make_optimizer_builds_the_named_optimizer(name: str, cls: type, extra: dict) -> None:
    params = FineTuneParams(
        optimizer=name, momentum=0.8, weight_decay=0.01, clip_norm=1.5, learning_rate=0.02
    )
    optimizer = optimization.make_optimizer(params)
    assert type(optimizer) is cls
    config = optimizer.get_config()
    assert config["name"] == name
    assert config["learning_rate"] == pytest.approx(0.02)
    assert config["weight_decay"] == pytest.approx(0.01)
    assert config["clipnorm"] == pytest.approx(1.5)
    for key, value in extra.items():
        assert config[key] == value, key


def _two_layer_model() -> tuple[keras.Model, keras.layers.Dense, keras.layers.Dense]:
    keras.utils.set_random_seed(0)
    first, second = keras.layers.Dense(4, name="first"), keras.layers.Dense(1, name="second")
    inputs = keras.Input((3,))
    return keras.Model(inputs, second(first(inputs))), first, second


def _train_steps(optimizer_params, factors_for) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    model, first, second = _two_layer_model()
    before = first.get_weights()[0].copy(), second.get_weights()[0].copy()
    factors = factors_for(first)
    model.compile(optimizer=optimization.make_optimizer(optimizer_params, factors), loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(32, 3)), rng.normal(size=(32, 1)), epochs=3, batch_size=8, verbose=0)
    return before[0], first.get_weights()[0], before[1], second.get_weights()[0]


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_discriminative_rates_scale_each_layers_updates(name: str) -> None:
    params = FineTuneParams(optimizer=name, learning_rate=0.01)
    base = _train_steps(params, lambda first: None)
    slow = _train_steps(params, lambda first: optimization.lr_factors_for(first.trainable_variables, 0.1))
    frozen = _train_steps(params, lambda first: optimization.lr_factors_for(first.trainable_variables, 1e-9))

    def moved(run: tuple[np.ndarray, ...]) -> float:
        return float(np.abs(run[1] - run[0]).mean())

    # the "backbone" (first layer) moves about 10x less at a 0.1 factor, and not at all near 0
    assert 0.03 < moved(slow) / moved(base) < 0.3
    assert moved(frozen) < 1e-6 * moved(base) + 1e-9
    # the "head" still learns at the full rate
    assert np.abs(frozen[3] - frozen[2]).mean() > 0.1 * np.abs(base[3] - base[2]).mean()


def test_factor_one_gives_the_plain_optimizer() -> None:
    optimizer = optimization.make_optimizer(FineTuneParams(learning_rate=0.1), {1: 1.0})
    assert type(optimizer) is keras.optimizers.Adam


# ------------------------------------------------------------ losses and class weights


def test_binary_loss_smooths_labels() -> None:
    loss = optimization.loss_for(2, 0.2)
    assert isinstance(loss, keras.losses.BinaryCrossentropy) and loss.label_smoothing == 0.2
    y = optimization.encode_labels(np.array([0, 1, 1]), 2)
    assert y.shape == (3, 1) and y.dtype == np.float32
    # smoothing 0.2 turns target 1 into 0.9: a prediction of exactly 0.9 is the smoothed optimum
    at_target = float(loss(np.array([[1.0]]), np.array([[0.9]])))
    assert at_target < float(loss(np.array([[1.0]]), np.array([[0.99]])))


def test_multiclass_labels_are_one_hot_for_categorical_loss() -> None:
    y = optimization.encode_labels(np.array([2, 0]), 3)
    np.testing.assert_array_equal(y, [[0, 0, 1], [1, 0, 0]])
    loss = optimization.loss_for(3, 0.0)
    assert isinstance(loss, keras.losses.CategoricalCrossentropy)
    assert float(loss(y, np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_balanced_class_weights_follow_sklearn() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 30 + [1] * 10 + [2] * 20)
    weights = optimization.class_weights(labels, 3, "balanced")
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose([weights[i] for i in range(3)], expected)
    # weighted counts are equal per class
    counts = np.bincount(labels)
    np.testing.assert_allclose([weights[i] * counts[i] for i in range(3)], 20.0)


def test_auto_weights_only_imbalanced_classes() -> None:
    assert optimization.class_weights(np.array([0] * 15 + [1] * 10), 2, "auto") is None  # ratio 1.5
    weighted = optimization.class_weights(np.array([0] * 16 + [1] * 10), 2, "auto")  # ratio 1.6
    assert weighted is not None and weighted[1] > weighted[0]
    assert optimization.class_weights(np.array([0] * 90 + [1] * 10), 2, "none") is None


def test_a_class_missing_from_training_is_an_error() -> None:
    with pytest.raises(PipelineError, match=r"no images of class index \[1\]"):
        optimization.class_weights(np.array([0, 0, 2]), 3, "auto")


@pytest.mark.parametrize("seed", range(5))
def test_balanced_class_weights_equal_the_hand_written_formula_exactly(seed: int) -> None:
    """sklearn's "balanced" weights are n / (k * count), float for float: the models do not change."""
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 8))
    labels = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, int(rng.integers(1, 500)))])
    counts = np.bincount(labels, minlength=n_classes)
    by_hand = {i: float(counts.sum() / (n_classes * c)) for i, c in enumerate(counts)}
    assert optimization.class_weights(labels, n_classes, "balanced") == by_hand
