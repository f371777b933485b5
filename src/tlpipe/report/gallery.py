"""Test images in the report: the most confident mistakes and Grad-CAM panels of a sample.

Images are read from the augmented data by their predictions.csv path and shrunk to
thumbnails, so the self-contained page stays small.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tlpipe.core.errors import PipelineError
from tlpipe.core.images import png_data_uri
from tlpipe.model.gradcam import gradcam_maps, overlay
from tlpipe.report.inputs import is_float
from tlpipe.report.page import Block, CamPanel, CamPanels, Card, Figure, Gallery, Paragraph, Prediction

logger = logging.getLogger(__name__)

GALLERY_SIZE = 12  # most confident mistakes shown
GRADCAM_CORRECT = 4  # Grad-CAM sample: correct and wrong test images, explained in one batch
GRADCAM_WRONG = 4
GRADCAM_BATCH = 16
THUMBNAIL_SIDE = 128  # px; larger images are scaled down so the HTML stays small

GRADCAM_NOTE = (
    "Grad-CAM colours the regions whose features raised the model's score for the named class "
    "(red: most). It shows where the model looked, not whether it was right. With two classes the "
    "model has one output, so evidence for one class is evidence against the other: the map for "
    "the class it did not pick is often empty ('no evidence')."
)


def probability(row: dict[str, str], cls: str) -> float:
    """The row's probability for ``cls``; NaN when predictions.csv has no such number."""
    value = row.get(f"p_{cls}")
    return float(value) if value is not None and is_float(value) else math.nan


def _confidence(row: dict[str, str]) -> float:
    value = probability(row, row["predicted"])
    return -1.0 if math.isnan(value) else value


def confident_mistakes(rows: Iterable[dict[str, str]], n: int) -> list[dict[str, str]]:
    """The ``n`` wrong predictions with the highest probability for the predicted class."""
    wrong = [r for r in rows if r.get("label") != r.get("predicted")]
    return sorted(wrong, key=_confidence, reverse=True)[:n]


def confident_hits(rows: Iterable[dict[str, str]], n: int) -> list[dict[str, str]]:
    """Up to ``n`` right predictions, the most confident of each true class in turn."""
    by_class: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        if row.get("label") == row.get("predicted"):
            by_class.setdefault(row["label"], []).append(row)
    queues = [sorted(rs, key=_confidence, reverse=True) for _, rs in sorted(by_class.items())]
    picked = []
    for rank in range(max((len(q) for q in queues), default=0)):
        picked += [q[rank] for q in queues if rank < len(q)]
    return picked[:n]


def read_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """An image as uint8 RGB, resized to (height, width) when given; None when unreadable."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if size is not None and rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(rgb)
    except (OSError, ValueError):  # missing or not an image: that card says so instead
        return None


def thumbnail(array: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """Scaled down to at most ``side`` px; small images stay as they are (the page scales them up)."""
    img = Image.fromarray(array)
    img.thumbnail((side, side), Image.Resampling.BILINEAR)
    return np.asarray(img)


def prediction(row: dict[str, str]) -> Prediction:
    """A test image's caption: true class, predicted class and the probability given to it."""
    p = probability(row, row["predicted"])
    return Prediction(row["label"], row["predicted"], "n/a" if math.isnan(p) else f"{p:.3f}")


def image_figure(pixels: np.ndarray, row: dict[str, str]) -> Figure:
    """A test image as a thumbnail, named by its path in the alt text."""
    return Figure(f"test image {row['path']}", png_data_uri(thumbnail(pixels)), "thumb")


def mistake_cards(rows: list[dict[str, str]], augmented_dir: Path | None) -> Gallery:
    """A card per mistake: its thumbnail (or "image not found") and what was predicted."""
    cards = []
    for row in rows:
        pixels = None if augmented_dir is None else read_rgb(Path(augmented_dir) / row["path"])
        picture = None if pixels is None else image_figure(pixels, row)
        cards.append(Card(picture, prediction(row), "image not found"))
    return Gallery(cards)


def mistakes_blocks(predictions: list[dict[str, str]], augmented_dir: Path | None) -> list[Block]:
    """The "Most confident mistakes" section, or why it is empty."""
    mistakes = confident_mistakes(predictions, GALLERY_SIZE)
    if mistakes:
        return [mistake_cards(mistakes, augmented_dir)]
    return [Paragraph("No mistakes on the test split." if predictions else "No per-image predictions found.")]


