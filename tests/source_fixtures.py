"""Small on-disk datasets in the layouts users bring, built by the tests themselves."""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"NORMAL": (40, 40, 40), "PNEUMONIA": (220, 220, 220), "nv": (200, 60, 60),
           "mel": (60, 200, 60), "bkl": (60, 60, 200), "cat": (200, 120, 40), "dog": (40, 120, 200)}  # fmt: skip


def save(path: Path, img: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def tinted(label: str, seed: int, size: int = 24) -> Image.Image:
    """Noise around a colour per class: distinct, but no two images alike."""
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS.get(label, (128, 128, 128)), dtype=np.int16)
    pixels = np.clip(base + rng.integers(-30, 31, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def class_folders(root: Path, per_class: int, labels=("cat", "dog")) -> Path:
    for label in labels:
        for i in range(per_class):
            save(root / label / f"{label}_{i:03d}.png", tinted(label, seed=hash((label, i)) % 2**32), "PNG")
    return root


def kermany_tree(root: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/personN_kind_M.jpeg, one image per person."""
    for split, n in per_split.items():
        for label in ("NORMAL", "PNEUMONIA"):
            for i in range(n):
                person = f"{split}{i}"
                name = f"person{person}_{'virus' if label == 'PNEUMONIA' else 'normal'}_{i + 100}.jpeg"
                save(root / split / label / name, tinted(label, seed=seed + i + 1000 * len(split)), "JPEG")
    return root


def ham_fixture(tmp_path: Path, n: int = 12) -> tuple[Path, Path]:
    """HAM10000-style: images/ISIC_000000N.jpg and a metadata CSV with lesion_id, image_id, dx."""
    images = tmp_path / "images"
    rows = ["lesion_id,image_id,dx,dx_type"]
    for i in range(n):
        dx = ("nv", "mel", "bkl")[i % 3]
        save(images / f"ISIC_{i:07d}.jpg", tinted(dx, seed=i), "JPEG")
        rows.append(f"HAM_{i // 2:07d},ISIC_{i:07d},{dx},histo")
    table = tmp_path / "HAM10000_metadata.csv"
    table.write_text("\n".join(rows) + "\n")
    return images, table


def medmnist_npz(path: Path, sizes: dict[str, int], side: int = 28, rgb: bool = False) -> Path:
    """A .npz in the MedMNIST layout: {split}_images uint8, {split}_labels (N, 1)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in sizes.items():
        labels = np.arange(n) % 2
        shape = (n, side, side, 3) if rgb else (n, side, side)
        images = rng.integers(0, 60, shape).astype(np.uint8)
        images[labels == 1] += 150  # class 1 brighter
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def tar_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tf.add(path, prefix + path.relative_to(folder).as_posix())
    return archive


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
