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
from tlpipe.core.constants import SOURCES_DIR
from tlpipe.core.files import read_csv
from tlpipe.ops.recipes import apply_recipe, load_recipe, recipe_path

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
    """The pipeline's files (dvc.yaml, stages/, params.yaml, recipes/) in a scratch folder."""
    dest = tmp_path / "repo"
    dest.mkdir()
    shutil.copy(REPO / "dvc.yaml", dest)
    shutil.copy(REPO / "params.yaml", dest)
    shutil.copytree(REPO / "stages", dest / "stages")
    shutil.copytree(REPO / "recipes", dest / "recipes")
    (dest / SOURCES_DIR).mkdir(parents=True)
    return dest


def apply_recipe_file(repo: Path, name: str) -> None:
    """What ``tlpipe recipe NAME`` does, in the scratch repository."""
    params = repo / "params.yaml"
    recipe = load_recipe(recipe_path(name, repo / "recipes"))
    params.write_text(apply_recipe(params.read_text(), recipe))


def run_pipeline(repo: Path, data: dict | None = None, split: dict | None = None) -> dict:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params = merge(merge(params, TINY), {"data": data or {}, "split": split or {}})
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


def test_folder_source(repo):
    class_folders(repo / SOURCES_DIR / "pets", per_class=12)
    metrics = run_pipeline(repo, {"source": "folder", "folder": {"path": f"{SOURCES_DIR}/pets"}})
    assert set(metrics["per_class"]) == {"cat", "dog"}
    assert sum(split_counts(repo).values()) == 24


def test_bad_file_corpus_is_quarantined_and_the_pipeline_completes(repo):
    root = class_folders(repo / SOURCES_DIR / "pets", per_class=12)
    write_bad_files(root)
    data = {"source": "folder", "folder": {"path": f"{SOURCES_DIR}/pets"}, "classes": ["cat", "dog"],
            "max_image_pixels": 5000, "max_rejected_fraction": 0.5}  # fmt: skip
    run_pipeline(repo, data)
    quarantined = {r["path"]: r["reason"] for r in read_csv(repo / "data/raw/quarantine.csv")}
    assert set(quarantined) == set(BAD_FILES)
    for path, reason in BAD_FILES.items():
        assert reason in quarantined[path], (path, quarantined[path])
    kept = read_csv(repo / "data/raw/manifest.csv")
    assert len(kept) == 24 and {r["label"] for r in kept} == {"cat", "dog"}


# ----------------------------------------------- the dataset recipes, on real-name fixtures


def test_kermany_recipe_groups_every_name_form_and_keeps_the_official_test_split(repo):
    # as distributed: train/ and test/ only, 170 children in both (here: 2)
    kermany_tree(repo / SOURCES_DIR / "chest_xray", {"train": 12, "test": 6}, shared_persons=2)
    apply_recipe_file(repo, "kermany")
    metrics = run_pipeline(repo, split={"val_fraction": 0.25})
    summary = json.loads((repo / "results/split/summary.json").read_text())
    assert summary["grouped_by"] == "group_pattern"
    assert summary["totals"]["test"] == 12  # the official test split, whole
    rows = read_csv(repo / "data/split/manifest.csv")
    assert {r["group"] for r in rows} >= {"IM-0100", "NORMAL2-IM-0101", "person100"}
    assert summary["source_splits"]["overlap"] == {
        "groups": 2, "images": 8, "test_images": 4,
        "examples": {"person100": ["train+val", "test"], "person101": ["train+val", "test"]},
    }  # fmt: skip
    by_group: dict[str, set[str]] = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert {g for g, s in by_group.items() if len(s) > 1} == {"person100", "person101"}  # only those
    assert metrics["n_test"] == 12
    assert (
        "Caution: the source's own splits share 2 group(s)"
        in (repo / "results/report/summary.md").read_text()
    )
    assert "share 2 group(s)" in (repo / "results/report/report.html").read_text()


def test_ham10000_recipe_reads_both_image_folders_and_groups_by_lesion(repo):
    ham_fixture(repo / SOURCES_DIR / "ham10000", n=36)
    apply_recipe_file(repo, "ham10000")
    metrics = run_pipeline(repo)
    assert set(metrics["per_class"]) == {"bkl", "mel", "nv"}
    rows = read_csv(repo / "data/split/manifest.csv")
    assert len(rows) == 36 and len({r["group"] for r in rows}) == 18  # two images per lesion
    for group in {r["group"] for r in rows}:
        assert len({r["split"] for r in rows if r["group"] == group}) == 1


@pytest.mark.parametrize(
    ("name", "classes", "rgb"),
    [
        ("pneumoniamnist", {"normal", "pneumonia"}, False),
        ("dermamnist", {"actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                        "vascular lesions"}, True),
    ],
)  # fmt: skip
def test_medmnist_recipes_keep_the_official_splits(repo, name, classes, rgb):
    n_classes = len(classes)
    sizes = {"train": 4 * n_classes, "val": 2 * n_classes, "test": 2 * n_classes}
    medmnist_npz(repo / SOURCES_DIR / f"{name}.npz", sizes, rgb=rgb, n_classes=n_classes)
    apply_recipe_file(repo, name)
    # offline: the copy in data/sources instead of the MD5-checked download (recipes/NAME.yaml says how)
    metrics = run_pipeline(repo, {"medmnist": {"path": f"{SOURCES_DIR}/{name}.npz"}})
    assert split_counts(repo) == sizes
    assert set(metrics["per_class"]) == classes


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
def test_real_pneumoniamnist_keeps_its_official_split(tmp_path, monkeypatch):
    from tlpipe.core.config import DataParams, MedmnistParams, SplitParams
    from tlpipe.data.sources import download
    from tlpipe.data.splitting import split_dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / SOURCES_DIR).mkdir(parents=True)
    (tmp_path / SOURCES_DIR / "pneumoniamnist.npz").symlink_to(PNEUMONIAMNIST)
    data = DataParams(source="medmnist", medmnist=MedmnistParams(path=f"{SOURCES_DIR}/pneumoniamnist.npz"))
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


def test_grayscale_channels_store_one_channel_and_the_pipeline_completes(repo):
    from PIL import Image

    class_folders(repo / SOURCES_DIR / "pets", per_class=12)
    data = {"source": "folder", "folder": {"path": f"{SOURCES_DIR}/pets"}, "channels": "grayscale"}
    metrics = run_pipeline(repo, data)
    for stage_dir in ("data/raw/images", "data/augmented/train"):
        modes = {Image.open(p).mode for p in (repo / stage_dir).rglob("*.png")}
        assert modes == {"L"}, stage_dir
    assert metrics["n_test"] == 6
