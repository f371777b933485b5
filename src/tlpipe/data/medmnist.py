"""MedMNIST (v2/v3) as a data source: the official .npz files, with their own splits.

The datasets, their class names and MD5s are in :mod:`tlpipe.data.medmnist_catalog`;
a download is used only when its MD5 matches.

Images are streamed one block of rows at a time from the .npz rather than loaded
whole: a 224 px file of the larger datasets holds many GB of pixels.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from tlpipe.core.config import MedmnistParams
from tlpipe.core.constants import SPLITS
from tlpipe.core.errors import PipelineError
from tlpipe.data.candidates import Candidate
from tlpipe.data.fetch import fetch
from tlpipe.data.medmnist_catalog import DATASETS, dataset_info, file_name, medmnist_url, unknown_dataset

_READ_BYTES = 1 << 22  # how much pixel data one read pulls from the .npz


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
                f"{path}: not in the MedMNIST layout: missing {', '.join(missing)} "
                f"(has {', '.join(npz.files)})"
            )
        return [_read_split(path, npz, split) for split in SPLITS]


def _read_split(path: Path, npz: np.lib.npyio.NpzFile, split: str) -> _Split:
    images_key, labels_key = f"{split}_images", f"{split}_labels"
    with _zip(npz).open(_member(npz, images_key)) as fh:
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


def _zip(npz: np.lib.npyio.NpzFile) -> zipfile.ZipFile:
    """The archive under an open NpzFile (numpy sets ``zip`` to None only when it is closed)."""
    if npz.zip is None:  # every caller holds the file open; a closed one would fail here anyway
        raise AttributeError("NpzFile.zip is None: the .npz file is closed")
    return npz.zip


def _member(npz: np.lib.npyio.NpzFile, key: str) -> str:
    return f"{key}.npy" if f"{key}.npy" in _zip(npz).namelist() else key


def _npy_header(fh: IO[bytes], path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
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
                open=partial(Image.fromarray, row),
            )


def _iter_rows(path: Path, split: _Split) -> Iterator[np.ndarray]:
    """The images of one split, one at a time, without holding the whole array."""
    row_shape = split.shape[1:3] if split.shape[3:] == (1,) else split.shape[1:]
    with np.load(path, allow_pickle=False) as npz:
        with _zip(npz).open(_member(npz, split.images_key)) as fh:
            _, fortran_order, _ = _npy_header(fh, path, split.images_key)
            if not fortran_order:
                yield from _stream_rows(fh, path, split, row_shape)
                return
        # rows are not contiguous on disk: read it whole (rare; numpy writes C order)
        for row in npz[split.images_key]:
            yield np.ascontiguousarray(row.reshape(row_shape))


def _stream_rows(
    fh: IO[bytes], path: Path, split: _Split, row_shape: tuple[int, ...]
) -> Iterator[np.ndarray]:
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
    if params.name is None:  # DataParams requires name or path; the table lookup would refuse None alike
        raise unknown_dataset(None)
    url, md5 = medmnist_url(params.name, params.size)
    archive = fetch(url, Path(workdir) / file_name(params.name, params.size), md5=md5)
    return npz_candidates(archive, class_names=labels)
