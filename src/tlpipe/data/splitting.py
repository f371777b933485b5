"""The split stage: the download manifest with a split and a group for every row, and a summary.

Where each row goes is decided by :func:`tlpipe.data.split_plan.plan_splits`; this
module reads the download stage's output, writes ``manifest.csv``, ``dropped.csv``
and ``classes.json`` together, and summarises the result for DVC and MLflow.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from tlpipe.core import tracking
from tlpipe.core.config import SplitParams, section_dict
from tlpipe.core.constants import SPLITS
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import atomic_dir, read_csv, read_json, write_csv, write_json
from tlpipe.data.split_plan import CONFLICT, DUPLICATE, LATER_COPY, SplitPlan, plan_splits

logger = logging.getLogger(__name__)

OUT_FIELDS = ("path", "label", "sha256", "split", "group")
DROPPED_FIELDS = ("path", "reason")
_SHOWN_CONFLICTS = 20  # conflict sets listed in the summary (all are in dropped.csv)
_SHOWN_OVERLAP = 10  # groups shared across the source's splits, named in the summary


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
    "keep": ("group_pattern", "duplicates", "source_splits", "source_split_overlap"),
    "resplit_train_val": (
        "val_fraction",
        "seed",
        "group_pattern",
        "duplicates",
        "source_splits",
        "source_split_overlap",
    ),
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
            "overlap": overlap_summary(out_rows, plan),
        },
        "params": {k: getattr(params, k) for k in _USED_PARAMS[plan.source_splits]},
    }


def overlap_summary(out_rows: Sequence[Mapping[str, str]], plan: SplitPlan) -> dict:
    """How far the source's own splits share groups (patients) that were kept as given."""
    shared = plan.overlap
    in_shared = [r for r in out_rows if r["group"] in shared]
    return {
        "groups": len(shared),
        "images": len(in_shared),
        "test_images": sum(r["split"] == "test" for r in in_shared),
        "examples": {g: shared[g] for g in list(shared)[:_SHOWN_OVERLAP]},
    }


def output_rows(raw_rows: Sequence[Mapping[str, str]], plan: SplitPlan) -> list[dict]:
    return [
        {"path": r["path"], "label": r["label"], "sha256": r["sha256"], "split": s, "group": g}
        for r, s, g in zip(raw_rows, plan.splits, plan.groups, strict=True)
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
            "source_split_overlap_groups": summary["source_splits"]["overlap"]["groups"],
            "source_split_overlap_test_images": summary["source_splits"]["overlap"]["test_images"],
        }
        if summary["imbalance_ratio"] is not None:
            figures["imbalance_ratio"] = summary["imbalance_ratio"]
        tracking.log_metrics(figures)
        tracking.log_artifact(str(summary_out))
    overlap = summary["source_splits"]["overlap"]
    if overlap["groups"]:
        logger.warning(
            f"split: the source's own splits share {overlap['groups']} group(s) "
            f"({overlap['test_images']} test images belong to a group also in train or val); kept as "
            "given (split.source_split_overlap: warn), so test results may be optimistic"
        )
    totals = summary["totals"]
    logger.info(
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
