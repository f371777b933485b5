"""Stratified, reproducible, leak-free train/val/test splits, and clear errors when they cannot be made.

Leak-free: no group (patient, lesion) and no exact duplicate image in two splits, and a
source's own splits kept (or re-split) without letting either cross them.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from tlpipe.core.config import SplitParams
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import read_csv, read_json, write_csv, write_json
from tlpipe.data.splitting import SPLITS, SplitPlan, assign_splits, plan_splits, split_dataset


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


# ------------------------------------------------------------ fixtures for leak tests

KERMANY = r"^person(\d+)_"  # anchored: it must see the file name, not the class folder before it


def _row(i: int, label: str, *, source: str = "", group: str = "", split: str = "", sha: str = "") -> dict:
    return {
        "path": f"images/{label}/{i:05d}.png",
        "label": label,
        "sha256": sha or f"{i:064x}",
        "width": "8",
        "height": "8",
        "source": source or f"{label}/{i:05d}.jpeg",
        "split": split,
        "group": group,
    }


def _kermany(n_patients: int = 30, seed: int = 0, classes: str = "bacteria virus normal") -> list[dict]:
    """Patients with 1-6 images each, one label per patient, named like Kermany's chest X-rays."""
    rng = np.random.default_rng(seed)
    names = classes.split()
    rows: list[dict] = []
    for p in range(n_patients):
        label = names[p % len(names)]
        for i in range(int(rng.integers(1, 7))):
            rows.append(_row(len(rows), label, source=f"{label}/person{p}_{label}_{i}.jpeg"))
    order = rng.permutation(len(rows))  # a real manifest interleaves patients
    return [rows[k] for k in order]


def _patient(row: dict) -> str:
    return row["source"].split("person")[1].split("_")[0]


