"""The split stage: manifest, dropped rows, classes and a summary written together, or nothing."""

from __future__ import annotations

import mlflow
import pytest
from split_fixtures import KERMANY, given_rows, interleaved_labels, kermany_rows, manifest_row, patient_id

from tlpipe.core.config import SplitParams
from tlpipe.core.constants import SPLITS
from tlpipe.core.errors import PipelineError
from tlpipe.core.files import read_csv, read_json, write_csv, write_json
from tlpipe.data.splitting import split_dataset
from tlpipe.data.stratification import assign_splits

# ------------------------------------------------------------ the stage


def _raw_dir(tmp_path, counts: dict[str, int], classes: list[str]):
    raw = tmp_path / "raw"
    rows = [
        {
            "path": f"images/{label}/{i:03d}.png",
            "label": label,
            "sha256": f"{i:064x}",
            "width": 8,
            "height": 8,
        }
        for i, label in enumerate(interleaved_labels(counts))
    ]
    write_csv(raw / "manifest.csv", rows, ("path", "label", "sha256", "width", "height"))
    write_json(raw / "classes.json", classes)
    return raw, rows


def test_split_dataset_writes_manifest_classes_and_summary(tmp_path):
    classes = ["zebra", "ant", "mole"]  # deliberately not sorted: the raw order must be kept
    counts = {"ant": 20, "mole": 11, "zebra": 25}
    raw, raw_rows = _raw_dir(tmp_path, counts, classes)  # an old manifest: no split, group or source
    out, summary_out = tmp_path / "split", tmp_path / "results" / "split" / "summary.json"
    summary = split_dataset(raw, SplitParams(seed=7), out, summary_out)

    rows = read_csv(out / "manifest.csv")
    assert list(rows[0]) == ["path", "label", "sha256", "split", "group"]
    assert [r["path"] for r in rows] == [r["path"] for r in raw_rows]  # every item once, in order
    assert [(r["label"], r["sha256"]) for r in rows] == [(r["label"], r["sha256"]) for r in raw_rows]
    assert [r["split"] for r in rows] == assign_splits([r["label"] for r in raw_rows], SplitParams(seed=7))
    assert {r["group"] for r in rows} == {""}

    assert read_json(out / "classes.json") == classes
    on_disk = read_json(summary_out)
    assert on_disk == summary
    assert on_disk["classes"] == classes
    assert list(on_disk["counts"]) == list(SPLITS)
    assert on_disk["total"] == sum(counts.values())
    for split in SPLITS:
        assert list(on_disk["counts"][split]) == classes
        for cls in classes:
            assert on_disk["counts"][split][cls] == sum(
                r["split"] == split and r["label"] == cls for r in rows
            )
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "dropped.csv", "manifest.csv"]
    assert read_csv(out / "dropped.csv") == []
    assert (out / "dropped.csv").read_text() == "path,reason\n"


def test_split_summary_reports_groups_duplicates_and_params(tmp_path):
    rows = kermany_rows()
    rows[0] = dict(rows[0], sha256="copy")
    rows[1] = dict(rows[1], sha256="copy", label=rows[0]["label"])  # same image, same label
    rows[2] = dict(rows[2], sha256="clash")
    clash_label = next(lab for lab in ("bacteria", "virus") if lab != rows[2]["label"])
    rows[3] = dict(rows[3], sha256="clash", label=clash_label)
    raw = tmp_path / "raw"
    write_csv(raw / "manifest.csv", rows, list(rows[0]))
    write_json(raw / "classes.json", ["normal", "virus", "bacteria"])
    out, summary_out = tmp_path / "split", tmp_path / "results" / "split" / "summary.json"
    params = SplitParams(group_pattern=KERMANY, seed=11, duplicates="keep_one")
    summary = split_dataset(raw, params, out, summary_out)

    assert read_json(summary_out) == summary
    written = read_csv(out / "manifest.csv")
    dropped = [rows[1], rows[2], rows[3]]
    assert [r["path"] for r in written] == [r["path"] for r in rows if r not in dropped]
    assert read_csv(out / "dropped.csv") == [
        {"path": dropped[0]["path"], "reason": "duplicate"},
        {"path": dropped[1]["path"], "reason": "conflicting_labels"},
        {"path": dropped[2]["path"], "reason": "conflicting_labels"},
    ]
    assert summary["classes"] == ["normal", "virus", "bacteria"]
    assert summary["totals"] == {s: sum(r["split"] == s for r in written) for s in SPLITS}
    assert summary["total"] == len(rows) - 3 and summary["rows_in"] == len(rows)
    assert summary["grouped_by"] == "group_pattern"
    patient_of = {r["path"]: patient_id(r) for r in rows}
    assert [r["group"] for r in written] == [patient_of[r["path"]] for r in written]
    patients = {s: {r["group"] for r in written if r["split"] == s} for s in SPLITS}
    assert summary["n_groups"] == {
        "total": len({r["group"] for r in written}),
        **{s: len(patients[s]) for s in SPLITS},
    }
    assert sum(len(p) for p in patients.values()) == summary["n_groups"]["total"]  # none in two splits
    assert summary["duplicates"] == {
        "sets": 2,
        "rows_in_sets": 4,
        "conflicting_sets": 1,
        "dropped": 3,
        "by_reason": {"conflicting_labels": 2, "duplicate": 1, "duplicate_in_later_split": 0},
        "conflicts": [
            {
                "sha256": "clash",
                "labels": sorted({rows[2]["label"], clash_label}),
                "paths": [rows[2]["path"], rows[3]["path"]],
            }
        ],
    }
    train = summary["counts"]["train"]
    assert summary["imbalance_ratio"] == round(max(train.values()) / min(train.values()), 4)
    assert summary["source_splits"]["used"] is False and summary["source_splits"]["mode"] is None
    assert summary["params"] == {
        "val_fraction": 0.15,
        "test_fraction": 0.2,
        "seed": 11,
        "group_pattern": KERMANY,
        "duplicates": "keep_one",
    }


