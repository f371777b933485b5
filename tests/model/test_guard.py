"""The unfamiliar-input guard: Mahalanobis scores, the val cut-off, the file, the feature model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tlpipe.core.errors import PipelineError
from tlpipe.model.guard import feature_model, fit_guard, guard_columns, guard_path, load_guard, save_guard


def _features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(16, 16))  # correlated dimensions, as real features are
    return rng.normal(size=(n, 16)) @ mixing + shift


def test_the_val_cut_off_accepts_its_share_and_shifted_features_are_flagged():
    guard = fit_guard(_features(3000, 0), _features(2000, 1), accept=0.99)
    fresh = guard.unfamiliar(guard.scores(_features(5000, 2)))
    assert 0.003 < fresh.mean() < 0.02  # about 1% of new in-distribution images
    assert guard.unfamiliar(guard.scores(_features(500, 3, shift=12.0))).mean() > 0.95
    assert guard_columns(guard, guard.cutoff + 1) == {"unfamiliar": "yes", "unfamiliarity": guard.cutoff + 1}
    assert guard_columns(guard, guard.cutoff)["unfamiliar"] == "no"


def test_the_score_is_the_mahalanobis_distance():
    train = _features(4000, 4)
    guard = fit_guard(train, _features(100, 5), accept=0.99)
    point = train[:3]
    centred = point - guard.mean
    expected = np.sqrt(np.einsum("ij,jk,ik->i", centred, guard.precision, centred))
    np.testing.assert_allclose(guard.scores(point), expected)
    assert (guard.scores(guard.mean[None]) == 0).all()


def test_a_guard_saved_beside_the_model_loads_back_the_same(tmp_path):
    guard = fit_guard(_features(500, 6), _features(100, 7), accept=0.95)
    path = guard_path(tmp_path / "models" / "model.keras")
    assert path == tmp_path / "models" / "guard.npz"
    save_guard(guard, path)
    loaded = load_guard(path)
    np.testing.assert_array_equal(loaded.precision, guard.precision)
    assert (loaded.cutoff, loaded.accept, loaded.n_fit) == (guard.cutoff, 0.95, 500)
    assert [p.name for p in path.parent.iterdir()] == ["guard.npz"]  # no temporary file left
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    with pytest.raises(PipelineError, match="not a readable guard file"):
        load_guard(tmp_path / "broken.npz")
    with pytest.raises(PipelineError, match="no guard file"):
        load_guard(tmp_path / "missing.npz")


@pytest.mark.slow
def test_the_feature_model_adds_what_the_head_reads():
    inputs = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Dropout(0.2)(pooled))
    model = keras.Model(inputs, outputs)
    images = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    probs, features = feature_model(model).predict(images, verbose=0)
    np.testing.assert_allclose(probs, model.predict(images, verbose=0), rtol=1e-6)
    np.testing.assert_allclose(features, images.mean(axis=(1, 2)), rtol=1e-5)  # the dropout's input
