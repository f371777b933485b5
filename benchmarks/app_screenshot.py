"""The README's screenshot of the upload page: real chest X-rays from ../shared/data/chest_xray classified by
a model (``--model``, with its decision, guard and model card), Grad-CAM on, in headless Chromium.

    .venv/bin/python benchmarks/app_screenshot.py --model models/model.keras --classes data/augmented/classes.json \\
        --card results/report/model_card.md --out docs/app.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bench_repo import SHARED, tests_on_path


def main(argv: list[str] | None = None) -> int:
    tests_on_path()
    from app_fixtures import CHROMIUM, serving
    from playwright.sync_api import sync_playwright

    from tlpipe.serve.app import load_served
    from tlpipe.serve.model_summary import local_summary

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--classes", type=Path, required=True)
    parser.add_argument("--card", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/app.png"))
    args = parser.parse_args(argv)
    test = SHARED / "chest_xray" / "test"
    files = [sorted((test / "NORMAL").glob("*.jpeg"))[0], sorted((test / "PNEUMONIA").glob("*.jpeg"))[0]]
    served = load_served(str(args.model), args.classes, None)
    served.summary = local_summary(args.model, args.card)
    with serving(served) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM or shutil.which("chromium"), args=["--no-sandbox"]
        )
        tab = browser.new_page(viewport={"width": 1280, "height": 820})
        tab.goto(url)
        tab.check("#gradcam-toggle")
        tab.set_input_files("#files", [str(f) for f in files])
        tab.wait_for_function("document.querySelectorAll('img.heatmap').length >= 2", timeout=120_000)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"wrote {args.out} ({', '.join(f.name for f in files)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
