"""Issue 19's side-by-side benchmark: every stage's wall time, CPU time, images/s and peak RSS, per recipe and
image size, beside the raw backbone's forward throughput and a plain Keras fit through the frozen backbone.

For each recipe and ``--size``, in a scratch copy of the repository (the dataset brought in as the README
says, ``tlpipe recipe NAME``, then ``augment.image_size=SIZE`` and the ``--set`` overrides): each stage run
alone (``dvc repro -s STAGE``), its wall time, its processes' CPU time and the peak RSS of its largest
process (``wait4``'s rusage of that one command); then, on the same augmented images, each in its own
process: (a) the backbone's forward pass over the train images (the frozen phase's limit) and (b) a plain
Keras ``fit`` through the frozen backbone for one epoch (what a user would write; tracing included), with
``train_frozen``'s batch size, precision and distribution. The images/s basis of each row is in the table's
notes. Not part of the test suite; needs ../shared/data (Kermany at 224 px: about 20 min on 2 cores).

    .venv/bin/python benchmarks/stage_table.py --recipe pneumoniamnist --recipe kermany --size 128 --size 224 \\
        --label before --out benchmarks/results/stage_table_before.json
    .venv/bin/python benchmarks/stage_table.py --table benchmarks/results/stage_table_before.json [MORE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from bench_repo import RECIPES, REPO, STAGES, recipe_repo, report_json

RATE_BASIS = {
    "download": "images in data/raw",
    "split": "images in data/split",
    "augment": "images written to data/augmented",
    "train-frozen": "train+val images (the feature pass) over the whole stage (head and out-of-fold fits included)",
    "fine-tune": "train images x epochs run",
    "evaluate": "test images",
    # the probes' rates are over their timed pass; their wall s is the whole process (start, import, build)
    "forward": "train images through the backbone over the timed predict (after one warm-up batch)",
    "naive_fit": "train+val images over one timed epoch of fit through the frozen backbone (tracing included)",
}
PROBES = {"forward": "(a) raw backbone forward", "naive_fit": "(b) plain Keras fit, frozen backbone"}


def stage_images(stage: str, counts: dict) -> int | None:
    """The number of images a stage's images/s divides by (``RATE_BASIS``); None where none applies."""
    basis = {
        "download": counts.get("raw"),
        "split": counts.get("split"),
        "augment": counts.get("augmented"),
        "train-frozen": counts.get("train", 0) + counts.get("val", 0),
        "fine-tune": counts.get("train", 0) * counts.get("fine_tune_epochs", 0),
        "evaluate": counts.get("test"),
    }
    return basis.get(stage) or None


def rate(images: int | None, seconds: float) -> float | None:
    return round(images / seconds, 1) if images and seconds > 0 else None


# Linux counts in a process's peak RSS the memory of the process it was forked from (the high-water mark
# is kept across exec), so a command forked from this one, or from a test worker holding TensorFlow,
# would report that size. A small fresh Python process starts the command and reports its wait4.
_STARTER = (
    "import json, os, subprocess, sys\n"
    "proc = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(proc.pid, 0)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    json.dump({'code': os.waitstatus_to_exitcode(status), 'cpu_s': usage.ru_utime + usage.ru_stime,"
    " 'maxrss': usage.ru_maxrss}, f)\n"
)


