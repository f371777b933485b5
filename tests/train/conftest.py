"""Fixtures for the training tests: both phases trained once per session, on tiny data.

Session-scoped so the test files of the several training modules share one run
(each takes tens of seconds on a CPU).
"""

from __future__ import annotations

import keras
import pytest
from phase_fixtures import BACKBONE, Trained, train_both_phases

from augmented_fixture import make_augmented
from tlpipe.train.head import build_backbone_model


@pytest.fixture(scope="session")
def tri(tmp_path_factory, mlflow_store) -> Trained:
    root = make_augmented(
        tmp_path_factory.mktemp("tri") / "augmented", ["red", "green", "blue"], {"train": 6, "val": 3}
    )
    return train_both_phases(root, frozen_epochs=2, fine_epochs=2, mlflow_store=mlflow_store)


@pytest.fixture(scope="session")
def binary(tmp_path_factory, mlflow_store) -> Trained:
    root = make_augmented(
        tmp_path_factory.mktemp("bin") / "augmented", ["red", "green"], {"train": 6, "val": 3}
    )
    return train_both_phases(root, frozen_epochs=2, fine_epochs=1, mlflow_store=mlflow_store)


@pytest.fixture(scope="session")
def fresh_backbone() -> keras.Model:
    return build_backbone_model(BACKBONE, "imagenet", 32)
