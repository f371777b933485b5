"""``tlpipe export``: the final model as ONNX (or OpenVINO IR), with its decision and guard.

The export folder is what ``tlpipe predict --model FOLDER`` and the served model
(:func:`tlpipe.serve.pyfunc.log_exported_model`) run; :mod:`tlpipe.serve.exported`
reads it. Nothing the ``.keras`` model answers with is left behind: the decision
(``decision.json``) is required, and so is the guard (``guard.npz``) unless
``--no-decision`` / ``--no-guard`` say to go without, which ``export.json`` then
records. With a guard the network is exported with a second output, the pooled
backbone features the guard scores (:func:`tlpipe.model.guard.feature_model`).

Before the folder is put in place the export is run beside Keras on check images
(random pixels, or ``--check-images``): a probability more than ``PARITY_TOLERANCE``
from Keras's, or a guard score more than that apart relatively, refuses it; the
figures go to ``export.json``. ONNX is the default format: docs/export.md has the
measurements it was picked by.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.core.errors import PipelineError
from tlpipe.core.files import atomic_dir, path_digest, read_json, write_json
from tlpipe.core.images import Rejected
from tlpipe.data.pixels import load_pixels
from tlpipe.model.decision import DECISION_FILE, Decision, argmax_decision, decision_path, load_decision
from tlpipe.model.guard import GUARD_FILE, Guard, feature_model, guard_path, load_guard
from tlpipe.serve.exported import (
    FORMATS,
    INSTALL,
    MANIFEST,
    RUNTIMES,
    ExportedModel,
    is_export,
    open_runner,
    runtime_version,
)
from tlpipe.serve.predict import DEFAULT_CLASSES, DEFAULT_MODEL, image_files

DEFAULT_FORMAT = "onnx"
DEFAULT_OUT = Path("models/export")
# the largest |Δp| between Keras and the export that is accepted, and the largest relative
# difference of a guard score
PARITY_TOLERANCE = 1e-4
RANDOM_CHECK_IMAGES = 16

logger = logging.getLogger(__name__)


def export_model(
    model_path: Path,
    out: Path,
    fmt: str = DEFAULT_FORMAT,
    classes_path: Path | None = None,
    decision_file: Path | None = None,
    guard_file: Path | None = None,
    with_decision: bool = True,
    with_guard: bool = True,
    check_images: list[Path] | None = None,
) -> dict[str, Any]:
    """Write the export of ``model_path`` to the folder ``out``; returns its manifest.

    ``decision_file`` and ``guard_file`` default to the files the evaluate stage writes beside the
    model; without ``with_decision`` / ``with_guard`` the export goes without them on purpose.
    """
    model_path, out = Path(model_path), Path(out)
    if fmt not in FORMATS:
        raise PipelineError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_destination(out, model_path)
    classes = [str(c) for c in read_json(classes_path or DEFAULT_CLASSES)]
    decision, decision_source = _decision(model_path, classes, decision_file, with_decision)
    guard, guard_source = _guard(model_path, guard_file, with_guard)

    from tlpipe.model.storage import load_model  # TensorFlow: only once the inputs are known to be there

    network = _network(load_model(model_path), guard)
    size = int(network.input_shape[1])
    images, described = _check_batch(check_images, size)
    with atomic_dir(out) as scratch:
        _write_network(network, fmt, scratch / FORMATS[fmt])
        if decision_source is None:
            from tlpipe.model.decision import save_decision

            save_decision(decision, scratch / DECISION_FILE)
        else:
            shutil.copyfile(decision_source, scratch / DECISION_FILE)  # byte for byte: diffable
        if guard_source is not None:
            shutil.copyfile(guard_source, scratch / GUARD_FILE)
        outputs = ["probabilities", "features"] if guard else ["probabilities"]
        manifest: dict[str, Any] = {
            "format": fmt,
            "model_file": FORMATS[fmt],
            "image_size": size,
            "outputs": outputs,
            "decision_fitted": decision_source is not None,
            "guard": guard is not None,
            "source_model": {"path": str(model_path), "sha256": path_digest(model_path)},
            "versions": {"keras": version("keras"), RUNTIMES[fmt]: runtime_version(fmt)},
        }
        exported = ExportedModel(open_runner(fmt, scratch / FORMATS[fmt]), size, len(outputs))
        parity = compare(network, exported, images, guard)
        worst = {"a probability": parity["max_abs_dp"], "an unfamiliarity score (relative)":
                 parity.get("max_rel_d_unfamiliarity", 0.0)}  # fmt: skip
        for what, gap in worst.items():
            if gap > PARITY_TOLERANCE:
                raise PipelineError(
                    f"the {fmt} export differs from the Keras model by up to {gap:.3g} in {what} on "
                    f"{described} (at most {PARITY_TOLERANCE:g} is accepted); nothing was written"
                )
        manifest["parity"] = {"check_images": described, "tolerance": PARITY_TOLERANCE, **parity}
        write_json(scratch / MANIFEST, manifest)
    logger.info(
        "tlpipe export: %s (%s, %d px%s%s); max |Δp| vs Keras %.2g on %s",
        out, fmt, size, "" if decision_source else ", no fitted decision", ", guard" if guard else ", no guard",
        parity["max_abs_dp"], described,
    )  # fmt: skip
    return manifest


def compare(
    keras_model, exported: ExportedModel, images: np.ndarray, guard: Guard | None
) -> dict[str, float]:
    """How far the export's answers are from Keras's on ``images``: the largest |Δp| over every class
    probability, and with a guard the largest relative difference of the unfamiliarity score."""
    from tlpipe.model.outputs import class_probabilities

    ours, theirs = keras_model.predict(images, verbose=0), exported.predict(images)
    if guard is None:
        ours, theirs = [ours], [theirs]
    dp = np.abs(class_probabilities(ours[0]) - class_probabilities(theirs[0]))
    result = {"max_abs_dp": float(dp.max())}
    if guard is not None:
        keras_scores, export_scores = guard.scores(ours[1]), guard.scores(theirs[1])
        relative = np.abs(keras_scores - export_scores) / np.maximum(np.abs(keras_scores), 1e-12)
        result["max_rel_d_unfamiliarity"] = float(relative.max())
    return result


def _check_destination(out: Path, model_path: Path) -> None:
    # atomic_dir replaces the folder whole: never let a typo replace models/ or a data folder
    if out.resolve() in (model_path.resolve().parent, *model_path.resolve().parents):
        raise PipelineError(f"{out} holds the model {model_path}; name another folder for the export")
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out} is a file; name a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise PipelineError(
            f"{out} is a folder with other content (no {MANIFEST}); the export replaces its folder whole, "
            "so name a new or empty folder"
        )


def _decision(
    model_path: Path, classes: list[str], decision_file: Path | None, with_decision: bool
) -> tuple[Decision, Path | None]:
    """The decision to carry and its file; without one on purpose, the argmax over raw probabilities."""
    if not with_decision:
        if decision_file is not None:
            raise PipelineError("--decision and --no-decision contradict each other; give one")
        logger.warning(
            "tlpipe export: --no-decision: the export answers with raw probabilities and the argmax"
        )
        return argmax_decision(classes), None
    path = decision_file or decision_path(model_path)
    if not path.is_file():
        raise PipelineError(
            f"no decision at {path}: run the evaluate stage (it writes {DECISION_FILE} beside the model), "
            "name one with --decision, or export raw probabilities on purpose with --no-decision"
        )
    decision = load_decision(path)
    if decision.classes != classes:
        raise PipelineError(f"{path} is for classes {decision.classes}, the model's are {classes}")
    return decision, path


def _guard(model_path: Path, guard_file: Path | None, with_guard: bool) -> tuple[Guard | None, Path | None]:
    if not with_guard:
        if guard_file is not None:
            raise PipelineError("--guard and --no-guard contradict each other; give one")
        logger.warning("tlpipe export: --no-guard: the export's answers have no unfamiliar column")
        return None, None
    path = guard_file or guard_path(model_path)
    if not path.is_file():
        raise PipelineError(
            f"no guard at {path}: run the evaluate stage (it writes {GUARD_FILE} beside the model), "
            "name one with --guard, or export without the unfamiliar-input check on purpose with --no-guard"
        )
    return load_guard(path), path


def _network(model, guard: Guard | None):
    """What gets exported: the classifier, with a guard also returning the features it scores."""
    shape = tuple(model.input_shape) if len(model.inputs) == 1 else ()
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or shape[1] is None:
        raise PipelineError(f"tlpipe export takes a model of square RGB images, this one takes {shape}")
    not_float32 = sorted({layer.dtype_policy.name for layer in _layers(model)} - {"float32"})
    if not_float32:
        raise PipelineError(
            f"the model computes in {', '.join(not_float32)} (mixed precision, trained on a GPU); the export "
            "runs in float32, so retrain with train_frozen.mixed_precision and fine_tune.mixed_precision: off"
        )
    network = feature_model(model) if guard is not None else model
    if guard is not None:
        width = int(network.outputs[1].shape[-1])
        if guard.mean.shape != (width,):
            raise PipelineError(
                f"the guard is for {guard.mean.shape[0]} features, the model's head reads {width}; "
                "the guard.npz is not this model's: run the evaluate stage again"
            )
    # Keras exports only a model that has run once
    network.predict(np.zeros((1, *shape[1:]), dtype=np.float32), verbose=0)
    return network


def _layers(model) -> list:
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found += _layers(layer)
    return found


def _write_network(network, fmt: str, path: Path) -> None:
    if fmt == "openvino":  # its converter's telemetry is on unless the user's consent file says no
        logger.warning(
            "tlpipe export: OpenVINO's converter sends usage telemetry (Google Analytics) unless you opt "
            "out once with opt_in_out --opt_out; the onnx format sends nothing"
        )
    # tf2onnx logs every rewrite at INFO and warns about numpy 2, which Keras patches around
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            network.export(str(path), format=fmt, verbose=False)
        except ImportError as err:
            raise PipelineError(
                f"writing an {fmt} export needs the package {err.name}: {INSTALL[fmt]}"
            ) from None


def _check_batch(check_images: list[Path] | None, size: int) -> tuple[np.ndarray, str]:
    """The images parity is checked on: the given ones decoded as predict decodes them, or seeded random
    pixels (every weight takes part whatever the pixels, and the check needs no data)."""
    if not check_images:
        rng = np.random.default_rng(0)
        return rng.uniform(0, 255, (RANDOM_CHECK_IMAGES, size, size, 3)).astype(np.float32), (
            f"{RANDOM_CHECK_IMAGES} random-pixel images"
        )
    files = image_files(check_images)
    pixels = []
    for path in files:
        try:
            pixels.append(load_pixels(path, size))
        except Rejected as err:
            raise PipelineError(f"check image {path}: {err}") from None
    if not pixels:
        raise PipelineError(f"no image files in {', '.join(map(str, check_images))}")
    return np.stack(pixels), f"{len(pixels)} images from {', '.join(map(str, check_images))}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL), help=f"default: {DEFAULT_MODEL}")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"the export folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--format", choices=sorted(FORMATS), default=DEFAULT_FORMAT, help=f"default: {DEFAULT_FORMAT}"
    )
    parser.add_argument("--classes", type=Path, default=None, help=f"default: {DEFAULT_CLASSES}")
    parser.add_argument("--decision", type=Path, default=None, help="default: decision.json beside the model")
    parser.add_argument("--guard", type=Path, default=None, help="default: guard.npz beside the model")
    parser.add_argument(
        "--no-decision", action="store_true", help="export without a decision: raw probabilities, argmax"
    )
    parser.add_argument("--no-guard", action="store_true", help="export without the unfamiliar-input guard")
    parser.add_argument(
        "--check-images",
        nargs="+",
        type=Path,
        default=None,
        help=f"files or folders to check parity with Keras on (default: {RANDOM_CHECK_IMAGES} random-pixel images)",
    )

    parser.add_argument(
        "--log-model",
        action="store_true",
        help="also log the export to MLflow (MLFLOW_TRACKING_URI's store) as the raw-image model "
        "'classifier' of an 'export' run, and print its URI for mlflow models serve or tlpipe promote",
    )


def log_export(out: Path, manifest: dict[str, Any], example_image_bytes: bytes) -> str:
    """The export logged as the raw-image pyfunc model in an ``export`` run; returns its model URI."""
    from tlpipe.core import tracking
    from tlpipe.serve.pyfunc import log_exported_model

    params = {"format": manifest["format"], "source_model": manifest["source_model"]["path"]}
    tags = {"tlpipe.export.source_sha256": manifest["source_model"]["sha256"]}
    with tracking.stage_run("export", params, tags=tags):
        tracking.log_metrics({f"parity.{k}": float(v) for k, v in manifest["parity"].items() if k != "check_images"
                              and not isinstance(v, str)})  # fmt: skip
        info = log_exported_model(out, example_image_bytes)
    return f"models:/{info.model_id}"


def _example_image(check_images: list[Path] | None) -> bytes:
    """An image file for MLflow's input example, which it runs through the logged model once."""
    if check_images:
        return image_files(check_images)[0].read_bytes()
    from tlpipe.core.images import png_bytes

    return png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def run(args: argparse.Namespace) -> int:
    manifest = export_model(
        args.model, args.out, args.format, args.classes, args.decision, args.guard,
        with_decision=not args.no_decision, with_guard=not args.no_guard, check_images=args.check_images,
    )  # fmt: skip
    if args.log_model:
        uri = log_export(args.out, manifest, _example_image(args.check_images))
        logger.info("tlpipe export: logged as %s", uri)
        sys.stdout.write(f"{uri}\n")  # stdout carries the command's data: here the model's URI
    return 0