def _crossing(keys: list[str], splits: list[str]) -> set[str]:
    """Keys ("" = none) whose rows sit in more than one split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for key, split in zip(keys, splits):
        if key and split:
            seen[key].add(split)
    return {k for k, s in seen.items() if len(s) > 1}


def _accounted(plan: SplitPlan, n: int) -> None:
    assert len(plan.splits) == n and set(plan.splits) <= {*SPLITS, ""}
    assert {i for i, s in enumerate(plan.splits) if not s} == set(plan.dropped)  # dropped xor placed


# ------------------------------------------------------------ groups


def test_group_pattern_keeps_each_patient_in_one_split_where_a_naive_split_leaks():
    rows = _kermany()
    patients = [_patient(r) for r in rows]
    naive = plan_splits(rows, SplitParams(seed=4))
    assert len(_crossing(patients, naive.splits)) >= 5  # so the grouped check below means something

    plan = plan_splits(rows, SplitParams(seed=4, group_pattern=KERMANY))
    _accounted(plan, len(rows))
    assert not plan.dropped
    assert _crossing(patients, plan.splits) == set()
    assert plan.groups == patients and plan.grouped_by == "group_pattern"
    per = Counter(zip((r["label"] for r in rows), plan.splits))
    assert all(per[c, s] >= 1 for c in ("bacteria", "virus", "normal") for s in SPLITS)


def test_group_column_keeps_groups_together_and_is_written_out():
    rows = [dict(r, group=f"lesion-{_patient(r)}", source=f"x/{i}.jpg") for i, r in enumerate(_kermany())]
    naive = plan_splits([dict(r, group="") for r in rows], SplitParams(seed=4))
    groups = [r["group"] for r in rows]
    assert _crossing(groups, naive.splits)

    plan = plan_splits(rows, SplitParams(seed=4))
    assert _crossing(groups, plan.splits) == set()
    assert plan.groups == groups and plan.grouped_by == "group_column"


def test_group_pattern_wins_over_the_group_column():
    rows = [dict(r, group="one-big-group") for r in _kermany()]
    plan = plan_splits(rows, SplitParams(group_pattern=KERMANY))
    assert plan.groups == [_patient(r) for r in rows]


def test_grouped_split_is_deterministic_for_a_seed_and_changes_with_it():
    rows = _kermany()
    first = plan_splits(rows, SplitParams(seed=1, group_pattern=KERMANY)).splits
    assert plan_splits(rows, SplitParams(seed=1, group_pattern=KERMANY)).splits == first
    assert plan_splits(rows, SplitParams(seed=2, group_pattern=KERMANY)).splits != first


def _many_small_groups(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for label, n_groups in (("a", 150), ("b", 100), ("c", 50)):  # imbalanced on purpose
        for g in range(n_groups):
            for _ in range(int(rng.integers(1, 6))):
                rows.append(_row(len(rows), label, group=f"{label}{g}"))
    return [rows[k] for k in rng.permutation(len(rows))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_keeps_every_class_share_near_the_fractions(seed):
    rows = _many_small_groups(seed)  # about 900 images in 300 groups of 1-5
    params = SplitParams(val_fraction=0.15, test_fraction=0.2, seed=seed)
    plan = plan_splits(rows, params)
    groups = [r["group"] for r in rows]
    assert _crossing(groups, plan.splits) == set()
    per = Counter(zip((r["label"] for r in rows), plan.splits))
    totals = Counter(r["label"] for r in rows)
    fractions = {"train": 0.65, "val": 0.15, "test": 0.2}
    # measured: at most 0.005 over seeds 0-19 (0.019 when groups are placed in random, not size, order)
    for cls, n in totals.items():
        for split, fraction in fractions.items():
            assert abs(per[cls, split] / n - fraction) <= 0.01, (cls, split, per[cls, split], n)


def test_a_class_of_three_equal_groups_still_gets_one_group_in_every_split():
    # by error alone the third group would go to test (2.7 wanted in val, 3.6 in test, 6 per group)
    rows = _kermany(n_patients=40, classes="bacteria normal")
    rows += [_row(1000 + k, "virus", source=f"person{900 + k // 6}_virus_{k}.jpeg") for k in range(18)]
    plan = plan_splits(rows, SplitParams(group_pattern=KERMANY, seed=0))
    virus = Counter(s for r, s in zip(rows, plan.splits) if r["label"] == "virus")
    assert virus == {"train": 6, "val": 6, "test": 6}


def test_one_image_per_group_gives_the_exact_ungrouped_split():
    rows = [_row(i, label) for i, label in enumerate(_labels({"a": 30, "b": 20, "c": 12}))]
    rows = [dict(r, group=f"g{i}") for i, r in enumerate(rows)]
    plan = plan_splits(rows, SplitParams(seed=9))
    assert plan.splits == assign_splits([r["label"] for r in rows], SplitParams(seed=9))


def test_manifest_without_split_and_group_columns_reads_as_ungrouped_without_source_splits():
    rows = [
        {"path": f"{i}.png", "label": lab, "sha256": f"{i:064x}"}
        for i, lab in enumerate(_labels({"a": 9, "b": 9}))
    ]
    plan = plan_splits(rows, SplitParams(seed=0))
    assert plan.source_splits is None and plan.grouped_by == "none" and set(plan.groups) == {""}
    assert plan.splits == assign_splits([r["label"] for r in rows], SplitParams(seed=0))


# ------------------------------------------------------------ duplicates


def _with_duplicates(copies: int = 3, sets: int = 12) -> tuple[list[dict], list[list[int]]]:
    """60 distinct images plus ``sets`` images with ``copies`` copies each, spread through the manifest."""
    rows = [_row(i, lab) for i, lab in enumerate(_labels({"a": 30, "b": 30}))]
    positions: list[list[int]] = []
    for d in range(sets):
        label = "ab"[d % 2]
        for c in range(copies):
            rows.insert(7 * c + d, _row(1000 + 10 * d + c, label, sha=f"dup{d}"))
    for d in range(sets):
        positions.append([i for i, r in enumerate(rows) if r["sha256"] == f"dup{d}"])
    return rows, positions


def test_duplicates_tied_by_keep_first_split_never_cross_splits_and_are_all_kept():
    rows, sets = _with_duplicates()
    shas = [r["sha256"] for r in rows]
    distinct = [dict(r, sha256=f"{k:064x}") for k, r in enumerate(rows)]  # the same rows, copies unseen
    naive = plan_splits(distinct, SplitParams(seed=3)).splits
    assert _crossing(shas, naive)  # so the check below means something

    plan = plan_splits(rows, SplitParams(seed=3, duplicates="keep_first_split"))
    _accounted(plan, len(rows))
    assert not plan.dropped and len(plan.duplicate_sets) == len(sets)
    assert _crossing(shas, plan.splits) == set()


def test_keep_one_keeps_the_first_copy_in_manifest_order():
    rows, sets = _with_duplicates()
    plan = plan_splits(rows, SplitParams(seed=3, duplicates="keep_one"))
    _accounted(plan, len(rows))
    assert plan.dropped == {i: "duplicate" for s in sets for i in s[1:]}
    assert all(plan.splits[s[0]] for s in sets)


def test_conflicting_duplicates_are_all_dropped_and_reported():
    rows, _ = _with_duplicates(copies=1, sets=0)
    rows[5] = dict(rows[5], sha256="same")
    rows[40] = dict(rows[40], sha256="same")
    assert rows[5]["label"] != rows[40]["label"]
    for policy in ("keep_one", "keep_first_split"):
        plan = plan_splits(rows, SplitParams(duplicates=policy))
        assert plan.dropped == {5: "conflicting_labels", 40: "conflicting_labels"}
        assert plan.conflicts == [[5, 40]]


def _given(layout: dict[str, dict[str, int]], first: int = 0) -> list[dict]:
    """Rows carrying the source's own split, e.g. {"train": {"a": 3}, "test": {"a": 1}}."""
    rows = []
    for split, counts in layout.items():
        for label in _labels(counts):
            rows.append(_row(first + len(rows), label, split=split))
    return rows


