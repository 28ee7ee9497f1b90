"""Images for the pictures: which files, at which size, in which batches.

A ViT needs an image whose sides are multiples of its patch size ``p``. ``fit_to_patches``
gets there without squashing: it optionally resizes the shorter side to ``image_size``
(keeping the aspect ratio), then centre-crops each side down to a multiple of ``p`` (at most
``p - 1`` pixels lost per side) or pads it up with the mean colour. The image it returns is
exactly what the network sees, so maps drawn over it line up pixel for pixel.
``batched_forward`` runs a backbone over such images, batching consecutive ones of one size.
What the pictures share besides: ``require_vit`` (attention and patch tokens need a ViT) and
``upsample`` (a map per patch to a map per pixel).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence, TypeVar

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dinokit.config import IMAGENET_MEAN, IMAGENET_STD
from dinokit.data.folders import IMAGE_EXTENSIONS, DataError, scan_folder
from dinokit.data.transforms import NormalizeImages
from dinokit.models.backbones import is_vit

Fit = Literal["crop", "pad"]
Key = TypeVar("Key")


def image_paths(source: str | Path) -> list[Path]:
    """One image file, or every image under a folder (recursive, sorted)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist (give an image file or a folder of images)")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{path} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    return scan_folder(path).paths


def output_names(keys: Sequence[Path], reserved: Iterable[str] = ()) -> list[Path]:
    """A distinct output name per image path (relative, distinct): the path without its extension
    (``sub/cat.jpg`` -> ``sub/cat``), except that images whose names would then coincide with
    another's or with a ``reserved`` name keep their extension (``cat.jpg`` and ``cat.png`` stay
    ``cat.jpg`` and ``cat.png``). Names that differ only in case count as coinciding
    (case-insensitive file systems)."""
    stems = Counter([str(key.with_suffix("")).lower() for key in keys] + [name.lower() for name in reserved])
    names = [key.with_suffix("") if stems[str(key.with_suffix("")).lower()] == 1 else key for key in keys]
    # a kept extension can still meet another image's stem (x.jpg next to x.jpg.png): number the later ones
    unique, seen = [], set()
    for name in names:
        candidate, n = name, 1
        while str(candidate).lower() in seen:
            n += 1
            candidate = name.with_name(f"{name.name}-{n}")
        seen.add(str(candidate).lower())
        unique.append(candidate)
    return unique


def fit_to_patches(image: Image.Image, patch_size: int, image_size: int | None = None, fit: Fit = "crop",
                   fill: tuple[float, float, float] = IMAGENET_MEAN) -> Image.Image:
    """``image`` with both sides a multiple of ``patch_size`` (see the module doc).

    ``image_size`` (pixels) is the shorter side after resizing; None keeps the size. ``fill``
    is the padding colour in [0, 1] (the normalisation mean: padding is zero for the network).
    """
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive (or None to keep the size), got {image_size}")
    if image_size is not None:
        image = TF.resize(image, image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    width, height = image.size
    p = patch_size
    if fit == "crop":
        new_w, new_h = width // p * p, height // p * p
        if not new_w or not new_h:
            raise DataError(f"a {width}x{height} px image is smaller than one {p} px patch; enlarge it (a larger "
                            f"image size) or pad it (fit='pad', --fit pad on the command line)")
        left, top = (width - new_w) // 2, (height - new_h) // 2
        return image.crop((left, top, left + new_w, top + new_h))
    if fit == "pad":
        new_w, new_h = -(-width // p) * p, -(-height // p) * p
        canvas = Image.new("RGB", (new_w, new_h), tuple(round(255 * c) for c in fill))
        canvas.paste(image, ((new_w - width) // 2, (new_h - height) // 2))
        return canvas
    raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")


def to_tensor(images: list[Image.Image], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Same-size PIL images -> a normalised float32 batch ``B x 3 x H x W`` (as training normalises)."""
    return NormalizeImages(mean, std)(torch.stack([TF.to_image(im) for im in images]))


class NeedsViTError(ValueError):
    """A picture that only a Vision Transformer can give (attention, patch tokens)."""


def require_vit(backbone: nn.Module, what: str) -> None:
    if not is_vit(backbone):
        kind = f"{type(backbone).__module__}.{type(backbone).__name__}"
        raise NeedsViTError(f"{what} need a ViT backbone (dinokit's vit_tiny/small/base, as trained by dinokit "
                            f"or released by DINO); this one is a {kind}")


def upsample(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``... x h x w`` -> ``... x h*p x w*p``, each patch value repeated over its pixels."""
    return maps.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def same_size_batches(items: Iterable[tuple[Key, Image.Image]], batch_size: int) -> Iterator[list[tuple[Key, Image.Image]]]:
    """Consecutive items grouped into batches of at most ``batch_size`` images of one size, in order."""
    batch: list[tuple[Key, Image.Image]] = []
    for item in items:
        if batch and (len(batch) == batch_size or item[1].size != batch[0][1].size):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch



@torch.no_grad()
def batched_forward(backbone: nn.Module, images: Iterable[tuple[Key, Image.Image]],
                    forward: Callable[[torch.Tensor], torch.Tensor], image_size: int | None = None, fit: Fit = "crop",
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size: int = 8
                    ) -> Iterator[tuple[list[tuple[Key, Image.Image]], torch.Tensor, tuple[int, int]]]:
    """``(batch of (key, fitted image), forward(batch tensor), (h, w) patch grid)`` over ``images``.

    Each image is fitted to ``backbone.patch_size`` by ``fit_to_patches``; consecutive images of
    one size share a call of ``forward`` (a bound method of ``backbone``), on the backbone's
    device and in eval mode (its mode is restored afterwards).
    """
    p = backbone.patch_size
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        fitted = ((key, fit_to_patches(image, p, image_size, fit, mean)) for key, image in images)
        for batch in same_size_batches(fitted, batch_size):
            pictures = [image for _, image in batch]
            width, height = pictures[0].size
            yield batch, forward(to_tensor(pictures, mean, std).to(device)), (height // p, width // p)
    finally:
        backbone.train(was_training)
