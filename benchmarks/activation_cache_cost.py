"""What fine-tune's activation cache costs and saves when every block trains (``unfreeze_blocks: all``).

With every block trainable the frozen bottom is only the stem convolution, yet the cache stores its output:
(64, 64, 32) float32 per image at 128 px (7 GB for Kermany's 13,302 training images), which the stage's
peak RSS counts, because Linux counts the memory-mapped file's resident pages in RSS.

In a scratch copy of the repository (the dataset brought in as the README says, ``tlpipe recipe NAME``, then
``augment.image_size=SIZE``): the stages up to train-frozen once; then ``dvc repro -s fine-tune`` with
``fine_tune.epochs=EPOCHS``, ``activation_cache`` true and false in turn, ``--rounds`` times (so a machine
that speeds up or slows down shows in both arms alike), each from an empty checkpoint folder so the cache
arm pays for its pass. Per run: wall and CPU seconds, ``wait4``'s peak RSS, and the peak over the run of the
stage's processes' anonymous and file-backed resident memory (``RssAnon``, ``RssFile`` in
``/proc/PID/status``, sampled every 0.5 s), the cache's size on disk, and the epoch's val metrics.
Not part of the test suite; needs ../shared/data.

    .venv/bin/python benchmarks/activation_cache_cost.py --recipe kermany --size 128 --rounds 2 \\
        --out benchmarks/results/activation_cache_cost_kermany_128.json
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench_repo import RECIPES, STAGES, edit_params, recipe_repo, report_json
from stage_table import measured


class ResidentPeaks:
    """The peak, over a process tree's life, of its summed ``RssAnon`` and ``RssFile`` (MiB)."""

    def __init__(self, root: int):
        self.root, self.peaks = root, {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ResidentPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                tree = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            totals = dict.fromkeys(self.peaks, 0.0)
            for proc in tree:
                try:
                    status = Path(f"/proc/{proc.pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    key, _, value = line.partition(":")
                    if key in totals:
                        totals[key] += int(value.split()[0]) / 1024  # kB
            for key, value in totals.items():
                self.peaks[key] = max(self.peaks[key], round(value, 1))


def folder_mib(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1)


def last_epoch(history: Path) -> dict:
    with open(history, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: round(float(v), 4) for k, v in rows[-1].items() if k.startswith("val_")} if rows else {}


def run(recipe: str, size: int, epochs: int, rounds: int, log_dir: Path) -> dict:
    log_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix=f"tlpipe-bench-actcache-{recipe}-{size}-") as tmp:
        repo = Path(tmp)
        env = recipe_repo(repo, recipe, [f"augment.image_size={size}", f"fine_tune.epochs={epochs}"])
        for stage in STAGES[: STAGES.index("fine-tune")]:
            row = measured(
                [sys.executable, "-m", "dvc", "repro", "-s", stage], repo, env, log_dir / f"{stage}.log"
            )
            print(f"{recipe} {size}px: {stage} {row}", file=sys.stderr, flush=True)
        for r in range(rounds):
            for cache in (True, False):
                edit_params(repo, [f"fine_tune.activation_cache={str(cache).lower()}"])
                shutil.rmtree(repo / "checkpoints" / "fine-tune", ignore_errors=True)
                log = log_dir / f"fine-tune-round{r + 1}-cache-{str(cache).lower()}.log"
                cmd = [sys.executable, "-m", "dvc", "repro", "-s", "fine-tune"]
                row = measure_with_peaks(cmd, repo, env, log)
                row.update(round=r + 1, activation_cache=cache,
                           checkpoints_mib=folder_mib(repo / "checkpoints" / "fine-tune"),
                           val=last_epoch(repo / "results" / "fine_tune" / "history.csv"))  # fmt: skip
                runs.append(row)
                print(f"{recipe} {size}px: {row}", file=sys.stderr, flush=True)
    return {"recipe": recipe, "size": size, "epochs": epochs, "runs": runs}


def measure_with_peaks(cmd: list[str], repo: Path, env: dict, log: Path) -> dict:
    """:func:`stage_table.measured`, with the tree's anonymous and file-backed peaks sampled beside it."""
    found: dict = {}
    done = threading.Event()

    def watch() -> None:
        # measured() starts a small Python starter, which starts dvc, which starts the stage
        me = psutil.Process()
        while not done.is_set():
            for child in me.children():
                found.setdefault("pid", child.pid)
            if "pid" in found:
                with ResidentPeaks(found["pid"]) as peaks:
                    done.wait()
                found["peaks"] = peaks.peaks
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        row = measured(cmd, repo, env, log)
    finally:
        done.set()
        watcher.join()
    peaks = found.get("peaks", {})
    return {**row, "peak_rss_anon_mib": peaks.get("RssAnon"), "peak_rss_file_mib": peaks.get("RssFile")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="kermany")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--log-dir", type=Path, default=Path("results/bench_logs/activation_cache_cost"))
    args = parser.parse_args(argv)
    report_json(run(args.recipe, args.size, args.epochs, args.rounds, args.log_dir), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