def measured(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run ``cmd`` with its output to ``log``: wall and CPU seconds (its whole process tree) and the peak
    RSS of its largest process, from ``wait4``: this command's alone, not the benchmark's so far."""
    report = log.with_name(log.name + ".rusage.json")
    with open(log, "w") as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _STARTER, str(report), *cmd], cwd=cwd, env=env, stdout=out,
                       stderr=subprocess.STDOUT, check=False)  # fmt: skip
        wall = time.perf_counter() - start
    usage = json.loads(report.read_text())
    report.unlink()
    if usage["code"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({usage['code']}): see {log}")
    kib = 1024 * (1024 if sys.platform == "darwin" else 1)  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"wall_s": round(wall, 1), "cpu_s": round(usage["cpu_s"], 1),
            "peak_rss_mib": round(usage["maxrss"] / kib, 1)}  # fmt: skip


def count_rows(path: Path, column: str | None = None) -> dict[str, int]:
    """Rows of a CSV (``""``), and per value of ``column`` when given."""
    counts: dict[str, int] = {"": 0}
    if path.is_file():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                counts[""] += 1
                if column:
                    counts[row[column]] = counts.get(row[column], 0) + 1
    return counts


def image_counts(repo: Path) -> dict[str, int]:
    augmented = count_rows(repo / "data/augmented/manifest.csv", "split")
    return {
        "raw": count_rows(repo / "data/raw/manifest.csv")[""],
        "split": count_rows(repo / "data/split/manifest.csv")[""],
        "augmented": augmented[""],
        **{s: augmented.get(s, 0) for s in ("train", "val", "test")},
        "train_frozen_epochs": count_rows(repo / "results/train_frozen/history.csv")[""],
        "fine_tune_epochs": count_rows(repo / "results/fine_tune/history.csv")[""],
    }


def feature_pass(log: Path) -> dict | None:
    """train-frozen's own timing of its feature pass, from its log line."""
    found = re.search(r"(\d+) feature vectors ready in ([\d.]+)s", log.read_text(errors="replace"))
    if not found:
        return None
    images, seconds = int(found.group(1)), float(found.group(2))
    return {"images": images, "seconds": seconds, "images_per_s": rate(images, seconds)}


def run_one(recipe: str, size: int, sets: list[str], log_dir: Path) -> dict:
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"tlpipe-bench-table-{recipe}-{size}-") as tmp:
        repo = Path(tmp)
        env = recipe_repo(repo, recipe, [*sets, f"augment.image_size={size}"])
        shutil.copy2(repo / "params.yaml", log_dir / "params.yaml")
        stages = {}
        for stage in STAGES:
            cmd = [sys.executable, "-m", "dvc", "repro", "-s", stage]
            stages[stage] = measured(cmd, repo, env, log_dir / f"{stage}.log")
            print(f"{recipe} {size}px: {stage} {stages[stage]}", file=sys.stderr, flush=True)
        counts = image_counts(repo)
        for stage, row in stages.items():
            row["images"] = stage_images(stage, counts)
            row["images_per_s"] = rate(row["images"], row["wall_s"])
        metrics = json.loads((repo / "results/evaluate/metrics.json").read_text())
        probes = {}
        for probe in PROBES:
            result_file = repo / f"probe-{probe}.json"
            cmd = [sys.executable, __file__, "--probe", probe, "--probe-out", str(result_file)]
            probes[probe] = measured(cmd, repo, env, log_dir / f"probe-{probe}.log")
            probes[probe].update(json.loads(result_file.read_text()))
            print(f"{recipe} {size}px: {probe} {probes[probe]}", file=sys.stderr, flush=True)
    naive = probes["naive_fit"]
    naive["projected_frozen_phase_s"] = round(naive["fit_s"] * counts["train_frozen_epochs"], 1)
    return {
        "recipe": recipe,
        "size": size,
        "counts": counts,
        "stages": stages,
        "feature_pass": feature_pass(log_dir / "train-frozen.log"),
        "probes": probes,
        "total_wall_s": round(sum(s["wall_s"] for s in stages.values()), 1),
        "total_cpu_s": round(sum(s["cpu_s"] for s in stages.values()), 1),
        "peak_rss_mib": max(s["peak_rss_mib"] for s in stages.values()),
        "test_roc_auc": metrics.get("roc_auc"),
        "test_accuracy": metrics.get("accuracy"),
    }


def probe(kind: str, out: Path) -> None:
    """In the child, in the scratch repository: (a) or (b) on its augmented images, with its params."""
    import keras

    from naive_fit import fit_through_frozen_backbone
    from tlpipe.core.config import load_params
    from tlpipe.data.datasets import image_dataset, load_augmented
    from tlpipe.train.devices import apply_precision, distribution_strategy
    from tlpipe.train.fitting import seed_everything
    from tlpipe.train.head import build_backbone_model, build_head

    params = load_params("params.yaml").train_frozen
    strategy = distribution_strategy(params.distribution)
    seed_everything(params.seed)
    policy = apply_precision(params.mixed_precision)
    data = load_augmented(Path("data/augmented"))
    train, val = data.split("train"), data.split("val")
    with strategy.scope():
        backbone = build_backbone_model(params.backbone, params.weights, data.image_size)
        if kind == "forward":
            ds = image_dataset(train, params.batch_size, with_labels=False)
            backbone.predict(ds.take(1), verbose=0)  # build and trace outside the timing
            images, start = len(train.paths), time.perf_counter()
            backbone.predict(ds, verbose=0)
        else:
            features = int(backbone.output_shape[-1])
            head = build_head(features, len(data.classes), params.dropout, params.head_l2)
            images, start = len(train.paths) + len(val.paths), time.perf_counter()
            fit_through_frozen_backbone(backbone, head, data, params.model_copy(update={"epochs": 1}))
    seconds = time.perf_counter() - start
    out.write_text(json.dumps({"images": images, "fit_s": round(seconds, 2), "images_per_s": rate(images, seconds),
                               "batch_size": params.batch_size, "policy": policy,
                               "replicas": strategy.num_replicas_in_sync, "keras": keras.__version__}))  # fmt: skip


