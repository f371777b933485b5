"""The augment stage: resized val/test, resized + augmented train, reproducible to the byte."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tlpipe.core.config import AugmentParams
from tlpipe.core.files import read_csv, read_json, write_csv, write_json
from tlpipe.data.augmentation import AUGMENTED_FIELDS, augment_dataset

SIZE = 32
CLASSES = ["square", "circle"]  # not sorted: label_index must follow this order
# (label, split, width, height) of each source image
SOURCES = [
    ("circle", "train", 40, 30),
    ("circle", "train", 33, 47),
    ("square", "train", 64, 64),
    ("square", "train", 20, 24),  # smaller than SIZE: upscaled
    ("circle", "val", 45, 36),
    ("square", "val", 36, 36),
    ("circle", "test", 50, 40),
    ("square", "test", 28, 44),
]
NO_AUGMENT = {
    "horizontal_flip": 0.0,
    "vertical_flip": 0.0,
    "rotate_limit": 0.0,
    "shift_limit": 0.0,
    "scale_limit": 0.0,
    "crop_scale": 1.0,
    "brightness_limit": 0.0,
    "contrast_limit": 0.0,
}


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path]:
    """A raw image folder and a split folder, as the download and split stages leave them."""
    raw, split = tmp_path / "raw", tmp_path / "split"
    rng = np.random.default_rng(0)
    rows = []
    for i, (label, name, w, h) in enumerate(SOURCES):
        # a smooth gradient plus noise: asymmetric, so any flip or shift shows
        ramp = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
        pixels = np.clip(ramp + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        rel = f"images/{label}/{label}__{i:03d}.png"
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(raw / rel)
        rows.append({"path": rel, "label": label, "sha256": "-", "split": name})
    write_csv(split / "manifest.csv", rows, ("path", "label", "sha256", "split"))
    write_json(split / "classes.json", CLASSES)
    return raw, split


def _params(**kw) -> AugmentParams:
    return AugmentParams(**{"image_size": SIZE, "copies": 2, "seed": 1, **kw})


def _run(dataset, out: Path, **kw) -> dict[str, list[dict]]:
    raw, split = dataset
    augment_dataset(raw, split, _params(**kw), out)
    rows = read_csv(out / "manifest.csv")
    return {name: [r for r in rows if r["split"] == name] for name in ("train", "val", "test")}


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (SIZE, SIZE))
        return np.asarray(img)


def _resized_source(raw: Path, source: str) -> np.ndarray:
    with Image.open(raw / source) as img:
        return cv2.resize(np.asarray(img.convert("RGB")), (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def _copies(out: Path, rows: list[dict]) -> dict[str, list[np.ndarray]]:
    """source -> [resized original, augmented copy 0, copy 1, ...] from the train rows."""
    grouped: dict[str, list[np.ndarray]] = {}
    for row in sorted(rows, key=lambda r: r["path"]):
        grouped.setdefault(row["source"], []).append(_load(out / row["path"]))
    return grouped


def test_two_runs_are_byte_identical(dataset, tmp_path):
    _run(dataset, tmp_path / "a")
    random.seed(1234)  # the global RNGs must play no part
    np.random.seed(5678)
    _run(dataset, tmp_path / "b")
    first, second = _tree_hashes(tmp_path / "a"), _tree_hashes(tmp_path / "b")
    assert len(first) == 4 * 3 + 4 + 2  # 4 train x (1 + 2 copies), 4 val/test, manifest, classes.json
    assert first == second


def test_layout_manifest_and_sizes(dataset, tmp_path):
    out = tmp_path / "aug"
    splits = _run(dataset, out, copies=3)
    rows = read_csv(out / "manifest.csv")
    assert list(rows[0]) == list(AUGMENTED_FIELDS)
    assert read_json(out / "classes.json") == CLASSES
    files = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert files == {r["path"] for r in rows}
    train_sources = [s for s in SOURCES if s[1] == "train"]
    assert len(splits["train"]) == len(train_sources) * (1 + 3)
    per_source: dict[str, int] = {}
    for row in splits["train"]:
        per_source[row["source"]] = per_source.get(row["source"], 0) + 1
    assert set(per_source.values()) == {4}
    assert len(splits["val"]) == len(splits["test"]) == 2
    for row in rows:
        assert row["path"].startswith(f"{row['split']}/{row['label']}/")
        assert int(row["label_index"]) == CLASSES.index(row["label"])
        assert Path(row["source"]).stem in row["path"]
        _load(out / row["path"])  # asserts PNG, RGB, SIZE x SIZE


def test_val_test_and_train_originals_are_only_resized(dataset, tmp_path):
    raw, _ = dataset
    out = tmp_path / "aug"
    splits = _run(dataset, out)
    for row in splits["val"] + splits["test"]:
        np.testing.assert_array_equal(_load(out / row["path"]), _resized_source(raw, row["source"]))
    originals = [r for r in splits["train"] if "_aug" not in r["path"]]
    assert len(originals) == 4
    for row in originals:
        np.testing.assert_array_equal(_load(out / row["path"]), _resized_source(raw, row["source"]))


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_zero_limits_make_copies_of_the_resized_original(dataset, tmp_path, probability):
    out = tmp_path / "aug"
    splits = _run(dataset, out, probability=probability, **NO_AUGMENT)
    for source, (original, *copies) in _copies(out, splits["train"]).items():
        assert len(copies) == 2
        for copy in copies:
            np.testing.assert_array_equal(copy, original, err_msg=source)


@pytest.mark.parametrize(("flip", "expected"), [("horizontal_flip", np.fliplr), ("vertical_flip", np.flipud)])
def test_flip_params_reach_the_transform(dataset, tmp_path, flip, expected):
    out = tmp_path / "aug"
    splits = _run(dataset, out, probability=0.0, **{**NO_AUGMENT, flip: 1.0})
    for original, *copies in _copies(out, splits["train"]).values():
        for copy in copies:
            assert not np.array_equal(copy, original)
            np.testing.assert_array_equal(copy, expected(original))


def test_default_augmentation_changes_the_copies(dataset, tmp_path):
    out = tmp_path / "aug"
    splits = _run(dataset, out, probability=1.0)
    for original, *copies in _copies(out, splits["train"]).values():
        assert not np.array_equal(copies[0], copies[1])
        for copy in copies:
            assert not np.array_equal(copy, original)


def test_a_different_seed_changes_only_the_augmented_copies(dataset, tmp_path):
    _run(dataset, tmp_path / "a", seed=1)
    _run(dataset, tmp_path / "b", seed=2)
    a, b = _tree_hashes(tmp_path / "a"), _tree_hashes(tmp_path / "b")
    assert a.keys() == b.keys()
    changed = {path for path in a if a[path] != b[path]}
    augmented = {path for path in a if "_aug" in path}
    assert changed == augmented


def test_no_copies_means_one_image_per_training_source(dataset, tmp_path):
    splits = _run(dataset, tmp_path / "aug", copies=0)
    assert len(splits["train"]) == 4
    assert not any("_aug" in r["path"] for r in splits["train"])


def _horizontal_span(pixels: np.ndarray) -> float:
    profile = pixels.astype(float).mean(axis=(0, 2))  # the fixture's ramp runs left to right
    return float(profile.max() - profile.min())


def test_crop_scale_zooms_into_a_random_part_of_the_image(dataset, tmp_path):
    out = tmp_path / "aug"
    splits = _run(dataset, out, probability=1.0, copies=8, **{**NO_AUGMENT, "crop_scale": 0.2})
    ratios = []
    for original, *copies in _copies(out, splits["train"]).values():
        assert not any(np.array_equal(copy, original) for copy in copies)
        ratios += [_horizontal_span(copy) / _horizontal_span(original) for copy in copies]
    # a crop sees part of the ramp: never more of it than the whole image, usually much less
    assert max(ratios) < 1.05
    assert np.mean(ratios) < 0.8
