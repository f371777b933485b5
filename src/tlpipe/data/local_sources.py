"""The local sources: a folder of class (or split/class) folders, and image folders plus a labels CSV.

Both read only inside the dataset's own folder: a symbolic link that leads out of it
is refused with its own reason and never opened, and links inside it are followed
with each real folder read once, so a link loop cannot recurse.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from PIL import Image

from tlpipe.core.config import CsvParams
from tlpipe.core.errors import PipelineError
from tlpipe.core.images import Rejected, open_source_file
from tlpipe.data.candidates import Candidate


def required(value: str | None, key: str) -> str:
    """A path setting DataParams requires for the source that reads it (None: a caller skipped that check)."""
    if value is None:  # TypeError, as Path(None) or fetch(None) would raise
        raise TypeError(f"{key} is not set (expected a path or URL, got None)")
    return value


# -------------------------------------------------------------- folder source


SPLIT_FOLDER_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_candidates(root: Path, key: str = "data.folder.path") -> Iterator[Candidate]:
    """One subfolder per class, or train/val/test folders of class subfolders.

    In the second layout (Kermany's ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``)
    each image carries its split, which the split stage keeps. The folder is checked
    at once (not on first iteration), so a wrong path fails before anything is written.
    """
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{key}: {root} is not a folder (expected one subfolder per class)")
    top = subfolders(root)
    if not top:
        raise PipelineError(f"{key}: {root} has no class subfolders")
    splits = {p.name.lower(): p for p in top if p.name.lower() in SPLIT_FOLDER_NAMES}
    if splits and len(splits) == len(top):
        return _split_folder_files(root, [(SPLIT_FOLDER_NAMES[n], p) for n, p in sorted(splits.items())])
    if splits:
        raise PipelineError(
            f"{key}: {root} mixes split folders ({', '.join(sorted(splits))}) with other folders "
            f"({', '.join(p.name for p in top if p.name.lower() not in splits)}); use one layout"
        )
    return _folder_files(root, top, split="")


def _split_folder_files(root: Path, split_dirs: list[tuple[str, Path]]) -> Iterator[Candidate]:
    for split, split_dir in split_dirs:
        yield from _folder_files(root, subfolders(split_dir), split)


def _folder_files(root: Path, class_dirs: list[Path], split: str) -> Iterator[Candidate]:
    real_root = root.resolve()
    seen: set[Path] = set()
    for class_dir in class_dirs:
        for path, refused in _walk(class_dir, real_root, seen):
            yield Candidate(
                source=path.relative_to(root).as_posix(),
                label=class_dir.name,
                open=partial(_refuse, refused) if refused else partial(open_source_file, path),
                split=split,
            )


OUTSIDE_LINK = "symbolic link to a path outside the source folder (not opened)"
SEEN_LINK = "symbolic link to a folder already read (a loop, or a second way to the same images)"


def _walk(folder: Path, real_root: Path, seen: set[Path]) -> Iterator[tuple[Path, str]]:
    """Every file below ``folder`` in name order, with the reason it is refused ("" if it is not).

    Symbolic links are followed only where they resolve inside the source root, and each
    real folder is read once, so a link cannot make the stage read a file outside the
    data DVC versions (``/etc/passwd``) or walk in a circle.
    """
    real = folder.resolve()
    if not real.is_relative_to(real_root):
        yield folder, OUTSIDE_LINK
        return
    if real in seen:
        yield folder, SEEN_LINK
        return
    seen.add(real)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and not entry.resolve().is_relative_to(real_root):
            yield entry, OUTSIDE_LINK
        elif entry.is_dir():
            yield from _walk(entry, real_root, seen)
        elif entry.is_file():
            yield entry, ""
        elif entry.is_symlink():
            yield entry, "broken symbolic link"


def _refuse(reason: str) -> Image.Image:
    raise Rejected(reason)


# ----------------------------------------------------------------- csv source


def csv_candidates(params: CsvParams) -> Iterator[Candidate]:
    """Image folders plus a CSV of labels, with configurable column names."""
    listed = (
        params.images if isinstance(params.images, list) else [required(params.images, "data.csv.images")]
    )
    folders = [Path(p) for p in listed]
    table = Path(required(params.file, "data.csv.file"))
    for folder in folders:
        if not folder.is_dir():
            raise PipelineError(f"data.csv.images: {folder} is not a folder")
    if not table.is_file():
        raise PipelineError(f"data.csv.file: {table} not found")
    with open(table, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        columns = reader.fieldnames or []
    wanted = {
        "path_column": params.path_column,
        "label_column": params.label_column,
        "group_column": params.group_column,
        "split_column": params.split_column,
    }
    for key, column in wanted.items():
        if column is not None and column not in columns:
            raise PipelineError(
                f"data.csv.{key}: column {column!r} not in {table} (columns: {', '.join(columns)})"
            )
    return (_csv_candidate(folders, row, params) for row in rows)


def _csv_candidate(folders: list[Path], row: dict[str, str], params: CsvParams) -> Candidate:
    rel = (row[params.path_column] or "").strip() + params.extension
    split = (row[params.split_column] or "").strip().lower() if params.split_column else ""
    return Candidate(
        source=rel,
        label=(row[params.label_column] or "").strip(),
        open=partial(_open_listed, folders, rel),
        split=SPLIT_FOLDER_NAMES.get(split, split),
        group=(row[params.group_column] or "").strip() if params.group_column else "",
    )


def _open_listed(folders: list[Path], rel: str) -> Image.Image:
    """The one image folder holding ``rel``, opened; none or several is a reason to reject."""
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise Rejected(f"path outside data.csv.images: {rel}")
    holding = [folder for folder in folders if os.path.lexists(folder / rel)]
    if len(holding) > 1:
        raise Rejected(f"in more than one of data.csv.images ({', '.join(f.name for f in holding)})")
    if not holding:
        raise Rejected("listed in the CSV but no such file")
    return _open_inside(holding[0], rel)


def _open_inside(root: Path, rel: str) -> Image.Image:
    """Open ``root/rel``, refusing a link that leads out of ``root`` without opening it."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise Rejected(OUTSIDE_LINK)
    if not path.is_file():
        raise Rejected("listed in the CSV but no such file")
    return open_source_file(path)
