"""Stratified assignment of items to train/val/test at configured fractions.

Two algorithms, both reproducible from a seed: an exact per-class cut when every
item stands alone, and a greedy placement of tied units (a patient's images, the
copies of one image) that keeps every class's share of each split near its fraction.
Neither knows where the items came from: :mod:`tlpipe.data.split_plan` decides
what is tied and what is drawn.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from tlpipe.core.config import SplitParams
from tlpipe.core.errors import PipelineError


def _apportion(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split ``n`` into integer parts, each the floor or ceiling of ``fraction * n`` (largest remainder)."""
    exact = [round(f * n, 9) for f in fractions]  # round: 0.29 * 100 is 28.999999999999996
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(fractions)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_fractions(params: SplitParams) -> dict[str, float]:
    # test first: it is cut first, so changing only val_fraction can keep it
    return {
        "test": params.test_fraction,
        "val": params.val_fraction,
        "train": 1.0 - params.val_fraction - params.test_fraction,
    }


def resplit_fractions(params: SplitParams) -> dict[str, float]:
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


def assign_exact(labels: list[str], fractions: Mapping[str, float], seed: int) -> list[str]:
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
        for name, size in zip(fractions, sizes, strict=True):
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
    return assign_exact(labels, split_fractions(params), params.seed)


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
    have: dict[str, Counter[str]] = {s: Counter() for s in fractions}
    for unit, split in split_of.items():
        have[split] += counts[unit]
    rest = sorted((u for u in shuffled if u not in split_of), key=lambda u: -sum(counts[u].values()))
    for unit in rest:
        split = min(fractions, key=lambda s: _placement_cost(counts[unit], have[s], target[s]))
        split_of[unit] = split
        have[split] += counts[unit]
    return [split_of[u] for u in range(len(counts))]
