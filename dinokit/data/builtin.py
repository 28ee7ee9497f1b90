"""The built-in data set: labelled pictures of shapes, generated on first use and cached.

Each image holds one shape of a class (circle, square, triangle, ...) with a random colour
(from a palette shared by all classes), size, position and rotation, over a random background
(a noisy two-colour gradient). Colour and position say nothing about the class, so a network
only scores well on k-NN if it has learned shape: a fair first test of DINO that needs no
download. The images are written once as PNG files in class folders under the cache
(``$DINOKIT_CACHE``, default ``~/.cache/dinokit``) and then read like any user folder.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
VERSION = 2
# Colours come from a small palette shared by all classes: many images share a colour, so
# colour cannot tell one image from all others, and DINO has to look at shape.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (250, 250, 250), (20, 20, 20))


def cache_dir() -> Path:
    return Path(os.environ.get("DINOKIT_CACHE", Path.home() / ".cache" / "dinokit")).expanduser()


def builtin_shapes(images_per_class: int = 300, size: int = 64, seed: int = 0, root: str | Path | None = None) -> Path:
    """The folder of the built-in shapes data set, generated there on first use.

    Returns ``root/<shape>/<nnnn>.png`` with ``len(SHAPES)`` classes of ``images_per_class``
    images of ``size`` x ``size`` px. Generation is atomic: a half-written set is never used.
    """
    base = Path(root) if root else cache_dir()
    folder = base / f"shapes-v{VERSION}-{images_per_class}x{size}px-seed{seed}"
    if (folder / ".complete").exists():
        return folder
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".shapes-", dir=base))
    try:
        rng = np.random.default_rng(seed)
        for c, shape in enumerate(SHAPES):
            (staging / shape).mkdir()
            for i in range(images_per_class):
                draw_shape_image(shape, size, rng).save(staging / shape / f"{i:04d}.png")
        (staging / ".complete").touch()
        if folder.exists():  # an earlier, interrupted attempt
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def draw_shape_image(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB picture of ``shape`` on a random background."""
    scale = 4  # draw large, then downsample: anti-aliased edges
    big = size * scale
    img = _background(big, rng)
    draw = ImageDraw.Draw(img)
    radius = rng.uniform(0.25, 0.45) * big
    cx, cy = rng.uniform(radius * 0.8, big - radius * 0.8, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    colour = _colour(rng)
    _draw(draw, shape, cx, cy, radius, angle, colour, img.getpixel((int(cx), int(cy))))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5))).resize((size, size), Image.Resampling.LANCZOS)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return PALETTE[rng.integers(len(PALETTE))]


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    a, b = (np.array(PALETTE[i], dtype=np.float32) * 0.5 + 64 for i in rng.integers(len(PALETTE), size=2))
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = (np.cos(theta) * xx + np.sin(theta) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    pixels = a * (1 - t[..., None]) + b * t[..., None]
    pixels += rng.normal(0, rng.uniform(2, 15), size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, colour, background) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=background)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        ox, oy = cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=background)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r] * 4, angle), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, angle), fill=colour)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, angle), fill=colour)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.42 * r] * 5, angle), fill=colour)
    elif shape == "cross":
        w = 0.3 * r
        arm = [(-r, -w), (r, -w), (r, w), (-r, w)]
        for rot in (angle, angle + math.pi / 2):
            c, s = math.cos(rot), math.sin(rot)
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
