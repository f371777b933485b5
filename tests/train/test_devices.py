"""Tests for where training runs: the precision policy, and oneDNN's bf16 math on CPUs with bf16 units."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tlpipe.train import devices
from tlpipe.train.devices import BF16_MATH, FPMATH_ENV, apply_precision, cpu_has_bf16, precision_policy

AMX_CPU = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
OLD_CPU = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"


def test_mixed_precision_only_with_a_gpu() -> None:
    assert precision_policy("auto", []) == "float32"
    assert precision_policy("auto", ["GPU:0"]) == "mixed_float16"
    assert precision_policy("off", ["GPU:0"]) == "float32"


def test_bf16_units_are_read_from_the_cpu_flags() -> None:
    assert cpu_has_bf16(AMX_CPU)
    assert cpu_has_bf16("flags : sse avx512_bf16\n")  # AVX-512 BF16 without AMX
    assert not cpu_has_bf16(OLD_CPU)
    assert not cpu_has_bf16("model name : amx_bf16 in a name, not a flag\n")
    assert not cpu_has_bf16("")


def test_bf16_math_only_when_auto_on_a_bf16_cpu_without_a_gpu() -> None:
    assert devices.wants_bf16_math("auto", [], AMX_CPU)
    assert not devices.wants_bf16_math("off", [], AMX_CPU)
    assert not devices.wants_bf16_math("auto", ["GPU:0"], AMX_CPU)  # mixed_float16 there
    assert not devices.wants_bf16_math("auto", [], OLD_CPU)


def test_auto_turns_bf16_math_on_and_says_so(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.delenv(FPMATH_ENV)
    caplog.set_level("INFO", logger="tlpipe")
    assert apply_precision("auto", cpuinfo=AMX_CPU) == BF16_MATH
    assert os.environ[FPMATH_ENV] == "BF16"
    assert "precision: float32 with oneDNN bf16 math" in caplog.text


def test_off_an_old_cpu_or_the_users_own_setting_leave_the_math_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(FPMATH_ENV)
    assert apply_precision("off", cpuinfo=AMX_CPU) == "float32"
    assert apply_precision("auto", cpuinfo=OLD_CPU) == "float32"
    assert FPMATH_ENV not in os.environ
    monkeypatch.setenv(FPMATH_ENV, "STRICT")  # the user's (and the test suite's) choice wins
    assert apply_precision("auto", cpuinfo=AMX_CPU) == "float32"
    assert os.environ[FPMATH_ENV] == "STRICT"


# In a fresh process, as a stage is: a convolution's error against float64 after apply_precision(MODE).
CONV_ERROR = """
import sys
import numpy as np
import tensorflow as tf
from tlpipe.train.devices import apply_precision
print(apply_precision(sys.argv[1]))
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 16, 16, 32)); k = rng.standard_normal((3, 3, 32, 32))
got = tf.nn.conv2d(x.astype(np.float32), k.astype(np.float32), 1, "SAME").numpy()
ref = tf.nn.conv2d(x, k, 1, "SAME").numpy()
print(float(np.abs(got - ref).max() / np.abs(ref).max()))
"""


@pytest.mark.slow  # two TensorFlow processes
@pytest.mark.skipif(
    not cpu_has_bf16(Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""),
    reason="this CPU has no bf16 units (AMX or AVX-512 BF16): oneDNN computes in float32 whatever is asked",
)
def test_a_stage_process_on_a_bf16_cpu_computes_convolutions_in_bf16_only_when_auto() -> None:
    env = {k: v for k, v in os.environ.items() if k != FPMATH_ENV}
    errors = {}
    for mode in ("auto", "off"):
        out = subprocess.run([sys.executable, "-c", CONV_ERROR, mode], env=env, capture_output=True, text=True,
                             check=True).stdout.splitlines()  # fmt: skip
        errors[mode] = (out[-2], float(out[-1]))
    assert errors["auto"][0] == BF16_MATH and errors["auto"][1] > 1e-4  # bf16 keeps 8 bits of mantissa
    assert errors["off"][0] == "float32" and errors["off"][1] < 1e-5