def machine() -> dict:
    versions = {}
    for name in ("tensorflow", "tensorflow-cpu", "keras"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.*)", cpu)
    smi = shutil.which("nvidia-smi")
    gpus = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout if smi else ""
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return {"cpus": os.cpu_count(), "cpu": model and model.group(1), "platform": platform.platform(),
            "gpus": [g for g in gpus.splitlines() if g.startswith("GPU ")], **versions,
            "commit": git.stdout.strip() or None}  # fmt: skip


def cell(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(runs: list[dict]) -> str:
    """Stage-table runs (each with its result's label) as Markdown: a summary, then every step."""
    summary = [
        "| label | recipe | px | total wall s | total CPU s | peak RSS MiB | test ROC-AUC | feature pass img/s "
        "| (a) forward img/s | (b) plain fit img/s | (b) x frozen epochs s |",
        "|---" * 11 + "|",
    ]
    stages = [
        "| label | recipe | px | step | wall s | CPU s | images | images/s | peak RSS MiB |",
        "|---" * 9 + "|",
    ]
    for run in runs:
        label, head = run["label"], f"{run['recipe']} | {run['size']}"
        probes, fp = run["probes"], run.get("feature_pass") or {}
        summary.append(
            f"| {label} | {head} | {cell(run['total_wall_s'])} | {cell(run['total_cpu_s'])} "
            f"| {cell(run['peak_rss_mib'])} | {cell(run.get('test_roc_auc'), 3)} | {cell(fp.get('images_per_s'))} "
            f"| {cell(probes['forward']['images_per_s'])} | {cell(probes['naive_fit']['images_per_s'])} "
            f"| {cell(probes['naive_fit'].get('projected_frozen_phase_s'))} |"
        )
        rows = [(s, run["stages"][s]) for s in STAGES if s in run["stages"]]
        rows += [(PROBES[p], probes[p]) for p in PROBES]
        for step, row in rows:
            stages.append(
                f"| {label} | {head} | {step} | {cell(row['wall_s'])} | {cell(row['cpu_s'])} "
                f"| {cell(row.get('images'))} | {cell(row.get('images_per_s'))} | {cell(row['peak_rss_mib'])} |"
            )
    notes = ["", "images/s per step: " + "; ".join(f"{k}: {v}" for k, v in RATE_BASIS.items()) + ". "
             "Feature pass: train-frozen's own timing of its backbone pass (its log). (b) x frozen epochs: the "
             "plain fit's epoch time times the epochs train-frozen ran (what that recipe would cost). Peak RSS: "
             "the step's largest process. CPU s: all its processes, user + system."]  # fmt: skip
    return "\n".join([*summary, "", *stages, *notes])


def precision_table(result: dict) -> str:
    """precision_speed.py's result as Markdown."""
    lines = [
        f"| variant ({result['size']} px, batch {result['batch']}) | forward images/s | training images/s |",
        "|---|---|---|",
    ]
    for name, v in result["variants"].items():
        lines.append(
            f"| {name} | {cell(v.get('forward_images_per_s'))} | {cell(v.get('train_images_per_s', v.get('error')))} |"
        )
    return "\n".join(lines)


def tables(results: list[dict]) -> str:
    """Stage-table results merged into one pair of tables, then each precision_speed result."""
    runs = [{"label": r.get("label", ""), **run} for r in results if "runs" in r for run in r["runs"]]
    parts = [markdown_table(runs)] if runs else []
    parts += [precision_table(r) for r in results if "variants" in r]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="repeat for several")
    parser.add_argument("--size", action="append", type=int, help="augment.image_size; repeat (default 128 224)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override")
    parser.add_argument("--label", default="run", help="names this run in the table (e.g. before, after)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--log-dir", type=Path, default=Path("results/bench_logs/stage_table"))
    parser.add_argument("--table", type=Path, nargs="+", help="only print the tables of result JSONs")
    parser.add_argument("--probe", choices=sorted(PROBES), help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--probe-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(args.probe, args.probe_out)
        return 0
    if args.table:
        print(tables([json.loads(path.read_text()) for path in args.table]))
        return 0
    if not args.recipe:
        parser.error("--recipe is required (or --table)")
    if bad := [s for s in args.set if "=" not in s]:
        parser.error(f"--set takes KEY=VALUE, got {bad[0]!r}")
    missing = [str(RECIPES[r][1]) for r in args.recipe if not RECIPES[r][1].exists()]
    if missing:
        print(f"no {', '.join(missing)}: this benchmark needs ../shared/data", file=sys.stderr)
        return 2
    result: dict = {"label": args.label, "sets": args.set, "machine": machine(), "rate_basis": RATE_BASIS,
                    "runs": []}  # fmt: skip
    for recipe in args.recipe:
        for size in args.size or [128, 224]:
            log_dir = args.log_dir / f"{args.label}-{recipe}-{size}"
            result["runs"].append(run_one(recipe, size, args.set, log_dir))
            if args.out:  # what is done so far survives a later failure
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=2) + "\n")
    report_json(result, args.out)
    print(tables([result]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