def test_resplit_keep_first_split_drops_test_copies_of_train_val_images():
    # the re-drawn train/val rows land before test whichever of the two they get
    rows = _given({"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}, "test": {"a": 3, "b": 3}})
    rows[0] = dict(rows[0], sha256="x")
    rows[-2] = dict(rows[-2], sha256="x", label=rows[0]["label"])
    plan = plan_splits(rows, SplitParams(duplicates="keep_first_split", source_splits="resplit_train_val"))
    assert plan.dropped == {len(rows) - 2: "duplicate_in_later_split"}
    assert plan.splits[0] in ("train", "val")


def test_given_splits_keep_first_split_drops_copies_in_later_splits():
    rows = _given({"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}})
    by_split = {s: [i for i, r in enumerate(rows) if r["split"] == s] for s in SPLITS}
    test_copy, val_copy = by_split["test"][0], by_split["val"][0]
    rows[test_copy] = dict(rows[test_copy], sha256="x", label="a")  # copy of a train image, listed later
    rows[by_split["train"][0]] = dict(rows[by_split["train"][0]], sha256="x", label="a")
    rows[by_split["train"][2]] = dict(rows[by_split["train"][2]], sha256="x", label="a")
    rows[val_copy] = dict(rows[val_copy], sha256="y", label="a")  # val and test copies
    rows[by_split["test"][2]] = dict(rows[by_split["test"][2]], sha256="y", label="a")

    plan = plan_splits(rows, SplitParams(duplicates="keep_first_split"))
    assert plan.dropped == {
        test_copy: "duplicate_in_later_split",
        by_split["test"][2]: "duplicate_in_later_split",
    }
    assert [plan.splits[i] for i in (by_split["train"][0], by_split["train"][2], val_copy)] == [
        "train",
        "train",
        "val",
    ]

    # keep_one keeps the first row in the manifest, whichever split it is in
    rows = [rows[test_copy]] + [r for i, r in enumerate(rows) if i != test_copy]
    plan = plan_splits(rows, SplitParams(duplicates="keep_one"))
    assert plan.splits[0] == "test"
    assert [plan.splits[i] for i, r in enumerate(rows) if r["sha256"] == "x"] == ["test", "", ""]


# ------------------------------------------------------------ the source's own splits


def _kermany_official() -> list[dict]:
    """Kermany's 4708/524/624 train/val/test, a tenth of it: 471/52/62, about 3:1 pneumonia."""
    layout = {
        "train": {"PNEUMONIA": 353, "NORMAL": 118},
        "val": {"PNEUMONIA": 39, "NORMAL": 13},
        "test": {"PNEUMONIA": 39, "NORMAL": 23},
    }
    rows = _given(layout)
    for k, r in enumerate(rows):  # patients never cross the given splits: their ids carry the split
        r["source"] = f"{r['label']}/person{r['split']}{k // 3}_x_{k}.jpeg"
    return rows


def test_source_splits_are_kept_exactly():
    rows = _kermany_official()
    params = SplitParams(val_fraction=0.3, test_fraction=0.3, seed=1, group_pattern=r"person(\w+?)_")
    plan = plan_splits(rows, params)
    assert plan.splits == [r["split"] for r in rows] and plan.source_splits == "keep"
    assert Counter(plan.splits) == {"train": 471, "val": 52, "test": 62}


def test_resplit_train_val_keeps_test_and_redraws_train_val_by_group():
    rows = _kermany_official()
    for k, r in enumerate(rows):  # patients now span the given train and val: fine, both are re-drawn
        if r["split"] != "test":
            r["source"] = f"{r['label']}/person{k // 4}_x_{k}.jpeg"
    params = SplitParams(
        val_fraction=0.2, seed=5, group_pattern=r"person(\w+?)_", source_splits="resplit_train_val"
    )
    with pytest.raises(PipelineError, match="resplit_train_val would re-split"):
        plan_splits(rows, params.model_copy(update={"source_splits": "keep"}))
    plan = plan_splits(rows, params)
    assert [i for i, s in enumerate(plan.splits) if s == "test"] == [
        i for i, r in enumerate(rows) if r["split"] == "test"
    ]
    assert _crossing(plan.groups, plan.splits) == set()
    assert plan.splits != [r["split"] for r in rows]
    pool = [(r["label"], s) for r, s in zip(rows, plan.splits) if s != "test"]
    for label in ("PNEUMONIA", "NORMAL"):
        in_val = sum(s == "val" for lab, s in pool if lab == label) / sum(lab == label for lab, _ in pool)
        assert abs(in_val - 0.2) <= 0.03, (label, in_val)


def test_source_with_train_and_test_only_needs_a_resplit():
    rows = _given({"train": {"a": 20, "b": 20}, "test": {"a": 5, "b": 5}})
    with pytest.raises(PipelineError, match="the val split is empty; the source brings no val split"):
        plan_splits(rows, SplitParams())
    plan = plan_splits(rows, SplitParams(source_splits="resplit_train_val", val_fraction=0.25))
    assert Counter(plan.splits) == {"train": 30, "val": 10, "test": 10}


@pytest.mark.parametrize("mode", ["keep", "resplit_train_val"])
def test_a_group_the_source_puts_in_train_and_test_is_an_error_naming_it(mode):
    rows = _given({"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}})
    for r in rows:
        r["group"] = f"p{r['path'][-9:-4]}"
    rows[-1]["group"] = rows[0]["group"]
    with pytest.raises(
        PipelineError, match=r"1 group\(s\) sit in more than one split, e\.g\. 'p00000' \(train"
    ):
        plan_splits(rows, SplitParams(source_splits=mode))


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        (["train", "", "test"], r"1 of 30 rows have no split while the others have one"),
        (
            ["train", "validation", "test"],
            r"split column holds \['validation'\]; expected train, val or test",
        ),
    ],
)
def test_bad_source_split_columns_are_errors(splits, message):
    rows = [_row(i, "ab"[i % 2], split=splits[i % 3] if i < 3 else "train") for i in range(30)]
    with pytest.raises(PipelineError, match=message):
        plan_splits(rows, SplitParams())


# ------------------------------------------------------------ errors of grouped splits


@pytest.mark.parametrize(
    ("rows", "params", "message"),
    [
        (_kermany(classes="bacteria"), SplitParams(group_pattern=KERMANY), r"need at least 2 classes"),
        (
            _kermany(n_patients=20, classes="bacteria normal")  # plus two virus patients
            + [_row(900 + i, "virus", source=f"person77_v_{i}.jpeg") for i in range(9)]
            + [_row(950, "virus", source="person78_v_0.jpeg")],
            SplitParams(group_pattern=KERMANY, seed=0),
            r"too few groups to stratify these classes \(need >= 3 groups each, .*\): \{'virus': 2\}",
        ),
        (
            _kermany() + [_row(999, "normal", source="normal/IM-0117-0001.jpeg")],
            SplitParams(group_pattern=KERMANY),
            r"'\^person\(\\d\+\)_' finds no group in 1 of \d+ file names, e\.g\. \['IM-0117-0001\.jpeg'\]",
        ),
    ],
    ids=["one-class", "two-groups", "unmatched-pattern"],
)
def test_impossible_grouped_splits_are_clear_pipeline_errors(rows, params, message):
    with pytest.raises(PipelineError, match=message):
        plan_splits(rows, params)


# ------------------------------------------------------------ properties


@st.composite
def _layouts(draw) -> list[dict]:
    """Groups of 1-4 images, some rows ungrouped, some images repeated (across labels too)."""
    rows: list[dict] = []
    for g in range(draw(st.integers(15, 40))):
        label = "abc"[g % 3]
        for _ in range(draw(st.integers(1, 4))):
            copy_of = draw(st.one_of(st.none(), st.integers(0, 12)))
            # copies 0-1 may carry any label (conflicts), the others only their own
            sha = "" if copy_of is None else f"dup{copy_of}" if copy_of < 2 else f"dup{label}{copy_of}"
            group = f"g{g}" if draw(st.booleans()) else ""
            rows.append(_row(len(rows), label, group=group, sha=sha))
    return rows


def _sha_sets(rows: list[dict]) -> dict[str, list[int]]:
    sets: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        sets[r["sha256"]].append(i)
    return sets


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_layouts(), seed=st.integers(0, 2**16), policy=st.sampled_from(["keep_one", "keep_first_split"]))
def test_no_image_or_group_in_two_splits_and_every_row_accounted_for(rows, seed, policy):
    try:
        plan = plan_splits(rows, SplitParams(seed=seed, duplicates=policy))
    except PipelineError as err:  # too few groups of a class after the draw: refused, not leaked
        assert str(err).startswith("split: ")
        return
    _accounted(plan, len(rows))
    shas = [r["sha256"] for r in rows]
    assert _crossing(shas, plan.splits) == set()
    assert _crossing([r["group"] for r in rows], plan.splits) == set()
    assert set(plan.splits) >= set(SPLITS)
    for members in _sha_sets(rows).values():
        kept = [i for i in members if plan.splits[i]]
        if len({rows[i]["label"] for i in members}) > 1:
            assert kept == []
        elif policy == "keep_one":
            assert kept == members[:1]
        else:
            assert kept == members


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_layouts(), data=st.data())
def test_kept_source_splits_are_unchanged_except_for_dropped_copies(rows, data):
    split_of_group = {r["group"] or r["path"]: data.draw(st.sampled_from(SPLITS)) for r in rows}
    rows = [dict(r, split=split_of_group[r["group"] or r["path"]]) for r in rows]
    policy = data.draw(st.sampled_from(["keep_one", "keep_first_split"]))
    try:
        plan = plan_splits(rows, SplitParams(duplicates=policy))
    except PipelineError as err:
        assert "is empty" in str(err) or "need at least 2 classes" in str(err)
        return
    _accounted(plan, len(rows))
    assert all(s in ("", r["split"]) for r, s in zip(rows, plan.splits))
    assert _crossing([r["sha256"] for r in rows], plan.splits) == set()
    for members in _sha_sets(rows).values():
        if policy == "keep_first_split" and len({rows[i]["label"] for i in members}) == 1:
            first = min(SPLITS.index(rows[i]["split"]) for i in members)
            assert [i for i in members if plan.splits[i]] == [
                i for i in members if SPLITS.index(rows[i]["split"]) == first
            ]


def _fractions_of(val: float, test: float) -> dict[str, float]:
    return {"train": 1 - val - test, "val": val, "test": test}


def _stratifiable(counts: dict[str, int], fractions: dict[str, float]) -> bool:
    """Every class in every split is possible: two classes or more, three images each, and
    every split big enough to hold one image of each class."""
    n = sum(counts.values())
    enough_each = min(counts.values()) >= len(fractions)
    return len(counts) >= 2 and enough_each and all(f * n >= len(counts) for f in fractions.values())


_FRACTION = st.floats(0.02, 0.45)


@settings(max_examples=200, deadline=None)
@given(
    counts=st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 40), min_size=1, max_size=6),
    val=_FRACTION,
    test=_FRACTION,
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_random_label_layouts_are_stratified_within_one_image_or_refused_with_the_fix(
    counts, val, test, seed, data
):
    assume(val + test < 0.9)
    labels = data.draw(st.permutations(_labels(counts)), label="labels")
    params = SplitParams(val_fraction=val, test_fraction=test, seed=seed)
    fractions = _fractions_of(val, test)
    event("stratifiable" if _stratifiable(counts, fractions) else "refused")
    if not _stratifiable(counts, fractions):
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


@st.composite
def _grouped_layouts(draw) -> tuple[list[dict], dict[str, list[int]]]:
    """Two or three classes of 2-14 groups of 1-5 images each (one label per group), shuffled."""
    rows: list[dict] = []
    sizes: dict[str, list[int]] = defaultdict(list)
    for label in "abc"[: draw(st.integers(2, 3))]:
        for g in range(draw(st.integers(2, 14))):
            size = draw(st.integers(1, 5))
            sizes[label].append(size)
            rows += [_row(len(rows) + k, label, group=f"{label}{g}") for k in range(size)]
    order = draw(st.permutations(range(len(rows))))
    return [rows[k] for k in order], dict(sizes)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=_grouped_layouts(), val=_FRACTION, test=_FRACTION, seed=st.integers(0, 2**16))
