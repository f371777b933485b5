"""Every data source through all seven stages, on a fixture of its own layout.

The stages run in this process (faster than seven fresh interpreters), each exactly
as dvc.yaml writes its command: same script, same arguments, repository as the
working directory. test_pipeline.py covers the real ``dvc repro`` on the demo set.
"""

from __future__ import annotations

import contextlib
import json
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_helpers import declared_outputs, load_dvc_yaml, merge
from source_fixtures import (
    BAD_FILES,
    class_folders,
    ham_fixture,
    kermany_tree,
    medmnist_npz,
    sha256_of,
    tar_folder,
    write_bad_files,
    zip_folder,
)
from tlpipe.core.files import read_csv

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    "augment": {"image_size": 32, "copies": 1},
    "train_frozen": {"epochs": 1, "batch_size": 16},
    "fine_tune": {"epochs": 1, "batch_size": 16, "unfreeze_blocks": 1},
}


pytestmark = pytest.mark.e2e  # every source through all seven stage scripts


@pytest.fixture
def repo(tmp_path) -> Path:
    """The pipeline's files (dvc.yaml, stages/, params.yaml) in a scratch folder."""
    dest = tmp_path / "repo"
    dest.mkdir()
    shutil.copy(REPO / "dvc.yaml", dest)
    shutil.copy(REPO / "params.yaml", dest)
    shutil.copytree(REPO / "stages", dest / "stages")
    return dest


