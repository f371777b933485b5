"""The report's inputs, read defensively: a file the evaluate stage did not write gives nothing.

A missing curve, history or summary hides its item in the report instead of failing
the stage, so every reader here returns an empty value for a file that is not there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tlpipe.core.files import read_csv, read_json


def is_float(text: str | None) -> bool:
    """Whether a CSV cell holds a number (an empty or missing cell does not)."""
    if text is None:
        return False
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def history(path: Path) -> list[dict[str, float]]:
    """A training history CSV, its numeric cells only; [] when the file is missing."""
    if not Path(path).exists():
        return []
    return [{k: float(v) for k, v in row.items() if is_float(v)} for row in read_csv(path)]


def numeric_rows(path: Path, fields: Sequence[str]) -> list[dict[str, float]]:
    """Rows of a CSV with the given numeric fields; rows lacking one are left out."""
    if not Path(path).is_file():
        return []
    rows = read_csv(path)
    return [{f: float(r[f]) for f in fields} for r in rows if all(is_float(r.get(f)) for f in fields)]


def load_curves(folder: Path, fields: tuple[str, str]) -> dict[str, list[dict[str, float]]]:
    """One curve per class, from ``folder/<class>.csv``; a missing folder gives none."""
    if not Path(folder).is_dir():
        return {}
    curves = {p.stem: numeric_rows(p, fields) for p in sorted(Path(folder).glob("*.csv"))}
    return {cls: points for cls, points in curves.items() if points}


def optional_json(path: Path | None) -> object | None:
    """A JSON file's content, or None when no path is given or the file is missing."""
    if path is None or not Path(path).is_file():
        return None
    return read_json(path)


def optional_rows(path: Path | None) -> list[dict[str, str]]:
    """A CSV file's rows, or [] when no path is given or the file is missing."""
    if path is None or not Path(path).is_file():
        return []
    return read_csv(path)


def class_names(metrics: dict, augmented_dir: Path | None) -> list[str]:
    """The model's class order: classes.json of the augmented data, else the per-class block's."""
    listed = optional_json(None if augmented_dir is None else Path(augmented_dir) / "classes.json")
    return list(listed) if isinstance(listed, list) else list(metrics.get("per_class", {}))
