"""The model card: what the model is for, what it was trained and measured on, and how far to trust it.

Written by the report stage as ``results/report/model_card.md`` and as a section of the
report; ``tlpipe promote`` sets it as the registered version's description, so whoever
picks the model from the registry reads it there.
"""

from __future__ import annotations

from collections.abc import Sequence

from tlpipe.core.config import Params
from tlpipe.report.page import Block, Heading, Paragraph

Card = list[tuple[str, list[str]]]  # (section title, its lines)


def _three(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def _where(threshold: dict) -> str:
    """Where the cut-off was chosen, in words (metrics.json's threshold ``chosen_on``)."""
    return {
        "oof": f"on {threshold.get('n_oof')} out-of-fold predictions over train+val",
        "val": "on val",
        "params": "in params",
        "fallback": f"as a fallback ({threshold.get('reason', 'no reason')})",
    }.get(str(threshold.get("chosen_on")), "on val")


def _with_ci(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    if value is None:
        return "n/a"
    interval = (metrics.get("ci") or {}).get(name)
    return f"{value:.3f}" + ("" if not interval else f" [{interval['low']:.3f}, {interval['high']:.3f}]")


def _data_lines(params: Params, summary: dict | None, data_digest: str) -> list[str]:
    data = params.data
    where = {"folder": data.folder.path, "csv": data.csv.file, "medmnist": data.medmnist.name or data.medmnist.path,
             "url": data.url.url, "demo": "generated shapes"}[data.source]  # fmt: skip
    lines = [f"Source: {data.source} ({where}); the augmented set's content hash: sha256 {data_digest}."]
    if summary:
        counts = summary.get("counts", {})
        lines += [
            f"{split}: " + ", ".join(f"{c} {n}" for c, n in per.items()) for split, per in counts.items()
        ]
        lines.append(
            f"Grouped by {summary.get('grouped_by', 'none')}: {summary.get('n_groups', {}).get('total')} groups."
        )
        overlap = (summary.get("source_splits") or {}).get("overlap") or {}
        if overlap.get("groups"):
            lines.append(
                f"The source's own splits share {overlap['groups']} groups ({overlap['test_images']} test images): "
                "kept as published, so the test figures may be optimistic."
            )
    return lines


def card_sections(metrics: dict, classes: Sequence[str], params: Params, summary: dict | None,
                  data_digest: str, commit: str) -> Card:  # fmt: skip
    """The card's sections, from the evaluation, the split summary and the params."""
    threshold = metrics.get("threshold") or {}
    calibration = metrics.get("calibration") or {}
    guard = metrics.get("guard") or {}
    shift = metrics.get("shift") or {}
    frozen, fine = params.train_frozen, params.fine_tune
    card: Card = [
        (
            "Intended use",
            [
                f"Sorting images into {', '.join(classes)} to help a qualified reader prioritise; every answer is "
                "to be checked by that reader.",
                "Not for: a diagnosis without a clinician; images unlike the training data (another hospital, age "
                "group, modality or scanner); images the unfamiliar-input guard flags.",
            ],
        ),
        ("Data", _data_lines(params, summary, data_digest)),
        (
            "Test performance at the operating point",
            [
                f"Operating point: {threshold.get('rule', 'argmax')}"
                + (
                    f", threshold {threshold['value']:.4f} chosen {_where(threshold)}"
                    if "value" in threshold
                    else ""
                )
                + ".",
                *(
                    f"{name}: {_with_ci(metrics, name)}"
                    for name in ("accuracy", "sensitivity", "specificity", "roc_auc", "macro_f1")
                    if metrics.get(name) is not None
                ),
                f"{metrics.get('n_test')} test images; 95% bootstrap intervals.",
            ],
        ),
        (
            "Calibration",
            [
                f"{calibration.get('method', 'none')}"
                + (
                    f" (T = {calibration['temperature']:.3g})"
                    if calibration.get("method") == "temperature"
                    else ""
                )
                + "; test ECE "
                f"{(calibration.get('before') or {}).get('ece', float('nan')):.3f} before, "
                f"{(calibration.get('after') or {}).get('ece', float('nan')):.3f} after.",
            ],
        ),
        (
            "Unfamiliar-input guard",
            [
                f"Flags {guard['test_flagged']:.1%} of test images; AUROC {guard['far']['auroc']:.3f} on far-away "
                f"images, {guard['near']['auroc']:.3f} on nearer ones."
                if guard.get("fitted")
                else "No guard: " + str(guard.get("reason", "not fitted")) + ".",
            ],
        ),
        (
            "Val and test",
            [
                f"Val sensitivity {_three(threshold.get('val_sensitivity'))}, "
                f"specificity {_three(threshold.get('val_specificity'))}; "
                f"test {_with_ci(metrics, 'sensitivity')} and {_with_ci(metrics, 'specificity')}."
                if threshold.get("chosen_on") in ("val", "oof")
                else "No val-chosen threshold.",
                shift.get("statement", "No val split to compare with."),
            ],
        ),
        (
            "Training",
            [
                f"{frozen.backbone} ({frozen.weights} weights) at {params.augment.image_size} px; head "
                f"{frozen.epochs} epochs at {frozen.learning_rate}, then fine-tuning {fine.unfreeze_blocks} blocks for "
                f"{fine.epochs} epochs at {fine.learning_rate} ({fine.schedule}).",
                f"Code: commit {commit}.",
            ],
        ),
    ]
    return card


def card_markdown(card: Card) -> str:
    parts = ["# Model card: tlpipe classifier"]
    for title, lines in card:
        parts.append(f"## {title}\n\n" + "\n".join(f"- {line}" for line in lines))
    return "\n\n".join(parts) + "\n"


def card_blocks(card: Card) -> list[Block]:
    blocks: list[Block] = []
    for title, lines in card:
        blocks += [Heading(title), *(Paragraph(line) for line in lines)]
    return blocks
