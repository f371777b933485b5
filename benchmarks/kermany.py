"""The Kermany recipe on the real chest X-ray set, run as the README writes it.

In a scratch copy of the repository: ``dvc add ../shared/data/chest_xray --out data/sources/chest_xray``,
``tlpipe recipe kermany``, then every stage (``dvc repro -s STAGE`` one after another), timed. Reports the
split summary (patient groups, the official splits' overlap) and the test metrics. Not part of the test
suite: about half an hour on 2 cores.

    .venv/bin/python benchmarks/kermany.py --out results/kermany.json [--set augment.image_size=224]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_repo import (
    SHARED,
    bring_in,
    copy_repo,
    edit_params,
    environment,
    operating_summary,
    report_json,
    run_stages,
)

DEFAULT_DATA = SHARED / "chest_xray"


def run(data: Path, overrides: list[str], log_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="tlpipe-bench-kermany-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        bring_in(repo, data, "chest_xray")
        tlpipe = Path(sys.executable).parent / "tlpipe"
        subprocess.run([str(tlpipe), "recipe", "kermany"], cwd=repo, env=environment(repo), check=True)
        if overrides:
            edit_params(repo, overrides)
        seconds, cpu = run_stages(repo, "kermany", log_dir)
        metrics = json.loads((repo / "results/evaluate/metrics.json").read_text())
        split = json.loads((repo / "results/split/summary.json").read_text())
        shutil.copytree(repo / "results", log_dir / "results")
        shutil.copy2(repo / "params.yaml", log_dir / "params.yaml")
    return {
        "overrides": overrides,
        "seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 1),
        "cpu_seconds": cpu,
        "split": {
            "totals": split["totals"],
            "groups": split["n_groups"],
            "overlap": split["source_splits"]["overlap"],
            "duplicates_dropped": split["duplicates"]["dropped"],
        },
        "test": {k: metrics.get(k) for k in ("n_test", "accuracy", "roc_auc", "sensitivity", "specificity")},
        "ci": {k: metrics.get("ci", {}).get(k) for k in ("accuracy", "roc_auc")},
        "threshold": metrics.get("threshold"),
        "at_0.5": metrics.get("at_0.5"),
        "operating_points": operating_summary(metrics),
        "calibration": metrics.get("calibration"),
        "guard": metrics.get("guard"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the chest_xray folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no chest_xray folder at {args.data} (pass --data)", file=sys.stderr)
        return 2
    log_dir = Path(tempfile.mkdtemp(prefix="tlpipe-bench-logs-"))
    report_json(
        {"dataset": str(args.data), "logs": str(log_dir), **run(args.data, args.set, log_dir)}, args.out
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
