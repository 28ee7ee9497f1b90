"""The built-in data set: labelled pictures of printed textures, generated on first use and cached.

Eight classes of pattern (stripes across, stripes down, checkerboard, dots, diagonal hatching,
rings, grid, speckle), each drawn in dark ink on light paper with a random period, phase,
small rotation (and ring centre), ink and paper grey levels and sensor noise. Position, phase
and scale say nothing about the class, so raw pixels do poorly; the kind of pattern is what a
network has to learn, and the multi-crop views keep it (a crop of stripes is stripes).

The images are grey on purpose. DINO amplifies what separates images under its augmentations;
a random colour per image survives the recipe's colour jitter (hue +-0.1), so on coloured
versions of these patterns a short run learns to tell colours apart instead of patterns and
its k-NN accuracy falls below the untrained network's (measured; see the README). Users' own
photos bring their own colour statistics; this set is the controlled first test.

The images are written once as PNG files in class folders under the cache
(``$DINOKIT_CACHE``, default ``~/.cache/dinokit``) and then read like any user folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from dinokit.data.folders import DataError
from dinokit.files import cache_dir, folder_made_once

TEXTURES = ("stripes_across", "stripes_down", "checkerboard", "dots", "hatching", "rings", "grid", "speckle")
VERSION = 3
SUPERSAMPLE = 2  # drawn at twice the size, then downsampled: anti-aliased edges


def builtin_textures(images_per_class: int = 300, size: int = 64, seed: int = 0, root: str | Path | None = None) -> Path:
    """The folder of the built-in textures data set, generated there on first use.

    Returns ``root/<texture>/<nnnn>.png`` with ``len(TEXTURES)`` classes of ``images_per_class``
    images of ``size`` x ``size`` px. Generation is atomic: a half-written set is never used.
    """
    base = Path(root) if root else cache_dir()

    def draw_all(staging: Path) -> None:
        rng = np.random.default_rng(seed)
        for texture in TEXTURES:
            (staging / texture).mkdir()
            for i in range(images_per_class):
                draw_texture_image(texture, size, rng).save(staging / texture / f"{i:04d}.png")

    try:
        return folder_made_once(base / f"textures-v{VERSION}-{images_per_class}x{size}px-seed{seed}", draw_all)
    except OSError as err:
        raise DataError(f"cannot write the built-in data set into {base} ({err.strerror or err}); point "
                        f"DINOKIT_CACHE at a writable folder") from None


def draw_texture_image(texture: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB picture (``size`` x ``size``) of ``texture``: ink where the pattern is, paper elsewhere."""
    ink_mask = texture_mask(texture, size * SUPERSAMPLE, rng)[..., None]
    ink, paper = 40 + rng.uniform(-10, 10), 215 + rng.uniform(-10, 10)
    pixels = ink_mask * ink + (1 - ink_mask) * paper
    pixels = np.repeat(pixels, 3, axis=2) + rng.normal(0, 6, (*ink_mask.shape[:2], 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.resize((size, size), Image.Resampling.BILINEAR)


def texture_mask(texture: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """``side x side`` float array, 1 where ``texture`` puts ink. The period is 6-14 px of the
    final image; the pattern is turned by up to +-0.25 rad (so across and down stay apart)."""
    period = rng.uniform(6, 14) * SUPERSAMPLE
    phase_u, phase_v = rng.uniform(0, 2 * math.pi, 2)
    turn = rng.uniform(-0.25, 0.25)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    u = (math.cos(turn) * xx + math.sin(turn) * yy) * 2 * math.pi / period + phase_u  # across the pattern
    v = (-math.sin(turn) * xx + math.cos(turn) * yy) * 2 * math.pi / period + phase_v  # down the pattern
    if texture == "stripes_across":
        mask = np.sin(v) > 0
    elif texture == "stripes_down":
        mask = np.sin(u) > 0
    elif texture == "checkerboard":
        mask = (np.sin(u) > 0) ^ (np.sin(v) > 0)
    elif texture == "dots":
        mask = np.cos(u) + np.cos(v) > 1.2
    elif texture == "hatching":
        mask = (np.cos((u + v) / math.sqrt(2)) > 0.6) | (np.cos((u - v) / math.sqrt(2)) > 0.6)
    elif texture == "rings":
        cx, cy = rng.uniform(0, side, 2)
        mask = np.sin(np.hypot(xx - cx, yy - cy) * 2 * math.pi / period + phase_u) > 0
    elif texture == "grid":
        mask = (np.cos(u) > 0.7) | (np.cos(v) > 0.7)
    elif texture == "speckle":
        cell = max(1, int(period / 4)) * SUPERSAMPLE
        cells = rng.random((side // cell + 1, side // cell + 1)) > 0.5
        mask = np.kron(cells, np.ones((cell, cell)))[:side, :side] > 0
    else:
        raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")
    return mask.astype(np.float32)
