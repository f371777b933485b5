"""A small X-ray classifier with its decision and guard, and the upload page serving it on a free port."""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from source_fixtures import kermany_tree

CLASSES = ["NORMAL", "PNEUMONIA"]
SIZE = 32
CHROMIUM = next(
    filter(
        None, map(shutil.which, ("chromium", "google-chrome", "google-chrome-stable", "chromium-browser"))
    ),
    None,
)


def xray_augmented(root: Path) -> tuple[Path, Path]:
    """Kermany-named fixture X-rays (``chest_xray/{train,test}/{NORMAL,PNEUMONIA}``) and the augment stage's
    layout of them at SIZE px: train re-split into train and val, test kept."""
    xrays = kermany_tree(root / "chest_xray", {"train": 12, "test": 4})
    out = root / "augmented"
    rows = []
    seen: dict[str, int] = {}
    for path in sorted(xrays.rglob("*.jpeg")):
        split, label = path.parts[-3], path.parts[-2]
        if split == "train":
            seen[label] = seen.get(label, 0) + 1
            split = "val" if seen[label] % 3 == 0 else "train"  # a third of each class to val
        rel = f"{split}/{label}/{path.stem}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR).save(out / rel)
        rows.append({"path": rel, "label": label, "label_index": CLASSES.index(label), "split": split,
                     "source": f"images/{label}/{path.name}"})  # fmt: skip
    with open(out / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "classes.json").write_text(json.dumps(CLASSES))
    return xrays, out


def train_xray_model(augmented: Path, model_path: Path) -> Path:
    """EfficientNet-Lite0 (ImageNet) with a head fitted on the fixture's train features; evaluate (val rule)
    then saves the decision and guard beside it, as the pipeline does."""
    import keras

    from tlpipe.core.config import EvaluateParams
    from tlpipe.data.datasets import load_augmented, load_images
    from tlpipe.evaluate.stage import evaluate
    from tlpipe.model import storage
    from tlpipe.train import head

    keras.utils.set_random_seed(0)
    data = load_augmented(augmented)
    train = data.split("train")
    backbone = head.build_backbone_model("efficientnet_lite0", "imagenet", SIZE)
    features = backbone.predict(load_images(train, len(train.paths)), verbose=0)
    classifier = head.build_head(features.shape[1], 2, dropout=0.0)
    classifier.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    classifier.fit(features, train.labels.astype("float32"), epochs=40, verbose=0)
    storage.save_model_atomically(head.assemble(backbone, classifier, 2, dropout=0.0), model_path)
    params = EvaluateParams(decision_data="val", bootstrap_resamples=0, guard_accept=0.95)
    evaluate(augmented, model_path, params, model_path.parent / "evaluation")
    return model_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(served) -> Iterator[str]:
    """The page for ``served`` on 127.0.0.1 in a background thread; yields its URL."""
    import uvicorn

    from tlpipe.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the app did not start in 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def photo_jpeg(path: Path) -> Path:
    """A natural photograph (scikit-learn's sample image): what an X-ray classifier must call unfamiliar."""
    from sklearn.datasets import load_sample_image

    Image.fromarray(load_sample_image("china.jpg")).save(path, "JPEG", quality=90)
    return path


def predict_csv(model: Path, files: list[Path], classes: Path) -> dict[str, dict[str, str]]:
    """``tlpipe predict``'s rows for ``files``, by file name."""
    from tlpipe.serve.predict import predict

    buffer = io.StringIO()
    predict(model, [str(f) for f in files], classes, buffer)
    return {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(buffer.getvalue()))}


def screenshot_has_content(png: bytes) -> dict[str, float]:
    """What a screenshot shows, in numbers: its size, how many colours, how much of it is strongly coloured
    (the heatmap's jet colours), and whether the caution banner's colour is there."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    flat = pixels.reshape(-1, 3)
    saturation = flat.max(axis=1) - flat.min(axis=1)
    banner = np.all(np.abs(flat - np.array([255, 244, 224])) <= 2, axis=1)
    return {
        "width": pixels.shape[1],
        "height": pixels.shape[0],
        "colours": len(np.unique(flat[:: max(1, len(flat) // 200_000)], axis=0)),
        "strongly_coloured": float((saturation > 150).mean()),
        "banner": float(banner.mean()),
    }