def test_random_group_layouts_keep_groups_whole_and_shares_near_the_fractions_or_are_refused(
    layout, val, test, seed
):
    rows, sizes = layout
    assume(val + test < 0.9)
    params = SplitParams(val_fraction=val, test_fraction=test, seed=seed)
    fractions = _fractions_of(val, test)
    counts = {label: sum(group_sizes) for label, group_sizes in sizes.items()}
    possible = _stratifiable(counts, fractions) and min(map(len, sizes.values())) >= len(SPLITS)
    event("stratifiable" if possible else "refused")
    if not possible:
        with pytest.raises(PipelineError, match=r"^split: "):
            plan_splits(rows, params)
        return
    plan = plan_splits(rows, params)
    _accounted(plan, len(rows))
    assert not plan.dropped
    assert _crossing([r["group"] for r in rows], plan.splits) == set()
    per = Counter(zip((r["label"] for r in rows), plan.splits))
    for label, group_sizes in sizes.items():
        n, largest = counts[label], max(group_sizes)
        for split, fraction in fractions.items():
            assert per[label, split] >= 1, (label, split, per)
            # whole groups move the share in steps of up to the largest group; where a split's share
            # is smaller than that group, one group in every split takes precedence
            if min(fractions.values()) * n >= largest:
                assert abs(per[label, split] - fraction * n) <= largest, (label, split, per, group_sizes)


