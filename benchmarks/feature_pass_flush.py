"""What the feature cache's per-batch flush costs: images/s of a raw ``predict``, of ``compute_features`` as
the pipeline runs it, and of ``compute_features`` with its per-batch flush and progress record switched off.

Random PNGs at ``SIZE`` px, batch 32, EfficientNet-Lite0 with its ImageNet weights. The three arms run in
turn, ``ROUNDS`` times, so a machine that speeds up or slows down during the run shows in every arm alike
(the first version ran each arm once, in a fixed order, and read a warm-up effect as the flush's cost).
Not part of the test suite.

    .venv/bin/python benchmarks/feature_pass_flush.py 64 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench_repo import random_pngs
from tlpipe.data.datasets import SplitData, image_dataset
from tlpipe.train import features
from tlpipe.train.head import build_backbone_model


@contextlib.contextmanager
def _without_commits() -> Iterator[None]:
    write_progress, flush = features._write_progress, np.memmap.flush
    features._write_progress = lambda *a, **k: None  # type: ignore[assignment]
    np.memmap.flush = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        features._write_progress = write_progress  # type: ignore[assignment]
        np.memmap.flush = flush  # type: ignore[method-assign]


def main(size: int, n: int, rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    paths = random_pngs(tmp, n, size)
    data = SplitData(paths, np.zeros(n, np.int32), paths)
    backbone = build_backbone_model("efficientnet_lite0", "imagenet", size)
    ds = image_dataset(data, 32, with_labels=False)
    backbone.predict(ds.take(1), verbose=0)
    rates: dict[str, list[float]] = {"predict": [], "compute_features": [], "without flush and progress": []}
    for r in range(rounds):
        for arm in rates:
            cache = tmp / f"{r}-{len(rates[arm])}-{arm.replace(' ', '_')}.npy"
            start = time.perf_counter()
            if arm == "predict":
                backbone.predict(ds, verbose=0)
            elif arm == "compute_features":
                features.compute_features(backbone, data, 32, cache, "k")
            else:
                with _without_commits():
                    features.compute_features(backbone, data, 32, cache, "k")
            rates[arm].append(round(n / (time.perf_counter() - start), 1))
            print(f"round {r + 1} {arm}: {rates[arm][-1]} images/s", flush=True)
            cache.unlink(missing_ok=True)
    for arm, values in rates.items():
        print(f"{arm}: median {statistics.median(values)} images/s over {values}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", type=int)
    parser.add_argument("n", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.size, args.n, args.rounds)
