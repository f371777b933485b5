"""Stratified train/val/test splits of the download manifest."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from tlpipe import tracking
from tlpipe.config import SplitParams, section_dict
from tlpipe.errors import PipelineError
from tlpipe.manifest import atomic_dir, read_csv, read_json, write_csv, write_json

SPLITS = ("train", "val", "test")


def _apportion(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split ``n`` into integer parts, each the floor or ceiling of ``fraction * n`` (largest remainder)."""
    exact = [round(f * n, 9) for f in fractions]  # round: 0.29 * 100 is 28.999999999999996
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(fractions)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _check_splittable(labels: list[str], fractions: dict[str, float]) -> None:
    counts = Counter(labels)
    if len(counts) < 2:
        raise PipelineError(f"split: need at least 2 classes, found {sorted(counts)}")
    thin = {c: n for c, n in counts.items() if n < len(SPLITS)}
    if thin:
        raise PipelineError(f"split: too few images to stratify these classes (need >= 3 each): {thin}")
    for name, fraction in fractions.items():
        expected = fraction * len(labels)
        if expected < len(counts):
            fix = (
                "lower split.val_fraction or split.test_fraction"
                if name == "train"
                else f"raise split.{name}_fraction"
            )
            raise PipelineError(
                f"split: {name} would hold {expected:.1f} images, fewer than the {len(counts)} classes; "
                f"{fix} or add images"
            )


def assign_splits(labels: list[str], params: SplitParams) -> list[str]:
    """A split name for each item, stratified by label and reproducible from the seed.

    Each class is shuffled and cut by itself, so its share of every split is within
    one image of the configured fraction; and every class has at least one image in
    every split, which takes precedence for tiny classes (a class of 3 gives one to
    each). Test images are cut first, so changing only ``val_fraction`` keeps the test
    split whenever its per-class sizes stay the same.
    """
    fractions = {
        "test": params.test_fraction,
        "val": params.val_fraction,
        "train": 1.0 - params.val_fraction - params.test_fraction,
    }
    _check_splittable(labels, fractions)
    rng = np.random.default_rng(params.seed)
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


def count_by_split(rows: list[dict], classes: list[str]) -> dict[str, dict[str, int]]:
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    for row in rows:
        counts[row["split"]][row["label"]] += 1
    return counts


def split_dataset(raw_dir: Path, params: SplitParams, out_dir: Path) -> dict:
    """The split stage: add a ``split`` column to the manifest; record the class order."""
    with tracking.stage_run("split", section_dict(params, "split")):
        summary = _split(raw_dir, params, out_dir)
        sizes = {s: sum(summary["counts"][s].values()) for s in SPLITS}
        tracking.log_metrics({f"{s}_images": n for s, n in sizes.items()})
        tracking.log_artifact(str(Path(out_dir) / "summary.json"))
    print(f"split: train {sizes['train']}, val {sizes['val']}, test {sizes['test']}")
    return summary


def _split(raw_dir: Path, params: SplitParams, out_dir: Path) -> dict:
    rows = read_csv(Path(raw_dir) / "manifest.csv")
    classes = read_json(Path(raw_dir) / "classes.json")
    splits = assign_splits([r["label"] for r in rows], params)
    out_rows = [
        {"path": r["path"], "label": r["label"], "sha256": r["sha256"], "split": s}
        for r, s in zip(rows, splits)
    ]
    for name in SPLITS:
        if not any(r["split"] == name for r in out_rows):
            raise PipelineError(f"split: the {name} split is empty")
    summary = {"classes": classes, "counts": count_by_split(out_rows, classes), "total": len(out_rows)}
    with atomic_dir(Path(out_dir)) as scratch:
        write_csv(scratch / "manifest.csv", out_rows, ("path", "label", "sha256", "split"))
        write_json(scratch / "classes.json", classes)
        write_json(scratch / "summary.json", summary)
    return summary
