"""Leak-free, stratified train/val/test splits of the download manifest.

Three things would put the same information on both sides of a split, and each is
dealt with before a row is placed:

* groups: images of one patient or lesion (``split.group_pattern`` on the file name,
  else the manifest's ``group`` column) always land in one split;
* exact duplicates (equal sha256 of the decoded pixels) never sit in two splits
  (``split.duplicates``), and copies that disagree on the label are dropped;
* a source that brings its own splits is kept as given (or its train+val re-split),
  and a group the source itself puts in two splits is an error.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlpipe.core.constants import SPLITS
from tlpipe.core import tracking
from tlpipe.core.config import SplitParams, section_dict
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import atomic_dir, read_csv, read_json, write_csv, write_json

OUT_FIELDS = ("path", "label", "sha256", "split", "group")
DROPPED_FIELDS = ("path", "reason")
CONFLICT = "conflicting_labels"  # copies of one image with different labels: all dropped
DUPLICATE = "duplicate"  # keep_one: a copy after the first
LATER_COPY = "duplicate_in_later_split"  # keep_first_split: a copy in a later split than another
_SHOWN = 5  # offending names quoted in an error message
_SHOWN_CONFLICTS = 20  # conflict sets listed in the summary (all are in dropped.csv)


@dataclass(frozen=True)
class SplitPlan:
    """Where every input row goes; rows are indexed as in the manifest."""

    splits: list[str]  # train/val/test, or "" for a dropped row
    groups: list[str]  # the group id, "" for a row that stands alone
    dropped: dict[int, str]  # row index -> reason
    duplicate_sets: list[list[int]]  # rows sharing a sha256, two or more each
    conflicts: list[list[int]]  # the duplicate sets whose copies disagree on the label
    grouped_by: str  # "group_pattern", "group_column" or "none"
    source_splits: str | None  # the mode applied to the source's own splits, None when it brings none


# ------------------------------------------------------------ exact per-class split


def _apportion(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split ``n`` into integer parts, each the floor or ceiling of ``fraction * n`` (largest remainder)."""
    exact = [round(f * n, 9) for f in fractions]  # round: 0.29 * 100 is 28.999999999999996
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(fractions)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _fractions(params: SplitParams) -> dict[str, float]:
    # test first: it is cut first, so changing only val_fraction can keep it
    return {
        "test": params.test_fraction,
        "val": params.val_fraction,
        "train": 1.0 - params.val_fraction - params.test_fraction,
    }


def _resplit_fractions(params: SplitParams) -> dict[str, float]:
    return {"val": params.val_fraction, "train": 1.0 - params.val_fraction}


def _check_splittable(labels: list[str], fractions: Mapping[str, float]) -> None:
    counts = Counter(labels)
    if len(counts) < 2:
        raise PipelineError(f"split: need at least 2 classes, found {sorted(counts)}")
    thin = {c: n for c, n in counts.items() if n < len(fractions)}
    if thin:
        raise PipelineError(
            f"split: too few images to stratify these classes (need >= {len(fractions)} each): {thin}"
        )
    for name, fraction in fractions.items():
        expected = fraction * len(labels)
        if expected < len(counts):
            lower = (
                "split.val_fraction or split.test_fraction" if "test" in fractions else "split.val_fraction"
            )
            fix = f"lower {lower}" if name == "train" else f"raise split.{name}_fraction"
            raise PipelineError(
                f"split: {name} would hold {expected:.1f} images, fewer than the {len(counts)} classes; "
                f"{fix} or add images"
            )


def _assign_exact(labels: list[str], fractions: Mapping[str, float], seed: int) -> list[str]:
    _check_splittable(labels, fractions)
    rng = np.random.default_rng(seed)
    split_of = [""] * len(labels)
    for label in sorted(set(labels)):
        members = [i for i, lab in enumerate(labels) if lab == label]
        sizes = _apportion(len(members), tuple(fractions.values()))
        for k in range(len(sizes)):  # at least one each: take from the largest part
            if sizes[k] == 0:
                sizes[k] += 1
                sizes[sizes.index(max(sizes))] -= 1
        order = rng.permutation(len(members))
        start = 0
        for name, size in zip(fractions, sizes):
            for j in order[start : start + size]:
                split_of[members[j]] = name
            start += size
    return split_of


