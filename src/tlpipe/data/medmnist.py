"""MedMNIST (v2/v3) as a data source: the official .npz files, with their own splits.

The table below is copied from the ``medmnist`` package (``medmnist/info.py`` of
MedMNIST/MedMNIST, version 3.0.2): class names in label order and the published
MD5 of each file. Only the 2D datasets are listed: the ``*mnist3d`` files hold
volumes, not images. A download is used only when its MD5 matches.

Images are streamed one block of rows at a time from the .npz rather than loaded
whole: a 224 px file of the larger datasets holds many GB of pixels.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from tlpipe.core.constants import SPLITS
from tlpipe.data.archives import fetch
from tlpipe.data.candidates import Candidate
from tlpipe.core.config import MedmnistParams
from tlpipe.core.errors import PipelineError

URL_BASE = "https://zenodo.org/records/10519652/files"  # MedMNIST v3 (MedMNIST+) on Zenodo
MULTI_LABEL_TASK = "multi-label, binary-class"
_READ_BYTES = 1 << 22  # how much pixel data one read pulls from the .npz


@dataclass(frozen=True)
class MedmnistDataset:
    task: str  # as medmnist names it: "multi-class", "binary-class", "ordinal-regression", ...
    labels: tuple[str, ...]  # class names, index = label value
    md5: dict[int, str]  # image size -> MD5 of the published .npz


_ORGAN_LABELS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

DATASETS: dict[str, MedmnistDataset] = {
    "pathmnist": MedmnistDataset(
        "multi-class",
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
        {
            28: "a8b06965200029087d5bd730944a56c1",
            64: "55aa9c1e0525abe5a6b9d8343a507616",
            128: "ac42d08fb904d92c244187169d1fd1d9",
            224: "2c51a510bcdc9cf8ddb2af93af1eadec",
        },
    ),
    "chestmnist": MedmnistDataset(
        MULTI_LABEL_TASK,
        (
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ),
        {
            28: "02c8a6516a18b556561a56cbdd36c4a8",
            64: "9de6cd0b934ebb5b7426cfba5efbae16",
            128: "db107e5590b27930b62dbaf558aebee3",
            224: "45bd33e6f06c3e8cdb481c74a89152aa",
        },
    ),
    "dermamnist": MedmnistDataset(
        "multi-class",
        (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
        {
            28: "0744692d530f8e62ec473284d019b0c7",
            64: "b70a2f5635c6199aeaa28c31d7202e1f",
            128: "2defd784463fa5243564e855ed717de1",
            224: "8974907d8e169bef5f5b96bc506ae45d",
        },
    ),
    "octmnist": MedmnistDataset(
        "multi-class",
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        {
            28: "c68d92d5b585d8d81f7112f81e2d0842",
            64: "e229e9440236b774d9f0dfef9d07bdaf",
            128: "0a97e76651ace45c5d943ee3f65b63ae",
            224: "abc493b6d529d5de7569faaef2773ba3",
        },
    ),
    "pneumoniamnist": MedmnistDataset(
        "binary-class",
        ("normal", "pneumonia"),
        {
            28: "28209eda62fecd6e6a2d98b1501bb15f",
            64: "8f4eceb4ccffa70c672198ea285246c6",
            128: "05b46931834c231683c68f40c47b2971",
            224: "d6a3c71de1b945ea11211b03746c1fe1",
        },
    ),
    "retinamnist": MedmnistDataset(
        "ordinal-regression",
        ("0", "1", "2", "3", "4"),
        {
            28: "bd4c0672f1bba3e3a89f0e4e876791e4",
            64: "afda852cc34dcda56f86ad2b2457dbcc",
            128: "e48e916a24454daf90583d4e6efb1a18",
            224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
        },
    ),
    "breastmnist": MedmnistDataset(
        "binary-class",
        ("malignant", "normal, benign"),
        {
            28: "750601b1f35ba3300ea97c75c52ff8f6",
            64: "742edef2a1fd1524b2efff4bd7ba9364",
            128: "363e4b3f8d712e9b5de15470a2aaadf1",
            224: "b56378a6eefa9fed602bb16d192d4c8b",
        },
    ),
    "bloodmnist": MedmnistDataset(
        "multi-class",
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
        {
            28: "7053d0359d879ad8a5505303e11de1dc",
            64: "2b94928a2ae4916078ca51e05b6b800b",
            128: "adace1e0ed228fccda1f39692059dd4c",
            224: "b718ff6835fcbdb22ba9eacccd7b2601",
        },
    ),
    "tissuemnist": MedmnistDataset(
        "multi-class",
        (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
        {
            28: "ebe78ee8b05294063de985d821c1c34b",
            64: "123ece2eba09d0aa5d698fda57103344",
            128: "61b955355d7425a89687b06cca3ce0c2",
            224: "b077128c4a949f0a4eb01517f9037b9c",
        },
    ),
    "organamnist": MedmnistDataset(
        "multi-class",
        _ORGAN_LABELS,
        {
            28: "68e3f8846a6bd62f0c9bf841c0d9eacc",
            64: "2dcccc29b88e6da5a01161ef20cda288",
            128: "eeae80d0a227a8d099027e1b3cfd3b60",
            224: "50747347e05c87dd3aaf92c49f9f3170",
        },
    ),
    "organcmnist": MedmnistDataset(
        "multi-class",
        _ORGAN_LABELS,
        {
            28: "b9ceb9546e10131b32923c5bbeaea2b1",
            64: "3ce34a8724ea6f548e6db4744d03b6a9",
            128: "773c1f009daa3fe5d9a2a201b2a7ed94",
            224: "050f5e875dc056f6768abf94ec9995d1",
        },
    ),
    "organsmnist": MedmnistDataset(
        "multi-class",
        _ORGAN_LABELS,
        {
            28: "9ab87b696fb54e2a387ebe992d6ed5f1",
            64: "53a6d115339d874c25e309a994ff46d3",
            128: "ded0c5fa01a95dc4978b956f613e9b8e",
            224: "b354719e553fbbb2513d5533f52a4cb1",
        },
    ),
}


# --------------------------------------------------------------- the table


def file_name(name: str, size: int) -> str:
    """The published file name: ``pneumoniamnist.npz`` at 28 px, ``pneumoniamnist_224.npz`` above."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def dataset_info(name: str) -> MedmnistDataset:
    """The table entry for a single-label dataset, or a PipelineError saying why there is none."""
    info = DATASETS.get(name)
    if info is None:
        raise PipelineError(
            f"data.medmnist.name: unknown MedMNIST dataset {name!r}; known: {', '.join(sorted(DATASETS))}"
        )
    if info.task == MULTI_LABEL_TASK:
        raise PipelineError(
            f"data.medmnist.name: {name} is a multi-label dataset ({info.task}); "
            "multi-label classification is not supported, choose a single-label dataset"
        )
    return info


