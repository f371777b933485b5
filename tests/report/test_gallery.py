"""Test images in the report: the most confident mistakes and the Grad-CAM panels."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from report_cases import full_inputs, images_in, make_inputs, report, section_of

from tlpipe.report import gallery
from tlpipe.report.page import Gallery, Section
from tlpipe.report.render import render_html


def test_mistakes_gallery_shows_the_most_confident_first(tmp_path: Path) -> None:
    page, _ = report(make_inputs(tmp_path))
    gallery = section_of(page, "mistakes")
    # cat's mistake was the most confident (0.9), then dog's (0.8), then the odd class's (0.7)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", gallery)
    assert captions == [
        "true <b>cat</b><br>predicted <b>dog</b><br>P(dog) = 0.900",
        "true <b>dog</b><br>predicted <b>&lt;b&gt;&amp;fox|ü</b><br>P(&lt;b&gt;&amp;fox|ü) = 0.800",
        "true <b>&lt;b&gt;&amp;fox|ü</b><br>predicted <b>cat</b><br>P(cat) = 0.700",
    ]
    thumbs = [img for alt, img in images_in(gallery)]
    assert [img.size for img in thumbs] == [(24, 24)] * 3  # small images stay small: CSS scales them


def test_gradcam_section_shows_overlays_of_correct_and_wrong_images(tmp_path: Path, tiny_model) -> None:
    inputs = full_inputs(tmp_path, tiny_model)
    page, _ = report(inputs)
    section = section_of(page, "gradcam")
    # the most confident correct image of each class in turn (4), then the two mistakes
    assert section.count('<div class="cam correct">') == 4 and section.count('<div class="cam wrong">') == 2
    images = images_in(section)
    originals = [img for alt, img in images if alt.startswith("test image ")]
    overlays = [img for alt, img in images if alt.startswith("Grad-CAM for ")]
    empty = section.count(">no evidence<")
    # one map per correct image, two (predicted and true class) per mistake; an empty map shows no image
    assert len(originals) == 6 and len(overlays) + empty == 4 + 2 * 2
    assert overlays and all(img.size == (32, 32) and img.mode == "RGB" for img in overlays)
    assert len({img.tobytes() for img in overlays}) > 1


def test_an_empty_map_says_no_evidence() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    empty = gallery.cam_card(image, "dog", np.zeros((8, 8), np.float32), "evidence for")
    shown = gallery.cam_card(image, "dog", np.ones((8, 8), np.float32), "evidence for")
    assert empty.picture is None and shown.picture is not None
    empty_html, shown_html = (
        render_html(["dog"], [Section("cams", "Grad-CAM", [Gallery([card])])]) for card in (empty, shown)
    )
    assert ">no evidence<" in empty_html and "<img" not in section_of(empty_html, "cams")
    assert '<img class="thumb" alt="Grad-CAM for dog" src="data:image/png;base64,' in shown_html


def test_without_a_model_the_gradcam_section_says_why(tmp_path: Path, caplog) -> None:
    inputs = make_inputs(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tlpipe.report"):
        page, _ = report({**inputs, "model_path": tmp_path / "missing.keras"})
    assert "Grad-CAM could not be computed" in section_of(page, "gradcam")
    assert any(m.startswith("report: warning: no Grad-CAM: ") for m in caplog.messages)