def assign_splits(labels: list[str], params: SplitParams) -> list[str]:
    """A split name for each item, stratified by label and reproducible from the seed.

    Each class is shuffled and cut by itself, so its share of every split is within
    one image of the configured fraction; and every class has at least one image in
    every split, which takes precedence for tiny classes (a class of 3 gives one to
    each). Test images are cut first, so changing only ``val_fraction`` keeps the test
    split whenever its per-class sizes stay the same.
    """
    return _assign_exact(labels, _fractions(params), params.seed)


# ------------------------------------------------------------ grouped split


def _seed_every_split(counts: list[Counter], splits: list[str], shuffled: list[int]) -> dict[int, str]:
    """Place one unit of every class in every split, the smallest units that do it.

    Done before the greedy pass, which minimises an error summed over classes and
    could otherwise leave a rare class out of val or test altogether.
    """
    by_size = sorted(shuffled, key=lambda u: sum(counts[u].values()))  # stable: ties in seeded order
    holders: dict[str, list[int]] = defaultdict(list)
    for u in by_size:
        for label in counts[u]:
            holders[label].append(u)
    placed: dict[int, str] = {}
    present: dict[str, set[str]] = {s: set() for s in splits}
    for label in sorted(holders, key=lambda c: (len(holders[c]), c)):  # fewest groups first
        for split in splits:
            if label in present[split]:
                continue
            unit = next((u for u in holders[label] if u not in placed), None)
            if unit is None:  # every group of it is taken by splits that needed another class
                raise PipelineError(
                    f"split: class {label!r} has too few groups ({len(holders[label])}) to put one in "
                    f"every split; add data or merge classes"
                )
            placed[unit] = split
            present[split] |= set(counts[unit])
    return placed


def _placement_cost(unit: Counter, have: Counter, target: Mapping[str, float]) -> float:
    """Growth of sum((have - target)^2 / target) over the unit's classes if it joins this split.

    Relative to the target, so a group that would overshoot a small val split costs
    more than the same overshoot of train.
    """
    return sum(n * (n + 2 * (have[c] - target[c])) / target[c] for c, n in unit.items())


def assign_group_splits(
    unit_labels: Sequence[Sequence[str]], fractions: Mapping[str, float], seed: int
) -> list[str]:
    """A split name for each unit (a list of item labels) that keeps class shares near the fractions.

    Every class first gets its smallest units in each split (so every split holds
    every class); the rest, largest first (ties in a seeded shuffle), go one by one
    to the split where they add least to the squared relative error of the per-class
    counts.
    """
    labels = [label for unit in unit_labels for label in unit]
    _check_splittable(labels, fractions)
    counts = [Counter(unit) for unit in unit_labels]
    per_class = Counter(label for c in counts for label in c)
    thin = {c: n for c, n in per_class.items() if n < len(fractions)}
    if thin:
        raise PipelineError(
            f"split: too few groups to stratify these classes (need >= {len(fractions)} groups each, "
            f"one per split): {thin}"
        )
    totals = Counter(labels)
    target = {s: {c: f * totals[c] for c in totals} for s, f in fractions.items()}
    shuffled = [int(u) for u in np.random.default_rng(seed).permutation(len(counts))]
    split_of = _seed_every_split(counts, list(fractions), shuffled)
    have = {s: Counter() for s in fractions}
    for unit, split in split_of.items():
        have[split] += counts[unit]
    rest = sorted((u for u in shuffled if u not in split_of), key=lambda u: -sum(counts[u].values()))
    for unit in rest:
        split = min(fractions, key=lambda s: _placement_cost(counts[unit], have[s], target[s]))
        split_of[unit] = split
        have[split] += counts[unit]
    return [split_of[u] for u in range(len(counts))]


# ------------------------------------------------------------ reading the manifest


def file_name(source: str) -> str:
    return source.replace("\\", "/").rsplit("/", 1)[-1]


