"""A tiny augmented-stage output folder (manifest.csv + classes.json + PNGs) for model-side tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

# a distinct base colour per class, so a head on any features can separate them
_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 210, 40]])


def make_augmented(
    root: Path, classes: list[str], counts: dict[str, int], size: int = 32, seed: int = 0
) -> Path:
    """``counts[split]`` images per class per split, as the augment stage lays them out."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in counts.items():
        for index, label in enumerate(classes):
            for k in range(n):
                rel = f"{split}/{label}/{label}__{k:03d}.png"
                noise = rng.integers(-30, 31, (size, size, 3))
                pixels = np.clip(_COLOURS[index] + noise, 0, 255).astype(np.uint8)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / rel)
                rows.append(
                    {"path": rel, "label": label, "label_index": index, "split": split, "source": rel}
                )
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "label_index", "split", "source"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "classes.json").write_text(json.dumps(classes))
    return root
