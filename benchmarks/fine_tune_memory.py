"""Where fine-tune's memory goes: resident memory over a plain fit that trains every block, per variant.

The stage table (benchmarks/stage_table.py) measured the Kermany fine-tune stage at a peak RSS of 8.9 GiB at
128 px, where train-frozen and evaluate stay near 1.3 GiB. This fits EfficientNet-Lite0 with the pipeline's
head, every block trainable and BatchNormalization frozen (as ``unfreeze_blocks: all`` does), batch 32, on
PNG files read through tlpipe's own input pipeline (``tlpipe.data.datasets.image_dataset``), and samples
VmRSS every 25 batches; each variant in a fresh process (the allocator is chosen at process start):

- ``pipeline``: as the stage runs;
- ``arena2``: the same with ``MALLOC_ARENA_MAX=2`` (glibc's per-thread arenas are a known source of RSS
  growth under TensorFlow's thread pools);
- ``in_memory``: the same images decoded once into a tensor, no tf.data prefetching (separates the input
  pipeline's buffers from training's).

Not part of the test suite; about 2 minutes per variant on 2 cores.

    .venv/bin/python benchmarks/fine_tune_memory.py --images 2000 --epochs 3 --out results/fine_tune_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_repo import random_pngs, report_json

VARIANTS = {
    "pipeline": {"env": {}, "in_memory": False},
    "arena2": {"env": {"MALLOC_ARENA_MAX": "2"}, "in_memory": False},
    "in_memory": {"env": {}, "in_memory": True},
}


def memory_mib() -> dict[str, float]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def measure(n_images: int, size: int, epochs: int, in_memory: bool) -> dict:
    """Run in the child: VmRSS every 25 batches of a fit that trains every block."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tlpipe.data.datasets import SplitData, image_dataset
    from tlpipe.model.backbones import get_backbone, set_top_blocks_trainable
    from tlpipe.train.head import assemble, build_backbone_model, build_head

    keras.utils.set_random_seed(0)
    samples: list[dict] = [{"batch": 0, "epoch": 0, **memory_mib()}]
    with tempfile.TemporaryDirectory() as tmp:
        paths = random_pngs(Path(tmp), n_images, size)
        labels = (np.arange(n_images) % 2).astype(np.float32)[:, None]
        split = SplitData(paths=paths, labels=labels, rel_paths=paths)
        if in_memory:
            pixels = np.stack([image for image, _ in image_dataset(split, 1).unbatch().as_numpy_iterator()])
            data = tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(32)
        else:
            data = image_dataset(split, 32, shuffle_seed=0)
        backbone = build_backbone_model("efficientnet_lite0", "imagenet", size)
        head = build_head(int(backbone.output_shape[-1]), 2, 0.2)
        model = assemble(backbone, head, 2, 0.2)
        spec = get_backbone("efficientnet_lite0")
        set_top_blocks_trainable(backbone, spec, spec.block_count)
        # two classes: one sigmoid output, as the pipeline builds it
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
        samples.append({"batch": 0, "epoch": 0, "after": "model built", **memory_mib()})

        class Sample(keras.callbacks.Callback):
            epoch = 0

            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if (batch + 1) % 25 == 0:
                    samples.append({"batch": batch + 1, "epoch": self.epoch + 1, **memory_mib()})

        model.fit(data, epochs=epochs, verbose=0, callbacks=[Sample()])
    return {"samples": samples, "final": memory_mib()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.variant:
        spec = VARIANTS[args.variant]
        print(json.dumps(measure(args.images, args.size, args.epochs, bool(spec["in_memory"]))))
        return 0
    results = {}
    for name in args.variants:
        env = dict(os.environ, **VARIANTS[name]["env"])
        argv_child = [sys.executable, __file__, "--variant", name, "--size", str(args.size)]
        argv_child += ["--images", str(args.images), "--epochs", str(args.epochs)]
        proc = subprocess.run(argv_child, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        final = results[name]["final"]
        print(f"{name}: RSS at the end {final['VmRSS']:.0f} MiB, peak {final['VmHWM']:.0f} MiB", flush=True)
    report_json(
        {"size": args.size, "images": args.images, "epochs": args.epochs, "variants": results}, args.out
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