def group_ids(rows: Sequence[Mapping[str, str]], pattern: str | None) -> tuple[list[str], str]:
    """Each row's group id ("" when it stands alone) and what the groups came from."""
    if pattern is not None:
        if rows and "source" not in rows[0]:
            raise PipelineError(
                "split: split.group_pattern needs the manifest's source column; re-run the download stage"
            )
        regex = re.compile(pattern)
        names = [file_name(r["source"]) for r in rows]
        found = [regex.search(n) for n in names]
        ids = [m.group(1) if m else None for m in found]
        # an unmatched image would silently stand alone and could sit beside its own group's split
        unmatched = [n for n, g in zip(names, ids) if not g]
        if unmatched:
            raise PipelineError(
                f"split: split.group_pattern '{pattern}' finds no group in {len(unmatched)} of {len(rows)} "
                f"file names, e.g. {unmatched[:_SHOWN]}; every image needs one, or fix the pattern"
            )
        return [str(g) for g in ids], "group_pattern"
    ids = [(r.get("group") or "").strip() for r in rows]
    return ids, ("group_column" if any(ids) else "none")


def given_splits(rows: Sequence[Mapping[str, str]]) -> list[str] | None:
    """The source's own split of each row, or None when it brings none."""
    values = [(r.get("split") or "").strip() for r in rows]
    if not any(values):
        return None
    unknown = sorted({v for v in values if v and v not in SPLITS})
    if unknown:
        raise PipelineError(
            f"split: the manifest's split column holds {unknown}; expected train, val or test"
        )
    missing = [r["path"] for r, v in zip(rows, values) if not v]
    if missing:
        raise PipelineError(
            f"split: {len(missing)} of {len(rows)} rows have no split while the others have one from "
            f"the source, e.g. {missing[:_SHOWN]}; re-run the download stage"
        )
    return values


# ------------------------------------------------------------ duplicates


def find_duplicate_sets(shas: Sequence[str]) -> list[list[int]]:
    """Rows sharing a sha256 (equal decoded pixels), two or more per set, in manifest order."""
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, sha in enumerate(shas):
        rows_of[sha].append(i)
    return [rows for rows in rows_of.values() if len(rows) > 1]


def duplicate_drops(
    sets: Sequence[Sequence[int]], labels: Sequence[str], ranks: Sequence[int], policy: str
) -> dict[int, str]:
    """Rows to drop, with the reason, so that no image sits in two splits.

    ``ranks`` orders the splits rows are known to land in; keep_first_split keeps
    the copies of the lowest rank.
    """
    dropped: dict[int, str] = {}
    for rows in sets:
        if len({labels[i] for i in rows}) > 1:
            dropped |= dict.fromkeys(rows, CONFLICT)
        elif policy == "keep_one":
            dropped |= dict.fromkeys(rows[1:], DUPLICATE)
        else:
            first = min(ranks[i] for i in rows)
            dropped |= {i: LATER_COPY for i in rows if ranks[i] > first}
    return dropped