def test_split_summary_says_when_source_splits_were_kept(tmp_path):
    rows = given_rows({"train": {"a": 8, "b": 4}, "val": {"a": 2, "b": 2}, "test": {"a": 3, "b": 3}})
    raw = tmp_path / "raw"
    write_csv(raw / "manifest.csv", rows, list(rows[0]))
    write_json(raw / "classes.json", ["a", "b"])
    summary = split_dataset(
        raw, SplitParams(duplicates="keep_one"), tmp_path / "split", tmp_path / "summary.json"
    )
    assert [r["split"] for r in read_csv(tmp_path / "split" / "manifest.csv")] == [r["split"] for r in rows]
    assert summary["source_splits"] == {
        "used": True,
        "mode": "keep",
        "note": "the source's own train/val/test kept as given; val_fraction, test_fraction and seed unused",
        "overlap": {"groups": 0, "images": 0, "test_images": 0, "examples": {}},
    }
    assert summary["params"] == {
        "group_pattern": None,
        "duplicates": "keep_one",
        "source_splits": "keep",
        "source_split_overlap": "error",
    }
    assert summary["imbalance_ratio"] == 2.0
    assert summary["n_groups"] == {"total": 22, "train": 12, "val": 4, "test": 6}  # each image its own


def test_split_dataset_fails_when_conflicts_empty_a_class(tmp_path):
    rows = [manifest_row(i, lab) for i, lab in enumerate(interleaved_labels({"a": 10, "b": 10}))] + [
        manifest_row(100, "c", sha="s1"),
        manifest_row(101, "a", sha="s1"),
    ]
    raw = tmp_path / "raw"
    write_csv(raw / "manifest.csv", rows, list(rows[0]))
    write_json(raw / "classes.json", ["a", "b", "c"])
    with pytest.raises(PipelineError, match=r"no images left for classes \['c'\] after dropping conflicting"):
        split_dataset(raw, SplitParams(), tmp_path / "split", tmp_path / "summary.json")
    assert not (tmp_path / "split").exists() and not (tmp_path / "summary.json").exists()


def test_split_dataset_failure_keeps_previous_output(tmp_path):
    raw, _ = _raw_dir(tmp_path, {"a": 20, "b": 2}, ["a", "b"])
    out, summary_out = tmp_path / "split", tmp_path / "summary.json"
    out.mkdir()
    (out / "manifest.csv").write_text("previous\n")
    summary_out.write_text("{}\n")
    with pytest.raises(PipelineError, match="too few images"):
        split_dataset(raw, SplitParams(), out, summary_out)
    assert [p.name for p in out.iterdir()] == ["manifest.csv"]
    assert (out / "manifest.csv").read_text() == "previous\n"
    assert summary_out.read_text() == "{}\n"


def test_split_dataset_without_raw_data_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the stage that produces it"):
        split_dataset(tmp_path / "raw", SplitParams(), tmp_path / "split", tmp_path / "summary.json")
    assert not (tmp_path / "split").exists()


def test_overlap_kept_under_warn_is_counted_in_the_summary_and_logged(tmp_path, caplog):
    rows = given_rows({"train": {"a": 8, "b": 4}, "val": {"a": 2, "b": 2}, "test": {"a": 3, "b": 3}})
    for k, r in enumerate(rows):
        r["group"] = f"p{k}"
    test_rows = [r for r in rows if r["split"] == "test"]
    for shared, r in zip(("p0", "p1"), test_rows[:2], strict=True):
        r["group"] = shared  # two train patients also in test, one image each there
    raw = tmp_path / "raw"
    write_csv(raw / "manifest.csv", rows, list(rows[0]))
    write_json(raw / "classes.json", ["a", "b"])
    with pytest.raises(PipelineError, match="2 group"):
        split_dataset(raw, SplitParams(), tmp_path / "split", tmp_path / "summary.json")
    summary = split_dataset(
        raw, SplitParams(source_split_overlap="warn"), tmp_path / "split", tmp_path / "summary.json"
    )
    assert summary["source_splits"]["overlap"] == {
        "groups": 2,
        "images": 4,
        "test_images": 2,
        "examples": {"p0": ["train", "test"], "p1": ["train", "test"]},
    }
    assert read_json(tmp_path / "summary.json")["source_splits"]["overlap"]["groups"] == 2
    assert "share 2 group(s)" in caplog.text and "may be optimistic" in caplog.text
    run = mlflow.search_runs(
        experiment_names=["tlpipe-tests"], filter_string="tags.`tlpipe.stage` = 'split'", max_results=1,
        order_by=["attributes.start_time DESC"],
    ).iloc[0]  # fmt: skip
    assert run["metrics.source_split_overlap_groups"] == 2
    assert run["metrics.source_split_overlap_test_images"] == 2
