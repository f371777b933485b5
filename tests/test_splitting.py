"""Stratified, reproducible train/val/test splits, and clear errors when they cannot be made."""

from __future__ import annotations

from collections import Counter

import pytest

from tlpipe.config import SplitParams
from tlpipe.errors import PipelineError
from tlpipe.manifest import read_csv, read_json, write_csv, write_json
from tlpipe.splitting import SPLITS, assign_splits, split_dataset


def _labels(counts: dict[str, int]) -> list[str]:
    """Labels interleaved (a, b, c, a, b, ...), as a real manifest would not be sorted by class."""
    out: list[str] = []
    for i in range(max(counts.values())):
        out += [c for c, n in counts.items() if i < n]
    return out


def _per_class(labels: list[str], splits: list[str]) -> Counter:
    return Counter(zip(labels, splits))


@pytest.mark.parametrize(
    "counts",
    [{"a": 50, "b": 50, "c": 50, "d": 50}, {"a": 40, "b": 17, "c": 9}, {"a": 3, "b": 30, "c": 30}],
    ids=["balanced", "imbalanced", "smallest-allowed-class"],
)
@pytest.mark.parametrize(("val", "test"), [(0.15, 0.2), (0.3, 0.3), (0.1, 0.1), (0.2, 0.45)])
def test_stratified_proportions_per_class(counts, val, test):
    labels = _labels(counts)
    splits = assign_splits(labels, SplitParams(val_fraction=val, test_fraction=test, seed=3))
    assert len(splits) == len(labels) and set(splits) <= set(SPLITS)
    per = _per_class(labels, splits)
    fractions = {"train": 1 - val - test, "val": val, "test": test}
    for cls, n in counts.items():
        assert sum(per[cls, s] for s in SPLITS) == n
        for split, fraction in fractions.items():
            assert per[cls, split] >= 1, (cls, split, per)  # every class in every split
            if n * min(fractions.values()) >= 1:  # else the one-each rule can take precedence
                assert abs(per[cls, split] - fraction * n) <= 1 + 1e-9, (cls, split, per)


def test_smallest_classes_get_one_image_in_each_split():
    labels = _labels({"a": 3, "b": 3, "c": 3, "d": 3, "big": 200})
    splits = assign_splits(labels, SplitParams(val_fraction=0.05, test_fraction=0.1, seed=0))
    per = _per_class(labels, splits)
    for cls in "abcd":
        assert [per[cls, s] for s in SPLITS] == [1, 1, 1]
    assert [per["big", s] for s in SPLITS] == [170, 10, 20]


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    labels = _labels({"a": 30, "b": 30, "c": 30})
    first = assign_splits(labels, SplitParams(seed=1))
    assert assign_splits(labels, SplitParams(seed=1)) == first
    other = assign_splits(labels, SplitParams(seed=2))
    assert other != first
    assert Counter(other) == Counter(first)  # same sizes, different members


def test_val_and_test_change_independently_of_fraction_order():
    # changing only val_fraction keeps the test split (it is drawn first, from the seed alone)
    labels = _labels({"a": 30, "b": 30, "c": 30})
    a = assign_splits(labels, SplitParams(val_fraction=0.1, test_fraction=0.2, seed=5))
    b = assign_splits(labels, SplitParams(val_fraction=0.3, test_fraction=0.2, seed=5))
    assert [i for i, s in enumerate(a) if s == "test"] == [i for i, s in enumerate(b) if s == "test"]


@pytest.mark.parametrize(
    ("counts", "params", "message"),
    [
        ({"a": 40}, SplitParams(), r"need at least 2 classes, found \['a'\]"),
        ({"a": 40, "b": 2, "c": 1}, SplitParams(), r"need >= 3 each\): \{'b': 2, 'c': 1\}"),
        (
            {c: 3 for c in "abcdefghij"},  # 30 images, 10 classes: test would get 6
            SplitParams(val_fraction=0.3, test_fraction=0.2),
            r"test would hold 6\.0 images, fewer than the 10 classes; raise split\.test_fraction",
        ),
        (
            {c: 10 for c in "abcdefghij"},  # 100 images: val would get 5
            SplitParams(val_fraction=0.05, test_fraction=0.3),
            r"val would hold 5\.0 images, fewer than the 10 classes; raise split\.val_fraction",
        ),
        (
            {c: 3 for c in "abcd"},  # 12 images: train would get 1.3
            SplitParams(val_fraction=0.44, test_fraction=0.45),
            r"train would hold 1\.3 images, fewer than the 4 classes; lower split\.val_fraction",
        ),
    ],
    ids=["one-class", "thin-classes", "test-too-small", "val-too-small", "train-too-small"],
)
def test_impossible_splits_are_clear_pipeline_errors(counts, params, message):
    with pytest.raises(PipelineError, match=message):
        assign_splits(_labels(counts), params)


def _raw_dir(tmp_path, counts: dict[str, int], classes: list[str]):
    raw = tmp_path / "raw"
    rows = [
        {
            "path": f"images/{label}/{i:03d}.png",
            "label": label,
            "sha256": f"{i:064x}",
            "width": 8,
            "height": 8,
        }
        for i, label in enumerate(_labels(counts))
    ]
    write_csv(raw / "manifest.csv", rows, ("path", "label", "sha256", "width", "height"))
    write_json(raw / "classes.json", classes)
    return raw, rows


def test_split_dataset_writes_manifest_classes_and_summary(tmp_path):
    classes = ["zebra", "ant", "mole"]  # deliberately not sorted: the raw order must be kept
    counts = {"ant": 20, "mole": 11, "zebra": 25}
    raw, raw_rows = _raw_dir(tmp_path, counts, classes)
    out = tmp_path / "split"
    summary = split_dataset(raw, SplitParams(seed=7), out)

    rows = read_csv(out / "manifest.csv")
    assert list(rows[0]) == ["path", "label", "sha256", "split"]
    assert [r["path"] for r in rows] == [r["path"] for r in raw_rows]  # every item once, in order
    assert [(r["label"], r["sha256"]) for r in rows] == [(r["label"], r["sha256"]) for r in raw_rows]
    assert [r["split"] for r in rows] == assign_splits([r["label"] for r in raw_rows], SplitParams(seed=7))

    assert read_json(out / "classes.json") == classes
    on_disk = read_json(out / "summary.json")
    assert on_disk == summary
    assert on_disk["classes"] == classes
    assert list(on_disk["counts"]) == list(SPLITS)
    assert on_disk["total"] == sum(counts.values())
    for split in SPLITS:
        assert list(on_disk["counts"][split]) == classes
        for cls in classes:
            assert on_disk["counts"][split][cls] == sum(
                r["split"] == split and r["label"] == cls for r in rows
            )
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "manifest.csv", "summary.json"]


def test_split_dataset_failure_keeps_previous_output(tmp_path):
    raw, _ = _raw_dir(tmp_path, {"a": 20, "b": 2}, ["a", "b"])
    out = tmp_path / "split"
    out.mkdir()
    (out / "manifest.csv").write_text("previous\n")
    with pytest.raises(PipelineError, match="too few images"):
        split_dataset(raw, SplitParams(), out)
    assert [p.name for p in out.iterdir()] == ["manifest.csv"]
    assert (out / "manifest.csv").read_text() == "previous\n"


def test_split_dataset_without_raw_data_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the stage that produces it"):
        split_dataset(tmp_path / "raw", SplitParams(), tmp_path / "split")
    assert not (tmp_path / "split").exists()
