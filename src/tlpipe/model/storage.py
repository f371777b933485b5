"""Saving and loading the pipeline's Keras models.

A saved model is written atomically and byte-reproducibly (the same weights give the
same file, so DVC sees an unchanged model as unchanged), and read with Keras safe mode.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import keras

from tlpipe.core.errors import PipelineError


def load_model(path: Path) -> keras.Model:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: not found; run the train-frozen stage first")
    return keras.models.load_model(path, safe_mode=True)


def save_model_atomically(model: keras.Model, path: Path) -> None:
    """Save so that a kill leaves the previous file or none, never a truncated one.

    The archive is also made byte-reproducible, so the same weights give the same
    file and DVC sees an unchanged model as unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.keras")
    try:
        model.save(tmp)
        make_archive_reproducible(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a full disk, most likely: say where, and leave no half-written archive
        tmp.unlink(missing_ok=True)
        raise PipelineError(
            f"cannot save the model to {path}: {err.strerror or err}; "
            f"{'the previous model there is unchanged' if path.exists() else 'nothing was written there'}"
        ) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_archive_reproducible(path: Path) -> None:
    """Drop the save time from a .keras archive: fixed entry dates, no ``date_saved``."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                data = json.dumps(renumber_shared_objects(json.loads(data))).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type = info.compress_type
            fixed.external_attr = info.external_attr
            archive.writestr(fixed, data)


def renumber_shared_objects(config: object) -> object:
    """Replace Keras's ``shared_object_id`` values (Python ``id()``s) by 1, 2, 3... in order.

    The ids only link the places one object is shared between, so consistent
    renumbering keeps their meaning and drops the memory addresses that differ per run.
    """
    numbers: dict[object, int] = {}

    def walk(node: object) -> object:
        if isinstance(node, dict):
            return {
                k: numbers.setdefault(v, len(numbers) + 1) if k == "shared_object_id" else walk(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(config)
