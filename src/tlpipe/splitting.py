"""Stratified train/val/test splits of the download manifest."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sklearn.model_selection import train_test_split

from tlpipe import tracking
from tlpipe.config import SplitParams, section_dict
from tlpipe.errors import PipelineError
from tlpipe.manifest import atomic_dir, read_csv, read_json, write_csv, write_json

SPLITS = ("train", "val", "test")


def _check_stratifiable(labels: list[str], fraction: float, what: str) -> None:
    counts = Counter(labels)
    if len(counts) < 2:
        raise PipelineError(f"split: need at least 2 classes, found {sorted(counts)}")
    n_take = fraction * len(labels)
    if fraction > 0 and n_take < len(counts):
        raise PipelineError(
            f"split: {what} would hold {n_take:.1f} images, fewer than the {len(counts)} classes; "
            f"raise split.{what}_fraction or add images"
        )
    thin = {c: n for c, n in counts.items() if n < 3}
    if thin:
        raise PipelineError(f"split: too few images to stratify these classes (need >= 3 each): {thin}")


def assign_splits(labels: list[str], params: SplitParams) -> list[str]:
    """A split name for each item, stratified by label and reproducible from the seed."""
    split_of = ["train"] * len(labels)
    _check_stratifiable(labels, params.test_fraction, "test")
    rest, test = train_test_split(
        list(range(len(labels))),
        test_size=params.test_fraction,
        stratify=labels,
        random_state=params.seed,
    )
    rest_labels = [labels[i] for i in rest]
    val_share = params.val_fraction / (1.0 - params.test_fraction)
    _check_stratifiable(rest_labels, val_share, "val")
    _, val = train_test_split(rest, test_size=val_share, stratify=rest_labels, random_state=params.seed)
    for i in test:
        split_of[i] = "test"
    for i in val:
        split_of[i] = "val"
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
