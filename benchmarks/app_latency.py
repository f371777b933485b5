"""Latency of the upload page (``tlpipe app``): one 1024x1024 JPEG answered, model loaded; and 20 at once.

Serves a model (``--model``, a .keras file with its decision and guard beside it, as the pipeline leaves
them; default: EfficientNet-Lite0 at ``--size`` px with an untrained head, which costs the same) on a free
local port, warms it up, then times sequential uploads from a client in the same process and 20 concurrent
ones. The image is a real chest X-ray from ../shared/data/chest_xray upscaled to 1024x1024 when there is one.

    .venv/bin/python benchmarks/app_latency.py --out results/app_latency.json [--model models/model.keras]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench_repo import SHARED, report_json, tests_on_path


def xray_jpeg(size: int = 1024) -> bytes:
    found = sorted((SHARED / "chest_xray" / "test" / "PNEUMONIA").glob("*.jpeg"))[:1]
    image = Image.open(found[0]).convert("L") if found else Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8))  # fmt: skip
    buffer = io.BytesIO()
    image.resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def default_model(root: Path, size: int) -> tuple[Path, Path]:
    from tlpipe.model import storage
    from tlpipe.train import head

    backbone = head.build_backbone_model("efficientnet_lite0", "imagenet", size)
    classifier = head.build_head(int(backbone.output_shape[-1]), 2, dropout=0.2)
    storage.save_model_atomically(head.assemble(backbone, classifier, 2, dropout=0.2), root / "model.keras")
    (root / "classes.json").write_text(json.dumps(["NORMAL", "PNEUMONIA"]))
    return root / "model.keras", root / "classes.json"


def post(url: str, body: bytes) -> tuple[float, dict]:
    request = urllib.request.Request(url, data=body, method="POST")
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - start, answer


def main(argv: list[str] | None = None) -> int:
    tests_on_path()
    from app_fixtures import serving  # the tests' in-process server: same app, a free port

    from tlpipe.serve.app import load_served

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--classes", type=Path, default=None)
    parser.add_argument(
        "--size", type=int, default=128, help="input size of the default model (Kermany recipe)"
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model, classes = (args.model, args.classes) if args.model else default_model(Path(tmp), args.size)
        served = load_served(str(model), classes, None)
        body = xray_jpeg()
        with serving(served) as url:
            for _ in range(3):
                post(url + "api/predict", body)  # warm-up: first calls trace the model
            times = [post(url + "api/predict", body)[0] for _ in range(args.repeats)]
            gradcam = [post(url + "api/gradcam", body)[0] for _ in range(3)]
            start = time.perf_counter()
            with ThreadPoolExecutor(20) as pool:
                answers = list(pool.map(lambda _: post(url + "api/predict", body), range(20)))
            concurrent_wall = time.perf_counter() - start
    errors = [a for _, a in answers if a.get("error")]
    result = {
        "model": str(args.model or f"efficientnet_lite0 at {args.size}px (untrained head)"),
        "input_size": int(served.model.input_shape[1]),  # type: ignore[attr-defined]
        "guard": served.guard is not None,
        "jpeg": {"pixels": "1024x1024", "bytes": len(body)},
        "sequential_ms": {
            "median": round(1000 * statistics.median(times), 1),
            "p90": round(1000 * sorted(times)[int(0.9 * len(times)) - 1], 1),
            "max": round(1000 * max(times), 1),
            "n": len(times),
        },
        "gradcam_ms_median": round(1000 * statistics.median(gradcam), 1),
        "concurrent_20": {
            "answered": len(answers),
            "errors": len(errors),
            "wall_s": round(concurrent_wall, 2),
            "slowest_ms": round(1000 * max(t for t, _ in answers), 1),
        },
    }
    report_json(result, args.out)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
