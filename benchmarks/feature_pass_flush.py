"""What the feature cache's per-batch flush costs: images/s of a raw ``predict``, of ``compute_features`` as
the pipeline runs it, and of ``compute_features`` with its per-batch flush and progress record switched off.

Random PNGs at ``SIZE`` px, batch 32, EfficientNet-Lite0 with its ImageNet weights. Not part of the test suite.

    .venv/bin/python benchmarks/feature_pass_flush.py 64 5000
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_repo import random_pngs
from tlpipe.data.datasets import SplitData, image_dataset
from tlpipe.train import features
from tlpipe.train.head import build_backbone_model


def main(size: int, n: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    paths = random_pngs(tmp, n, size)
    data = SplitData(paths, np.zeros(n, np.int32), paths)
    backbone = build_backbone_model("efficientnet_lite0", "imagenet", size)
    ds = image_dataset(data, 32, with_labels=False)
    backbone.predict(ds.take(1), verbose=0)
    start = time.perf_counter()
    backbone.predict(ds, verbose=0)
    print("predict", round(n / (time.perf_counter() - start), 1), flush=True)
    start = time.perf_counter()
    features.compute_features(backbone, data, 32, tmp / "a.npy", "k")
    print("compute_features", round(n / (time.perf_counter() - start), 1), flush=True)
    features._write_progress = lambda *a, **k: None  # type: ignore[assignment]
    np.memmap.flush = lambda self: None  # type: ignore[method-assign]
    start = time.perf_counter()
    features.compute_features(backbone, data, 32, tmp / "b.npy", "k")
    print("without flush and progress", round(n / (time.perf_counter() - start), 1), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
