"""medmnist: reading the .npz layout safely, and the download path."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tlpipe.core.config import MedmnistParams
from tlpipe.core.errors import PipelineError
from tlpipe.data import medmnist, medmnist_catalog
from tlpipe.data.medmnist import medmnist_candidates, npz_candidates
from tlpipe.data.medmnist_catalog import DATASETS

SHARED_NPZ = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pneumoniamnist.npz"
SIZES = {"train": 7, "val": 3, "test": 4}


def make_arrays(sizes=SIZES, *, rgb: bool = False, classes: int = 2, side: int = 28, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        shape = (n, side, side, 3) if rgb else (n, side, side)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8).reshape(n, 1)
    return arrays


def write_npz(path: Path, arrays: dict, *, compressed: bool = True) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def pixels(candidate) -> np.ndarray:
    return np.asarray(candidate.open())


# ------------------------------------------------------------------ the .npz


def test_grayscale_splits_labels_and_pixels(tmp_path):
    arrays = make_arrays()
    cands = list(npz_candidates(write_npz(tmp_path / "mine.npz", arrays)))
    assert [c.split for c in cands] == ["train"] * 7 + ["val"] * 3 + ["test"] * 4
    assert cands[0].source == "train/000000.png" and cands[8].source == "val/000001.png"
    assert [c.label for c in cands[:4]] == ["0", "1", "0", "1"]  # no table entry, no names: the numbers
    for c in cands:
        index = int(c.source.split("/")[1].removesuffix(".png"))
        img = c.open()
        assert img.mode == "L" and img.size == (28, 28)
        assert np.array_equal(np.asarray(img), arrays[f"{c.split}_images"][index])
        assert c.label == str(int(arrays[f"{c.split}_labels"][index, 0]))
        assert c.group == ""


@pytest.mark.parametrize("compressed", [True, False])
def test_rgb_images(tmp_path, compressed):
    arrays = make_arrays(rgb=True, classes=3, side=16)
    cands = list(npz_candidates(write_npz(tmp_path / "mine.npz", arrays, compressed=compressed)))
    assert len(cands) == 14
    assert cands[5].open().mode == "RGB" and cands[5].open().size == (16, 16)
    assert np.array_equal(pixels(cands[-1]), arrays["test_images"][-1])
    assert Counter(c.label for c in cands) == {"0": 6, "1": 4, "2": 4}


def test_single_channel_axis_and_flat_labels(tmp_path):
    arrays = make_arrays()
    for split in SIZES:
        arrays[f"{split}_images"] = arrays[f"{split}_images"][..., None]
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"].reshape(-1).astype(np.int64)
    cands = list(npz_candidates(write_npz(tmp_path / "mine.npz", arrays)))
    assert cands[2].open().mode == "L"
    assert np.array_equal(pixels(cands[2]), arrays["train_images"][2, :, :, 0])


def test_reads_block_by_block_and_fortran_order(tmp_path, monkeypatch):
    monkeypatch.setattr(medmnist, "_READ_BYTES", 3 * 28 * 28)  # 3 rows per read: several blocks
    arrays = make_arrays(sizes={"train": 10, "val": 2, "test": 1})
    arrays["val_images"] = np.asfortranarray(arrays["val_images"])
    cands = list(npz_candidates(write_npz(tmp_path / "mine.npz", arrays)))
    got = {s: np.stack([pixels(c) for c in cands if c.split == s]) for s in ("train", "val", "test")}
    for split, stacked in got.items():
        assert np.array_equal(stacked, arrays[f"{split}_images"]), split


@pytest.mark.parametrize(
    "file_name", ["pneumoniamnist.npz", "pneumoniamnist_64.npz", "PneumoniaMNIST_224.npz"]
)
def test_class_names_from_the_table(tmp_path, file_name):
    path = write_npz(tmp_path / file_name, make_arrays())
    cands = list(npz_candidates(path, class_names=["ignored", "too"]))
    assert [c.label for c in cands[:3]] == ["normal", "pneumonia", "normal"]


def test_class_names_argument_for_other_files(tmp_path):
    path = write_npz(tmp_path / "xray.npz", make_arrays(classes=3))
    labels = {c.label for c in npz_candidates(path, class_names=["a", "b", "c"])}
    assert labels == {"a", "b", "c"}


def test_a_multi_label_file_is_refused(tmp_path):
    arrays = make_arrays()
    arrays["train_labels"] = np.zeros((7, 14), dtype=np.uint8)
    with pytest.raises(PipelineError, match="train_labels has 14 labels per image: multi-label"):
        npz_candidates(write_npz(tmp_path / "mine.npz", arrays))
    with pytest.raises(PipelineError, match="multi-label"):
        npz_candidates(write_npz(tmp_path / "chestmnist.npz", make_arrays()))


@pytest.mark.parametrize("key", ["val_images", "test_labels"])
def test_object_arrays_are_never_unpickled(tmp_path, key):
    arrays = make_arrays()
    arrays[key] = np.array([object()] * len(arrays[key]), dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)  # numpy pickles object arrays into the file
    with pytest.raises(PipelineError, match=f"{key} .*unpickling"):
        npz_candidates(path)


def _without(arrays: dict, key: str) -> dict:
    return {k: v for k, v in arrays.items() if k != key}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: _without(a, "val_labels"), "missing val_labels"),
        (
            lambda a: {**a, "test_labels": a["test_labels"][:3]},
            "test_images has 4 images but test_labels has 3",
        ),
        (lambda a: {**a, "train_labels": a["train_labels"] + 1}, "train_labels has label 2, outside 0..1"),
        (lambda a: {**a, "val_labels": a["val_labels"].astype(np.int8) - 1}, "val_labels has label -1"),
        (
            lambda a: {**a, "train_labels": a["train_labels"].astype(np.float32)},
            "train_labels must hold integers",
        ),
        (lambda a: {**a, "train_images": a["train_images"].astype(np.float32)}, "train_images must be uint8"),
        (lambda a: {**a, "test_images": np.zeros((4, 8, 8, 8), np.uint8)}, "3D MedMNIST volumes"),
        (
            lambda a: {**a, "val_images": np.zeros((3, 8, 8, 2), np.uint8)},
            "val_images must be uint8 of shape",
        ),
    ],
)
def test_broken_layouts_name_the_key(tmp_path, change, message):
    path = write_npz(tmp_path / "breastmnist.npz", change(make_arrays()))  # a table name: 2 classes
    with pytest.raises(PipelineError, match=re.escape(message)):
        npz_candidates(path)


def test_not_an_npz(tmp_path):
    with pytest.raises(PipelineError, match="no such file"):
        npz_candidates(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x80\x04not numpy at all")
    with pytest.raises(PipelineError, match=r"not a readable \.npz"):
        npz_candidates(junk)
    single = tmp_path / "single.npz"
    with open(single, "wb") as fh:
        np.save(fh, np.zeros((2, 2), np.uint8))
    with pytest.raises(PipelineError, match=r"single \.npy array"):
        npz_candidates(single)


# ---------------------------------------------------------------- the source


@pytest.fixture
def fake_zenodo(tmp_path, monkeypatch) -> Path:
    """The download URL pointed at a local folder."""
    folder = tmp_path / "zenodo"
    folder.mkdir()
    monkeypatch.setattr(medmnist_catalog, "URL_BASE", folder.as_uri())
    return folder


def _pin_md5(monkeypatch, name: str, size: int, path: Path) -> None:
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    info = DATASETS[name]
    monkeypatch.setitem(DATASETS, name, replace(info, md5={**info.md5, size: md5}))


@pytest.mark.parametrize(("size", "file_name"), [(28, "pneumoniamnist.npz"), (224, "pneumoniamnist_224.npz")])
def test_download_with_the_right_md5(tmp_path, fake_zenodo, monkeypatch, size, file_name):
    arrays = make_arrays()
    published = write_npz(fake_zenodo / file_name, arrays)
    _pin_md5(monkeypatch, "pneumoniamnist", size, published)
    workdir = tmp_path / "work"
    params = MedmnistParams(name="pneumoniamnist", size=size)
    cands = list(medmnist_candidates(params, workdir))
    assert (workdir / file_name).read_bytes() == published.read_bytes()
    assert len(cands) == 14 and cands[1].label == "pneumonia" and cands[-1].split == "test"
    assert np.array_equal(pixels(cands[0]), arrays["train_images"][0])


def test_download_with_the_wrong_md5_is_refused(tmp_path, fake_zenodo):
    write_npz(fake_zenodo / "pneumoniamnist.npz", make_arrays())  # not the published bytes
    workdir = tmp_path / "work"
    with pytest.raises(PipelineError, match="md5 expected 28209eda62fecd6e6a2d98b1501bb15f"):
        medmnist_candidates(MedmnistParams(name="pneumoniamnist"), workdir)
    assert list(workdir.iterdir()) == []


def test_local_path_needs_no_download(tmp_path, monkeypatch):
    def no_fetch(*args, **kwargs):
        raise AssertionError("fetch must not be called")

    monkeypatch.setattr(medmnist, "fetch", no_fetch)
    path = write_npz(tmp_path / "my_export.npz", make_arrays())
    plain = list(medmnist_candidates(MedmnistParams(path=str(path)), tmp_path / "work"))
    assert {c.label for c in plain} == {"0", "1"}
    named = list(medmnist_candidates(MedmnistParams(name="breastmnist", path=str(path)), tmp_path / "work"))
    assert {c.label for c in named} == {"malignant", "normal, benign"}  # a name lends its class names
    with pytest.raises(PipelineError, match="unknown MedMNIST dataset"):
        medmnist_candidates(MedmnistParams(name="nosuchmnist", path=str(path)), tmp_path / "work")


# ------------------------------------------------------------- the real file


def test_real_pneumoniamnist_when_available():
    if not SHARED_NPZ.is_file():
        pytest.skip(f"real data not present at {SHARED_NPZ} (only on machines with ../shared/data)")
    counts = Counter((c.split, c.label) for c in npz_candidates(SHARED_NPZ))
    per_split = Counter(split for split, _ in counts.elements())
    assert per_split == {"train": 4708, "val": 524, "test": 624}
    assert counts == {
        ("train", "normal"): 1214,
        ("train", "pneumonia"): 3494,
        ("val", "normal"): 135,
        ("val", "pneumonia"): 389,
        ("test", "normal"): 234,
        ("test", "pneumonia"): 390,
    }
    first_test = next(c for c in npz_candidates(SHARED_NPZ) if c.split == "test")
    with np.load(SHARED_NPZ, allow_pickle=False) as npz:
        assert np.array_equal(pixels(first_test), npz["test_images"][0])
    assert first_test.open().size == (28, 28)
