"""The model card: in the report, as model_card.md, with the data, the operating point, calibration,
the guard, the val/test comparison and the recipe."""

from __future__ import annotations

from pathlib import Path

from report_cases import make_inputs, report, section_of

from tlpipe.core.config import parse_params
from tlpipe.report.model_card import card_markdown, card_sections

METRICS = {
    "accuracy": 0.849, "sensitivity": 0.997, "specificity": 0.603, "roc_auc": 0.973, "n_test": 624,
    "ci": {"accuracy": {"low": 0.821, "high": 0.877}, "specificity": {"low": 0.54, "high": 0.66}},
    "threshold": {"rule": "youden", "value": 0.5053, "chosen_on": "val", "val_sensitivity": 0.979,
                  "val_specificity": 0.970},
    "calibration": {"method": "temperature", "temperature": 0.97, "before": {"ece": 0.104}, "after": {"ece": 0.103}},
    "guard": {"fitted": True, "test_flagged": 0.0048, "far": {"auroc": 1.0}, "near": {"auroc": 0.99998}},
    "shift": {"statement": "Caution: the test split looks unlike val (...)"},
}  # fmt: skip
SUMMARY = {
    "counts": {"train": {"NORMAL": 1100, "PNEUMONIA": 3334}, "test": {"NORMAL": 234, "PNEUMONIA": 390}},
    "grouped_by": "group_pattern", "n_groups": {"total": 3103},
    "source_splits": {"overlap": {"groups": 170, "test_images": 320}},
}  # fmt: skip


def test_the_card_says_what_it_is_for_and_how_far_to_trust_it():
    params = parse_params({"data": {"source": "folder", "folder": {"path": "data/sources/chest_xray"}}})
    text = card_markdown(card_sections(METRICS, ["NORMAL", "PNEUMONIA"], params, SUMMARY, "ab12", "1a2b3c4"))
    for heading in ("Intended use", "Data", "Test performance at the operating point", "Calibration",
                    "Unfamiliar-input guard", "Val and test", "Training"):  # fmt: skip
        assert f"## {heading}" in text
    assert "Not for: a diagnosis without a clinician" in text
    assert "Source: folder (data/sources/chest_xray); the augmented set's content hash: sha256 ab12." in text
    assert "- test: NORMAL 234, PNEUMONIA 390" in text and "Grouped by group_pattern: 3103 groups." in text
    assert "share 170 groups (320 test images)" in text
    assert "youden, threshold 0.5053 chosen on val" in text and "accuracy: 0.849 [0.821, 0.877]" in text
    assert "test ECE 0.104 before, 0.103 after" in text and "Flags 0.5% of test images" in text
    assert "Val sensitivity 0.979, specificity 0.970; test 0.997 and 0.603 [0.540, 0.660]" in text
    assert "Caution: the test split looks unlike val" in text and "commit 1a2b3c4" in text
    assert "efficientnet_lite0 (imagenet weights) at 64 px" in text


def test_an_out_of_fold_cut_off_is_named_as_such_in_the_card():
    threshold = {**METRICS["threshold"], "chosen_on": "oof", "n_oof": 5216}
    params = parse_params({})
    text = card_markdown(card_sections({**METRICS, "threshold": threshold}, ["NORMAL", "PNEUMONIA"], params,
                                       SUMMARY, "ab12", "1a2b3c4"))  # fmt: skip
    assert "youden, threshold 0.5053 chosen on 5216 out-of-fold predictions over train+val." in text
    assert "Val sensitivity 0.979, specificity 0.970;" in text


def test_the_report_stage_writes_the_card_and_shows_it(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    page, _ = report(inputs)
    card = (inputs["markdown_out"].parent / "model_card.md").read_text()
    assert card.startswith("# Model card: tlpipe classifier") and "## Intended use" in card
    assert "Not for: a diagnosis without a clinician" in section_of(page, "model-card")
