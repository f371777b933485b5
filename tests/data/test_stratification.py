"""Stratified assignment: every class's share of each split within one image of its fraction,
reproducible from the seed, and clear errors when a split cannot hold every class.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from split_fixtures import FRACTION, fractions_of, interleaved_labels, stratifiable

from tlpipe.core.config import SplitParams
from tlpipe.core.constants import SPLITS
from tlpipe.core.errors import PipelineError
from tlpipe.data.stratification import assign_splits


def _per_class(labels: list[str], splits: list[str]) -> Counter:
    return Counter(zip(labels, splits, strict=True))


@pytest.mark.parametrize(
    "counts",
    [{"a": 50, "b": 50, "c": 50, "d": 50}, {"a": 40, "b": 17, "c": 9}, {"a": 3, "b": 30, "c": 30}],
    ids=["balanced", "imbalanced", "smallest-allowed-class"],
)
@pytest.mark.parametrize(("val", "test"), [(0.15, 0.2), (0.3, 0.3), (0.1, 0.1), (0.2, 0.45)])
def test_stratified_proportions_per_class(counts, val, test):
    labels = interleaved_labels(counts)
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
    labels = interleaved_labels({"a": 3, "b": 3, "c": 3, "d": 3, "big": 200})
    splits = assign_splits(labels, SplitParams(val_fraction=0.05, test_fraction=0.1, seed=0))
    per = _per_class(labels, splits)
    for cls in "abcd":
        assert [per[cls, s] for s in SPLITS] == [1, 1, 1]
    assert [per["big", s] for s in SPLITS] == [170, 10, 20]


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    labels = interleaved_labels({"a": 30, "b": 30, "c": 30})
    first = assign_splits(labels, SplitParams(seed=1))
    assert assign_splits(labels, SplitParams(seed=1)) == first
    other = assign_splits(labels, SplitParams(seed=2))
    assert other != first
    assert Counter(other) == Counter(first)  # same sizes, different members


def test_val_and_test_change_independently_of_fraction_order():
    # changing only val_fraction keeps the test split (it is drawn first, from the seed alone)
    labels = interleaved_labels({"a": 30, "b": 30, "c": 30})
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
        assign_splits(interleaved_labels(counts), params)


# ------------------------------------------------------------ properties


@settings(max_examples=200, deadline=None)
@given(
    counts=st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 40), min_size=1, max_size=6),
    val=FRACTION,
    test=FRACTION,
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_random_label_layouts_are_stratified_within_one_image_or_refused_with_the_fix(
    counts, val, test, seed, data
):
    assume(val + test < 0.9)
    labels = data.draw(st.permutations(interleaved_labels(counts)), label="labels")
    params = SplitParams(val_fraction=val, test_fraction=test, seed=seed)
    fractions = fractions_of(val, test)
    event("stratifiable" if stratifiable(counts, fractions) else "refused")
    if not stratifiable(counts, fractions):
        # says what to change: a fraction to raise or lower, or the images a class needs
        with pytest.raises(PipelineError, match=r"^split: .*(split\.(val|test)_fraction|need )"):
            assign_splits(labels, params)
        return
    per = _per_class(labels, assign_splits(labels, params))
    for cls, n in counts.items():
        assert sum(per[cls, s] for s in SPLITS) == n
        for split, fraction in fractions.items():
            assert per[cls, split] >= 1, (cls, split, per)
            if n * min(fractions.values()) >= 1:  # else one image each takes precedence
                assert abs(per[cls, split] - fraction * n) <= 1 + 1e-9, (cls, split, per)
