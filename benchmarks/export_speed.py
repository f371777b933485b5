"""``tlpipe export`` measured: parity with Keras on a test split, and throughput at batch 1 and 32 (issue 19).

For each export format (``--formats``, default every one whose packages are installed) the model is exported
with :func:`tlpipe.serve.export.export_model`, whose own parity check runs on the test images (Kermany's
official test split in ``../shared/data/chest_xray/test`` when it is there, else ``--images``): the largest
|Δp| between Keras and the export over every class probability, and the largest relative difference of the
guard's score. Throughput is then the network call that ``tlpipe predict`` and the served model make
(:func:`tlpipe.model.inference.decide`'s ``model.predict``), on random pixels, images/s: Keras's
``model.predict`` (what tlpipe runs), Keras's ``predict_on_batch`` (its lowest-overhead call, for an honest
ratio), and the export. The runners take turns, ``--rounds`` times, in one process, so load from other jobs
on the machine falls on all of them alike; the ratios are medians of per-round ratios. Two settings the
export's runtimes do not use are measured too, for the record of why: ONNX Runtime's default of spinning
threads, and OpenVINO's default precision (bfloat16 on CPUs with AMX or AVX512-BF16, with its |Δp|).

The subject (``--model``, default: built here) is EfficientNet-Lite0 with its ImageNet weights and a fresh head
at ``--size`` px, with a guard fitted on ``--guard-images`` training images (Kermany's train split when it is
there), exported with its features output as the pipeline's final model is; without a decision (a fresh head
has none fitted, and the decision is applied after the network, in numpy). A pipeline model with
``decision.json`` and ``guard.npz`` beside it is exported with them instead. Not part of the test suite;
about five minutes on 2 cores.

    .venv/bin/python benchmarks/export_speed.py --size 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from bench_repo import SHARED

REPO = Path(__file__).resolve().parents[1]
KERMANY = SHARED / "chest_xray"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "export_speed.json"
BATCHES = (1, 32)


def build_subject(folder: Path, size: int, guard_images: list[Path], guard_count: int) -> tuple[Path, Path]:
    """EfficientNet-Lite0 (ImageNet) plus a fresh seeded head, saved with its classes and, given training
    images, a guard fitted on the first part of them with its cut-off from the rest."""
    import keras

    from tlpipe.data.pixels import load_pixels
    from tlpipe.model import storage
    from tlpipe.model.guard import feature_model, fit_guard, save_guard
    from tlpipe.serve.predict import image_files
    from tlpipe.train.head import assemble, build_backbone_model, build_head

    keras.utils.set_random_seed(0)
    backbone = build_backbone_model("efficientnet_lite0", "imagenet", size)
    model = assemble(backbone, build_head(int(backbone.output_shape[-1]), 2, 0.0), 2, 0.0)
    model_path = folder / "model.keras"
    storage.save_model_atomically(model, model_path)
    classes = folder / "classes.json"
    classes.write_text(json.dumps(["NORMAL", "PNEUMONIA"]))
    if guard_images:
        files = image_files(guard_images)
        picked = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:guard_count]]
        pixels = np.stack([load_pixels(p, size) for p in picked])
        _, features = feature_model(model).predict(pixels, verbose=0)
        half = len(features) * 3 // 4
        save_guard(fit_guard(features[:half], features[half:], 0.99), folder / "guard.npz")
    return model_path, classes


def cpu_model() -> dict:
    """The processor's name and the bfloat16 units that decide OpenVINO's default precision."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    return {"processor": fields.get("model name", ""), "bf16_units": [f for f in flags if "bf16" in f]}


def rate(run: Callable[[np.ndarray], object], batch: np.ndarray, seconds: float) -> float:
    """Images/s of ``run`` on ``batch``, over at least ``seconds`` after one warm-up call."""
    run(batch)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 2:
        run(batch)
        calls += 1
    return calls * len(batch) / elapsed


def throughput(runners: dict[str, Callable], size: int, rounds: int, seconds: float) -> dict:
    """Per batch size: each runner's median images/s, and each one's median per-round ratio to every Keras
    runner, the runners taking turns round by round."""
    pixels = np.random.default_rng(1).uniform(0, 255, (max(BATCHES), size, size, 3)).astype(np.float32)
    result: dict[str, dict] = {}
    for batch in BATCHES:
        rates: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                rates[name].append(rate(run, pixels[:batch], seconds))
        keras_names = [n for n in runners if n.startswith("keras")]
        result[str(batch)] = {
            "images_per_s": {n: round(statistics.median(r), 1) for n, r in rates.items()},
            "ratio": {
                f"{n}/{k}": round(
                    statistics.median(a / b for a, b in zip(rates[n], rates[k], strict=True)), 2
                )
                for n in runners
                if not n.startswith("keras")
                for k in keras_names
            },
            "rounds": {n: [round(x, 1) for x in r] for n, r in rates.items()},
        }
    return result


