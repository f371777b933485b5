"""Tests for the tf.data pipelines over the augmented manifest."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augmented_fixture import make_augmented
from tlpipe.core.errors import PipelineError
from tlpipe.data.datasets import image_dataset, load_augmented, load_images

CLASSES = ["red", "green", "blue"]
SIZE = 36  # not a size any default uses, so it must come from the PNGs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_augmented(
        tmp_path_factory.mktemp("augmented"), CLASSES, {"train": 4, "val": 2, "test": 1}, size=SIZE
    )


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


def _collect(ds) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(images), np.concatenate(labels)


def test_load_augmented_reads_classes_size_and_splits(root: Path) -> None:
    data = load_augmented(root)
    assert data.classes == CLASSES
    assert data.image_size == SIZE
    assert {name: len(s.paths) for name, s in data.splits.items()} == {"train": 12, "val": 6, "test": 3}
    with open(root / "manifest.csv", newline="") as fh:
        val_rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    val = data.split("val")
    assert val.rel_paths == [r["path"] for r in val_rows]
    assert val.paths == [str(root / r["path"]) for r in val_rows]
    assert val.labels.tolist() == [int(r["label_index"]) for r in val_rows] == [0, 0, 1, 1, 2, 2]
    assert all(Path(p).is_file() for p in val.paths)


def test_image_dataset_yields_raw_float_pixels_and_labels(root: Path) -> None:
    train = load_augmented(root).split("train")
    batches = list(image_dataset(train, batch_size=5))
    assert [len(y) for _, y in batches] == [5, 5, 2]
    images, labels = _collect(batches)
    assert images.dtype == np.float32
    assert images.shape == (12, SIZE, SIZE, 3)
    assert labels.tolist() == train.labels.tolist()
    np.testing.assert_array_equal(images, np.stack([_pixels(p) for p in train.paths]))
    assert images.max() > 200  # raw 0..255, not rescaled: backbones scale inside the model


def test_without_labels_yields_images_only(root: Path) -> None:
    val = load_augmented(root).split("val")
    batches = list(image_dataset(val, batch_size=4, with_labels=False))
    assert [tuple(b.shape) for b in batches] == [(4, SIZE, SIZE, 3), (2, SIZE, SIZE, 3)]
    np.testing.assert_array_equal(batches[0].numpy()[0], _pixels(val.paths[0]))


def test_seeded_shuffle_is_reproducible_and_keeps_pairs(root: Path) -> None:
    train = load_augmented(root).split("train")
    first = _collect(image_dataset(train, 4, shuffle_seed=7))
    again = _collect(image_dataset(train, 4, shuffle_seed=7))
    other = _collect(image_dataset(train, 4, shuffle_seed=8))
    plain = _collect(image_dataset(train, 4))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], plain[0])  # 12! orders: a no-op shuffle is no accident
    assert not np.array_equal(first[0], other[0])
    # every image still carries its own label
    label_of = {img.tobytes(): y for img, y in zip(*plain, strict=True)}
    assert [label_of[img.tobytes()] for img in first[0]] == first[1].tolist()
    assert sorted(first[1].tolist()) == sorted(train.labels.tolist())


def test_grayscale_png_is_decoded_to_three_channels(tmp_path: Path) -> None:
    root = make_augmented(tmp_path, ["a", "b"], {"test": 1}, size=SIZE)
    gray = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    Image.fromarray(gray).save(root / "test/a/a__000.png")
    test = load_augmented(root).split("test")
    images = next(iter(image_dataset(test, 2, with_labels=False))).numpy()
    assert images.shape == (2, SIZE, SIZE, 3)
    for channel in range(3):
        np.testing.assert_array_equal(images[0, :, :, channel], gray.astype(np.float32))


def test_load_images_stacks_the_first_few(root: Path) -> None:
    val = load_augmented(root).split("val")
    batch = load_images(val, 4)
    assert batch.shape == (4, SIZE, SIZE, 3)
    assert batch.dtype == np.float32
    np.testing.assert_array_equal(batch[3], _pixels(val.paths[3]))


def test_split_without_images_is_a_pipeline_error(tmp_path: Path) -> None:
    data = load_augmented(make_augmented(tmp_path, ["a", "b"], {"train": 2, "val": 1}))
    assert len(data.split("train").paths) == 4
    with pytest.raises(PipelineError, match=r"manifest\.csv has no 'test' images"):
        data.split("test")


def test_empty_manifest_is_a_pipeline_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("path,label,label_index,split,source\n")
    (tmp_path / "classes.json").write_text('["a", "b"]')
    with pytest.raises(PipelineError, match="is empty"):
        load_augmented(tmp_path)


def test_missing_manifest_says_which_stage_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the stage that produces it"):
        load_augmented(tmp_path / "nowhere")
