"""The frozen phase's feature cache: the backbone run once per image, kept on disk.

A frozen backbone's output never changes, so every epoch after the first through
the full model would recompute the same numbers; the head trains on these instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from tlpipe.core.files import atomic_write, path_digest
from tlpipe.data.datasets import AugmentedData, SplitData, image_dataset
from tlpipe.train.checkpoints import fingerprint

logger = logging.getLogger(__name__)


def data_digest(data: AugmentedData) -> str:
    """A digest of the images and labels a phase trains and validates on."""
    splits = [data.split("train"), data.split("val")]
    return fingerprint(
        data.classes,
        [s.rel_paths for s in splits],
        [s.labels.tolist() for s in splits],
        [path_digest(p) for s in splits for p in s.paths],
    )


def compute_features(
    backbone_model: keras.Model, data: SplitData, batch_size: int, cache: Path, key: str
) -> np.ndarray:
    """The backbone's output for every image, streamed to ``cache`` (an .npy file).

    ``backbone_model`` is any frozen model from raw pixels: the pooled backbone (one
    feature vector per image) or its bottom up to fine-tuning's first trainable layer.

    The file is a memory map written batch by batch, with a progress record beside
    it, so memory stays flat with the dataset's size and a killed run continues
    from the last batch written. A cache from other inputs (``key``) is recomputed.
    """
    progress_path = cache.with_suffix(".json")
    n = len(data.paths)
    shape = tuple(int(d) for d in backbone_model.output_shape[1:])
    done = _cached_rows(progress_path, key, n)
    cache.parent.mkdir(parents=True, exist_ok=True)
    if done == 0 or not cache.exists():
        done = 0
        features = np.lib.format.open_memmap(cache, mode="w+", dtype=np.float32, shape=(n, *shape))
    else:
        features = np.lib.format.open_memmap(cache, mode="r+")
        logger.info(
            f"feature cache {cache}: {done} of {n} images already done" + ("" if done < n else ", reused")
        )
    if done < n:
        # one trace for every batch size (the last batch is smaller): tracing costs seconds
        spec = tf.TensorSpec((None, *backbone_model.input_shape[1:]), tf.float32)
        forward = tf.function(lambda x: backbone_model(x, training=False), input_signature=[spec])
        rest = SplitData(data.paths[done:], data.labels[done:], data.rel_paths[done:])
        batches = image_dataset(rest, batch_size, with_labels=False)
        with tqdm(total=n, initial=done, desc=f"features {cache.stem}", unit="img", mininterval=5) as bar:
            for batch in batches:
                out = forward(batch).numpy()
                features[done : done + len(out)] = out
                features.flush()
                done += len(out)
                _write_progress(progress_path, {"key": key, "rows": done, "total": n})
                bar.update(len(out))
    del features
    return np.load(cache, mmap_mode="r")


def _write_progress(path: Path, progress: dict[str, object]) -> None:
    text = json.dumps(progress)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _cached_rows(progress_path: Path, key: str, n: int) -> int:
    try:
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if progress.get("key") != key or progress.get("total") != n:
        return 0
    return int(progress.get("rows", 0))


def feature_dataset(
    features: np.ndarray, targets: np.ndarray, batch_size: int, shuffle_seed: int | None
) -> tf.data.Dataset:
    """Batches of (features, target) read from the (memory-mapped) cache as needed.

    Shuffled as :func:`tlpipe.data.datasets.image_dataset` shuffles the images with the
    same seed, so a phase sees the same batches from the cache as from the images.
    """
    n = len(features)
    index = tf.data.Dataset.range(n)
    if shuffle_seed is not None:
        index = index.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True)

    def gather(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(features[idx], dtype=np.float32), targets[idx]

    def load(idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(gather, [idx], (tf.float32, tf.float32))
        x.set_shape((None, *features.shape[1:]))
        y.set_shape((None, *targets.shape[1:]))
        return x, y

    return index.batch(batch_size).map(load).prefetch(tf.data.AUTOTUNE)
