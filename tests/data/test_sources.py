"""The download stage's sources (folders, CSVs) and ingestion: every bad file rejected with its reason."""

from __future__ import annotations

import builtins
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from source_fixtures import BAD_FILES, ham_fixture, ham_parts, kermany_tree, noise, save, write_bad_files
from tlpipe.core.config import CsvParams, DataParams, FolderParams
from tlpipe.core.constants import SOURCES_DIR
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import read_csv, read_json
from tlpipe.data.local_sources import OUTSIDE_LINK, SEEN_LINK, folder_candidates
from tlpipe.data.sources import candidates_for, download, ingest


@pytest.fixture(autouse=True)
def _repo_root(tmp_path, monkeypatch):
    # params paths are relative to the repository root, where dvc repro runs every stage
    monkeypatch.chdir(tmp_path)


def _in_sources(tmp_path: Path, name: str) -> Path:
    return tmp_path / SOURCES_DIR / name


def _rel(path: Path) -> str:
    return Path(path).relative_to(Path.cwd()).as_posix()


def _folder_params(root: Path, **kw) -> DataParams:
    # the corpus is half bad files on purpose: lift the share that would fail the stage
    kw.setdefault("max_rejected_fraction", 1.0)
    return DataParams(source="folder", folder=FolderParams(path=_rel(root)), **kw)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -------------------------------------------------------------- folder source


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """Good images in many modes, and every kind of bad file, under cat/ dog/ and bird/."""
    root = _in_sources(tmp_path, "photos")
    save(root / "cat" / "rgb.jpg", noise(40, 30), "JPEG")
    save(root / "cat" / "gray.png", Image.new("L", (20, 16), 77), "PNG")
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((10, 200, 30, 255), (0, 0, 10, 20))  # left half opaque green, right half transparent
    save(root / "cat" / "rgba.png", rgba, "PNG")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    save(root / "cat" / "nested" / "palette.png", palette, "PNG")
    deep = Image.fromarray(np.arange(32 * 16, dtype=np.uint16).reshape(16, 32) * 120)  # mode I;16
    save(root / "cat" / "deep16.png", deep, "PNG")
    save(root / "dog" / "cmyk.jpg", Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG")
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    save(root / "dog" / "rotated.jpg", rotated, "JPEG", exif=exif.tobytes(), quality=95)
    write_bad_files(root)
    (root / "dog" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: skipped, not even rejected
    return root


EXPECTED_REJECTED = BAD_FILES


@pytest.fixture
def ingested(image_tree, tmp_path) -> Path:
    params = _folder_params(image_tree, classes=["dog", "cat"], min_image_size=8, max_image_pixels=5000)
    summary = download(params, tmp_path / "raw")  # the whole stage, MLflow run included
    assert (summary.kept, summary.rejected, summary.classes) == (7, len(EXPECTED_REJECTED), ["dog", "cat"])
    return tmp_path / "raw"


def test_folder_every_bad_file_is_rejected_with_its_reason(ingested):
    rejected = {r["path"]: r["reason"] for r in read_csv(ingested / "quarantine.csv")}
    assert set(rejected) == set(EXPECTED_REJECTED)
    for path, reason in EXPECTED_REJECTED.items():
        assert reason in rejected[path], (path, rejected[path])


def test_folder_good_files_become_rgb_pngs_with_correct_manifest(ingested):
    rows = {r["source"]: r for r in read_csv(ingested / "manifest.csv")}
    expected_sizes = {
        "cat/rgb.jpg": (40, 30),
        "cat/gray.png": (20, 16),
        "cat/rgba.png": (20, 20),
        "cat/nested/palette.png": (16, 16),
        "cat/deep16.png": (32, 16),
        "dog/cmyk.jpg": (24, 24),
        "dog/rotated.jpg": (20, 40),  # stored landscape 40x20, EXIF says portrait
    }
    assert set(rows) == set(expected_sizes)
    assert read_json(ingested / "classes.json") == ["dog", "cat"]  # the configured order, not sorted
    files = {p.relative_to(ingested).as_posix() for p in (ingested / "images").rglob("*") if p.is_file()}
    assert files == {r["path"] for r in rows.values()}
    for source, row in rows.items():
        assert row["label"] == source.split("/")[0]
        assert row["path"].startswith(f"images/{row['label']}/") and row["path"].endswith(".png")
        out = ingested / row["path"]
        assert _sha(out) == row["sha256"]
        with Image.open(out) as img:
            assert (img.format, img.mode) == ("PNG", "RGB")
            assert img.size == expected_sizes[source] == (int(row["width"]), int(row["height"]))


def _pixels(raw: Path, source: str) -> np.ndarray:
    row = next(r for r in read_csv(raw / "manifest.csv") if r["source"] == source)
    with Image.open(raw / row["path"]) as img:
        return np.asarray(img).astype(int)


def test_folder_pixel_conversions(ingested):
    assert (_pixels(ingested, "cat/gray.png") == 77).all()
    rgba = _pixels(ingested, "cat/rgba.png")
    assert (rgba[:, :10] == (10, 200, 30)).all()  # opaque part kept
    assert (rgba[:, 10:] == 255).all()  # transparent part on white, not black
    assert (_pixels(ingested, "cat/nested/palette.png") == (200, 100, 50)).all()
    deep = _pixels(ingested, "cat/deep16.png")
    assert (deep[..., 0] == deep[..., 1]).all() and (deep[..., 1] == deep[..., 2]).all()
    flat = deep[..., 0].ravel()  # a row-major ramp stays a ramp over the full 8-bit range
    assert flat[0] == 0 and flat[-1] == 255 and (np.diff(flat) >= 0).all()
    red, green, blue = _pixels(ingested, "dog/cmyk.jpg").reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60  # CMYK (0, 255, 255, 0) is red
    rotated = _pixels(ingested, "dog/rotated.jpg")  # 90 degrees clockwise: stored left goes on top
    assert rotated.shape == (40, 20, 3)
    assert rotated[5, 10, 0] > 200 and rotated[5, 10, 2] < 60
    assert rotated[35, 10, 2] > 200 and rotated[35, 10, 0] < 60


def test_folder_without_class_filter_keeps_every_class(image_tree, tmp_path):
    summary = ingest(folder_candidates(image_tree), _folder_params(image_tree), tmp_path / "raw")
    assert summary.classes == ["bird", "cat", "dog"]  # sorted when data.classes is null
    rejected = {r["path"] for r in read_csv(tmp_path / "raw" / "quarantine.csv")}
    assert rejected == set(EXPECTED_REJECTED) - {"bird/robin.png", "dog/huge.png"}


def test_pillow_pixel_limit_does_not_override_max_image_pixels(image_tree, tmp_path, monkeypatch):
    # a user who raises data.max_image_pixels above Pillow's own bomb limit must get what they asked for
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    params = _folder_params(image_tree, classes=["dog", "cat"], max_image_pixels=10_000)
    ingest(folder_candidates(image_tree), params, tmp_path / "raw")
    kept = {r["source"] for r in read_csv(tmp_path / "raw" / "manifest.csv")}
    assert {"cat/rgb.jpg", "dog/huge.png"} <= kept  # 1200 and 6400 px, both within 10000
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


def test_folder_output_names_never_collide(tmp_path):
    root = _in_sources(tmp_path, "photos")
    save(root / "a" / "x" / "y.png", noise(10, 10, seed=1), "PNG")
    save(root / "a" / "x__y.png", noise(10, 10, seed=2), "PNG")
    save(root / "b" / "z.png", noise(10, 10, seed=3), "PNG")
    ingest(folder_candidates(root), _folder_params(root), tmp_path / "raw")
    rows = read_csv(tmp_path / "raw" / "manifest.csv")
    assert len({r["path"] for r in rows}) == 3
    for row in rows:
        assert _sha(tmp_path / "raw" / row["path"]) == row["sha256"]
    assert len({r["sha256"] for r in rows}) == 3


def test_configured_class_without_images_is_an_error(image_tree, tmp_path):
    params = _folder_params(image_tree, classes=["cat", "dog", "fish"])
    with pytest.raises(PipelineError, match="fish"):
        ingest(folder_candidates(image_tree), params, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_no_usable_images_is_an_error_and_keeps_old_output(tmp_path):
    root = _in_sources(tmp_path, "photos")
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "broken.png").write_bytes(b"nope")
    out = tmp_path / "raw"
    out.mkdir()
    (out / "manifest.csv").write_text("old\n")
    with pytest.raises(PipelineError, match=r"no usable images \(rejected 1\)"):
        ingest(folder_candidates(root), _folder_params(root), out)
    assert [p.name for p in out.iterdir()] == ["manifest.csv"]
    assert (out / "manifest.csv").read_text() == "old\n"


@pytest.mark.parametrize(
    ("layout", "hint"),
    [("missing", "is not a folder"), ("files-only", "has no class subfolders"), ("file", "is not a folder")],
)
def test_unusable_folder_path_is_a_pipeline_error(tmp_path, layout, hint):
    root = _in_sources(tmp_path, "photos")
    if layout == "files-only":
        root.mkdir(parents=True)
        save(root / "loose.png", noise(10, 10), "PNG")
        (root / ".hidden").mkdir()
    elif layout == "file":
        root.parent.mkdir(parents=True)
        root.write_text("not a folder")
    params = _folder_params(root)
    with pytest.raises(PipelineError, match=hint) as info:
        candidates_for(params)  # fails at once, before the stage starts writing anything
    assert _rel(root) in str(info.value)
    assert "data.folder.path" in str(info.value)
    with pytest.raises(PipelineError, match=hint):
        download(params, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# ------------------------------------------------------ quarantine threshold


def test_too_many_rejects_fail_the_stage_with_reasons_and_write_nothing(image_tree, tmp_path):
    params = _folder_params(image_tree, min_image_size=8, max_image_pixels=5000, max_rejected_fraction=0.2)
    with pytest.raises(PipelineError) as err:
        download(params, tmp_path / "raw")
    message = str(err.value)
    assert "more than data.max_rejected_fraction=0.2" in message
    assert "4 x not an image" in message and "dog/cut.png" in message and str(tmp_path) not in message
    assert not (tmp_path / "raw").exists()


# ------------------------------------------------- folder with its own splits


def test_folder_with_split_subfolders_keeps_each_images_split(tmp_path):
    root = kermany_tree(_in_sources(tmp_path, "chest_xray"), {"train": 4, "val": 2, "test": 3})
    download(_folder_params(root), tmp_path / "raw")
    rows = read_csv(tmp_path / "raw" / "manifest.csv")
    assert read_json(tmp_path / "raw" / "classes.json") == ["NORMAL", "PNEUMONIA"]
    by_split = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert by_split == {"train": 8, "val": 4, "test": 6}
    assert all(r["source"].startswith(f"{r['split']}/{r['label']}/") for r in rows)
    assert len({r["path"] for r in rows}) == len(rows)  # same file name in two splits: two outputs


def test_folder_mixing_split_and_class_folders_is_an_error(tmp_path):
    root = kermany_tree(_in_sources(tmp_path, "mixed"), {"train": 1})
    save(root / "NORMAL" / "x.png", noise(20, 20), "PNG")
    with pytest.raises(PipelineError, match="mixes split folders"):
        download(_folder_params(root), tmp_path / "raw")


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """Every path opened for reading with ``builtins.open`` (Pillow opens files with it) during the test."""
    paths: list[Path] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        mode = args[0] if args else kwargs.get("mode", "r")
        if isinstance(file, (str, os.PathLike)) and not set(mode) & set("wax+"):
            paths.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return paths


def test_link_leading_outside_the_source_is_quarantined_and_never_opened(tmp_path, opened):
    root = _in_sources(tmp_path, "photos")
    for label in ("cat", "dog"):
        for i in range(3):
            save(root / label / f"{label}{i}.png", noise(20, 20, seed=i + 10 * len(label)), "PNG")
    secret = tmp_path / "secret.png"  # a readable image, so opening it would succeed
    save(secret, noise(20, 20, seed=99), "PNG")
    save(tmp_path / "elsewhere" / "more.png", noise(20, 20, seed=98), "PNG")
    (root / "cat" / "passwd.png").symlink_to(secret)
    (root / "dog" / "etc").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "dog" / "chained.png").symlink_to(root / "cat" / "passwd.png")  # inside, then out
    summary = download(_folder_params(root), tmp_path / "raw")
    quarantined = {r["path"]: r["reason"] for r in read_csv(tmp_path / "raw" / "quarantine.csv")}
    assert quarantined == dict.fromkeys(["cat/passwd.png", "dog/chained.png", "dog/etc"], OUTSIDE_LINK)
    assert summary.kept == 6
    assert secret.resolve() not in opened and (tmp_path / "elsewhere" / "more.png") not in opened
    assert (root / "cat" / "cat0.png").resolve() in opened  # the spy does see what is read


def test_links_inside_the_source_are_followed_once_without_looping(tmp_path):
    root = _in_sources(tmp_path, "photos")
    for label in ("cat", "dog"):
        for i in range(2):
            save(root / label / f"{label}{i}.png", noise(20, 20, seed=i + 10 * len(label)), "PNG")
    (root / "dog" / "alias.png").symlink_to(root / "cat" / "cat0.png")
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    download(_folder_params(root), tmp_path / "raw")
    kept = {r["source"]: r for r in read_csv(tmp_path / "raw" / "manifest.csv")}
    assert set(kept) == {"cat/cat0.png", "cat/cat1.png", "dog/alias.png", "dog/dog0.png", "dog/dog1.png"}
    assert kept["dog/alias.png"]["sha256"] == kept["cat/cat0.png"]["sha256"]  # read through the link
    quarantined = {r["path"]: r["reason"] for r in read_csv(tmp_path / "raw" / "quarantine.csv")}
    assert quarantined == {"cat/loop": SEEN_LINK}


# ----------------------------------------------------------------- csv source


def ham_with_bad_rows(tmp_path: Path) -> Path:
    root = ham_fixture(_in_sources(tmp_path, "ham10000"))
    part_1 = ham_parts(root)[0]
    with open(root / "HAM10000_metadata.csv", "a") as fh:
        fh.write("HAM_9999999,ISIC_missing,nv,histo,50.0,male,back\n")  # listed, but no file
        fh.write("HAM_9999998,../outside,nv,histo,50.0,male,back\n")  # climbs out of the image folder
        fh.write("HAM_9999997,ISIC_0024306,,histo,50.0,male,back\n")  # no label
    (part_1 / "outside.jpg").write_bytes((part_1 / "ISIC_0024307.jpg").read_bytes())
    return root


def _csv_params(root: Path, **kw) -> DataParams:
    csv = CsvParams(
        images=[_rel(p) for p in ham_parts(root)],
        file=_rel(root / "HAM10000_metadata.csv"),
        extension=".jpg",
        group_column="lesion_id",
        **kw,
    )
    return DataParams(source="csv", csv=csv, max_rejected_fraction=0.5)


def test_csv_source_reads_ham10000_with_its_two_image_folders_and_quarantines_bad_rows(tmp_path):
    root = ham_with_bad_rows(tmp_path)
    summary = download(_csv_params(root), tmp_path / "raw")
    rows = read_csv(tmp_path / "raw" / "manifest.csv")
    assert summary.classes == ["bkl", "mel", "nv"]
    assert len(rows) == 12  # six from each part folder
    by_source = {r["source"]: r for r in rows}
    assert by_source["ISIC_0024308.jpg"]["label"] == "mel"
    assert by_source["ISIC_0024308.jpg"]["group"] == "HAM_0000119"
    assert by_source["ISIC_0024317.jpg"]["group"] == "HAM_0000123"  # from part 2
    assert all(r["split"] == "" for r in rows)
    quarantined = {r["path"]: r["reason"] for r in read_csv(tmp_path / "raw" / "quarantine.csv")}
    assert quarantined == {
        "ISIC_missing.jpg": "listed in the CSV but no such file",
        "../outside.jpg": "path outside data.csv.images: ../outside.jpg",
        "ISIC_0024306.jpg": "empty label",
    }


def test_csv_row_whose_file_is_a_link_out_of_the_image_folder_is_refused_unopened(tmp_path, opened):
    root = ham_fixture(_in_sources(tmp_path, "ham10000"))
    part_1 = ham_parts(root)[0]
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((part_1 / "ISIC_0024306.jpg").read_bytes())
    (part_1 / "ISIC_0024306.jpg").unlink()
    (part_1 / "ISIC_0024306.jpg").symlink_to(secret)
    download(_csv_params(root), tmp_path / "raw")
    quarantined = {r["path"]: r["reason"] for r in read_csv(tmp_path / "raw" / "quarantine.csv")}
    assert quarantined == {"ISIC_0024306.jpg": OUTSIDE_LINK}
    assert secret.resolve() not in opened and (part_1 / "ISIC_0024307.jpg").resolve() in opened


def test_csv_image_in_two_of_the_image_folders_is_rejected_as_ambiguous(tmp_path):
    root = ham_fixture(_in_sources(tmp_path, "ham10000"))
    part_1, part_2 = ham_parts(root)
    (part_2 / "ISIC_0024306.jpg").write_bytes((part_1 / "ISIC_0024306.jpg").read_bytes())
    download(_csv_params(root), tmp_path / "raw")
    quarantined = {r["path"]: r["reason"] for r in read_csv(tmp_path / "raw" / "quarantine.csv")}
    assert quarantined == {
        "ISIC_0024306.jpg": "in more than one of data.csv.images (HAM10000_images_part_1, HAM10000_images_part_2)"
    }


def test_csv_split_column_is_carried(tmp_path):
    root = ham_fixture(_in_sources(tmp_path, "ham10000"))
    table = root / "HAM10000_metadata.csv"
    lines = table.read_text().splitlines()
    split_of = ["train", "val", "test"]
    lines = [lines[0] + ",split"] + [f"{line},{split_of[i % 3]}" for i, line in enumerate(lines[1:])]
    table.write_text("\n".join(lines) + "\n")
    download(_csv_params(root, split_column="split"), tmp_path / "raw")
    rows = read_csv(tmp_path / "raw" / "manifest.csv")
    assert {r["split"] for r in rows} == {"train", "val", "test"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"label_column": "diagnosis"}, "data.csv.label_column: column 'diagnosis' not in"),
        ({"group_column": "patient"}, "data.csv.group_column: column 'patient' not in"),
    ],
)
def test_csv_missing_column_names_the_key_and_the_columns(tmp_path, override, message):
    params = _csv_params(ham_fixture(_in_sources(tmp_path, "ham10000")))
    params = params.model_copy(update={"csv": params.csv.model_copy(update=override)})
    with pytest.raises(PipelineError, match=message) as err:
        download(params, tmp_path / "raw")
    assert "lesion_id, image_id, dx, dx_type, age, sex, localization" in str(err.value)


