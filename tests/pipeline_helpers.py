"""Helpers for tests that run the real pipeline in a temporary copy of the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["download", "split", "augment", "train-frozen", "fine-tune", "evaluate", "report"]

TINY_PARAMS = {
    "data": {"demo": {"images_per_class": 8, "image_size": 32}},
    "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    "augment": {"image_size": 32, "copies": 1},
    "train_frozen": {"epochs": 2, "batch_size": 16, "patience": 1},
    "fine_tune": {"epochs": 1, "batch_size": 16, "unfreeze_blocks": 1},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def edit_params(repo: Path, override: dict) -> None:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), override), sort_keys=False))


def dvc_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=dvc_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def stages_run(proc: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr)


def load_dvc_yaml(repo: Path = REPO) -> dict:
    """dvc.yaml as DVC reads it: each ``${name}`` replaced by its value from ``vars`` (keys too)."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    values = {k: v for entry in spec.get("vars", []) for k, v in entry.items()}

    def resolved(node: object) -> object:
        if isinstance(node, str):
            return re.sub(r"\$\{(\w+)\}", lambda m: str(values[m.group(1)]), node)
        if isinstance(node, dict):
            return {resolved(k): resolved(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolved(v) for v in node]
        return node

    return resolved(spec)  # type: ignore[return-value]


def declared_outputs(repo: Path) -> list[str]:
    spec = load_dvc_yaml(repo)
    paths = []
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths
