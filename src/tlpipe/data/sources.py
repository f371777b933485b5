"""Data sources for the download stage, normalised to one manifest.

Every source yields ``Candidate`` items (where the image came from, its label and
a way to open it). :func:`ingest` decodes each one once, rejects what is unusable
with a reason, and writes the survivors as RGB PNGs plus ``manifest.csv``,
``quarantine.csv`` and ``classes.json``.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from tlpipe.core import tracking
from tlpipe.core.config import CsvParams, DataParams, MedmnistParams, UrlParams, section_dict
from tlpipe.core.constants import SPLITS
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import MANIFEST_FIELDS, atomic_dir, sha256_bytes, write_csv, write_json
from tlpipe.core.images import Rejected, decode_image, png_bytes
from tlpipe.data.candidates import Candidate
from tlpipe.data.demo import demo_candidates

logger = logging.getLogger(__name__)

PIL_MODES = {"rgb": "RGB", "grayscale": "L"}
QUARANTINE = "quarantine.csv"  # every rejected input with its reason


@dataclass(frozen=True)
class IngestSummary:
    kept: int
    rejected: int
    classes: list[str]

    def line(self) -> str:
        return (
            f"download: kept {self.kept} images in {len(self.classes)} classes "
            f"({', '.join(self.classes)}), rejected {self.rejected}"
        )


def _required(value: str | None, key: str) -> str:
    """A path setting DataParams requires for the source that reads it (None: a caller skipped that check)."""
    if value is None:  # TypeError, as Path(None) or fetch(None) would raise
        raise TypeError(f"{key} is not set (expected a path or URL, got None)")
    return value


# -------------------------------------------------------------- folder source


SPLIT_FOLDER_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _subfolders(path: Path) -> list[Path]:
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
    top = _subfolders(root)
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
        yield from _folder_files(root, _subfolders(split_dir), split)


def _folder_files(root: Path, class_dirs: list[Path], split: str) -> Iterator[Candidate]:
    real_root = root.resolve()
    seen: set[Path] = set()
    for class_dir in class_dirs:
        for path, refused in _walk(class_dir, real_root, seen):
            yield Candidate(
                source=path.relative_to(root).as_posix(),
                label=class_dir.name,
                open=partial(_refuse, refused) if refused else partial(open_image_file, path),
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
        params.images if isinstance(params.images, list) else [_required(params.images, "data.csv.images")]
    )
    folders = [Path(p) for p in listed]
    table = Path(_required(params.file, "data.csv.file"))
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
    return open_image_file(path)


def open_image_file(path: Path) -> Image.Image:
    """Open a file as an image (DICOM included), turning the usual failures into specific reasons."""
    from tlpipe.core.images import open_source_file

    return open_source_file(path)


# ------------------------------------------------------- medmnist and url sources


def medmnist_source(params: MedmnistParams) -> Iterator[Candidate]:
    from tlpipe.data.medmnist import medmnist_candidates

    with tempfile.TemporaryDirectory(prefix="tlpipe-download-") as workdir:
        yield from medmnist_candidates(params, Path(workdir))


def url_source(params: UrlParams) -> Iterator[Candidate]:
    """An archive of a folder dataset: fetched, hash-checked, unpacked safely, read as a folder."""
    from tlpipe.data.archives import extract_archive
    from tlpipe.data.fetch import fetch

    url = _required(params.url, "data.url.url")
    with tempfile.TemporaryDirectory(prefix="tlpipe-download-") as workdir:
        name = Path(urllib.parse.urlparse(url).path).name or "archive"
        archive = fetch(url, Path(workdir) / name, sha256=params.sha256)
        try:
            root = extract_archive(
                archive,
                Path(workdir) / "extracted",
                max_bytes=params.max_extracted_bytes,
                max_members=params.max_members,
            )
        except PipelineError as err:
            # name the archive as the user gave it, not by its temporary copy
            raise PipelineError(str(err).replace(str(archive), url)) from None
        yield from folder_candidates(_dataset_root(root, params.subdir), key="data.url.subdir")


def _dataset_root(extracted: Path, subdir: str | None) -> Path:
    if subdir:
        return extracted / subdir
    # archives usually wrap everything in one top folder (chest_xray/...): step into it
    entries = [p for p in extracted.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and len(_subfolders(entries[0])) > 0:
        only = entries[0]
        if only.name.lower() not in SPLIT_FOLDER_NAMES and all(
            p.is_dir() for p in only.iterdir() if not p.name.startswith(".")
        ):
            return only
    return extracted


# ----------------------------------------------------------------- ingestion


def _output_name(candidate: Candidate, taken: set[str]) -> str:
    """A flat file name for the candidate, unique within its class (``taken`` is updated).

    ``a/b.png`` and ``a__b.png`` flatten alike, and ``A.png`` and ``a.png`` clash on a
    case-insensitive disk: a later one gets ``~2``, ``~3``... (candidates come sorted,
    so the names are reproducible).
    """
    stem = Path(candidate.source).relative_to(Path(candidate.source).parts[0]).as_posix()
    stem = stem.replace("/", "__")
    name, n = f"{stem}.png", 1
    while f"{candidate.label}/{name}".casefold() in taken:
        n += 1
        name = f"{stem}~{n}.png"
    taken.add(f"{candidate.label}/{name}".casefold())
    return name


def candidates_for(params: DataParams) -> Iterator[Candidate]:
    readers = {
        "demo": lambda: demo_candidates(params.demo),
        "folder": lambda: folder_candidates(Path(_required(params.folder.path, "data.folder.path"))),
        "csv": lambda: csv_candidates(params.csv),
        "medmnist": lambda: medmnist_source(params.medmnist),
        "url": lambda: url_source(params.url),
    }
    return readers[params.source]()


def check_rejected_share(kept: int, rejected: list[dict], limit: float) -> None:
    """Fail when too much of the input was unusable: that is a wrong path or format, not noise."""
    total = kept + len(rejected)
    if total and len(rejected) / total > limit:
        reasons = Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejected)
        common = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(5))
        first = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:3])
        raise PipelineError(
            f"download: rejected {len(rejected)} of {total} files ({len(rejected) / total:.0%}), "
            f"more than data.max_rejected_fraction={limit}. Reasons: {common}. First: {first}"
        )


def ingest(candidates: Iterator[Candidate], params: DataParams, out_dir: Path) -> IngestSummary:
    """Decode, validate and normalise every candidate into ``out_dir``."""
    allowed = set(params.classes) if params.classes is not None else None
    kept: list[dict] = []
    rejected: list[dict] = []
    taken: set[str] = set()
    with atomic_dir(Path(out_dir)) as scratch:
        for cand in tqdm(candidates, desc="download", unit="img", mininterval=2.0):
            try:
                if cand.split not in ("", *SPLITS):
                    raise Rejected(f"unknown split {cand.split!r} (allowed: {', '.join(SPLITS)})")
                if not cand.label:
                    raise Rejected("empty label")
                if allowed is not None and cand.label not in allowed:
                    raise Rejected(f"label {cand.label!r} not in data.classes")
                img = decode_image(
                    cand.source,
                    cand.open,
                    params.min_image_size,
                    params.max_image_pixels,
                    PIL_MODES[params.channels],
                )
            except Rejected as why:
                rejected.append({"path": cand.source, "reason": str(why)})
                continue
            rel = Path("images") / cand.label / _output_name(cand, taken)
            data = png_bytes(img)
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            (scratch / rel).write_bytes(data)
            kept.append(
                {
                    "path": rel.as_posix(),
                    "label": cand.label,
                    "sha256": sha256_bytes(data),
                    "width": img.size[0],
                    "height": img.size[1],
                    "source": cand.source,
                    "split": cand.split,
                    "group": cand.group,
                }
            )
        check_rejected_share(len(kept), rejected, params.max_rejected_fraction)
        classes = list(params.classes) if params.classes else sorted({r["label"] for r in kept})
        if not kept:
            raise PipelineError(f"download: no usable images (rejected {len(rejected)})")
        missing = [c for c in classes if not any(r["label"] == c for r in kept)]
        if missing:
            raise PipelineError(
                f"download: no usable images for {missing}, listed in data.classes; "
                "add images of them or remove them from data.classes"
            )
        write_csv(scratch / "manifest.csv", kept, (*MANIFEST_FIELDS, "source", "split", "group"))
        write_csv(scratch / QUARANTINE, rejected, ("path", "reason"))
        write_json(scratch / "classes.json", classes)
    return IngestSummary(kept=len(kept), rejected=len(rejected), classes=classes)


def download(params: DataParams, out_dir: Path) -> IngestSummary:
    """The download stage: bring the configured source in as a normalised dataset."""
    with tracking.stage_run("download", section_dict(params, "data")):
        summary = ingest(candidates_for(params), params, out_dir)
        tracking.log_metrics(
            {"kept": summary.kept, "rejected": summary.rejected, "classes": len(summary.classes)}
        )
        tracking.log_artifact(str(Path(out_dir) / QUARANTINE))
    logger.info(summary.line())
    return summary
