"""Shared by the whole-pipeline benchmarks: a scratch copy of the repository, a real dataset brought
into it the way a user would (``dvc add ... --out data/sources/NAME``), and the stages run one by one
with their wall and CPU time."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
STAGES = ["download", "split", "augment", "train-frozen", "fine-tune", "evaluate", "report"]
RECIPES = {
    # tlpipe recipe, the shared data, the params that point the recipe at the brought-in copy
    "kermany": ("kermany", SHARED / "chest_xray", lambda path: []),
    "pneumoniamnist": (
        "pneumoniamnist",
        SHARED / "pneumoniamnist.npz",
        lambda path: ["data.medmnist.name=null", f"data.medmnist.path={path}"],
    ),
}


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """``KEY=VALUE`` settings (dotted keys, YAML values), as ``dvc exp run -S`` takes them."""
    for item in overrides:
        key, _, value = item.partition("=")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return params


def edit_params(repo: Path, overrides: list[str]) -> None:
    params = apply_overrides(yaml.safe_load((repo / "params.yaml").read_text()), overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_repo(dest: Path) -> None:
    """The files a fresh clone would have (tracked and new, not ignored), committed in a new repository."""
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


def environment(repo: Path) -> dict[str, str]:
    # the copy's own code, not the editable install's: the checkout may change while a benchmark runs
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(repo / "src"),
    )
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    return env


def bring_in(repo: Path, data: Path, name: str) -> str:
    """``dvc add DATA --out data/sources/NAME``: what the README tells a user to do; the path to use."""
    rel = f"data/sources/{name}"
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", str(data), "--out", rel], cwd=repo,
                   env=environment(repo), check=True)  # fmt: skip
    return rel


def recipe_repo(repo: Path, dataset: str, overrides: list[str]) -> dict[str, str]:
    """A scratch copy of the repository in ``repo`` set up as a user would for ``dataset`` (``RECIPES``):
    the shared data brought in, ``tlpipe recipe NAME``, then ``overrides``. The environment to run it in."""
    recipe, data, point_at = RECIPES[dataset]
    copy_repo(repo)
    env = environment(repo)
    target = bring_in(repo, data, data.name)
    subprocess.run([str(Path(sys.executable).parent / "tlpipe"), "recipe", recipe], cwd=repo, env=env,
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    edit_params(repo, [*point_at(target), *overrides])
    return env


def run_stages(repo: Path, name: str, log_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """``dvc repro -s STAGE`` for each stage in order: wall seconds and CPU seconds per stage."""
    seconds, cpu = {}, {}
    with open(log_dir / f"{name}.log", "w") as log:
        for stage in STAGES:
            start, cpu_start = time.perf_counter(), children_cpu_seconds()
            subprocess.run([sys.executable, "-m", "dvc", "repro", "-s", stage], cwd=repo, env=environment(repo),
                           stdout=log, stderr=subprocess.STDOUT, check=True)  # fmt: skip
            seconds[stage] = round(time.perf_counter() - start, 1)
            cpu[stage] = round(children_cpu_seconds() - cpu_start, 1)
            print(f"{name}: {stage} {seconds[stage]}s (CPU {cpu[stage]}s)", file=sys.stderr, flush=True)
    return seconds, cpu


def operating_summary(metrics: dict) -> dict:
    """Each val-chosen operating point's cut-off and test accuracy, sensitivity and specificity."""
    keys = ("value", "accuracy", "sensitivity", "specificity")
    return {
        name: {k: point.get(k) for k in keys} for name, point in metrics.get("operating_points", {}).items()
    }


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def report_json(result: dict, out: Path | None) -> None:
    """The benchmark's result on stdout, and in ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def tests_on_path() -> None:
    """The tests' helpers importable (the upload page benchmarks use the tests' in-process server)."""
    for folder in (REPO / "tests" / "serve", REPO / "tests"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def random_pngs(folder: Path, n: int, size: int) -> list[str]:
    """``n`` PNGs of random pixels, ``size`` px square, written into ``folder`` (seeded): their paths."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        tf.io.write_file(str(path), tf.io.encode_png(pixels))
        paths.append(str(path))
    return paths