# ------------------------------------------------------------ the stage


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
    raw, raw_rows = _raw_dir(tmp_path, counts, classes)  # an old manifest: no split, group or source
    out, summary_out = tmp_path / "split", tmp_path / "results" / "split" / "summary.json"
    summary = split_dataset(raw, SplitParams(seed=7), out, summary_out)

    rows = read_csv(out / "manifest.csv")
    assert list(rows[0]) == ["path", "label", "sha256", "split", "group"]
    assert [r["path"] for r in rows] == [r["path"] for r in raw_rows]  # every item once, in order
    assert [(r["label"], r["sha256"]) for r in rows] == [(r["label"], r["sha256"]) for r in raw_rows]
    assert [r["split"] for r in rows] == assign_splits([r["label"] for r in raw_rows], SplitParams(seed=7))
    assert {r["group"] for r in rows} == {""}

    assert read_json(out / "classes.json") == classes
    on_disk = read_json(summary_out)
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
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "dropped.csv", "manifest.csv"]
    assert read_csv(out / "dropped.csv") == []
    assert (out / "dropped.csv").read_text() == "path,reason\n"


def test_split_summary_reports_groups_duplicates_and_params(tmp_path):
    rows = _kermany()
    rows[0] = dict(rows[0], sha256="copy")
    rows[1] = dict(rows[1], sha256="copy", label=rows[0]["label"])  # same image, same label
    rows[2] = dict(rows[2], sha256="clash")
    clash_label = next(lab for lab in ("bacteria", "virus") if lab != rows[2]["label"])
    rows[3] = dict(rows[3], sha256="clash", label=clash_label)
    raw = tmp_path / "raw"
    write_csv(raw / "manifest.csv", rows, list(rows[0]))
    write_json(raw / "classes.json", ["normal", "virus", "bacteria"])
    out, summary_out = tmp_path / "split", tmp_path / "results" / "split" / "summary.json"
    params = SplitParams(group_pattern=KERMANY, seed=11, duplicates="keep_one")
    summary = split_dataset(raw, params, out, summary_out)

    assert read_json(summary_out) == summary
    written = read_csv(out / "manifest.csv")
    dropped = [rows[1], rows[2], rows[3]]
    assert [r["path"] for r in written] == [r["path"] for r in rows if r not in dropped]
    assert read_csv(out / "dropped.csv") == [
        {"path": dropped[0]["path"], "reason": "duplicate"},
        {"path": dropped[1]["path"], "reason": "conflicting_labels"},
        {"path": dropped[2]["path"], "reason": "conflicting_labels"},
    ]
    assert summary["classes"] == ["normal", "virus", "bacteria"]
    assert summary["totals"] == {s: sum(r["split"] == s for r in written) for s in SPLITS}
    assert summary["total"] == len(rows) - 3 and summary["rows_in"] == len(rows)
    assert summary["grouped_by"] == "group_pattern"
    patient_of = {r["path"]: _patient(r) for r in rows}
    assert [r["group"] for r in written] == [patient_of[r["path"]] for r in written]
    patients = {s: {r["group"] for r in written if r["split"] == s} for s in SPLITS}
    assert summary["n_groups"] == {
        "total": len({r["group"] for r in written}),
        **{s: len(patients[s]) for s in SPLITS},
    }
    assert sum(len(p) for p in patients.values()) == summary["n_groups"]["total"]  # none in two splits
    assert summary["duplicates"] == {
        "sets": 2,
        "rows_in_sets": 4,
        "conflicting_sets": 1,
        "dropped": 3,
        "by_reason": {"conflicting_labels": 2, "duplicate": 1, "duplicate_in_later_split": 0},
        "conflicts": [
            {
                "sha256": "clash",
                "labels": sorted({rows[2]["label"], clash_label}),
                "paths": [rows[2]["path"], rows[3]["path"]],
            }
        ],
    }
    train = summary["counts"]["train"]
    assert summary["imbalance_ratio"] == round(max(train.values()) / min(train.values()), 4)
    assert summary["source_splits"]["used"] is False and summary["source_splits"]["mode"] is None
    assert summary["params"] == {
        "val_fraction": 0.15,
        "test_fraction": 0.2,
        "seed": 11,
        "group_pattern": KERMANY,
        "duplicates": "keep_one",
    }


