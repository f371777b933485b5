"""The demo dataset: synthetic shapes on clutter, generated from a seed.

Lets the whole pipeline run with no download at all; the same seed always gives
the same images, so the demo's data/raw is reproducible byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tlpipe.core.config import DemoParams
from tlpipe.data.candidates import Candidate

DEMO_CLASSES = ("circle", "square", "triangle", "cross")


def _shape_points(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    if kind == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * r * 0.8, y * r * 0.8) for x, y in corners]
    elif kind == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "cross":
        w, arm = r * 0.32, r
        pts = [
            (-w, -arm),
            (w, -arm),
            (w, -w),
            (arm, -w),
            (arm, w),
            (w, w),
            (w, arm),
            (-w, arm),
            (-w, w),
            (-arm, w),
            (-arm, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = (int(v) for v in rng.integers(0, 256, size=3))
    return red, green, blue


def render_demo_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One synthetic image: a shape of random colour, size, place and angle on clutter.

    Colours and sizes are drawn independently of the class, and every image gets
    the same kinds of distractors, so no single pixel statistic gives the class away.
    """
    scale = 2  # draw large then downsample, for antialiased edges
    big = size * scale
    background = _random_colour(rng)
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):  # distractor strokes
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, big, size=4))
        draw.line((x0, y0, x1, y1), fill=_random_colour(rng), width=int(rng.integers(1, 4) * scale))
    foreground = _random_colour(rng)
    while sum(abs(a - b) for a, b in zip(foreground, background, strict=True)) < 120:
        foreground = _random_colour(rng)
    r = float(rng.uniform(0.18, 0.36)) * big
    cx, cy = (float(v) for v in rng.uniform(r, big - r, size=2))
    if kind == "circle":
        ry = r * float(rng.uniform(0.75, 1.0))  # slightly elliptic so radius is no cue
        draw.ellipse((cx - r, cy - ry, cx + r, cy + ry), fill=foreground)
    else:
        angle = float(rng.uniform(0, 2 * math.pi))
        draw.polygon(_shape_points(kind, cx, cy, r, angle), fill=foreground)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.5)) * scale))
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    noise = rng.normal(0, float(rng.uniform(4, 20)), size=(size, size, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _opener(img: Image.Image) -> Callable[[], Image.Image]:
    """A Candidate.open that hands back ``img`` (bound now, not when the loop has moved on)."""
    return lambda: img


def demo_candidates(params: DemoParams) -> Iterator[Candidate]:
    """A deterministic dataset of shapes: the same seed gives the same images."""
    rng = np.random.default_rng(params.seed)
    for i in range(params.images_per_class):
        for kind in DEMO_CLASSES:
            img = render_demo_image(kind, params.image_size, rng)
            yield Candidate(source=f"demo/{kind}/{i:05d}", label=kind, open=_opener(img))
