"""The "Dataset" section: images per class and split, what the split dropped, what was quarantined."""

from __future__ import annotations

from tlpipe.report.page import Block, Heading, Paragraph, Table

QUARANTINE_SHOWN = 20


def split_table(summary: dict) -> list[list[str]] | None:
    """Images per class (rows) and split (columns), with totals."""
    counts = summary.get("counts")
    if not isinstance(counts, dict) or not counts:
        return None
    splits = list(counts)
    classes = summary.get("classes") or sorted({c for per in counts.values() for c in per})
    rows = [["class", *splits, "total"]]
    for cls in classes:
        values = [int(counts[s].get(cls, 0)) for s in splits]
        rows.append([cls, *map(str, values), str(sum(values))])
    totals = [sum(int(v) for v in counts[s].values()) for s in splits]
    rows.append(["all", *map(str, totals), str(sum(totals))])
    return rows


def split_notes(summary: dict) -> list[str]:
    """What the split summary says beyond the counts, a sentence each."""
    notes = []
    duplicates = summary.get("duplicates") or {}
    if "rows_in" in summary and "total" in summary:
        notes.append(f"{summary['rows_in']} images after download; {summary['total']} kept by the split.")
    if duplicates.get("dropped"):
        notes.append(
            f"{duplicates['dropped']} duplicate images dropped ({duplicates.get('sets', '?')} sets of "
            f"identical pixels; {duplicates.get('conflicting_sets', 0)} with conflicting labels)."
        )
    overlap = (summary.get("source_splits") or {}).get("overlap") or {}
    if overlap.get("groups"):
        notes.append(overlap_warning(overlap))
    elif summary.get("grouped_by") not in (None, "none"):
        notes.append(f"Grouped by {summary['grouped_by']}: no group spans two splits.")
    if summary.get("imbalance_ratio") is not None:
        notes.append(f"Largest / smallest training class: {summary['imbalance_ratio']}.")
    note = (summary.get("source_splits") or {}).get("note")
    if note:
        notes.append(f"Splits: {note}.")
    return notes


def overlap_warning(overlap: dict) -> str:
    """The source's splits share groups, kept as given (split.source_split_overlap: warn)."""
    return (
        f"Caution: the source's own splits share {overlap['groups']} group(s) (e.g. a patient), kept as given "
        f"(split.source_split_overlap: warn); {overlap.get('test_images', '?')} test images belong to a "
        "group that is also in train or val, so the test figures may be optimistic."
    )


def data_cautions(summary: dict | None) -> list[str]:
    """Warnings about the data that must travel with the results (the CI job summary shows them)."""
    overlap = ((summary or {}).get("source_splits") or {}).get("overlap") or {}
    return [overlap_warning(overlap)] if overlap.get("groups") else []


def quarantine_blocks(rows: list[dict[str, str]]) -> list[Block]:
    """The first QUARANTINE_SHOWN rejected files with their reasons, and how many more there are."""
    if not rows:
        return [Paragraph("No input files were quarantined.")]
    shown = [["file", "reason"]] + [[r.get("path", ""), r.get("reason", "")] for r in rows[:QUARANTINE_SHOWN]]
    blocks: list[Block] = [
        Paragraph(f"Input files rejected by the download stage, so not used: {len(rows)}."),
        Table(shown),
    ]
    more = len(rows) - QUARANTINE_SHOWN
    if more > 0:
        blocks.append(Paragraph(f"... and {more} more in quarantine.csv."))
    return blocks


def dataset_blocks(summary: dict | None, quarantined: list[dict[str, str]]) -> list[Block]:
    """The split table (or that there is none), its notes, then the quarantined files."""
    table = None if summary is None else split_table(summary)
    blocks: list[Block] = [Table(table) if table else Paragraph("No split summary found.")]
    blocks += [Paragraph(note) for note in ([] if summary is None else split_notes(summary))]
    return [*blocks, Heading("Quarantined files"), *quarantine_blocks(quarantined)]
