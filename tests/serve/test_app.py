"""The upload page (``tlpipe app``) in a real headless Chromium: what it shows is what ``tlpipe predict``
returns for the same files; unreadable and unfamiliar files are said so; limits hold."""

from __future__ import annotations

import csv
import io
import json
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from app_fixtures import (
    CHROMIUM,
    CLASSES,
    free_port,
    photo_jpeg,
    predict_csv,
    screenshot_has_content,
    serving,
    train_xray_model,
    xray_augmented,
)

from source_fixtures import png_header_only
from tlpipe.core.errors import PipelineError
from tlpipe.serve.app import CAUTION, load_served

SHARED_XRAYS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "chest_xray"
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def xray_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model, classes.json, the fixture's chest_xray folder)."""
    root = tmp_path_factory.mktemp("app")
    xrays, augmented = xray_augmented(root)
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before conftest's MLflow isolation
        store = root / "mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
        model = train_xray_model(augmented, root / "models" / "model.keras")
    return model, augmented / "classes.json", xrays


@pytest.fixture(scope="module")
def page(xray_model):
    model, classes, _ = xray_model
    with serving(load_served(str(model), classes, None)) as url:
        yield url


def _post(url: str, data: bytes, path: str = "api/predict") -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _results(page_) -> dict[str, dict]:
    """Every result card on the page: its label, probabilities, warnings and error, by file name."""
    return page_.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('.result')].map(card => [card.dataset.name, {
            label: card.querySelector('.label')?.dataset.value ?? null,
            probs: Object.fromEntries([...card.querySelectorAll('.prob')].map(r => [r.dataset.class, Number(r.dataset.value)])),
            unfamiliar: card.querySelector('.unfamiliar') !== null,
            error: card.querySelector('.error')?.textContent ?? null,
            operating: card.querySelector('.operating')?.textContent ?? null,
            heatmap: card.querySelector('img.heatmap') !== null,
        }]))"""
    )


def _upload_and_wait(page_, files: list[Path]) -> None:
    before = page_.locator(".result[data-done]").count()
    page_.set_input_files("#files", [str(f) for f in files])
    page_.wait_for_function(f"document.querySelectorAll('.result[data-done]').length >= {before + len(files)}",
                            timeout=60_000)  # fmt: skip


@needs_chromium
def test_the_page_shows_what_predict_returns_warns_and_keeps_working(xray_model, page, browser, tmp_path):
    model, classes, xrays = xray_model
    xray_files = sorted((xrays / "test").rglob("*.jpeg"))[:1] + sorted((xrays / "test").rglob("*.jpeg"))[-1:]
    corrupt = tmp_path / "corrupt.jpeg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    photo = photo_jpeg(tmp_path / "holiday_photo.jpg")
    expected = predict_csv(model, [*xray_files, photo], classes)
    assert expected["holiday_photo.jpg"]["unfamiliar"] == "yes"  # the guard fires on a photograph
    assert {expected[f.name]["unfamiliar"] for f in xray_files} == {"no"}

    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    tab.goto(page)
    assert CAUTION in tab.inner_text("#caution")
    assert str(model) in tab.inner_text("#model-panel")
    _upload_and_wait(tab, [*xray_files, corrupt, photo])
    shown = _results(tab)
    for name, row in expected.items():
        assert shown[name]["label"] == row["predicted"] and shown[name]["error"] is None
        for cls in CLASSES:  # the same numbers, not just the same rounded text
            assert shown[name]["probs"][cls] == pytest.approx(float(row[f"p_{cls}"]), abs=1e-6)
        assert shown[name]["unfamiliar"] == (row["unfamiliar"] == "yes")
        assert row["operating_point"] in shown[name]["operating"]
    assert "Could not classify this file: cannot decode image" in shown["corrupt.jpeg"]["error"]
    assert shown["corrupt.jpeg"]["label"] is None

    # the page keeps working after the bad file: a further upload is answered
    _upload_and_wait(tab, xray_files[:1])
    assert tab.locator(".result[data-done]").count() == 5

    tab.check("#gradcam-toggle")
    tab.wait_for_function("document.querySelectorAll('img.heatmap').length >= 4", timeout=60_000)
    assert not _results(tab)["corrupt.jpeg"]["heatmap"]

    with tab.expect_download() as download:
        tab.click("#download")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert len(rows) == 5 and list(rows[0]) == list(next(iter(expected.values())))
    for row in rows:
        if row["path"] in expected:
            assert row["predicted"] == expected[row["path"]]["predicted"]
            assert float(row["p_PNEUMONIA"]) == pytest.approx(
                float(expected[row["path"]]["p_PNEUMONIA"]), abs=1e-6
            )
    assert next(r for r in rows if r["path"] == "corrupt.jpeg")["error"].startswith("cannot decode image")

    content = screenshot_has_content(tab.screenshot(full_page=True))
    assert content["width"] == 1280 and content["colours"] > 1000
    assert content["strongly_coloured"] > 0.005  # the heatmaps' colours
    assert content["banner"] > 0.01  # the caution banner
    tab.close()


@needs_chromium
def test_a_dicom_file_dropped_on_the_page_is_answered_as_predict_answers_it(
    xray_model, page, browser, tmp_path
):
    """Drag and drop, and DICOM: the file's pixels (a fixture X-ray's) in a DICOM file named like a scanner's."""
    import numpy as np
    from PIL import Image

    from dicom_fixtures import write_dicom

    model, classes, xrays = xray_model
    xray = sorted((xrays / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    scan = write_dicom(tmp_path / "chest.dcm", np.asarray(Image.open(xray).convert("L")))
    expected = predict_csv(model, [scan], classes)["chest.dcm"]
    assert expected["error"] == ""
    tab = browser.new_page()
    tab.goto(page)
    data = list(scan.read_bytes())
    transfer = tab.evaluate_handle(
        """(bytes) => { const t = new DataTransfer();
            t.items.add(new File([new Uint8Array(bytes)], 'chest.dcm', { type: 'application/dicom' })); return t; }""",
        data,
    )
    tab.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    tab.wait_for_selector(".result[data-done]", timeout=60_000)
    shown = _results(tab)["chest.dcm"]
    assert shown["label"] == expected["predicted"] and shown["error"] is None
    assert shown["probs"]["PNEUMONIA"] == pytest.approx(float(expected["p_PNEUMONIA"]), abs=1e-6)
    assert "no preview (DICOM)" in tab.inner_text(".result .picture")
    tab.close()


@needs_chromium
@pytest.mark.skipif(not SHARED_XRAYS.is_dir(), reason="no ../shared/data/chest_xray (the real Kermany set)")
def test_a_real_chest_xray_gets_its_answer_and_heatmap(xray_model, page, browser):
    model, classes, _ = xray_model
    real = sorted((SHARED_XRAYS / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    expected = predict_csv(model, [real], classes)[real.name]
    tab = browser.new_page()
    tab.goto(page)
    tab.check("#gradcam-toggle")
    _upload_and_wait(tab, [real])
    tab.wait_for_selector("img.heatmap", timeout=60_000)
    shown = _results(tab)[real.name]
    assert shown["label"] == expected["predicted"] and shown["heatmap"]
    assert shown["probs"]["PNEUMONIA"] == pytest.approx(float(expected["p_PNEUMONIA"]), abs=1e-6)
    tab.close()


def test_twenty_concurrent_uploads_are_all_answered(xray_model, page):
    _, _, xrays = xray_model
    files = sorted((xrays / "test").rglob("*.jpeg"))
    bodies = [files[k % len(files)].read_bytes() for k in range(20)]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda body: _post(page, body), bodies))
    assert [status for status, _ in answers] == [200] * 20
    assert all(answer["error"] == "" and answer["predicted"] in CLASSES for _, answer in answers)
    # the same file gets the same answer whatever ran beside it
    by_body: dict[bytes, set[str]] = {}
    for body, (_, answer) in zip(bodies, answers, strict=True):
        by_body.setdefault(body, set()).add(json.dumps(answer, sort_keys=True))
    assert all(len(v) == 1 for v in by_body.values())


def test_limits_refuse_large_files_and_decompression_bombs(xray_model, caplog):
    model, classes, xrays = xray_model
    served = load_served(str(model), classes, None)
    served.max_upload_bytes = 10_000
    caplog.set_level(logging.DEBUG)
    with serving(served) as url:
        status, answer = _post(url, b"\0" * 20_000)
        assert status == 413 and "over the page's limit of 0.01 MB (--max-upload-mb)" in answer["error"]
        status, answer = _post(url, png_header_only(100_000, 100_000))
        assert status == 200 and answer["error"] == "too many pixels (100000x100000 > 40000000)"
        name = sorted((xrays / "test").rglob("*.jpeg"))[0]
        status, answer = _post(url, name.read_bytes())
        assert status == 200 and answer["predicted"] in CLASSES
    # nothing about an upload reaches the log: no file name, no pixels
    assert name.name not in caplog.text


def test_the_pixel_limit_is_the_pages_own_and_read_from_the_header(xray_model):
    model, classes, _ = xray_model
    served = load_served(str(model), classes, None)
    served.max_pixels = 1_000_000
    answer = served.classify(png_header_only(1001, 1000))
    assert answer["error"] == "too many pixels (1001x1000 > 1000000)" and answer["predicted"] == ""


def test_listening_beyond_this_machine_warns_that_there_is_no_authentication(xray_model, monkeypatch, caplog):
    import argparse

    import uvicorn

    from tlpipe.serve import app

    model, classes, _ = xray_model
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **kw: started.update(kw))
    args = argparse.Namespace(model=str(model), classes=classes, decision=None, host="0.0.0.0", port=free_port(),
                              max_upload_mb=1.0, max_pixels=1000)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert app.run(args) == 0
    assert "the page has no authentication" in caplog.text and started["host"] == "0.0.0.0"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        app.run(argparse.Namespace(**{**vars(args), "host": "127.0.0.1"}))
    assert "no authentication" not in caplog.text and started["access_log"] is False


def test_a_registered_champion_is_served_with_its_card_and_answers_as_the_local_model(xray_model):
    import mlflow

    from tlpipe.serve.pyfunc import log_raw_image_model

    model, classes, xrays = xray_model
    image = sorted((xrays / "test").rglob("*.jpeg"))[0]
    card = "# Model card\n\n## Data\n\n- Source: folder (data/sources/chest_xray)\n\n## Training\n\n- Code: commit 1a2b3c4d.\n"
    with mlflow.start_run():
        info = log_raw_image_model(model, classes, image.read_bytes(), decision_path=model.with_name("decision.json"),
                                   guard_path=model.with_name("guard.npz"))  # fmt: skip
    client = mlflow.MlflowClient()
    client.create_registered_model("tlpipe-classifier")
    version = client.create_model_version("tlpipe-classifier", info.model_uri, description=card)
    client.set_registered_model_alias("tlpipe-classifier", "champion", version.version)

    served = load_served("models:/tlpipe-classifier@champion", None, None)
    local = load_served(str(model), classes, None)
    assert served.summary["version"] == str(version.version) and served.summary["aliases"] == ["champion"]
    assert served.summary["sections"] == {"Data": ["Source: folder (data/sources/chest_xray)"]}
    assert served.summary["commit"] == "1a2b3c4d"
    assert served.classify(image.read_bytes()) == local.classify(image.read_bytes())
    with pytest.raises(PipelineError, match=r"--classes and --decision are for a \.keras model"):
        load_served("models:/tlpipe-classifier@champion", classes, None)