def openvino_default_precision(
    export_dir: Path, parity_images: np.ndarray, keras_model
) -> tuple[Callable, dict]:
    """OpenVINO with its own default precision hint: a runner and its |Δp| on the parity images."""
    import openvino

    from tlpipe.model.outputs import class_probabilities

    compiled = openvino.Core().compile_model(str(export_dir / "model.xml"), "CPU")
    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    theirs = np.concatenate(
        [compiled(parity_images[i : i + 32]).to_tuple()[0] for i in range(0, len(parity_images), 32)]
    )
    ours = keras_model.predict(parity_images, verbose=0)
    ours = ours[0] if isinstance(ours, list) else ours
    dp = np.abs(class_probabilities(ours) - class_probabilities(theirs)).max()
    return (lambda batch: compiled(batch)), {"inference_precision": hint, "max_abs_dp": float(dp)}


def onnx_spinning(export_dir: Path) -> Callable:
    """ONNX Runtime with its default of spinning threads between calls, which the export turns off."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})


def measure(args: argparse.Namespace, work: Path) -> dict:
    from tlpipe.data.pixels import load_pixels
    from tlpipe.model.guard import feature_model, guard_path
    from tlpipe.model.storage import load_model
    from tlpipe.serve.export import export_model
    from tlpipe.serve.exported import load_export
    from tlpipe.serve.predict import image_files

    if args.model is None:
        model_path, classes = build_subject(work, args.size, args.guard_images, args.guard_count)
    else:
        model_path, classes = args.model, args.classes
    keras_model = load_model(model_path)
    has_guard = guard_path(model_path).is_file()
    network = feature_model(keras_model) if has_guard else keras_model
    size = int(network.input_shape[1])
    has_decision = (model_path.parent / "decision.json").is_file()
    test_files = image_files(args.images)
    parity_images = np.stack([load_pixels(p, size) for p in test_files])
    result: dict = {
        "subject": {"model": str(args.model or "EfficientNet-Lite0 (ImageNet) + fresh head"), "size": size,
                    "guard": has_guard, "decision": has_decision, "outputs": 2 if has_guard else 1},
        "parity_images": {"paths": [str(p) for p in args.images], "count": len(test_files)},
        "machine": {"cpus": os.cpu_count(), **cpu_model(), "load_average_start": os.getloadavg()},
        "method": {"rounds": args.rounds, "seconds_per_measurement": args.seconds,
                   "keras": "model.predict (what tlpipe runs) and predict_on_batch, same process, in turns"},
        "formats": {},
    }  # fmt: skip
    for fmt in args.formats:
        out = work / f"export-{fmt}"
        start = time.perf_counter()
        manifest = export_model(
            model_path,
            out,
            fmt,
            classes,
            with_decision=has_decision,
            with_guard=has_guard,
            check_images=args.images,
        )
        exported = load_export(out).model
        runners = {
            "keras_predict": lambda b: network.predict(b, verbose=0),
            "keras_predict_on_batch": network.predict_on_batch,
            fmt: exported.predict,
        }
        entry = {"export_seconds": round(time.perf_counter() - start, 1), "parity": manifest["parity"],
                 "bytes": sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model."))}  # fmt: skip
        if fmt == "onnx":
            runners["onnx_spinning"] = onnx_spinning(out)
        if fmt == "openvino":
            runners["openvino_default_precision"], entry["openvino_default_precision"] = (
                openvino_default_precision(out, parity_images, network)
            )
        entry["throughput"] = throughput(runners, size, args.rounds, args.seconds)
        result["formats"][fmt] = entry
    result["machine"]["load_average_end"] = os.getloadavg()
    return result


def table(result: dict) -> str:
    lines = [
        "| format | max \\|Δp\\| (test images) | batch | Keras predict img/s | Keras predict_on_batch img/s "
        "| export img/s | export / predict | export / predict_on_batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fmt, entry in result["formats"].items():
        for batch, row in entry["throughput"].items():
            speed, ratio = row["images_per_s"], row["ratio"]
            lines.append(
                f"| {fmt} | {entry['parity']['max_abs_dp']:.2g} | {batch} | {speed['keras_predict']} "
                f"| {speed['keras_predict_on_batch']} | {speed[fmt]} | {ratio[f'{fmt}/keras_predict']} "
                f"| {ratio[f'{fmt}/keras_predict_on_batch']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    installed = [
        f for f, package in (("onnx", "onnxruntime"), ("openvino", "openvino")) if find_spec(package)
    ]
    parser.add_argument("--formats", nargs="+", default=installed, choices=["onnx", "openvino"])
    parser.add_argument(
        "--model", type=Path, default=None, help="a .keras model (default: build the subject)"
    )
    parser.add_argument("--classes", type=Path, default=REPO / "data/augmented/classes.json")
    parser.add_argument("--size", type=int, default=128, help="the built subject's image size")
    default_test = [KERMANY / "test"] if KERMANY.is_dir() else None
    parser.add_argument("--images", nargs="+", type=Path, default=default_test, help="the parity test split")
    default_train = [KERMANY / "train"] if KERMANY.is_dir() else []
    parser.add_argument("--guard-images", nargs="*", type=Path, default=default_train)
    parser.add_argument("--guard-count", type=int, default=400, help="training images the guard is fitted on")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per runner, round and batch size")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not args.images:
        parser.error(f"no test split at {KERMANY / 'test'}: name the parity images with --images")
    with tempfile.TemporaryDirectory(prefix="tlpipe-export-speed-") as tmp:
        result = measure(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
