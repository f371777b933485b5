"""The demo source: deterministic synthetic shapes, ingested like any other source."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestCentroid

from tlpipe.core.config import DataParams, DemoParams
from tlpipe.core.files import MANIFEST_FIELDS, read_csv, read_json
from tlpipe.data.demo import DEMO_CLASSES, demo_candidates
from tlpipe.data.sources import candidates_for, ingest


def _demo(tmp_path: Path, name: str = "raw", **demo) -> Path:
    params = DataParams(demo=DemoParams(**{"images_per_class": 4, "image_size": 32, **demo}))
    ingest(candidates_for(params), params, tmp_path / name)
    return tmp_path / name


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_is_deterministic_per_seed(tmp_path):
    shas = {
        name: [r["sha256"] for r in read_csv(_demo(tmp_path, name, seed=s) / "manifest.csv")]
        for name, s in (("a", 0), ("b", 0), ("c", 1))
    }
    assert shas["a"] == shas["b"]
    assert len(set(shas["a"])) == len(shas["a"])  # no two images alike
    assert shas["a"] != shas["c"]
    assert not set(shas["a"]) & set(shas["c"])


def test_demo_classes_counts_and_sizes(tmp_path):
    raw = _demo(tmp_path, images_per_class=5, image_size=24)
    rows = read_csv(raw / "manifest.csv")
    classes = read_json(raw / "classes.json")
    assert len(classes) >= 3
    assert classes == sorted(DEMO_CLASSES)
    assert {c: sum(r["label"] == c for r in rows) for c in classes} == dict.fromkeys(classes, 5)
    assert read_csv(raw / "quarantine.csv") == []
    for row in rows:
        assert list(row)[: len(MANIFEST_FIELDS)] == list(MANIFEST_FIELDS)
        assert (row["width"], row["height"]) == ("24", "24")
        with Image.open(raw / row["path"]) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (24, 24))
        assert _sha(raw / row["path"]) == row["sha256"]


def _demo_features(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cands = list(demo_candidates(DemoParams(images_per_class=60, image_size=32, seed=seed)))
    pixels = [np.asarray(c.open(), dtype=np.float64) / 255 for c in cands]
    mean_rgb = np.array([p.reshape(-1, 3).mean(axis=0) for p in pixels])
    thumbs = np.array([p.reshape(4, 8, 4, 8, 3).mean(axis=(1, 3)).ravel() for p in pixels])  # 4x4 boxes
    return mean_rgb, thumbs, np.array([c.label for c in cands])


def test_demo_is_not_separable_by_colour_or_thumbnails():
    """Colour and coarse layout must not give the class away: the shape has to be learnt.

    Measured (seed 0, 60 images per class, 32 px, half held out; chance is 0.25):
    nearest centroid on mean RGB 0.24, logistic regression on 4x4 thumbnails 0.25.
    The positive control below (a 40 % class tint) reaches 1.0 with the same probe.
    """
    mean_rgb, thumbs, labels = _demo_features(seed=0)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.5, stratify=labels, random_state=0)
    centroid = NearestCentroid().fit(mean_rgb[train], labels[train]).score(mean_rgb[test], labels[test])
    logistic = LogisticRegression(max_iter=1000).fit(thumbs[train], labels[train])
    thumb_acc = logistic.score(thumbs[test], labels[test])
    assert centroid < 0.5, centroid
    assert thumb_acc < 0.5, thumb_acc

    # positive control: the probe does catch a colour leak when there is one
    palette = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=np.float64)
    tinted = 0.6 * mean_rgb + 0.4 * palette[np.searchsorted(sorted(DEMO_CLASSES), labels)]
    leak = NearestCentroid().fit(tinted[train], labels[train]).score(tinted[test], labels[test])
    assert leak > 0.9, leak
