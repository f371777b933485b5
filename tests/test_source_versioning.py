"""A user's own data is versioned by DVC: every change to a source reruns download, and only what
depends on a changed output after it; no change, no rerun. Then the README's "bring your own data"
commands, run as written, through `dvc push` and a second clone that pulls everything back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench_repo import copy_repo
from pipeline_helpers import REPO, TINY_PARAMS, dvc, dvc_env, edit_params, merge, stages_run
from source_fixtures import ham_fixture, ham_parts, kermany_tree, medmnist_npz, save, tinted
from tlpipe.core.constants import SOURCES_DIR
from tlpipe.core.files import read_csv

pytestmark = pytest.mark.e2e

GIT = ["git", "-c", "user.name=tlpipe-tests", "-c", "user.email=tests@tlpipe.invalid"]


def _commit(repo: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=repo, check=True)


def _status(repo: Path) -> str:
    return dvc(repo, "status").stdout


def _repro_split(repo: Path) -> list[str]:
    return stages_run(dvc(repo, "repro", "split"))


# ------------------------------------------------------------ what each source's edits look like


def root(repo: Path) -> Path:
    """Where the test's dataset sits in the repository: what `dvc add --out` made of it."""
    return repo / SOURCES_DIR / "dataset"


def _folder(ext: Path) -> tuple[dict, dict]:
    kermany_tree(ext, {"train": 6, "val": 3, "test": 3})
    data = {"source": "folder", "folder": {"path": f"{SOURCES_DIR}/dataset"}}

    def add(repo: Path) -> None:
        save(root(repo) / "train" / "NORMAL" / "IM-0999-0001.jpeg", tinted("NORMAL", 999), "JPEG")

    def relabel(repo: Path) -> None:
        moved = root(repo) / "train" / "NORMAL" / "IM-0999-0001.jpeg"
        moved.rename(root(repo) / "train" / "PNEUMONIA" / moved.name)

    def remove(repo: Path) -> None:
        (root(repo) / "train" / "NORMAL" / "IM-0100-0001.jpeg").unlink()

    def unused(repo: Path) -> None:  # a file the folder source skips: download reruns, its output stays
        (root(repo) / "train" / ".DS_Store").write_bytes(b"\0\1")

    return data, {"add": add, "relabel": relabel, "remove": remove, "unused": unused}


def _csv(ext: Path) -> tuple[dict, dict]:
    ham_fixture(ext, n=24)
    parts = [f"{SOURCES_DIR}/dataset/{p.name}" for p in ham_parts(ext)]
    data = {"source": "csv", "csv": {"images": parts, "file": f"{SOURCES_DIR}/dataset/HAM10000_metadata.csv",
                                     "extension": ".jpg", "group_column": "lesion_id"}}  # fmt: skip

    def add(repo: Path) -> None:
        save(repo / parts[1] / "ISIC_0099999.jpg", tinted("mel", 999), "JPEG")
        with open(root(repo) / "HAM10000_metadata.csv", "a") as fh:
            fh.write("HAM_0099999,ISIC_0099999,mel,histo,50.0,male,back\n")

    def relabel(repo: Path) -> None:
        text = (root(repo) / "HAM10000_metadata.csv").read_text()
        (root(repo) / "HAM10000_metadata.csv").write_text(
            text.replace("ISIC_0099999,mel,", "ISIC_0099999,nv,")
        )

    def remove(repo: Path) -> None:  # the image goes; its row stays, and is quarantined
        (repo / parts[0] / "ISIC_0024306.jpg").unlink()

    def unused(repo: Path) -> None:  # a column tlpipe does not read
        lines = (root(repo) / "HAM10000_metadata.csv").read_text().splitlines()
        (root(repo) / "HAM10000_metadata.csv").write_text("\n".join(f"{line},x" for line in lines) + "\n")

    return data, {"add": add, "relabel": relabel, "remove": remove, "unused": unused}