@dataclass(frozen=True)
class ExplainedImage:
    row: dict[str, str]
    outcome: str  # "correct" or "wrong"
    image: np.ndarray  # uint8 RGB at the model's input size
    maps: list[tuple[str, np.ndarray]]  # (explained class, heatmap in [0, 1])


def explain(
    model_path: Path, augmented_dir: Path, sample: list[tuple[str, dict]], classes: list[str]
) -> list[ExplainedImage]:
    """Grad-CAM maps for each sampled image: its predicted class and, when wrong, its true class."""
    from tlpipe.model.storage import load_model  # TensorFlow loads the model; only this section needs it

    model = load_model(model_path)
    dims = model.input_shape[1:3]
    # images are resized to what the model takes; one taking any size gets them as they are
    size = None if None in dims else (int(dims[0]), int(dims[1]))
    index = {c: i for i, c in enumerate(classes)}
    kept = []
    for outcome, row in sample:
        pixels = read_rgb(Path(augmented_dir) / row["path"], size)
        if pixels is not None and row["label"] in index and row["predicted"] in index:
            kept.append((outcome, row, pixels))
    if not kept:
        return []
    targets = [(k, row["predicted"]) for k, (_, row, _) in enumerate(kept)]
    targets += [(k, row["label"]) for k, (_, row, _) in enumerate(kept) if row["label"] != row["predicted"]]
    images = np.stack([kept[k][2] for k, _ in targets]).astype(np.float32)
    maps = gradcam_maps(model, images, np.array([index[c] for _, c in targets]), batch_size=GRADCAM_BATCH)
    explained: dict[int, list[tuple[str, np.ndarray]]] = {}
    for (k, cls), heat in zip(targets, maps, strict=True):
        explained.setdefault(k, []).append((cls, heat))
    return [
        ExplainedImage(row, outcome, pixels, explained[k]) for k, (outcome, row, pixels) in enumerate(kept)
    ]


def cam_card(image: np.ndarray, cls: str, heat: np.ndarray, role: str) -> Card:
    """The Grad-CAM overlay for one class, captioned with its role ("evidence for predicted ...")."""
    # an all-zero map: nothing pushed this class's score up (one sigmoid unit: often the unpicked class)
    picture = None
    if heat.max() > 0:
        picture = Figure(f"Grad-CAM for {cls}", png_data_uri(thumbnail(overlay(image, heat))), "thumb")
    return Card(picture, f"{role} {cls}", "no evidence")


def cam_panels(explained: list[ExplainedImage]) -> CamPanels:
    """One panel per image: the image and its prediction, then a map per explained class."""
    panels = []
    for item in explained:
        cards = [Card(image_figure(item.image, item.row), prediction(item.row))]
        for cls, heat in item.maps:
            role = "evidence for predicted" if cls == item.row["predicted"] else "evidence for true"
            cards.append(cam_card(item.image, cls, heat, role))
        panels.append(CamPanel(item.outcome, cards))
    return CamPanels(panels)


def gradcam_blocks(
    rows: list[dict[str, str]], model_path: Path | None, augmented_dir: Path | None, classes: list[str]
) -> list[Block]:
    """The Grad-CAM section: panels of confident hits and mistakes, or why there are none."""
    if not rows or model_path is None or augmented_dir is None:
        return [Paragraph("No per-image predictions or no model: nothing to explain.")]
    sample = [("correct", r) for r in confident_hits(rows, GRADCAM_CORRECT)]
    sample += [("wrong", r) for r in confident_mistakes(rows, GRADCAM_WRONG)]
    try:
        explained = explain(Path(model_path), Path(augmented_dir), sample, classes)
    except (PipelineError, ValueError, FileNotFoundError) as err:  # a model Grad-CAM cannot take apart
        logger.warning("report: warning: no Grad-CAM: %s", err)
        return [Paragraph(f"Grad-CAM could not be computed: {err}")]
    if not explained:
        return [Paragraph("None of the sampled test images could be read: nothing to explain.")]
    return [Paragraph(GRADCAM_NOTE, "note"), cam_panels(explained)]
