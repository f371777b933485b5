"""Tests for where training runs: the precision policy."""

from __future__ import annotations

from tlpipe.train.devices import precision_policy


def test_mixed_precision_only_with_a_gpu() -> None:
    assert precision_policy("auto", []) == "float32"
    assert precision_policy("auto", ["GPU:0"]) == "mixed_float16"
    assert precision_policy("off", ["GPU:0"]) == "float32"
