"""Data sources for the download stage, normalised to one manifest.

Every source yields ``Candidate`` items (where the image came from, its label and
a way to open it). :func:`ingest` decodes each one once, rejects what is unusable
with a reason, and writes the survivors as RGB PNGs plus ``manifest.csv``,
``quarantine.csv`` and ``classes.json``.
"""

from __future__ import annotations

import logging
import tempfile
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tlpipe.core import tracking
from tlpipe.core.config import DataParams, MedmnistParams, UrlParams, section_dict
from tlpipe.core.constants import SPLITS
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import MANIFEST_FIELDS, atomic_dir, sha256_bytes, write_csv, write_json
from tlpipe.core.images import Rejected, decode_image, png_bytes
from tlpipe.data.candidates import Candidate
from tlpipe.data.demo import demo_candidates
from tlpipe.data.local_sources import (
    SPLIT_FOLDER_NAMES,
    csv_candidates,
    folder_candidates,
    required,
    subfolders,
)

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


# ------------------------------------------------------- medmnist and url sources


def medmnist_source(params: MedmnistParams) -> Iterator[Candidate]:
    from tlpipe.data.medmnist import medmnist_candidates

    with tempfile.TemporaryDirectory(prefix="tlpipe-download-") as workdir:
        yield from medmnist_candidates(params, Path(workdir))


def url_source(params: UrlParams) -> Iterator[Candidate]:
    """An archive of a folder dataset: fetched, hash-checked, unpacked safely, read as a folder."""
    from tlpipe.data.archives import extract_archive
    from tlpipe.data.fetch import fetch

    url = required(params.url, "data.url.url")
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
    if len(entries) == 1 and entries[0].is_dir() and len(subfolders(entries[0])) > 0:
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
        "folder": lambda: folder_candidates(Path(required(params.folder.path, "data.folder.path"))),
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
