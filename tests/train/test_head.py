"""Tests for the classification head, the assembled model, and how it is saved."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from phase_fixtures import BACKBONE, Trained, load

from tlpipe.core.errors import PipelineError
from tlpipe.model import outputs, storage
from tlpipe.train.head import build_head

# ------------------------------------------------------------------ outputs


pytestmark = pytest.mark.slow  # builds, trains or runs real Keras models


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


def test_find_backbone_requires_a_known_backbone_layer() -> None:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(PipelineError, match=f"no known backbone layer.*{BACKBONE}"):
        outputs.find_backbone(model)


def test_head_outputs_float32_under_mixed_precision() -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = build_head(8, 3, 0.1)
        out = head(np.ones((2, 8), "float32"))
        assert head.get_layer(outputs.HEAD_OUTPUT).compute_dtype == "float32"
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ------------------------------------------------------------------ saving


def test_saved_model_is_byte_reproducible(tri: Trained, tmp_path: Path) -> None:
    model = load(tri.frozen)
    first, second = tmp_path / "a.keras", tmp_path / "b.keras"
    storage.save_model_atomically(model, first)
    time.sleep(1.1)  # zip entry dates have 2-second resolution; metadata has seconds
    storage.save_model_atomically(model, second)
    assert first.read_bytes() == second.read_bytes()
    reloaded = load(first)
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
from tlpipe.model import storage
from tlpipe.train.head import assemble, build_backbone_model, build_head
keras.utils.set_random_seed(1)
backbone = build_backbone_model("efficientnet_lite0", "none", 32)
model = assemble(backbone, build_head(1280, 3, 0.2), 3, 0.2)
storage.save_model_atomically(model, sys.argv[1])
"""


def test_saved_bytes_do_not_depend_on_memory_addresses(tmp_path: Path) -> None:
    """A freshly built model's config.json names shared objects by id(): their address in memory."""
    for name, padding in (("a.keras", "10"), ("b.keras", "100000")):
        subprocess.run([sys.executable, "-c", SAVE_A_FRESH_MODEL, str(tmp_path / name), padding], check=True)
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
