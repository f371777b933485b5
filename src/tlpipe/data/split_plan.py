"""Leak-free placement of the download manifest's rows: the split of each, or why it is dropped.

Three things would put the same information on both sides of a split, and each is
dealt with before a row is placed:

* groups: images of one patient or lesion (``split.group_pattern`` on the file name,
  else the manifest's ``group`` column) always land in one split;
* exact duplicates (equal sha256 of the decoded pixels) never sit in two splits
  (``split.duplicates``), and copies that disagree on the label are dropped;
* a source that brings its own splits is kept as given (or its train+val re-split),
  and a group the source itself puts in two splits is an error, unless
  ``split.source_split_overlap: warn`` keeps them as given and counts the overlap.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tlpipe.core.config import SplitParams
from tlpipe.core.constants import SPLITS
from tlpipe.core.errors import PipelineError
from tlpipe.data.stratification import assign_exact, assign_group_splits, resplit_fractions, split_fractions

CONFLICT = "conflicting_labels"  # copies of one image with different labels: all dropped
DUPLICATE = "duplicate"  # keep_one: a copy after the first
LATER_COPY = "duplicate_in_later_split"  # keep_first_split: a copy in a later split than another
_SHOWN = 5  # offending names quoted in an error message


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
    # groups the source itself puts in more than one split (kept as given under
    # split.source_split_overlap: warn): group id -> the splits it sits in
    overlap: dict[str, list[str]] = field(default_factory=dict)


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
        matched = [m.group(1) if m else None for m in found]
        # an unmatched image would silently stand alone and could sit beside its own group's split
        unmatched = [n for n, g in zip(names, matched, strict=True) if not g]
        if unmatched:
            raise PipelineError(
                f"split: split.group_pattern '{pattern}' finds no group in {len(unmatched)} of {len(rows)} "
                f"file names ({name_forms(unmatched)}); every image needs one: widen the pattern "
                "to cover these forms (alternatives with |)"
            )
        return [str(g) for g in matched], "group_pattern"
    ids = [(r.get("group") or "").strip() for r in rows]
    return ids, ("group_column" if any(ids) else "none")


def name_forms(names: Sequence[str]) -> str:
    """File names summarised by form (digits as N), the commonest first, each with an example."""
    forms: dict[str, list[str]] = defaultdict(list)
    for name in names:
        forms[re.sub(r"\d+", "N", name)].append(name)
    ranked = sorted(forms.items(), key=lambda kv: -len(kv[1]))
    return ", ".join(f"{len(v)} like {v[0]}" for _, v in ranked[:_SHOWN])


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
    missing = [r["path"] for r, v in zip(rows, values, strict=True) if not v]
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


def shared_groups(zones: Mapping[int, str], groups: Sequence[str]) -> dict[str, list[str]]:
    """Groups whose rows sit in more than one zone, with those zones in pipeline order."""
    seen: dict[str, set[str]] = defaultdict(set)
    for i, zone in zones.items():
        if groups[i]:
            seen[groups[i]].add(zone)
    return {g: sorted(z, key=_ZONES.index) for g, z in sorted(seen.items()) if len(z) > 1}


def _check_overlap(crossing: Mapping[str, list[str]], params: SplitParams) -> None:
    if not crossing or params.source_split_overlap == "warn":
        return
    shown = ", ".join(f"{g!r} ({' and '.join(z)})" for g, z in list(crossing.items())[:_SHOWN])
    hint = ""
    if params.source_splits == "keep" and all("test" not in z for z in crossing.values()):
        hint = "; split.source_splits: resplit_train_val would re-split train+val by group"
    raise PipelineError(
        f"split: the source's own splits leak: {len(crossing)} group(s) sit in more than one split, "
        f"e.g. {shown}{hint}. To keep the source's splits anyway (an official test split, say), set "
        "split.source_split_overlap: warn; the overlap is then counted in the split summary and report"
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
        return assign_exact([labels[i] for i in free], fractions, seed)
    unit_splits = assign_group_splits([[labels[free[k]] for k in unit] for unit in units], fractions, seed)
    drawn = [""] * len(free)
    for unit, split in zip(units, unit_splits, strict=True):
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
    ranks = [0] * len(rows) if given is None else _duplicate_ranks(given, params.source_splits)
    sets = find_duplicate_sets(shas)
    dropped = duplicate_drops(sets, labels, ranks, params.duplicates)
    kept = [i for i in range(len(rows)) if i not in dropped]

    splits = [""] * len(rows)
    overlap: dict[str, list[str]] = {}
    if given is None:
        free, fractions = kept, split_fractions(params)
    else:
        redrawn = {i for i in kept if mode == "resplit_train_val" and given[i] != "test"}
        overlap = shared_groups({i: "train+val" if i in redrawn else given[i] for i in kept}, groups)
        _check_overlap(overlap, params)
        for i in kept:
            splits[i] = "" if i in redrawn else given[i]
        free, fractions = sorted(redrawn), resplit_fractions(params)
    if free:
        for i, split in zip(free, _draw(free, labels, groups, shas, fractions, params.seed), strict=True):
            splits[i] = split

    _check_result(rows, splits, given)
    conflicts = [s for s in sets if dropped.get(s[0]) == CONFLICT]
    return SplitPlan(splits, groups, dropped, sets, conflicts, grouped_by, mode, overlap)


def _check_result(rows: Sequence[Mapping[str, str]], splits: list[str], given: list[str] | None) -> None:
    kept_labels = {r["label"] for r, s in zip(rows, splits, strict=True) if s}
    if len(kept_labels) < 2:  # the drawn splits check this first; kept source splits and drops do not
        raise PipelineError(f"split: need at least 2 classes, found {sorted(kept_labels)}")
    for name in SPLITS:
        if name not in splits:
            hint = ""
            if given is not None and name == "val" and "val" not in given:
                hint = "; the source brings no val split: split.source_splits: resplit_train_val draws one"
            raise PipelineError(f"split: the {name} split is empty{hint}")
