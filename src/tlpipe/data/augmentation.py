"""Materialised training augmentations, built with albumentations from params.

Training images are written once resized plus ``copies`` augmented variants;
val and test images are only resized. A fixed seed makes the output
byte-for-byte reproducible.
"""

from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A  # tlpipe/__init__.py turns off its update check first
import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from tlpipe.core import tracking
from tlpipe.core.config import AugmentParams, section_dict
from tlpipe.core.constants import SPLITS
from tlpipe.core.files import atomic_dir, read_csv, read_json, write_csv
from tlpipe.core.images import png_bytes

logger = logging.getLogger(__name__)

AUGMENTED_FIELDS = ("path", "label", "label_index", "split", "source", "group")


def resize_transform(size: int) -> A.Compose:
    return A.Compose([A.Resize(size, size, interpolation=cv2.INTER_AREA)])


def train_transform(params: AugmentParams) -> A.Compose:
    """The training augmentation pipeline described by ``params``."""
    p = params.probability
    size = (params.image_size, params.image_size)
    crop = []
    if params.crop_scale < 1.0:
        # a random field of view: X-rays from different sites are framed (collimated) differently,
        # and a tight crop must not become a cue for the class that happens to be imaged tightly.
        # Cropped from the original (full detail); the Resize after it then changes nothing.
        scale = (params.crop_scale, 1.0)
        crop = [A.RandomResizedCrop(size=size, scale=scale, interpolation=cv2.INTER_AREA, p=p)]
    return A.Compose(
        [
            *crop,
            A.Resize(*size, interpolation=cv2.INTER_AREA),
            A.HorizontalFlip(p=params.horizontal_flip),
            A.VerticalFlip(p=params.vertical_flip),
            A.Affine(
                scale=(1.0 - params.scale_limit, 1.0 + params.scale_limit),
                translate_percent=(-params.shift_limit, params.shift_limit),
                rotate=(-params.rotate_limit, params.rotate_limit),
                border_mode=cv2.BORDER_REFLECT_101,
                p=p,
            ),
            A.RandomBrightnessContrast(
                brightness_limit=params.brightness_limit,
                contrast_limit=params.contrast_limit,
                p=p,
            ),
        ],
        seed=params.seed,
    )


def _load_pixels(path: Path) -> np.ndarray:
    """RGB as (H, W, 3), grayscale kept as (H, W): the download stage chose the channels."""
    with Image.open(path) as img:
        return np.asarray(img if img.mode in ("RGB", "L") else img.convert("RGB"))


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(Image.fromarray(pixels)))


def augment_dataset(images_dir: Path, split_dir: Path, params: AugmentParams, out_dir: Path) -> dict:
    """The augment stage: write resized (and, for train, augmented) PNGs plus a manifest."""
    with tracking.stage_run("augment", section_dict(params, "augment")):
        counts = _augment(images_dir, split_dir, params, out_dir)
        tracking.log_metrics({f"{s}_images": n for s, n in counts.items()})
    logger.info(
        f"augment: {counts['train']} train images ({params.copies} augmented copies each), "
        f"{counts['val']} val, {counts['test']} test at {params.image_size}px"
    )
    return counts


def _augment(images_dir: Path, split_dir: Path, params: AugmentParams, out_dir: Path) -> dict:
    rows = read_csv(Path(split_dir) / "manifest.csv")
    classes = read_json(Path(split_dir) / "classes.json")
    index_of = {c: i for i, c in enumerate(classes)}
    augment = train_transform(params)
    resize = resize_transform(params.image_size)
    out_rows: list[dict] = []
    with atomic_dir(Path(out_dir)) as scratch:
        for row in tqdm(rows, desc="augment", unit="img", mininterval=2.0):
            pixels = _load_pixels(Path(images_dir) / row["path"])
            stem = Path(row["path"]).stem
            variants = [("", resize(image=pixels)["image"])]
            if row["split"] == "train":
                variants += [(f"_aug{k}", augment(image=pixels)["image"]) for k in range(params.copies)]
            for suffix, out in variants:
                rel = f"{row['split']}/{row['label']}/{stem}{suffix}.png"
                _write_png(scratch / rel, out)
                out_rows.append(
                    {
                        "path": rel,
                        "label": row["label"],
                        "label_index": index_of[row["label"]],
                        "split": row["split"],
                        "source": row["path"],
                        # the split's group (a patient): cross-fitting keeps one in one fold
                        "group": row.get("group") or "",
                    }
                )
        write_csv(scratch / "manifest.csv", out_rows, AUGMENTED_FIELDS)
        (scratch / "classes.json").write_text((Path(split_dir) / "classes.json").read_text())
    return {s: sum(r["split"] == s for r in out_rows) for s in SPLITS}