def test_split_summary_says_when_source_splits_were_kept(tmp_path):
    rows = _given({"train": {"a": 8, "b": 4}, "val": {"a": 2, "b": 2}, "test": {"a": 3, "b": 3}})
    raw = tmp_path / "raw"
    write_csv(raw / "manifest.csv", rows, list(rows[0]))
    write_json(raw / "classes.json", ["a", "b"])
    summary = split_dataset(
        raw, SplitParams(duplicates="keep_one"), tmp_path / "split", tmp_path / "summary.json"
    )
    assert [r["split"] for r in read_csv(tmp_path / "split" / "manifest.csv")] == [r["split"] for r in rows]
    assert summary["source_splits"] == {
        "used": True,
        "mode": "keep",
        "note": "the source's own train/val/test kept as given; val_fraction, test_fraction and seed unused",
    }
    assert summary["params"] == {"group_pattern": None, "duplicates": "keep_one", "source_splits": "keep"}
    assert summary["imbalance_ratio"] == 2.0
    assert summary["n_groups"] == {"total": 22, "train": 12, "val": 4, "test": 6}  # each image its own


def test_split_dataset_fails_when_conflicts_empty_a_class(tmp_path):
    rows = [_row(i, lab) for i, lab in enumerate(_labels({"a": 10, "b": 10}))] + [
        _row(100, "c", sha="s1"),
        _row(101, "a", sha="s1"),
    ]
    raw = tmp_path / "raw"
    write_csv(raw / "manifest.csv", rows, list(rows[0]))
    write_json(raw / "classes.json", ["a", "b", "c"])
    with pytest.raises(PipelineError, match=r"no images left for classes \['c'\] after dropping conflicting"):
        split_dataset(raw, SplitParams(), tmp_path / "split", tmp_path / "summary.json")
    assert not (tmp_path / "split").exists() and not (tmp_path / "summary.json").exists()


def test_split_dataset_failure_keeps_previous_output(tmp_path):
    raw, _ = _raw_dir(tmp_path, {"a": 20, "b": 2}, ["a", "b"])
    out, summary_out = tmp_path / "split", tmp_path / "summary.json"
    out.mkdir()
    (out / "manifest.csv").write_text("previous\n")
    summary_out.write_text("{}\n")
    with pytest.raises(PipelineError, match="too few images"):
        split_dataset(raw, SplitParams(), out, summary_out)
    assert [p.name for p in out.iterdir()] == ["manifest.csv"]
    assert (out / "manifest.csv").read_text() == "previous\n"
    assert summary_out.read_text() == "{}\n"


def test_split_dataset_without_raw_data_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the stage that produces it"):
        split_dataset(tmp_path / "raw", SplitParams(), tmp_path / "split", tmp_path / "summary.json")
    assert not (tmp_path / "split").exists()