def _npz(ext: Path) -> tuple[dict, dict]:
    ext.mkdir(parents=True)
    medmnist_npz(ext / "pneumoniamnist.npz", {"train": 12, "val": 6, "test": 6})
    data = {"source": "medmnist", "medmnist": {"path": f"{SOURCES_DIR}/dataset/pneumoniamnist.npz"}}

    def rewrite(repo: Path, change) -> None:
        path = repo / SOURCES_DIR / "dataset" / "pneumoniamnist.npz"
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        change(arrays)
        np.savez_compressed(path, **arrays)

    def add(repo: Path) -> None:
        def one_more(a: dict) -> None:
            a["train_images"] = np.concatenate([a["train_images"], a["train_images"][:1] // 2])
            a["train_labels"] = np.concatenate([a["train_labels"], a["train_labels"][:1]])

        rewrite(repo, one_more)

    def relabel(repo: Path) -> None:
        def flip(a: dict) -> None:
            a["train_labels"][-1] = 1 - a["train_labels"][-1]

        rewrite(repo, flip)

    def remove(repo: Path) -> None:
        def drop(a: dict) -> None:
            a["train_images"], a["train_labels"] = a["train_images"][1:], a["train_labels"][1:]

        rewrite(repo, drop)

    return data, {"add": add, "relabel": relabel, "remove": remove}


@pytest.mark.parametrize("kind", ["folder", "csv", "npz"])
def test_every_change_to_a_source_reruns_download_and_nothing_else_reruns_without_one(tmp_path, kind):
    repo = tmp_path / "repo"
    copy_repo(repo)
    data, edits = {"folder": _folder, "csv": _csv, "npz": _npz}[kind](tmp_path / "outside")
    dvc(repo, "add", str(tmp_path / "outside"), "--out", f"{SOURCES_DIR}/dataset")
    edit_params(repo, {"data": data})
    _commit(repo, "dataset")
    assert _repro_split(repo) == ["download", "split"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    recorded = {d["path"]: d for d in lock["stages"]["download"]["deps"]}
    assert recorded[SOURCES_DIR]["md5"].endswith(".dir")  # the sources' content hash
    rows_before = len(read_csv(repo / "data/raw/manifest.csv"))

    assert "download" not in _status(repo)
    assert _repro_split(repo) == []  # unchanged: nothing reruns

    # each edit leads to a state not seen before: a return to an earlier one would be restored from
    # DVC's run cache instead of rerun (same inputs, same outputs)
    for name in ("add", "relabel", "remove"):
        edits[name](repo)
        status = _status(repo)
        assert re.search(rf"download:\s+changed deps:\s+modified:\s+{SOURCES_DIR}", status), (name, status)
        assert _repro_split(repo) == ["download", "split"], name
        assert _repro_split(repo) == [], name  # and then it is up to date again
    raw = read_csv(repo / "data/raw/manifest.csv")
    quarantined = read_csv(repo / "data/raw/quarantine.csv")
    assert len(raw) + len(quarantined) == rows_before + (1 if kind == "csv" else 0)
    if "unused" in edits:
        edits["unused"](repo)
        assert _repro_split(repo) == ["download"]  # its output is unchanged: split does not rerun


# ------------------------------------------------------------ the README, as written

README_BLOCK = re.compile(r"<!-- bring-your-own-data -->\s*```bash\n(.*?)```", re.S)


def _readme_commands() -> list[str]:
    block = README_BLOCK.search((REPO / "README.md").read_text())
    assert block, "README.md has no bring-your-own-data block"
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_bring_your_own_data_commands_run_push_and_a_second_clone_pulls_everything(tmp_path):
    commands = _readme_commands()
    assert any(c.startswith(".venv/bin/dvc add /path/to/chest_xray") for c in commands)
    assert commands[-1] == ".venv/bin/dvc push"
    repo, store = tmp_path / "repo", tmp_path / "dvc-store"
    copy_repo(repo)
    kermany_tree(tmp_path / "chest_xray", {"train": 12, "test": 6}, shared_persons=1)
    env = dvc_env() | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid",
                       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}  # fmt: skip
    bin_dir = str(Path(sys.executable).parent)
    for command in commands:
        if command.startswith(".venv/bin/dvc repro"):
            # the one step added: tiny training, so the test takes seconds rather than an hour
            edit_params(repo, merge(TINY_PARAMS, {"split": {"val_fraction": 0.25}}))
        line = (
            command.replace(".venv/bin/", f"{bin_dir}/")
            .replace("/path/to/chest_xray", str(tmp_path / "chest_xray"))
            .replace("/mnt/shared/dvc-store", str(store))
        )
        proc = subprocess.run(
            line, shell=True, cwd=repo, env=env, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    summary = yaml.safe_load((repo / "results/split/summary.json").read_text())
    assert summary["grouped_by"] == "group_pattern" and summary["source_splits"]["overlap"]["groups"] == 1
    assert (repo / "results/evaluate/metrics.json").is_file()
    _commit(repo, "after push")  # what the README's git commit left out: the tiny params of this test

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / SOURCES_DIR / "chest_xray").exists()
    dvc(clone, "pull")
    pulled = sorted(
        p.relative_to(clone / SOURCES_DIR) for p in (clone / SOURCES_DIR / "chest_xray").rglob("*")
    )
    original = sorted(p.relative_to(tmp_path) for p in (tmp_path / "chest_xray").rglob("*"))
    assert pulled == original and len(pulled) > 30
    status = dvc(clone, "status").stdout
    # every data and model output came back; the training stages' local scratch (the feature cache and
    # resume checkpoints) is absent in a fresh clone, and is no DVC output, so nothing is out of date
    assert status.strip() == "Data and pipelines are up to date.", status
    assert not (clone / "checkpoints").exists()
    assert (clone / "models/model.keras").is_file()
    shutil.rmtree(store)  # nothing below depends on the remote
    assert os.listdir(clone / SOURCES_DIR)  # README.md, .gitignore, the .dvc file and the data
