"""Running a model written by ``tlpipe export``: ONNX Runtime or OpenVINO in place of Keras.

An export folder holds the network (``model.onnx``, or OpenVINO IR: ``model.xml`` and
``model.bin``), the decision (``decision.json``), the guard (``guard.npz``) when the
classifier has one, and ``export.json``, which says what is there and how closely the
export matched Keras when it was written. :func:`load_export` gives an object that
answers ``input_shape`` and ``predict`` as the Keras model does, so ``tlpipe predict``
and the served model run it through :func:`tlpipe.model.inference.decide` after
:mod:`tlpipe.data.pixels` decoding: the same code as for the ``.keras`` file, only the
network's arithmetic runs elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.core.errors import PipelineError
from tlpipe.core.files import read_json
from tlpipe.model.decision import DECISION_FILE, Decision, load_decision
from tlpipe.model.guard import GUARD_FILE, Guard, load_guard

MANIFEST = "export.json"
FORMATS = {"onnx": "model.onnx", "openvino": "model.xml"}  # format -> the file the runtime opens
RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}  # format -> the package that runs it
# format -> how to install what writes and runs it: ONNX's packages are tlpipe's own dependencies
INSTALL = {
    "onnx": "pip install -c constraints.txt -e .",
    "openvino": "pip install -c constraints.txt -e '.[openvino]'",
}
# images per runtime call: a served request of any size runs in bounded memory
CHUNK = 32

logger = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], list[np.ndarray]]


class ExportedModel:
    """An exported network, with what tlpipe asks of a Keras model: ``input_shape`` and ``predict``.

    ``predict`` returns the class output alone, or ``[classes, features]`` for an export made with
    the guard's features, in Keras's order and shapes.
    """

    def __init__(self, run: Runner, image_size: int, outputs: int) -> None:
        self._run = run
        self.image_size = image_size
        self.outputs = outputs

    @property
    def input_shape(self) -> tuple[None, int, int, int]:
        return (None, self.image_size, self.image_size, 3)

    def predict(self, images: object, verbose: int = 0) -> Any:
        batch = np.ascontiguousarray(images, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape[1:]:
            raise PipelineError(
                f"the export takes images of shape (n, {self.image_size}, {self.image_size}, 3), "
                f"got {batch.shape}"
            )
        parts = [self._run(batch[i : i + CHUNK]) for i in range(0, len(batch), CHUNK)]
        if not parts:
            raise PipelineError("the export was given no images")
        if len(parts[0]) != self.outputs:
            raise PipelineError(f"the export gave {len(parts[0])} outputs, its manifest says {self.outputs}")
        joined = [np.concatenate([part[k] for part in parts]) for k in range(self.outputs)]
        return joined[0] if self.outputs == 1 else joined


@dataclass(frozen=True)
class Export:
    model: ExportedModel
    decision: Decision
    guard: Guard | None
    manifest: dict[str, Any]


def is_export(path: str | Path) -> bool:
    """A folder written by ``tlpipe export``."""
    return (Path(path) / MANIFEST).is_file()


def open_runner(fmt: str, path: Path) -> Runner:
    """A function from a float32 image batch to the network's outputs, in order, on the CPU."""
    if fmt not in FORMATS:
        raise PipelineError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    try:
        if fmt == "onnx":
            return _onnx_runner(path)
        return _openvino_runner(path)
    except ImportError:
        raise PipelineError(
            f"{path} is an {fmt} export; running it needs the package {RUNTIMES[fmt]} ({INSTALL[fmt]})"
        ) from None


def _onnx_runner(path: Path) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # ONNX Runtime's threads spin between calls by default: where other work shares the cores (image
    # decoding in the same process, other jobs) that cost 2-3x throughput on 2 cores (docs/export.md)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: list(session.run(None, {name: batch}))


def _openvino_runner(path: Path) -> Runner:
    import openvino

    # float32 explicitly: on CPUs with bfloat16 units (AMX, AVX512-BF16) OpenVINO's default is to
    # compute in bfloat16, which moved probabilities by about 1e-2 where the issue allows 1e-4
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda batch: list(compiled(batch).to_tuple())


def runtime_version(fmt: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(RUNTIMES[fmt])
    except PackageNotFoundError:
        return "not installed"


def load_export(folder: Path) -> Export:
    """The export in ``folder``: its network ready to run, its decision and its guard.

    PipelineError, naming the file, when the folder is not a complete export.
    """
    folder = Path(folder)
    if not is_export(folder):
        raise PipelineError(f"{folder}: not an export (no {MANIFEST}); write one with tlpipe export")
    manifest = read_json(folder / MANIFEST)
    try:
        fmt, size, outputs = manifest["format"], int(manifest["image_size"]), list(manifest["outputs"])
        fitted, has_guard = bool(manifest["decision_fitted"]), bool(manifest["guard"])
    except (KeyError, TypeError, ValueError) as err:
        raise PipelineError(f"{folder / MANIFEST}: not an export manifest ({err})") from None
    network = folder / FORMATS.get(fmt, "?")
    if fmt in FORMATS and not network.is_file():
        raise PipelineError(f"{folder}: the {fmt} export's {network.name} is missing; export again")
    if has_guard != ("features" in outputs):
        raise PipelineError(f"{folder / MANIFEST}: guard {has_guard} but outputs {outputs}")
    decision = load_decision(folder / DECISION_FILE)
    if not fitted:
        logger.warning(
            "%s was exported without a fitted decision: raw probabilities and the most probable class, "
            "not the calibrated decision evaluate measured", folder,
        )  # fmt: skip
    guard = load_guard(folder / GUARD_FILE) if has_guard else None
    model = ExportedModel(open_runner(fmt, network), size, len(outputs))
    return Export(model, decision, guard, manifest)
