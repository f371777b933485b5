"""Framing check: does the model's answer change when the same image is zoomed in or out?

A classifier that has learnt "tightly framed means class X" (a shortcut: in PneumoniaMNIST's training
split the pneumonias are imaged more tightly than the normals) calls a zoomed-in image of any class X.
This script zooms every val and test image about its centre (a centre crop to zoom in, edge-replicating
padding to zoom out, then the resize back) and prints, per split, zoom and true class, the share the model
gets right. A framing-robust model keeps those shares near their zoom 1.0 values; the val rows need no test
labels, so they can compare recipes without tuning on test. Not part of the test suite.

    .venv/bin/python benchmarks/framing.py --model models/model.keras --data data/augmented
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tlpipe.data.datasets import SplitData, load_augmented
from tlpipe.model.storage import load_model

REPO = Path(__file__).resolve().parents[1]


def zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """The image seen ``factor`` times closer (>1: centre crop; <1: replicated border), same size."""
    size = image.shape[0]
    if factor > 1:
        keep = round(size / factor)
        start = (size - keep) // 2
        image = image[start : start + keep, start : start + keep]
    elif factor < 1:
        pad = round(size * (1 / factor - 1) / 2)
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def load_images(split: SplitData, channels: int) -> np.ndarray:
    mode = "L" if channels == 1 else "RGB"
    images = [np.asarray(Image.open(path).convert(mode)) for path in split.paths]
    return np.stack(images).reshape(len(images), *images[0].shape[:2], channels)


def recall_by_class(model, images: np.ndarray, labels: np.ndarray, factor: float, n_classes: int) -> list:
    zoomed = np.stack([zoom(im, factor).reshape(im.shape) for im in images]).astype("float32")
    probs = model.predict(zoomed, batch_size=128, verbose=0)
    # a one-unit (sigmoid) head gives P(class 1); argmax of [1-p, p] is the 0.5 cut-off
    predicted = (probs[:, -1] >= 0.5).astype(int) if probs.shape[1] == 1 else probs.argmax(axis=1)
    return [
        float((predicted[labels == c] == c).mean()) if (labels == c).any() else None for c in range(n_classes)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "models/model.keras")
    parser.add_argument("--data", type=Path, default=REPO / "data/augmented")
    parser.add_argument("--zooms", type=float, nargs="+", default=[0.8, 1.0, 1.25])
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    data = load_augmented(args.data)
    classes = data.classes
    model = load_model(args.model)
    rows = []
    for split in ("val", "test"):
        part = data.split(split)
        images, labels = load_images(part, model.input_shape[-1]), part.labels
        for factor in args.zooms:
            recalls = recall_by_class(model, images, labels, factor, len(classes))
            rows.append({"split": split, "zoom": factor, "recall": dict(zip(classes, recalls, strict=True))})
            shares = "  ".join(f"{c} {r:.2f}" for c, r in zip(classes, recalls, strict=True) if r is not None)
            print(f"{split:5s} zoom {factor:4.2f}  right: {shares}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
