"""``tlpipe predict``: classify image files with a trained model, as a CSV.

Each image goes through the same steps as the pipeline's test images: decoded
with EXIF orientation, converted to RGB, resized to the model's input size with
the augment stage's interpolation, then fed as raw 0..255 pixels (the model
holds its own preprocessing). A file that cannot be read gets a row with the
reason instead of stopping the run.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tlpipe.augmentation import resize_transform
from tlpipe.candidates import Candidate
from tlpipe.errors import PipelineError
from tlpipe.manifest import read_json
from tlpipe.sources import IMAGE_EXTENSIONS, Rejected, decode_image

BATCH = 32


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """The given files, and the image files under the given folders (sorted, recursively)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        else:
            found.append(path)  # named explicitly: a missing or odd file is reported, not skipped
    return found


def load_pixels(path: Path, size: int) -> np.ndarray:
    """Raw RGB pixels as the model saw them in training; raises Rejected with the reason."""
    if not path.is_file():
        raise Rejected("no such file")
    candidate = Candidate(str(path), "", lambda: Image.open(path))
    image = decode_image(candidate, min_size=1, max_pixels=50_000_000, mode="RGB")
    pixels = np.asarray(image, dtype=np.uint8)
    return resize_transform(size)(image=pixels)["image"].astype(np.float32)


def predict_rows(model, files: Sequence[Path], classes: list[str], progress: bool) -> Iterator[dict]:
    """One CSV row per file: predicted class and probabilities, or the reason it was unreadable."""
    size = int(model.input_shape[1])
    batch: list[tuple[Path, np.ndarray]] = []
    with tqdm(total=len(files), unit="img", disable=not progress, file=sys.stderr) as bar:
        for path in files:
            try:
                batch.append((path, load_pixels(path, size)))
            except Rejected as err:
                yield {"path": str(path), "predicted": "", "error": str(err)}
            bar.update(1)
            if len(batch) == BATCH:
                yield from _classify(model, batch, classes)
                batch = []
        yield from _classify(model, batch, classes)


def _classify(model, batch: list[tuple[Path, np.ndarray]], classes: list[str]) -> Iterator[dict]:
    from tlpipe.training import class_probabilities  # TensorFlow: only once there is something to classify

    if not batch:
        return
    probs = class_probabilities(model.predict(np.stack([pixels for _, pixels in batch]), verbose=0))
    if probs.shape[1] != len(classes):
        raise PipelineError(
            f"the model has {probs.shape[1]} outputs but {len(classes)} class names were given"
        )
    for (path, _), row in zip(batch, probs):
        yield {
            "path": str(path),
            "predicted": classes[int(row.argmax())],
            "error": "",
            **{f"p_{c}": f"{p:.6f}" for c, p in zip(classes, row)},
        }


def predict(model_path: Path, paths: Sequence[str], classes_path: Path, out) -> tuple[int, int]:
    """Write the CSV to ``out``; returns (classified, unreadable)."""
    from tlpipe.training import load_model

    classes = read_json(classes_path)
    files = image_files(paths)
    if not files:
        raise PipelineError(f"no image files in {', '.join(map(str, paths))}")
    model = load_model(model_path)
    writer = csv.DictWriter(out, fieldnames=["path", "predicted", *(f"p_{c}" for c in classes), "error"],
                            lineterminator="\n")  # fmt: skip
    writer.writeheader()
    done = failed = 0
    progress = any(Path(p).is_dir() for p in paths)
    for row in predict_rows(model, files, classes, progress):
        writer.writerow(row)
        failed += bool(row["error"])
        done += not row["error"]
    return done, failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--classes", type=Path, default=Path("data/augmented/classes.json"))
    parser.add_argument("--out", type=Path, default=None, help="CSV file (default: standard output)")


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        done, failed = predict(args.model, args.paths, args.classes, sys.stdout)
    else:
        with open(args.out, "w", newline="", encoding="utf-8") as fh:
            done, failed = predict(args.model, args.paths, args.classes, fh)
    note = f"; {failed} unreadable (see the error column)" if failed else ""
    print(f"tlpipe predict: {done} images classified{note}", file=sys.stderr)
    return 0