def tied_units(indices: Sequence[int], groups: Sequence[str], shas: Sequence[str]) -> list[list[int]]:
    """Rows that must share a split (same group or same image), as lists of positions in ``indices``."""
    parent = list(range(len(indices)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    first_of: dict[tuple[str, str], int] = {}
    for k, i in enumerate(indices):
        keys = [("sha", shas[i])] + ([("group", groups[i])] if groups[i] else [])
        for key in keys:
            if key in first_of:
                parent[root(k)] = root(first_of[key])
            else:
                first_of[key] = k
    units: dict[int, list[int]] = defaultdict(list)
    for k in range(len(indices)):
        units[root(k)].append(k)
    return sorted(units.values(), key=lambda unit: unit[0])


# ------------------------------------------------------------ the plan


_ZONES = ("train", "val", "train+val", "test")  # "train+val": the pool resplit_train_val re-draws


def _check_groups_stay_within(zones: Mapping[int, str], groups: Sequence[str], mode: str) -> None:
    seen: dict[str, set[str]] = defaultdict(set)
    for i, zone in zones.items():
        if groups[i]:
            seen[groups[i]].add(zone)
    crossing = {g: sorted(z, key=_ZONES.index) for g, z in seen.items() if len(z) > 1}
    if not crossing:
        return
    shown = ", ".join(f"{g!r} ({' and '.join(z)})" for g, z in list(crossing.items())[:_SHOWN])
    hint = ""
    if mode == "keep" and all("test" not in z for z in crossing.values()):
        hint = "; split.source_splits: resplit_train_val would re-split train+val by group"
    raise PipelineError(
        f"split: the source's own splits leak: {len(crossing)} group(s) sit in more than one split, "
        f"e.g. {shown}{hint}"
    )


def _duplicate_ranks(given: list[str], mode: str) -> list[int]:
    """The order, for keep_first_split, of the splits the source puts rows in."""
    if mode == "keep":
        return [SPLITS.index(s) for s in given]
    return [int(s == "test") for s in given]  # re-drawn train/val rows land before test either way


def _draw(
    free: list[int],
    labels: list[str],
    groups: list[str],
    shas: list[str],
    fractions: Mapping[str, float],
    seed: int,
) -> list[str]:
    """Splits for the rows in ``free``: exact per class when every row stands alone, else by unit."""
    units = tied_units(free, groups, shas)
    if all(len(unit) == 1 for unit in units):
        return _assign_exact([labels[i] for i in free], fractions, seed)
    unit_splits = assign_group_splits([[labels[free[k]] for k in unit] for unit in units], fractions, seed)
    drawn = [""] * len(free)
    for unit, split in zip(units, unit_splits):
        for k in unit:
            drawn[k] = split
    return drawn


def plan_splits(rows: Sequence[Mapping[str, str]], params: SplitParams) -> SplitPlan:
    """Decide the split of every manifest row, or drop it, with no group or image in two splits."""
    labels = [r["label"] for r in rows]
    shas = [r["sha256"] for r in rows]
    given = given_splits(rows)
    mode = None if given is None else params.source_splits
    groups, grouped_by = group_ids(rows, params.group_pattern)
    # rows still to be drawn all rank 0: their copies are tied and drawn into one split together
    ranks = [0] * len(rows) if given is None else _duplicate_ranks(given, mode)
    sets = find_duplicate_sets(shas)
    dropped = duplicate_drops(sets, labels, ranks, params.duplicates)
    kept = [i for i in range(len(rows)) if i not in dropped]

    splits = [""] * len(rows)
    if given is None:
        free, fractions = kept, _fractions(params)
    else:
        redrawn = {i for i in kept if mode == "resplit_train_val" and given[i] != "test"}
        _check_groups_stay_within({i: "train+val" if i in redrawn else given[i] for i in kept}, groups, mode)
        for i in kept:
            splits[i] = "" if i in redrawn else given[i]
        free, fractions = sorted(redrawn), _resplit_fractions(params)
    if free:
        for i, split in zip(free, _draw(free, labels, groups, shas, fractions, params.seed)):
            splits[i] = split

    _check_result(rows, splits, given)
    conflicts = [s for s in sets if dropped.get(s[0]) == CONFLICT]
    return SplitPlan(splits, groups, dropped, sets, conflicts, grouped_by, mode)


def _check_result(rows: Sequence[Mapping[str, str]], splits: list[str], given: list[str] | None) -> None:
    kept_labels = {r["label"] for r, s in zip(rows, splits) if s}
    if len(kept_labels) < 2:  # the drawn splits check this first; kept source splits and drops do not
        raise PipelineError(f"split: need at least 2 classes, found {sorted(kept_labels)}")
    for name in SPLITS:
        if name not in splits:
            hint = ""
            if given is not None and name == "val" and "val" not in given:
                hint = "; the source brings no val split: split.source_splits: resplit_train_val draws one"
            raise PipelineError(f"split: the {name} split is empty{hint}")


# ------------------------------------------------------------ the stage


def count_by_split(rows: list[dict], classes: list[str]) -> dict[str, dict[str, int]]:
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    for row in rows:
        counts[row["split"]][row["label"]] += 1
    return counts


_SOURCE_NOTES = {
    None: "the source brings no splits: drawn from val_fraction and test_fraction",
    "keep": "the source's own train/val/test kept as given; val_fraction, test_fraction and seed unused",
    "resplit_train_val": "the source's test kept; its train+val re-split with val_fraction of it in val; "
    "test_fraction unused",
}
_USED_PARAMS = {
    None: ("val_fraction", "test_fraction", "seed", "group_pattern", "duplicates"),
    "keep": ("group_pattern", "duplicates", "source_splits"),
    "resplit_train_val": ("val_fraction", "seed", "group_pattern", "duplicates", "source_splits"),
}


def _n_groups(rows: list[dict]) -> int:
    # a row without a group is a group of its own
    return len({r["group"] for r in rows if r["group"]}) + sum(not r["group"] for r in rows)


def build_summary(
    raw_rows: Sequence[Mapping[str, str]], plan: SplitPlan, classes: list[str], params: SplitParams
) -> dict:
    out_rows = output_rows(raw_rows, plan)
    counts = count_by_split(out_rows, classes)
    train = [counts["train"][c] for c in classes]
    reasons = Counter(plan.dropped.values())
    return {
        "classes": classes,
        "counts": counts,
        "totals": {s: sum(counts[s].values()) for s in SPLITS},
        "total": len(out_rows),
        "rows_in": len(raw_rows),
        "grouped_by": plan.grouped_by,
        "n_groups": {
            "total": _n_groups(out_rows),
            **{s: _n_groups([r for r in out_rows if r["split"] == s]) for s in SPLITS},
        },
        "duplicates": {
            "sets": len(plan.duplicate_sets),
            "rows_in_sets": sum(len(s) for s in plan.duplicate_sets),
            "conflicting_sets": len(plan.conflicts),
            "dropped": len(plan.dropped),
            "by_reason": {r: reasons[r] for r in (CONFLICT, DUPLICATE, LATER_COPY)},
            "conflicts": [
                {
                    "sha256": raw_rows[s[0]]["sha256"],
                    "labels": sorted({raw_rows[i]["label"] for i in s}),
                    "paths": [raw_rows[i]["path"] for i in s],
                }
                for s in plan.conflicts[:_SHOWN_CONFLICTS]
            ],
        },
        "imbalance_ratio": round(max(train) / min(train), 4) if min(train) > 0 else None,
        "source_splits": {
            "used": plan.source_splits is not None,
            "mode": plan.source_splits,
            "note": _SOURCE_NOTES[plan.source_splits],
        },
        "params": {k: getattr(params, k) for k in _USED_PARAMS[plan.source_splits]},
    }


def output_rows(raw_rows: Sequence[Mapping[str, str]], plan: SplitPlan) -> list[dict]:
    return [
        {"path": r["path"], "label": r["label"], "sha256": r["sha256"], "split": s, "group": g}
        for r, s, g in zip(raw_rows, plan.splits, plan.groups)
        if s
    ]


def split_dataset(raw_dir: Path, params: SplitParams, out_dir: Path, summary_out: Path) -> dict:
    """The split stage: the manifest with ``split`` and ``group`` columns, the dropped rows, a summary."""
    with tracking.stage_run("split", section_dict(params, "split")):
        summary = _split(Path(raw_dir), params, Path(out_dir), Path(summary_out))
        figures = {f"{s}_images": n for s, n in summary["totals"].items()}
        figures |= {
            "groups": summary["n_groups"]["total"],
            "dropped_rows": summary["duplicates"]["dropped"],
            "duplicate_sets": summary["duplicates"]["sets"],
            "source_splits_used": int(summary["source_splits"]["used"]),
        }
        if summary["imbalance_ratio"] is not None:
            figures["imbalance_ratio"] = summary["imbalance_ratio"]
        tracking.log_metrics(figures)
        tracking.log_artifact(str(summary_out))
    totals = summary["totals"]
    print(
        f"split: train {totals['train']}, val {totals['val']}, test {totals['test']} "
        f"({summary['n_groups']['total']} groups, {summary['duplicates']['dropped']} duplicate rows dropped)"
    )
    return summary


def _split(raw_dir: Path, params: SplitParams, out_dir: Path, summary_out: Path) -> dict:
    rows = read_csv(raw_dir / "manifest.csv")
    classes = read_json(raw_dir / "classes.json")
    plan = plan_splits(rows, params)
    summary = build_summary(rows, plan, classes, params)
    emptied = [c for c in classes if not any(summary["counts"][s][c] for s in SPLITS)]
    if emptied:  # only conflicting duplicates can empty a class the download stage found
        raise PipelineError(
            f"split: no images left for classes {emptied} after dropping conflicting duplicates"
        )
    dropped = [{"path": rows[i]["path"], "reason": reason} for i, reason in sorted(plan.dropped.items())]
    with atomic_dir(out_dir) as scratch:
        write_csv(scratch / "manifest.csv", output_rows(rows, plan), OUT_FIELDS)
        write_csv(scratch / "dropped.csv", dropped, DROPPED_FIELDS)
        write_json(scratch / "classes.json", classes)
    write_json(summary_out, summary)
    return summary
