"""The "Dataset" section: images per split and class, dropped duplicates, quarantined files."""

from __future__ import annotations

import json
from pathlib import Path

from report_cases import make_inputs, report, section_of


def test_dataset_section_has_split_counts_and_quarantine(tmp_path: Path) -> None:
    page, _ = report(make_inputs(tmp_path))
    dataset = section_of(page, "dataset")
    assert "<tr><th>class</th><th>train</th><th>val</th><th>test</th><th>total</th></tr>" in dataset
    assert "<tr><td>cat</td><td>20</td><td>4</td><td>3</td><td>27</td></tr>" in dataset
    assert "<tr><td>all</td><td>60</td><td>12</td><td>9</td><td>81</td></tr>" in dataset
    assert "2 duplicate images dropped" in dataset
    assert "Input files rejected by the download stage, so not used: 1." in dataset
    assert "<td>images/bad&lt;1&gt;.png</td><td>cannot identify image file</td>" in dataset


def test_source_split_overlap_is_a_caution_in_the_page_and_the_ci_summary(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    summary = json.loads(inputs["split_summary"].read_text())
    summary["grouped_by"] = "group_pattern"
    summary["source_splits"] = {
        "used": True,
        "mode": "resplit_train_val",
        "note": "the source's test kept",
        "overlap": {"groups": 170, "images": 1012, "test_images": 203, "examples": {}},
    }
    inputs["split_summary"].write_text(json.dumps(summary))
    page, markdown = report(inputs)
    dataset = section_of(page, "dataset")
    assert "Caution: the source&#39;s own splits share 170 group(s)" in dataset
    assert "203 test images belong to a group that is also in train or val" in dataset
    assert "no group spans two splits" not in dataset  # the claim it replaces would be false
    assert any(line.startswith("Caution: the source's own splits share 170 group(s)") for line in markdown)


def test_no_caution_without_overlap(tmp_path: Path) -> None:
    page, markdown = report(make_inputs(tmp_path))
    assert "Caution: the source" not in page and not any("Caution" in line for line in markdown)
