"""Measuring the unfamiliar-input guard: images the model should flag, built without any download.

* far away: crops of scikit-learn's two sample photographs (a temple, a flower) and the
  demo set's shapes on clutter, nothing like any medical image;
* nearer: the test images themselves with their grey values inverted and turned a
  quarter, the same modality gone wrong (a MONOCHROME1 file read as MONOCHROME2, a
  scan rotated on upload).

The guard's AUROC against each set, and the share of each it flags, go to metrics.json.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

FAR_PHOTO_CROPS = 24  # per sample photograph
FAR_SHAPES = 24
NEAR_IMAGES = 64  # test images transformed


def far_images(size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) raw 0..255 pixels: photograph crops and demo shapes."""
    from sklearn.datasets import load_sample_images

    from tlpipe.data.demo import render_demo_image

    rng = np.random.default_rng(seed)
    images = []
    for photo in load_sample_images().images:
        height, width = photo.shape[:2]
        for _ in range(FAR_PHOTO_CROPS):
            side = int(rng.integers(min(height, width) // 4, min(height, width)))
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            crop = Image.fromarray(photo[top : top + side, left : left + side])
            images.append(np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)))
    kinds = ("circle", "square", "triangle", "cross")
    images += [np.asarray(render_demo_image(kinds[k % 4], size, rng)) for k in range(FAR_SHAPES)]
    return np.stack(images).astype(np.float32)


def near_images(test_pixels: np.ndarray) -> np.ndarray:
    """Test images inverted and turned a quarter: the right modality, wrongly read."""
    return np.rot90(255.0 - np.asarray(test_pixels, dtype=np.float32), k=1, axes=(1, 2)).copy()


def separation(in_scores: np.ndarray, out_scores: np.ndarray, cutoff: float) -> dict:
    """How well the guard's scores tell the unfamiliar images from the test split, and what it flags."""
    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return {
        "n": len(out_scores),
        "auroc": float(roc_auc_score(labels, np.r_[in_scores, out_scores])),
        "flagged": float(np.mean(np.asarray(out_scores) > cutoff)),
    }
