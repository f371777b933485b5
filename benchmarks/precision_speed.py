"""bf16 and XLA on this CPU, measured with the pipeline's real backbone (issue 19).

For each variant, in a fresh process (a precision policy and oneDNN's math mode are process-wide):
EfficientNet-Lite0 with its ImageNet weights and the pipeline's head at ``--size`` px, batch 32, on random
pixels: forward images/s (the frozen phase's feature pass) and training images/s with every layer trainable
(the fine-tune phase), after warm-up steps. Variants: float32; the ``mixed_bfloat16`` policy;
``ONEDNN_DEFAULT_FPMATH_MODE=BF16`` (float32 model, oneDNN free to use bf16 kernels); and each with
``jit_compile=True`` (XLA). ``--variants`` picks others, e.g. ``mixed_float16`` and ``mixed_float16_xla`` on a
GPU. ``--frozen-batchnorm`` trains as the fine-tune stage does (every block, BatchNormalization frozen) and
``--rounds N`` alternates the variants N times, for a comparison made at one time on one machine. Not part of
the test suite; about a minute per variant on 2 cores.

    .venv/bin/python benchmarks/precision_speed.py --size 128 --out results/precision_speed.json
    .venv/bin/python benchmarks/precision_speed.py --size 128 --frozen-batchnorm --rounds 3 \
        --variants float32 onednn_bf16_math --out results/precision_speed_frozen_bn.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_repo import report_json

VARIANTS = {
    "float32": {"policy": "float32", "jit": False, "env": {}},
    "mixed_bfloat16": {"policy": "mixed_bfloat16", "jit": False, "env": {}},
    "onednn_bf16_math": {"policy": "float32", "jit": False, "env": {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16"}},
    "float32_xla": {"policy": "float32", "jit": True, "env": {}},
    "mixed_bfloat16_xla": {"policy": "mixed_bfloat16", "jit": True, "env": {}},
    # GPUs (benchmarks/gpu_benchmark.sh): float16 with loss scaling, the policy mixed_precision: auto picks there
    "mixed_float16": {"policy": "mixed_float16", "jit": False, "env": {}},
    "mixed_float16_xla": {"policy": "mixed_float16", "jit": True, "env": {}},
}
CPU_VARIANTS = ["float32", "mixed_bfloat16", "onednn_bf16_math", "float32_xla", "mixed_bfloat16_xla"]


def measure(
    policy: str, jit: bool, size: int, steps: int, top_blocks: list[int], frozen_batchnorm: bool = False
) -> dict:
    """Run in the child: forward and training images/s for one variant; with ``top_blocks``, also
    fine-tuning's top K blocks on cached activations (tlpipe.train.activation_cache): the frozen bottom's
    forward images/s (once per image) and the top's training images/s (every epoch)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tlpipe.train.head import assemble, build_backbone_model, build_head

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    backbone = build_backbone_model("efficientnet_lite0", "imagenet", size)
    head = build_head(int(backbone.output_shape[-1]), 2, 0.2)
    model = assemble(backbone, head, 2, 0.2)
    batch = np.random.default_rng(0).uniform(0, 255, (32, size, size, 3)).astype("float32")
    labels = np.random.default_rng(1).integers(0, 2, (32, 1)).astype("float32")

    forward = tf.function(lambda x: backbone(x, training=False), jit_compile=jit)
    for _ in range(3):
        forward(batch).numpy()
    start = time.perf_counter()
    for _ in range(steps):
        forward(batch).numpy()
    forward_rate = steps * 32 / (time.perf_counter() - start)

    if (
        frozen_batchnorm
    ):  # as fine-tune's unfreeze_blocks: all trains it: BatchNormalization in inference mode
        from tlpipe.model.backbones import get_backbone, set_top_blocks_trainable

        spec = get_backbone("efficientnet_lite0")
        set_top_blocks_trainable(backbone, spec, spec.block_count)
    else:
        backbone.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=jit)
    data = tf.data.Dataset.from_tensors((batch, labels)).repeat(steps + 3)
    model.fit(data.take(3), epochs=1, verbose=0)  # warm-up: tracing and compiling
    start = time.perf_counter()
    model.fit(data.take(steps), epochs=1, verbose=0)
    train_rate = steps * 32 / (time.perf_counter() - start)
    result = {"forward_images_per_s": round(forward_rate, 1), "train_images_per_s": round(train_rate, 1)}
    for k in top_blocks:
        result[f"top_{k}"] = _measure_cut(model, backbone, k, batch, labels, jit, steps)
    return result


def _measure_cut(model, backbone, k: int, batch, labels, jit: bool, steps: int) -> dict:
    import keras
    import tensorflow as tf

    from tlpipe.model.backbones import get_backbone, set_top_blocks_trainable
    from tlpipe.train.activation_cache import cut_at_first_trainable

    set_top_blocks_trainable(backbone, get_backbone("efficientnet_lite0"), k)
    cut = cut_at_first_trainable(model, backbone)
    bottom = tf.function(lambda x: cut.bottom(x, training=False), jit_compile=jit)
    for _ in range(3):
        activations = bottom(batch).numpy()
    start = time.perf_counter()
    for _ in range(steps):
        bottom(batch).numpy()
    bottom_rate = steps * 32 / (time.perf_counter() - start)
    cut.top.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=jit)
    data = tf.data.Dataset.from_tensors((activations, labels)).repeat(steps + 3)
    cut.top.fit(data.take(3), epochs=1, verbose=0)
    start = time.perf_counter()
    cut.top.fit(data.take(steps), epochs=1, verbose=0)
    top_rate = steps * 32 / (time.perf_counter() - start)
    return {
        "cut": cut.cut,
        "activation_shape": list(activations.shape[1:]),
        "bottom_forward_images_per_s": round(bottom_rate, 1),
        "top_train_images_per_s": round(top_rate, 1),
    }


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=CPU_VARIANTS)
    parser.add_argument(
        "--top-blocks",
        type=int,
        nargs="*",
        default=[],
        help="also time training the top K blocks on cached activations",
    )
    parser.add_argument(
        "--frozen-batchnorm",
        action="store_true",
        help="train every block with BatchNormalization frozen, as the fine-tune stage does",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the variants this many times, alternating (NAME#ROUND)"
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.variant:
        spec = VARIANTS[args.variant]
        measured = measure(
            spec["policy"], spec["jit"], args.size, args.steps, args.top_blocks, args.frozen_batchnorm
        )
        print(json.dumps(measured))
        return 0
    results = {}
    # alternating rounds: a drift in the machine's speed then falls on every variant alike
    runs = [(name, r) for r in range(1, args.rounds + 1) for name in args.variants]
    for name, r in runs:
        key = name if args.rounds == 1 else f"{name}#{r}"
        spec = VARIANTS[name]
        env = {**os.environ, **spec["env"], "TF_CPP_MIN_LOG_LEVEL": "2"}
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            name,
            "--size",
            str(args.size),
            "--steps",
            str(args.steps),
            "--top-blocks",
            *map(str, args.top_blocks),
            *(["--frozen-batchnorm"] if args.frozen_batchnorm else []),
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            results[key] = {
                "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
            }
        else:
            results[key] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{key}: {results[key]}", file=sys.stderr, flush=True)
    report_json({"size": args.size, "batch": 32, "top_blocks": args.top_blocks, "steps": args.steps, "cpu_flags": cpu_flags(),
                 "frozen_batchnorm": args.frozen_batchnorm, "rounds": args.rounds,
                 "cpus": os.cpu_count(), "variants": results}, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