def run_pipeline(repo: Path, data: dict, split: dict | None = None) -> dict:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params = merge(merge(params, TINY), {"data": data, "split": split or {}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    stages = load_dvc_yaml(repo)["stages"]
    for name, stage in stages.items():
        argv = shlex.split(" ".join(stage["cmd"].split()))
        assert argv[0] == "python"
        with contextlib.chdir(repo), _argv(argv[1:]):
            try:
                runpy.run_path(argv[1], run_name="__main__")
            except SystemExit as stop:
                assert stop.code in (0, None), f"stage {name} exited with {stop.code}"
    for path in declared_outputs(repo):
        assert (repo / path).exists(), path
    return json.loads((repo / "results/evaluate/metrics.json").read_text())


@contextlib.contextmanager
def _argv(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def split_counts(repo: Path) -> dict[str, int]:
    rows = read_csv(repo / "data/split/manifest.csv")
    return {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}


def test_folder_source(repo, tmp_path):
    root = class_folders(tmp_path / "pets", per_class=12)
    metrics = run_pipeline(repo, {"source": "folder", "folder": {"path": str(root)}})
    assert set(metrics["per_class"]) == {"cat", "dog"}
    assert sum(split_counts(repo).values()) == 24


def test_bad_file_corpus_is_quarantined_and_the_pipeline_completes(repo, tmp_path):
    root = class_folders(tmp_path / "pets", per_class=12)
    write_bad_files(root)
    data = {"source": "folder", "folder": {"path": str(root)}, "classes": ["cat", "dog"],
            "max_image_pixels": 5000, "max_rejected_fraction": 0.5}  # fmt: skip
    run_pipeline(repo, data)
    quarantined = {r["path"]: r["reason"] for r in read_csv(repo / "data/raw/quarantine.csv")}
    assert set(quarantined) == set(BAD_FILES)
    for path, reason in BAD_FILES.items():
        assert reason in quarantined[path], (path, quarantined[path])
    kept = read_csv(repo / "data/raw/manifest.csv")
    assert len(kept) == 24 and {r["label"] for r in kept} == {"cat", "dog"}


def test_folder_source_with_its_own_splits(repo, tmp_path):
    root = kermany_tree(tmp_path / "chest_xray", {"train": 8, "val": 3, "test": 4})
    metrics = run_pipeline(
        repo, {"source": "folder", "folder": {"path": str(root)}}, {"group_pattern": r"person(\w+?)_"}
    )
    assert split_counts(repo) == {"train": 16, "val": 6, "test": 8}
    assert metrics["n_test"] == 8


def test_csv_source(repo, tmp_path):
    images, table = ham_fixture(tmp_path, n=36)
    data = {"source": "csv", "csv": {"images": str(images), "file": str(table), "extension": ".jpg",
                                     "group_column": "lesion_id"}}  # fmt: skip
    metrics = run_pipeline(repo, data)
    assert set(metrics["per_class"]) == {"bkl", "mel", "nv"}


def test_medmnist_npz_source_keeps_official_splits(repo, tmp_path):
    npz = medmnist_npz(tmp_path / "pneumoniamnist.npz", {"train": 24, "val": 8, "test": 10})
    metrics = run_pipeline(repo, {"source": "medmnist", "medmnist": {"path": str(npz)}})
    assert split_counts(repo) == {"train": 24, "val": 8, "test": 10}
    assert set(metrics["per_class"]) == {"normal", "pneumonia"}


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_url_archive_source(repo, tmp_path, kind):
    tree = kermany_tree(tmp_path / "tree", {"train": 8, "val": 3, "test": 4})
    pack = zip_folder if kind == "zip" else tar_folder
    archive = pack(tree, tmp_path / f"chest_xray.{kind}", prefix="chest_xray/")
    data = {"source": "url", "url": {"url": archive.as_uri(), "sha256": sha256_of(archive)}}
    metrics = run_pipeline(repo, data)
    assert split_counts(repo) == {"train": 16, "val": 6, "test": 8}
    assert metrics["n_test"] == 8
    quarantine = read_csv(repo / "data/raw/quarantine.csv")
    assert quarantine == []


PNEUMONIAMNIST = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"


@pytest.mark.skipif(not PNEUMONIAMNIST.is_file(), reason=f"real data not present at {PNEUMONIAMNIST}")
def test_real_pneumoniamnist_keeps_its_official_split(tmp_path):
    from tlpipe.core.config import DataParams, MedmnistParams, SplitParams
    from tlpipe.data.sources import download
    from tlpipe.data.splitting import split_dataset

    data = DataParams(source="medmnist", medmnist=MedmnistParams(path=str(PNEUMONIAMNIST)))
    summary = download(data, tmp_path / "raw")
    assert summary.rejected == 0 and summary.classes == ["normal", "pneumonia"]
    # 27 sets of identical images, 8 of them reaching from train into val: keep_first_split drops
    # just those 8 val copies, so train and test stay exactly as published
    params = SplitParams(duplicates="keep_first_split")
    split_dataset(tmp_path / "raw", params, tmp_path / "split", tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["source_splits"]["used"] is True
    assert summary["totals"] == {"train": 4708, "val": 524 - 8, "test": 624}
    assert summary["duplicates"]["sets"] == 27
    dropped_by_reason = {k: n for k, n in summary["duplicates"]["by_reason"].items() if n}
    assert dropped_by_reason == {"duplicate_in_later_split": 8}
    dropped = read_csv(tmp_path / "split" / "dropped.csv")
    assert len(dropped) == 8 and all(r["path"].startswith("images/") for r in dropped)
    rows = read_csv(tmp_path / "split" / "manifest.csv")
    sources = {r["path"]: r["source"] for r in read_csv(tmp_path / "raw" / "manifest.csv")}
    assert all(sources[r["path"]].startswith(r["split"] + "/") for r in rows)  # nobody moved
    assert summary["counts"]["test"] == {"normal": 234, "pneumonia": 390}


def test_url_archive_with_path_traversal_is_refused_naming_the_url(tmp_path):
    import zipfile

    from tlpipe.core.config import DataParams, UrlParams
    from tlpipe.core.errors import PipelineError
    from tlpipe.data.sources import download

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("chest_xray/train/NORMAL/a.png", b"x")
        zf.writestr("../../etc/evil.png", b"x")
    params = DataParams(source="url", url=UrlParams(url=archive.as_uri(), sha256=sha256_of(archive)))
    with pytest.raises(PipelineError) as err:
        download(params, tmp_path / "raw")
    assert str(err.value).startswith(f"{archive.as_uri()}: refused member '../../etc/evil.png'")
    assert "tlpipe-download-" not in str(err.value)
    assert not (tmp_path / "raw").exists() and not (tmp_path.parent / "etc" / "evil.png").exists()


def test_grayscale_channels_store_one_channel_and_the_pipeline_completes(repo, tmp_path):
    from PIL import Image

    root = class_folders(tmp_path / "pets", per_class=12)
    metrics = run_pipeline(repo, {"source": "folder", "folder": {"path": str(root)}, "channels": "grayscale"})
    for stage_dir in ("data/raw/images", "data/augmented/train"):
        modes = {Image.open(p).mode for p in (repo / stage_dir).rglob("*.png")}
        assert modes == {"L"}, stage_dir
    assert metrics["n_test"] == 6
