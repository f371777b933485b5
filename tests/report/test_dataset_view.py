"""The "Dataset" section: images per split and class, dropped duplicates, quarantined files."""

from __future__ import annotations

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
