"""Small on-disk datasets in the layouts users bring, built by the tests themselves."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import zipfile
import zlib
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


_SPLIT_BASE = {"train": 100, "val": 700, "test": 1}  # patient numbers per split: disjoint unless shared


def kermany_tree(root: Path, per_split: dict[str, int], seed: int = 0, shared_persons: int = 0) -> Path:
    """``chest_xray/{split}/{NORMAL,PNEUMONIA}/``, n images per class and split, named as in the real set.

    NORMAL cycles through ``IM-0115-0001.jpeg``, ``NORMAL2-IM-0116-0001.jpeg`` and a second image of the
    first form's patient, ``IM-0115-0001-0002.jpeg``; PNEUMONIA holds two images per child,
    ``person100_bacteria_10.jpeg`` and ``person100_virus_11.jpeg``. ``shared_persons`` test children
    carry the number of a train child, as 170 do in the real set.
    """
    for split, n in per_split.items():
        base = _SPLIT_BASE[split]
        for i in range(n):
            patient = base + i - i % 3
            normal = (f"IM-{patient:04d}-0001.jpeg", f"NORMAL2-IM-{patient + 1:04d}-0001.jpeg",
                      f"IM-{patient:04d}-0001-0002.jpeg")[i % 3]  # fmt: skip
            person = base + i // 2
            if split == "test" and i // 2 < shared_persons:
                person = _SPLIT_BASE["train"] + i // 2
            pneumonia = f"person{person}_{('bacteria', 'virus')[i % 2]}_{base * 10 + i}.jpeg"
            for label, name in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
                pixels = tinted(label, seed=seed + i + 1000 * base)
                save(root / split / label / name, pixels, "JPEG", quality=95)
    return root


KERMANY_PATTERN = r"^((?:NORMAL2-)?IM-\d+|person\d+)[-_]"  # recipes/kermany.yaml's split.group_pattern

HAM_COLUMNS = "lesion_id,image_id,dx,dx_type,age,sex,localization"
HAM_CLASSES = ("nv", "mel", "bkl")


def ham_fixture(root: Path, n: int = 12, classes: tuple[str, ...] = HAM_CLASSES) -> Path:
    """HAM10000 as distributed: ``HAM10000_metadata.csv`` and the images split over
    ``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/`` (``ISIC_0024306.jpg`` ...),
    two images per lesion (``HAM_0000118``)."""
    rows = [HAM_COLUMNS]
    for i in range(n):
        dx = classes[(i // 2) % len(classes)]
        image_id = f"ISIC_{24306 + i:07d}"
        part = 1 if i < n // 2 else 2
        save(
            root / f"HAM10000_images_part_{part}" / f"{image_id}.jpg", tinted(dx, seed=i), "JPEG", quality=95
        )
        rows.append(
            f"HAM_{118 + i // 2:07d},{image_id},{dx},histo,{40 + i % 30}.0,{('male', 'female')[i % 2]},back"
        )
    (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def ham_parts(root: Path) -> list[Path]:
    return [root / "HAM10000_images_part_1", root / "HAM10000_images_part_2"]


def medmnist_npz(
    path: Path, sizes: dict[str, int], side: int = 28, rgb: bool = False, n_classes: int = 2
) -> Path:
    """A .npz in the MedMNIST layout (``pneumoniamnist.npz``: 28 px grayscale (N, 28, 28);
    ``dermamnist.npz``: RGB (N, 28, 28, 3)): {split}_images uint8, {split}_labels (N, 1) uint8."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in sizes.items():
        labels = np.arange(n) % n_classes
        shape = (n, side, side, 3) if rgb else (n, side, side)
        images = rng.integers(0, 60, shape).astype(np.uint8)
        step = 190 // max(n_classes - 1, 1)  # each class brighter than the one before
        images += (labels * step).astype(np.uint8).reshape(-1, *[1] * (len(shape) - 1))
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


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(64))  # a few hundred bytes on disk, 30 GB once decoded
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_bad_files(root: Path) -> None:
    """One file of each kind the download stage must quarantine, under root/dog and root/bird.

    Meant for a run with data.classes [cat, dog] (or [dog, cat]), min_image_size 8 and
    max_image_pixels 5000; BAD_FILES maps each to its reason.
    """
    (root / "dog" / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    noise(48, 48, seed=1).save(buf, "JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dog" / "fake.jpg").write_text("this is not a jpeg\n")
    (root / "dog" / "notes.txt").write_text("a note\n")
    save(root / "dog" / "tiny.png", noise(5, 30), "PNG")
    save(root / "dog" / "huge.png", noise(80, 80), "PNG")
    save(root / "bird" / "robin.png", noise(20, 20), "PNG")
    (root / "dog" / "random.png").write_bytes(np.random.default_rng(3).bytes(500))
    (root / "dog" / "page.jpeg").write_text("<html><body>404 not found</body></html>\n")
    (root / "dog" / "doc.png").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n")
    png = io.BytesIO()
    noise(30, 30, seed=4).save(png, "PNG")
    (root / "dog" / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    corrupt = bytearray(png.getvalue())
    idat = corrupt.index(b"IDAT") + 8
    corrupt[idat : idat + 40] = bytes(40)  # zeroed compressed data: the stream no longer inflates
    (root / "dog" / "corrupt.png").write_bytes(bytes(corrupt))
    (root / "dog" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))


# one entry per kind of bad file: 13 kinds
BAD_FILES = {
    "dog/empty.png": "empty file (0 bytes)",
    "dog/truncated.jpg": "truncated",
    "dog/fake.jpg": "not an image (unrecognised format)",
    "dog/random.png": "not an image (unrecognised format)",
    "dog/page.jpeg": "not an image (unrecognised format)",
    "dog/doc.png": "not an image (unrecognised format)",
    "dog/cut.png": "cannot decode image",
    "dog/corrupt.png": "cannot decode image",
    "dog/bomb.png": "too many pixels (100000x100000 > 5000)",
    "dog/notes.txt": "not an image extension (.txt)",
    "dog/tiny.png": "too small (5x30 < 8 px)",
    "dog/huge.png": "too many pixels (80x80 > 5000)",
    "bird/robin.png": "label 'bird' not in data.classes",
}
