"""``tlpipe app``: a local upload page for the classifier, answering exactly as ``tlpipe predict`` does.

A small Starlette app served by uvicorn (both already pinned: MLflow's server runs on them), with one plain
HTML page and no assets from the internet. Each uploaded file is sent as the body of one request, read
into memory (never written to disk) up to a size limit, and classified by
:func:`tlpipe.serve.pyfunc.classify_images`, the function the served MLflow model runs, with the model's
saved decision and guard, its pixel count checked from its header before it is decoded. Nothing that holds patient data is logged: no file names, no pixels.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlpipe.core.errors import PipelineError
from tlpipe.core.images import Rejected
from tlpipe.model.decision import Decision
from tlpipe.model.guard import Guard
from tlpipe.serve.model_summary import local_summary, registry_summary

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8501
DEFAULT_MAX_UPLOAD_MB = 32.0
DEFAULT_MAX_PIXELS = 40_000_000  # a 6000 x 6000 X-ray fits; a decompression bomb's header says far more
TEMPLATE = Path(__file__).with_name("templates") / "app.html"
CAUTION = (
    "Not a diagnosis. This is a research model's output and it can be wrong: it was measured on one "
    "dataset, may not hold for your hospital, scanner or patients, and must be checked by a qualified reader."
)


@dataclass
class Served:
    """What the page answers with: the model (its feature model when there is a guard), decision and guard."""

    model: object
    decision: Decision
    guard: Guard | None
    summary: dict
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6)
    max_pixels: int = DEFAULT_MAX_PIXELS
    # one image at a time: TensorFlow runs a model on all cores anyway, and decoding swaps Pillow's
    # process-wide pixel limit, which concurrent decodes must not interleave
    lock: threading.RLock = field(default_factory=threading.RLock)

    def classify(self, data: bytes) -> dict:
        """One answer, with the columns and values of ``tlpipe predict``'s CSV (less the path)."""
        from tlpipe.serve.pyfunc import classify_images

        with self.lock:
            frame = classify_images(self.model, self.decision, [data], self.guard, self.max_pixels)
        return {k: _json_value(v) for k, v in frame.iloc[0].to_dict().items()}

    def heatmap(self, data: bytes) -> str:
        """The Grad-CAM overlay for the decided class, as a PNG data URL."""
        from PIL import Image

        from tlpipe.data.pixels import bytes_pixels
        from tlpipe.model.gradcam import gradcam_maps, overlay
        from tlpipe.model.inference import decide

        size = int(self.model.input_shape[1])  # type: ignore[attr-defined]
        with self.lock:
            pixels = bytes_pixels(data, size, self.max_pixels)
            # the decided class through the same call classify_images makes, on the pixels decoded once
            label = decide(self.model, self.decision, pixels[None], self.guard)[0].labels
            cam = gradcam_maps(self.model, pixels[None], label)[0]
        buffer = io.BytesIO()
        Image.fromarray(overlay(pixels.astype(np.uint8), cam)).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _json_value(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def load_served(model: str, classes: Path | None, decision: Path | None) -> Served:
    """A local ``.keras`` model with its decision and guard, or a logged model from an MLflow URI."""
    from tlpipe.serve.predict import is_mlflow_model, load_logged_model

    if is_mlflow_model(model):
        if classes is not None or decision is not None:
            raise PipelineError(f"--classes and --decision are for a .keras model; {model} carries its own")
        logged = load_logged_model(model).unwrap_python_model()
        return Served(logged.model, logged.decision, logged.guard, registry_summary(model))
    from tlpipe.core.files import read_json
    from tlpipe.model.guard import feature_model, guard_path, load_guard
    from tlpipe.model.storage import load_model
    from tlpipe.serve.predict import DEFAULT_CLASSES, local_decision

    path = Path(model)
    chosen = local_decision(path, read_json(classes or DEFAULT_CLASSES), decision)
    keras_model = load_model(path)
    guard = load_guard(guard_path(path)) if guard_path(path).is_file() else None
    served_model = feature_model(keras_model) if guard is not None else keras_model
    return Served(served_model, chosen, guard, local_summary(path))


def create_app(served: Served):
    """The Starlette app: the page, the model's summary, and one answer per uploaded file."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    from tlpipe.serve.predict import output_fields

    env = Environment(loader=FileSystemLoader(TEMPLATE.parent), autoescape=select_autoescape())
    page = env.get_template(TEMPLATE.name).render(
        caution=CAUTION,
        summary=served.summary,
        columns=output_fields(served.decision.classes),
        classes=served.decision.classes,
        max_upload_mb=served.max_upload_bytes / 1e6,
    )

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def body_or_error(request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > served.max_upload_bytes:
            return _too_large(served)
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > served.max_upload_bytes:
                return _too_large(served)
            chunks.append(chunk)
        return b"".join(chunks)

    async def predict(request: Request) -> JSONResponse:
        data = await body_or_error(request)
        if isinstance(data, JSONResponse):
            return data
        answer = await run_in_threadpool(served.classify, data)
        return JSONResponse(answer)

    async def gradcam(request: Request) -> JSONResponse:
        data = await body_or_error(request)
        if isinstance(data, JSONResponse):
            return data
        try:
            return JSONResponse({"overlay": await run_in_threadpool(served.heatmap, data)})
        except (Rejected, ValueError) as err:
            return JSONResponse({"error": str(err)}, status_code=422)

    async def summary(request: Request) -> JSONResponse:
        return JSONResponse(served.summary)

    routes = [
        Route("/", index),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/gradcam", gradcam, methods=["POST"]),
        Route("/api/model", summary),
    ]
    return Starlette(routes=routes)


def _too_large(served: Served):
    from starlette.responses import JSONResponse

    limit = served.max_upload_bytes / 1e6
    return JSONResponse(
        {"predicted": "", "error": f"file over the page's limit of {limit:g} MB (--max-upload-mb)"},
        status_code=413,
    )


# ---- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tlpipe.serve.predict import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a .keras file (default: {DEFAULT_MODEL}) or an MLflow model URI, e.g. "
                        "models:/tlpipe-classifier@champion")  # fmt: skip
    parser.add_argument("--classes", type=Path, default=None, help="class names of a .keras model")
    parser.add_argument("--decision", type=Path, default=None, help="decision of a .keras model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")  # fmt: skip
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest file accepted (default {DEFAULT_MAX_UPLOAD_MB:g} MB)")  # fmt: skip
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"largest image accepted, width x height (default {DEFAULT_MAX_PIXELS})")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import uvicorn

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "tlpipe app: listening on %s: the page has no authentication; anyone who can reach this address "
            "can upload images and see the answers", args.host,
        )  # fmt: skip
    served = load_served(args.model, args.classes, args.decision)
    served.max_upload_bytes = int(args.max_upload_mb * 1e6)
    served.max_pixels = args.max_pixels
    logger.info("tlpipe app: %s on http://%s:%d/", served.summary.get("name"), args.host, args.port)
    # no access log: the page's requests hold no file names, but nothing about uploads is logged at all
    uvicorn.run(create_app(served), host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0
