"""Attention maps of a ViT: where the last block's [CLS] token looks, per head.

For an image cut into an ``h x w`` grid of patches, the last block's attention row of the
[CLS] token, restricted to the patches and renormalised, gives each head a map of shares
that sum to 1. The *top-mass mask* of a head keeps its most attended patches until they hold
``threshold`` of that head's mass (the DINO paper's figures use 0.6): sort the shares in
decreasing order, accumulate, and keep a patch while the mass before it is still below the
threshold. Maps and masks are upsampled to the image by repeating each patch ``p x p`` times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from dinokit.config import IMAGENET_MEAN, IMAGENET_STD
from dinokit.viz.inputs import Fit, Key, batched_forward, require_vit, upsample

DEFAULT_THRESHOLD = 0.6


def cls_patch_attention(attention: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Last-block attention ``B x heads x T x T`` -> [CLS]->patch shares ``B x heads x h x w``.

    ``T = 1 + h*w`` with [CLS] first; each head's map is renormalised to sum to 1.
    """
    h, w = grid
    rows = attention[:, :, 0, 1:].float()
    if rows.shape[-1] != h * w:
        raise ValueError(f"attention over {rows.shape[-1]} patches does not fit a {h}x{w} grid")
    rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows.reshape(*rows.shape[:2], h, w)


def top_mass_mask(shares: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Boolean mask, same shape as ``shares`` (``... x h x w``): per map, the fewest patches that
    together hold at least ``threshold`` of its mass. Maps need not be normalised."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    flat = shares.flatten(-2).double()
    flat = flat / flat.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    ordered, order = flat.sort(dim=-1, descending=True)
    mass_before = ordered.cumsum(dim=-1) - ordered
    keep_sorted = mass_before < threshold
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(shares.shape)


@dataclass
class AttentionMaps:
    """One image's attention. Pixel arrays are ``H x W`` with ``H = h*p``, ``W = w*p``."""

    image: np.ndarray        # H x W x 3 uint8: the image as the network saw it (cropped or padded)
    shares: np.ndarray       # heads x h x w float32: [CLS]->patch attention share per patch (sums to 1)
    masks: np.ndarray        # heads x h x w bool: top-mass mask per head
    patch_size: int
    threshold: float

    @property
    def num_heads(self) -> int:
        return self.shares.shape[0]

    def heatmaps(self) -> np.ndarray:
        """``heads x H x W`` shares upsampled to the pixels."""
        return upsample(torch.from_numpy(self.shares), self.patch_size).numpy()

    def pixel_masks(self) -> np.ndarray:
        """``heads x H x W`` bool masks upsampled to the pixels."""
        return upsample(torch.from_numpy(self.masks), self.patch_size).numpy()


def attention_maps(backbone: nn.Module, images: Iterable[tuple[Key, Image.Image]], threshold: float = DEFAULT_THRESHOLD,
                   image_size: int | None = None, fit: Fit = "crop", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   batch_size: int = 4) -> Iterator[tuple[Key, AttentionMaps]]:
    """``(key, AttentionMaps)`` for each ``(key, image)``, in order, computed on the backbone's
    device; images are fitted to the patch grid by ``fit_to_patches`` and batched by size.

    Memory: the attention of a batch is ``B x heads x T^2`` floats (T = 3601 tokens for a
    480 px side at patch 8: about 0.3 GB per image for ViT-S).
    """
    require_vit(backbone, "attention maps")
    p = backbone.patch_size
    for batch, attention, grid in batched_forward(backbone, images, backbone.get_last_selfattention, image_size,
                                                  fit, mean, std, batch_size):
        shares = cls_patch_attention(attention, grid).cpu()
        masks = top_mass_mask(shares, threshold)
        for i, (key, picture) in enumerate(batch):
            yield key, AttentionMaps(np.asarray(picture), shares[i].numpy(), masks[i].numpy(), p, threshold)


def colourise(values: np.ndarray, high: float, cmap: str = "inferno") -> np.ndarray:
    """``H x W`` values in ``[0, high]`` -> ``H x W x 3`` uint8 through a colour map."""
    scaled = np.clip(values / high, 0, 1) if high > 0 else np.zeros_like(values)
    return (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)


def attention_figure(maps: AttentionMaps, title: str | None = None, cell_inches: float = 1.8) -> Figure:
    """All heads on one figure: the image, then per head its heat map over the image (top row)
    and its top-mass mask over the image (bottom row). Heat maps share one colour scale, from 0 to
    the largest share of any head, so a flat (near-uniform) head looks flat."""
    heads = maps.num_heads
    aspect = maps.image.shape[0] / maps.image.shape[1]
    fig = Figure(figsize=(cell_inches * (heads + 1), 2 * cell_inches * aspect + 0.4 + 0.3 * bool(title)),
                 layout="constrained")
    axes = fig.subplots(2, heads + 1, squeeze=False)
    image = maps.image.astype(np.float32) / 255
    heat, masks = maps.heatmaps(), maps.pixel_masks()
    axes[0, 0].imshow(maps.image)
    axes[0, 0].set_title("image", fontsize=9)
    axes[1, 0].imshow(maps.image)
    axes[1, 0].set_title(f"top {maps.threshold:.0%} mass", fontsize=9)
    for k in range(heads):
        overlay = 0.45 * image + 0.55 * colourise(heat[k], float(maps.shares.max())).astype(np.float32) / 255
        axes[0, k + 1].imshow(overlay)
        axes[0, k + 1].set_title(f"head {k}", fontsize=9)
        dimmed = np.where(masks[k][..., None], image, 0.25 * image)
        axes[1, k + 1].imshow(dimmed)
        axes[1, k + 1].set_title(f"{int(maps.masks[k].sum())}/{maps.masks[k].size} patches", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_attention(maps: AttentionMaps, folder: Path, dpi: int = 100) -> Path:
    """Write one image's pictures into ``folder``: ``image.png`` (what the network saw),
    ``attn-head{k}.png`` (heat map per head, colours from 0 to the largest share of any head),
    ``mask-head{k}.png`` (white: kept patches) and ``heads.png`` (all heads over the image, see
    ``attention_figure``). Returns the path of ``heads.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(maps.image).save(folder / "image.png")
    for k, (heat, mask) in enumerate(zip(maps.heatmaps(), maps.pixel_masks())):
        Image.fromarray(colourise(heat, float(maps.shares.max()))).save(folder / f"attn-head{k}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"mask-head{k}.png")
    grid = folder / "heads.png"
    attention_figure(maps).savefig(grid, dpi=dpi)
    return grid
