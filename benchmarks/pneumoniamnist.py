"""Whole-pipeline benchmark on PneumoniaMNIST: test ACC/AUC and wall time per stage.

Runs the real stages (``dvc repro -s STAGE`` one after another) in a temporary copy
of the repository, for the transfer recipe in params.yaml and, with --baseline, the
same architecture trained from scratch (``train_frozen.weights: none``, every block
fine-tuned). Not part of the test suite: minutes to tens of minutes on 2 cores.

    .venv/bin/python benchmarks/pneumoniamnist.py --out results/bench.json \\
        --set augment.image_size=128 --baseline
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"
STAGES = ["download", "split", "augment", "train-frozen", "fine-tune", "evaluate", "report"]


def parse_value(text: str) -> object:
    return yaml.safe_load(text)


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, _, value = item.partition("=")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(value)
    return params


def copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@tlpipe.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "bench"], cwd=dest, check=True)


def run_recipe(name: str, npz: Path, overrides: list[str], log_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"tlpipe-bench-{name}-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params = apply_overrides(params, ["data.source=medmnist", f"data.medmnist.path={npz}", *overrides])
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
        seconds, cpu = {}, {}
        with open(log_dir / f"{name}.log", "w") as log:
            for stage in STAGES:
                start, cpu_start = time.perf_counter(), _children_cpu_seconds()
                subprocess.run([sys.executable, "-m", "dvc", "repro", "-s", stage], cwd=repo, env=env,
                               stdout=log, stderr=subprocess.STDOUT, check=True)  # fmt: skip
                seconds[stage] = round(time.perf_counter() - start, 1)
                cpu[stage] = round(_children_cpu_seconds() - cpu_start, 1)
                print(f"{name}: {stage} {seconds[stage]}s (CPU {cpu[stage]}s)", file=sys.stderr, flush=True)
        metrics = json.loads((repo / "results/evaluate/metrics.json").read_text())
        kept = log_dir / name  # the outputs worth a second look, before the copy is deleted
        shutil.copytree(repo / "results", kept / "results")
        shutil.copy2(repo / "params.yaml", kept / "params.yaml")
        return {"recipe": name, "overrides": overrides, "seconds": seconds,
                "total_seconds": round(sum(seconds.values()), 1), "cpu_seconds": cpu,
                "total_cpu_seconds": round(sum(cpu.values()), 1), "accuracy": metrics["accuracy"],
                "roc_auc": metrics["roc_auc"], "macro_f1": metrics["macro_f1"], "n_test": metrics["n_test"],
                "threshold": metrics.get("threshold"), "operating_points": operating_summary(metrics)}  # fmt: skip


def operating_summary(metrics: dict) -> dict:
    """Each val-chosen operating point's cut-off and test accuracy, sensitivity and specificity."""
    keys = ("value", "accuracy", "sensitivity", "specificity")
    return {
        name: {k: point.get(k) for k in keys} for name, point in metrics.get("operating_points", {}).items()
    }


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--baseline", action="store_true", help="also train from scratch")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.npz.is_file():
        print(f"no PneumoniaMNIST file at {args.npz} (pass --npz)", file=sys.stderr)
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="tlpipe-bench-logs-"))
    results = [run_recipe("transfer", args.npz, args.set, log_dir)]
    if args.baseline:
        # one param change: with no pretrained weights fine-tune trains every layer (see fine_tune)
        scratch = [*args.set, "train_frozen.weights=none"]
        results.append(run_recipe("from_scratch", args.npz, scratch, log_dir))
    text = json.dumps({"dataset": str(args.npz.name), "logs": str(log_dir), "results": results}, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
