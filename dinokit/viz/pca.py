"""Patch features as colours: the first three principal components of a ViT's patch tokens.

The patch tokens (last block, after the final norm) of all given images are pooled, their
first three principal components computed together, and each patch coloured by its
projections, min-max scaled to [0, 1] per channel over all images: the same colour means a
similar feature in every image. With ``background_threshold`` the first component separates
object from background (it is oriented so that the image borders score low): patches whose
min-max scaled first component is at most the threshold turn black, and the three colours are
recomputed from the remaining (foreground) patches alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from dinokit.config import IMAGENET_MEAN, IMAGENET_STD
from dinokit.viz.inputs import Fit, Key, batched_forward, require_vit, upsample


def patch_features(backbone: nn.Module, images: Iterable[tuple[Key, Image.Image]], image_size: int | None = None,
                   fit: Fit = "crop", mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size: int = 8
                   ) -> Iterator[tuple[Key, Image.Image, torch.Tensor]]:
    """``(key, fitted image, h x w x D float32 CPU patch tokens)`` per ``(key, image)``, in order,
    computed on the backbone's device (last block, after the final norm)."""
    require_vit(backbone, "patch-feature maps")
    for batch, tokens, (h, w) in batched_forward(backbone, images, backbone.forward_features, image_size, fit,
                                                 mean, std, batch_size):
        grids = tokens[:, 1:].float().cpu().reshape(len(batch), h, w, -1)
        for (key, picture), grid in zip(batch, grids):
            yield key, picture, grid


def principal_components(x: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean D, components k x D)`` of the rows of ``x`` (``N x D``), strongest first.

    Each component's sign is fixed so that its largest-magnitude coordinate is positive.
    """
    x = x.double()
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / max(len(x) - 1, 1)
    _, vectors = torch.linalg.eigh(covariance)           # ascending eigenvalues
    components = vectors[:, -k:].flip(-1).T               # k x D, descending
    pivot = components.abs().argmax(dim=1)
    signs = components[torch.arange(len(components)), pivot].sign()
    return mean, components * signs[:, None]


def pca_rgb(features: list[torch.Tensor], background_threshold: float | None = None) -> list[np.ndarray]:
    """Patch features ``h_i x w_i x D`` of several images -> colours ``h_i x w_i x 3`` in [0, 1]
    (float32), components 1-3 in channels R, G, B (see the module doc).

    A ``ValueError`` when ``background_threshold`` (in [0, 1)) leaves no foreground patch, as
    every threshold does for a single patch or identical features."""
    if not features:
        return []
    if background_threshold is not None and not 0 <= background_threshold < 1:
        raise ValueError(f"background_threshold must lie in [0, 1), got {background_threshold}")
    sizes = [f.shape[0] * f.shape[1] for f in features]
    flat = torch.cat([f.reshape(n, -1) for f, n in zip(features, sizes)]).double()
    mean, components = principal_components(flat)
    projection = (flat - mean) @ components.T
    keep = torch.ones(len(flat), dtype=torch.bool)
    if background_threshold is not None:
        first = _minmax(projection[:, 0] * _border_sign(projection[:, 0], features))
        keep = first > background_threshold
        if not keep.any():
            raise ValueError(f"no foreground patch: the first component is the same on all {len(flat)} patch(es) "
                             f"(one patch, or identical features), so no background threshold separates them; "
                             f"leave the threshold out")
        if int(keep.sum()) > 3:
            mean, components = principal_components(flat[keep])
            projection = (flat - mean) @ components.T
    low, high = projection[keep].min(dim=0).values, projection[keep].max(dim=0).values
    colours = ((projection - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    colours[~keep] = 0
    return [c.reshape(f.shape[0], f.shape[1], 3).float().numpy()
            for c, f in zip(colours.split(sizes), features)]


def _minmax(values: torch.Tensor) -> torch.Tensor:
    return (values - values.min()) / (values.max() - values.min()).clamp_min(1e-12)


def _border_sign(first: torch.Tensor, features: list[torch.Tensor]) -> float:
    """+1 or -1: the orientation of the first component that gives border patches the lower mean."""
    border, start = [], 0
    for f in features:
        h, w = f.shape[:2]
        grid = first[start:start + h * w].reshape(h, w)
        edge = torch.ones(h, w, dtype=torch.bool)
        edge[1:-1, 1:-1] = False
        border.append(grid[edge])
        start += h * w
    return -1.0 if float(torch.cat(border).mean()) > float(first.mean()) else 1.0


def save_pca(picture: Image.Image, colours: np.ndarray, path: Path) -> Path:
    """Write the colours of one image as a PNG the size of ``picture`` (each patch a flat square)."""
    patch = picture.size[1] // colours.shape[0]
    pixels = upsample(torch.from_numpy(colours).permute(2, 0, 1), patch).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)
    return path


def pca_figure(pairs: list[tuple[str, Image.Image, np.ndarray]], cell_inches: float = 2.0) -> Figure:
    """Images (top) over their feature colours (bottom), one column per ``(name, picture, colours)``."""
    fig = Figure(figsize=(cell_inches * len(pairs), cell_inches * 2.2), layout="constrained")
    axes = fig.subplots(2, len(pairs), squeeze=False)
    for column, (name, picture, colours) in enumerate(pairs):
        axes[0, column].imshow(picture)
        axes[0, column].set_title(name, fontsize=8)
        axes[1, column].imshow(colours, interpolation="nearest")
        for ax in axes[:, column]:
            ax.set_axis_off()
    return fig
