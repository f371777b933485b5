"""Training-speed benchmark: backbone forward, feature cache vs naive fit, fine-tune, memory.

Measures, on an augmented dataset folder (by default the pipeline's own
``data/augmented``; run ``dvc repro augment`` first):

- backbone forward images/s (inference, batch 32, after one warm-up batch);
- the frozen phase two ways for the same number of head epochs: with the feature
  cache (one backbone pass, then the head trains on cached features) and the
  usual Keras recipe (``fit`` through the frozen backbone every epoch);
- fine-tuning images/s (training with the top blocks unfrozen);
- the process's peak resident memory.

Not part of the test suite. Prints and writes JSON:

    .venv/bin/python benchmarks/training_speed.py --epochs 10 --out results/speed.json
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import keras

from bench_repo import report_json
from naive_fit import fit_through_frozen_backbone
from tlpipe.core.config import FineTuneParams, TrainFrozenParams
from tlpipe.data.datasets import image_dataset, load_augmented
from tlpipe.model.backbones import get_backbone
from tlpipe.train.features import compute_features, feature_dataset
from tlpipe.train.fine_tune import unfreeze, unfreeze_plan
from tlpipe.train.fitting import compile_for
from tlpipe.train.head import assemble, build_backbone_model, build_head
from tlpipe.train.optimization import encode_labels


def timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def forward_images_per_second(backbone: keras.Model, data, batch_size: int) -> float:
    ds = image_dataset(data, batch_size, with_labels=False)
    backbone.predict(ds.take(1), verbose=0)  # build and trace outside the timing
    _, seconds = timed(lambda: backbone.predict(ds, verbose=0))
    return len(data.paths) / seconds


def frozen_with_cache(backbone, data, params: TrainFrozenParams, cache_dir: Path) -> dict:
    n_classes = len(data.classes)

    def run() -> None:
        features = {
            s: compute_features(backbone, data.split(s), params.batch_size, cache_dir / f"{s}.npy", "bench")
            for s in ("train", "val")
        }
        targets = {s: encode_labels(data.split(s).labels, n_classes) for s in ("train", "val")}
        head = build_head(features["train"].shape[1], n_classes, params.dropout)
        compile_for(head, params, n_classes)
        head.fit(
            feature_dataset(features["train"], targets["train"], params.batch_size, params.seed),
            validation_data=feature_dataset(features["val"], targets["val"], params.batch_size, None),
            epochs=params.epochs,
            verbose=0,
        )

    _, seconds = timed(run)
    return {"seconds": round(seconds, 2)}


def frozen_naive(backbone, data, params: TrainFrozenParams) -> dict:
    head = build_head(int(backbone.output_shape[-1]), len(data.classes), params.dropout)
    _, seconds = timed(lambda: fit_through_frozen_backbone(backbone, head, data, params))
    return {"seconds": round(seconds, 2)}


def fine_tune_images_per_second(backbone, data, params: FineTuneParams, name: str) -> float:
    n_classes = len(data.classes)
    head = build_head(int(backbone.output_shape[-1]), n_classes, 0.2)
    model = assemble(backbone, head, n_classes, 0.2)
    unfreeze(backbone, name, params, unfreeze_plan(params, get_backbone(name).block_count)[0], scratch=False)
    compile_for(model, params, n_classes)
    train = data.split("train")
    ds = image_dataset(train, params.batch_size, targets=encode_labels(train.labels, n_classes))
    model.fit(ds.take(2), verbose=0)  # trace outside the timing
    _, seconds = timed(lambda: model.fit(ds, epochs=1, verbose=0))
    return len(train.paths) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data/augmented"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--epochs", type=int, default=10, help="head epochs for both frozen-phase variants")
    parser.add_argument("--unfreeze-blocks", default="all", help="a number, or all")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (args.data / "manifest.csv").is_file():
        print(f"no augmented dataset at {args.data}: run `dvc repro augment` or pass --data", file=sys.stderr)
        return 2
    keras.utils.set_random_seed(0)
    data = load_augmented(args.data)
    # patience above the epoch count: both variants run every epoch
    frozen = TrainFrozenParams(backbone=args.backbone, weights=args.weights, epochs=args.epochs,
                               patience=args.epochs + 1)  # fmt: skip
    blocks = args.unfreeze_blocks if args.unfreeze_blocks == "all" else int(args.unfreeze_blocks)
    fine = FineTuneParams(unfreeze_blocks=blocks)
    backbone = build_backbone_model(args.backbone, args.weights, data.image_size)
    n_train, n_val = len(data.split("train").paths), len(data.split("val").paths)
    print(f"{args.backbone} at {data.image_size}px: {n_train} train, {n_val} val images", file=sys.stderr)

    forward = forward_images_per_second(backbone, data.split("train"), frozen.batch_size)
    print(f"forward: {forward:.1f} images/s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cached = frozen_with_cache(backbone, data, frozen, Path(tmp))
    print(f"frozen phase, feature cache, {args.epochs} epochs: {cached['seconds']}s", file=sys.stderr)
    naive = frozen_naive(backbone, data, frozen)
    print(f"frozen phase, naive fit, {args.epochs} epochs: {naive['seconds']}s", file=sys.stderr)
    fine_rate = fine_tune_images_per_second(backbone, data, fine, args.backbone)
    print(f"fine-tune (top {args.unfreeze_blocks} blocks): {fine_rate:.1f} images/s", file=sys.stderr)

    result = {
        "backbone": args.backbone,
        "image_size": data.image_size,
        "train_images": n_train,
        "val_images": n_val,
        "epochs": args.epochs,
        "forward_images_per_second": round(forward, 1),
        "frozen_cache_seconds": cached["seconds"],
        "frozen_naive_seconds": naive["seconds"],
        "cache_speedup": round(naive["seconds"] / cached["seconds"], 2),
        "fine_tune_images_per_second": round(fine_rate, 1),
        "fine_tune_unfreeze_blocks": args.unfreeze_blocks,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    report_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
