"""Manifest rows and fraction helpers shared by the split tests (stratification, plan, stage)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

KERMANY = r"^person(\d+)_"  # anchored: it must see the file name, not the class folder before it


def manifest_row(
    i: int, label: str, *, source: str = "", group: str = "", split: str = "", sha: str = ""
) -> dict:
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


def kermany_rows(n_patients: int = 30, seed: int = 0, classes: str = "bacteria virus normal") -> list[dict]:
    """Patients with 1-6 images each, one label per patient, named like Kermany's chest X-rays."""
    rng = np.random.default_rng(seed)
    names = classes.split()
    rows: list[dict] = []
    for p in range(n_patients):
        label = names[p % len(names)]
        for i in range(int(rng.integers(1, 7))):
            rows.append(manifest_row(len(rows), label, source=f"{label}/person{p}_{label}_{i}.jpeg"))
    order = rng.permutation(len(rows))  # a real manifest interleaves patients
    return [rows[k] for k in order]


def patient_id(row: dict) -> str:
    return row["source"].split("person")[1].split("_")[0]


def interleaved_labels(counts: dict[str, int]) -> list[str]:
    """Labels interleaved (a, b, c, a, b, ...), as a real manifest would not be sorted by class."""
    out: list[str] = []
    for i in range(max(counts.values())):
        out += [c for c, n in counts.items() if i < n]
    return out


def given_rows(layout: dict[str, dict[str, int]], first: int = 0) -> list[dict]:
    """Rows carrying the source's own split, e.g. {"train": {"a": 3}, "test": {"a": 1}}."""
    rows = []
    for split, counts in layout.items():
        for label in interleaved_labels(counts):
            rows.append(manifest_row(first + len(rows), label, split=split))
    return rows


def fractions_of(val: float, test: float) -> dict[str, float]:
    return {"train": 1 - val - test, "val": val, "test": test}


def stratifiable(counts: dict[str, int], fractions: dict[str, float]) -> bool:
    """Every class in every split is possible: two classes or more, three images each, and
    every split big enough to hold one image of each class."""
    n = sum(counts.values())
    enough_each = min(counts.values()) >= len(fractions)
    return len(counts) >= 2 and enough_each and all(f * n >= len(counts) for f in fractions.values())


FRACTION = st.floats(0.02, 0.45)
