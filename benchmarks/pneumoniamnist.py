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
import shutil
import sys
import tempfile
from pathlib import Path

from bench_repo import SHARED, bring_in, copy_repo, edit_params, operating_summary, report_json, run_stages

DEFAULT_NPZ = SHARED / "pneumoniamnist.npz"


def run_recipe(name: str, npz: Path, overrides: list[str], log_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"tlpipe-bench-{name}-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        # brought in as a user would: DVC versions it under data/sources/
        npz_path = bring_in(repo, npz, npz.name)
        edit_params(repo, ["data.source=medmnist", f"data.medmnist.path={npz_path}", *overrides])
        seconds, cpu = run_stages(repo, name, log_dir)
        metrics = json.loads((repo / "results/evaluate/metrics.json").read_text())
        kept = log_dir / name  # the outputs worth a second look, before the copy is deleted
        shutil.copytree(repo / "results", kept / "results")
        shutil.copy2(repo / "params.yaml", kept / "params.yaml")
        return {"recipe": name, "overrides": overrides, "seconds": seconds,
                "total_seconds": round(sum(seconds.values()), 1), "cpu_seconds": cpu,
                "total_cpu_seconds": round(sum(cpu.values()), 1), "accuracy": metrics["accuracy"],
                "roc_auc": metrics["roc_auc"], "macro_f1": metrics["macro_f1"], "n_test": metrics["n_test"],
                "threshold": metrics.get("threshold"), "operating_points": operating_summary(metrics)}  # fmt: skip


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
    report_json({"dataset": str(args.npz.name), "logs": str(log_dir), "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
