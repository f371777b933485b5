"""The ``data`` section of params.yaml: which source the download stage reads, and how.

Every local path a source reads must lie under :data:`~tlpipe.core.constants.SOURCES_DIR`,
the folder the download stage declares to DVC, so that DVC sees any change to the data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tlpipe.core.constants import SOURCES_DIR
from tlpipe.core.schema import Section


class DemoParams(Section):
    images_per_class: int = Field(200, ge=4, le=100_000)
    image_size: int = Field(64, ge=16, le=1024)
    seed: int = 0


class FolderParams(Section):
    # one subfolder per class, or train/val/test subfolders each holding one subfolder per class
    path: str | None = None


class CsvParams(Section):
    # folder the CSV's paths are relative to, or a list of them searched in order (HAM10000 ships
    # its images in two folders); a path found in more than one is rejected as ambiguous
    images: str | list[str] | None = None
    file: str | None = None  # the CSV of labels
    path_column: str = "image_id"
    label_column: str = "dx"
    extension: str = ""  # appended to each path, e.g. ".jpg" for HAM10000's image_id
    group_column: str | None = None  # e.g. HAM10000's lesion_id: rows sharing it stay in one split
    split_column: str | None = None  # a column of train/val/test, when the CSV brings its own split


class MedmnistParams(Section):
    name: str | None = None  # e.g. pneumoniamnist, dermamnist
    size: Literal[28, 64, 128, 224] = 28
    path: str | None = None  # a local .npz in the MedMNIST layout instead of the download


class UrlParams(Section):
    url: str | None = None  # http(s):// or file:// to a .zip, .tar.gz or .tgz
    sha256: str | None = None  # required: a download that does not match is never used
    subdir: str | None = None  # folder inside the archive holding the class (or split) folders
    max_extracted_bytes: int = Field(20_000_000_000, ge=1)
    max_members: int = Field(1_000_000, ge=1)


class DataParams(Section):
    source: Literal["demo", "folder", "csv", "medmnist", "url"] = "demo"
    classes: list[str] | None = None
    min_image_size: int = Field(8, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_rejected_fraction: float = Field(0.1, ge=0.0, le=1.0)  # above it the stage fails
    # what every image is converted to; grayscale (X-rays) stores a third of the bytes and the
    # training input pipeline repeats the one channel for the RGB backbone
    channels: Literal["rgb", "grayscale"] = "rgb"
    demo: DemoParams = DemoParams()
    folder: FolderParams = FolderParams()
    csv: CsvParams = CsvParams()
    medmnist: MedmnistParams = MedmnistParams()
    url: UrlParams = UrlParams()

    def local_inputs(self) -> list[tuple[str, str]]:
        """(key, path) of every local file or folder the configured source reads."""
        images = self.csv.images if isinstance(self.csv.images, list) else [self.csv.images]
        inputs = {
            "folder": [("folder.path", self.folder.path)],
            "csv": [*(("csv.images", p) for p in images), ("csv.file", self.csv.file)],
            "medmnist": [("medmnist.path", self.medmnist.path)],
        }
        return [(key, path) for key, path in inputs.get(self.source, []) if path]

    @model_validator(mode="after")
    def _source_is_configured(self) -> DataParams:
        required: dict[str, list[tuple[str, object]]] = {
            "folder": [("folder.path", self.folder.path)],
            "csv": [("csv.images", self.csv.images), ("csv.file", self.csv.file)],
            "medmnist": [("medmnist.name or data.medmnist.path", self.medmnist.name or self.medmnist.path)],
            "url": [("url.url", self.url.url), ("url.sha256", self.url.sha256)],
        }
        for key, value in required.get(self.source, []):
            if not value:
                raise ValueError(f"data.source is '{self.source}' but data.{key} is not set")
        for key, path in self.local_inputs():
            _check_versioned(f"data.{key}", path)
        if self.url.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.url.sha256):
            raise ValueError(f"data.url.sha256 must be 64 hex digits, got {self.url.sha256!r}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes has duplicates: {self.classes}")
        if self.classes is not None and len(self.classes) < 2:
            raise ValueError(f"data.classes needs at least 2 classes (or null for all), got {self.classes}")
        return self


def _check_versioned(key: str, path: str) -> None:
    """A local input must sit under SOURCES_DIR, the folder the download stage declares to DVC.

    Anywhere else DVC cannot see it change, and results would describe data that no
    longer exists; the URL and MedMNIST-by-name sources are pinned by their hashes instead.
    """
    parts = Path(path).parts
    if Path(path).is_absolute() or ".." in parts or Path(*parts[:2]) != Path(SOURCES_DIR) or len(parts) < 3:
        name = Path(path).name or "dataset"
        raise ValueError(
            f"{key} is {path!r}: a local source must be a relative path inside {SOURCES_DIR}/, the folder "
            f"the download stage declares to DVC, so that any change to it reruns the pipeline. Bring it "
            f"in with: dvc add {path} --out {SOURCES_DIR}/{name}  (then set {key}: {SOURCES_DIR}/{name})"
        )
