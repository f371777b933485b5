"""What every data source yields: one image to be checked, with its label."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Candidate:
    source: str  # where it came from (relative path or id), for the manifest and for rejection messages
    label: str
    open: Callable[[], Image.Image]  # opens (lazily) the image; may raise on a broken file
    split: str = ""  # "train", "val" or "test" when the source brings its own split, else ""
    group: str = ""  # rows sharing a group (e.g. a patient or lesion id) must stay in one split