def test_unreadable_file_is_quarantined_not_fatal(tmp_path, monkeypatch):
    root = _in_sources(tmp_path, "photos")
    for name in ("a.png", "locked.png"):
        save(root / "cat" / name, noise(20, 20), "PNG")
        save(root / "dog" / name, noise(20, 20, seed=1), "PNG")
    real_open = Image.open

    def open_(fp, *args, **kwargs):
        if Path(fp).name == "locked.png" and Path(fp).parent.name == "dog":
            raise PermissionError(13, "Permission denied")  # root reads anything: simulate chmod 000
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_)
    summary = download(_folder_params(root), tmp_path / "raw")
    assert summary.kept == 3
    assert read_csv(tmp_path / "raw" / "quarantine.csv") == [
        {"path": "dog/locked.png", "reason": "unreadable file (permission denied)"}
    ]


def test_grayscale_channels_convert_every_mode_to_one_channel(image_tree, tmp_path):
    params = _folder_params(image_tree, classes=["dog", "cat"], max_image_pixels=5000, channels="grayscale")
    download(params, tmp_path / "raw")
    rows = read_csv(tmp_path / "raw" / "manifest.csv")
    assert len(rows) == 7
    for row in rows:
        with Image.open(tmp_path / "raw" / row["path"]) as img:
            assert img.mode == "L", row["source"]
    by_source = {r["source"]: r for r in rows}
    with Image.open(tmp_path / "raw" / by_source["dog/cmyk.jpg"]["path"]) as img:
        red = Image.new("RGB", (1, 1), (255, 0, 0)).convert("L").getpixel((0, 0))
        assert abs(img.getpixel((5, 5)) - red) <= 3  # CMYK red, then luminance