def medmnist_url(name: str, size: int) -> tuple[str, str]:
    """The official download URL of ``name`` at ``size`` px and its published MD5."""
    info = dataset_info(name)
    if size not in info.md5:
        sizes = ", ".join(str(s) for s in sorted(info.md5))
        raise PipelineError(f"data.medmnist.size: {name} has no size {size}; available: {sizes}")
    return f"{URL_BASE}/{file_name(name, size)}?download=1", info.md5[size]


def _table_labels_for_file(path: Path) -> list[str] | None:
    """Class names when the file is named like a published one (``dermamnist_64.npz``)."""
    match = re.fullmatch(r"(?P<name>[a-z0-9]+?)(?:_(?P<size>\d+))?\.npz", path.name.lower())
    if match is None or match["name"] not in DATASETS:
        return None
    return list(dataset_info(match["name"]).labels)


# ------------------------------------------------------------- the .npz file


@dataclass(frozen=True)
class _Split:
    name: str
    images_key: str
    labels: np.ndarray  # (N,) integers
    shape: tuple[int, ...]  # of the images array


def npz_candidates(path: Path, class_names: list[str] | None = None) -> Iterator[Candidate]:
    """Every image of a MedMNIST-layout .npz, train then val then test, with its split.

    Class names come from the table when the file is named like a published file,
    else from ``class_names``, else they are the label numbers. The layout is checked
    at once (not on first iteration), so a broken file fails before anything starts.
    Nothing is ever unpickled: object arrays are refused.
    """
    path = Path(path)
    names = _table_labels_for_file(path) or (list(class_names) if class_names else None)
    splits = _read_layout(path)
    if names is None:
        highest = max((int(s.labels.max()) for s in splits if s.labels.size), default=0)
        names = [str(i) for i in range(highest + 1)]
    for split in splits:
        _check_label_range(path, split, names)
    return _iter_candidates(path, splits, names)


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise PipelineError(f"{path}: no such file (expected a MedMNIST .npz)")
    try:
        data = np.load(path, allow_pickle=False)  # user data must never be unpickled
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise PipelineError(f"{path}: not a readable .npz file: {err}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise PipelineError(f"{path}: a single .npy array, not an .npz in the MedMNIST layout")
    return data


def _read_layout(path: Path) -> list[_Split]:
    """Check keys, shapes, dtypes and lengths; load the (small) label arrays."""
    with _open_npz(path) as npz:
        wanted = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
        missing = [key for key in wanted if key not in npz.files]
        if missing:
            raise PipelineError(
                f"{path}: not in the MedMNIST layout: missing {', '.join(missing)} (has {', '.join(npz.files)})"
            )
        return [_read_split(path, npz, split) for split in SPLITS]


def _read_split(path: Path, npz: np.lib.npyio.NpzFile, split: str) -> _Split:
    images_key, labels_key = f"{split}_images", f"{split}_labels"
    with npz.zip.open(_member(npz, images_key)) as fh:
        shape, _, dtype = _npy_header(fh, path, images_key)
    if dtype.hasobject:
        raise PipelineError(f"{path}: {images_key} holds Python objects (it would need unpickling); refused")
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise PipelineError(
            f"{path}: {images_key} must be uint8 of shape (N, H, W) or (N, H, W, 3), "
            f"got {dtype} {shape} (3D MedMNIST volumes are not supported)"
        )
    labels = _load_labels(path, npz, labels_key)
    if len(labels) != shape[0]:
        raise PipelineError(
            f"{path}: {images_key} has {shape[0]} images but {labels_key} has {len(labels)} labels"
        )
    return _Split(split, images_key, labels, shape)


def _load_labels(path: Path, npz: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    try:
        labels = npz[key]
    except ValueError as err:  # allow_pickle=False refusing an object array lands here
        raise PipelineError(f"{path}: {key} cannot be read without unpickling; refused ({err})") from None
    if labels.dtype.kind not in "iu":
        raise PipelineError(f"{path}: {key} must hold integers, got {labels.dtype}")
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise PipelineError(
            f"{path}: {key} has {labels.shape[1]} labels per image: multi-label data is not supported"
        )
    if labels.ndim not in (1, 2):
        raise PipelineError(f"{path}: {key} must have shape (N, 1), got {labels.shape}")
    return labels.reshape(-1).astype(np.int64)


def _check_label_range(path: Path, split: _Split, names: list[str]) -> None:
    if not split.labels.size:
        return
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= len(names):
        bad = low if low < 0 else high
        raise PipelineError(
            f"{path}: {split.name}_labels has label {bad}, outside 0..{len(names) - 1} "
            f"for the {len(names)} classes {names}"
        )


def _member(npz: np.lib.npyio.NpzFile, key: str) -> str:
    return f"{key}.npy" if f"{key}.npy" in npz.zip.namelist() else key


def _npy_header(fh: BinaryIO, path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream, leaving it at the first data byte."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fh)
    except ValueError as err:
        raise PipelineError(f"{path}: {key} is not a valid .npy array: {err}") from None
    raise PipelineError(f"{path}: {key} uses .npy format version {version}, which is not supported")


def _iter_candidates(path: Path, splits: list[_Split], names: list[str]) -> Iterator[Candidate]:
    for split in splits:
        rows = _iter_rows(path, split)
        for index, (row, label) in enumerate(zip(rows, split.labels, strict=True)):
            yield Candidate(
                source=f"{split.name}/{index:06d}.png",
                label=names[label],
                split=split.name,
                open=lambda row=row: Image.fromarray(row),
            )


def _iter_rows(path: Path, split: _Split) -> Iterator[np.ndarray]:
    """The images of one split, one at a time, without holding the whole array."""
    row_shape = split.shape[1:3] if split.shape[3:] == (1,) else split.shape[1:]
    with np.load(path, allow_pickle=False) as npz:
        with npz.zip.open(_member(npz, split.images_key)) as fh:
            _, fortran_order, _ = _npy_header(fh, path, split.images_key)
            if not fortran_order:
                yield from _stream_rows(fh, path, split, row_shape)
                return
        # rows are not contiguous on disk: read it whole (rare; numpy writes C order)
        for row in npz[split.images_key]:
            yield np.ascontiguousarray(row.reshape(row_shape))


def _stream_rows(fh: BinaryIO, path: Path, split: _Split, row_shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    row_bytes = math.prod(row_shape)
    per_read = max(1, _READ_BYTES // max(row_bytes, 1))
    remaining = split.shape[0]
    while remaining:
        count = min(per_read, remaining)
        block = fh.read(count * row_bytes)
        if len(block) != count * row_bytes:
            raise PipelineError(f"{path}: {split.images_key} is truncated (the file is damaged)")
        pixels = np.frombuffer(block, dtype=np.uint8).reshape(count, *row_shape)
        yield from (row.copy() for row in pixels)  # copies: a kept image must not pin the whole block
        remaining -= count


# ---------------------------------------------------------------- the source


def medmnist_candidates(params: MedmnistParams, workdir: Path) -> Iterator[Candidate]:
    """The configured MedMNIST dataset: a local file when ``path`` is set, else the MD5-checked download."""
    labels = list(dataset_info(params.name).labels) if params.name else None
    if params.path:
        return npz_candidates(Path(params.path), class_names=labels)
    url, md5 = medmnist_url(params.name, params.size)
    archive = fetch(url, Path(workdir) / file_name(params.name, params.size), md5=md5)
    return npz_candidates(archive, class_names=labels)
