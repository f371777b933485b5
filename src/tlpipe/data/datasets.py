"""tf.data input pipelines over the augmented manifest.

Images are decoded from PNG in parallel and streamed in batches, so memory
stays flat however large the dataset is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from tlpipe.core.constants import SPLITS
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import read_csv, read_json


@dataclass(frozen=True)
class SplitData:
    paths: list[str]  # absolute or cwd-relative file paths
    labels: np.ndarray  # int label indices
    rel_paths: list[str]  # paths as written in the manifest


@dataclass(frozen=True)
class AugmentedData:
    root: Path
    classes: list[str]
    image_size: int
    splits: dict[str, SplitData]

    def split(self, name: str) -> SplitData:
        data = self.splits.get(name)
        if data is None or not data.paths:
            raise PipelineError(f"{self.root}/manifest.csv has no {name!r} images")
        return data


def load_augmented(root: Path) -> AugmentedData:
    root = Path(root)
    rows = read_csv(root / "manifest.csv")
    classes = read_json(root / "classes.json")
    splits: dict[str, SplitData] = {}
    for name in SPLITS:
        chosen = [r for r in rows if r["split"] == name]
        splits[name] = SplitData(
            paths=[str(root / r["path"]) for r in chosen],
            labels=np.array([int(r["label_index"]) for r in chosen], dtype=np.int32),
            rel_paths=[r["path"] for r in chosen],
        )
    first = next(iter(rows), None)
    if first is None:
        raise PipelineError(f"{root}/manifest.csv is empty")
    image_size = tf.io.decode_png(tf.io.read_file(str(root / first["path"]))).shape[0]
    return AugmentedData(root, classes, int(image_size), splits)


def _decode(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_png(tf.io.read_file(path), channels=3)
    return tf.cast(image, tf.float32)  # raw 0..255: each backbone scales inside its model


def image_dataset(
    data: SplitData,
    batch_size: int,
    shuffle_seed: int | None = None,
    with_labels: bool = True,
    targets: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Batches of (image, label), shuffled reproducibly when a seed is given.

    ``targets`` replaces the label indices (e.g. one-hot rows for a softmax loss).
    Only paths and labels are held in memory; images are decoded batch by batch.
    """
    labels = data.labels if targets is None else targets
    ds = tf.data.Dataset.from_tensor_slices((data.paths, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(data.paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda p, y: (_decode(p), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not with_labels:
        ds = ds.map(lambda x, y: x)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load_images(data: SplitData, limit: int) -> np.ndarray:
    """A small in-memory batch (for model signatures and examples)."""
    return np.stack([_decode(tf.constant(p)).numpy() for p in data.paths[:limit]])
