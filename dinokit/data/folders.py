"""Image folders: a recursive scan, optional labels from class sub-folders, and safe decoding.

A folder is *labelled* when every image lies inside a first-level sub-folder; the sub-folder
names, sorted, are the classes (the torchvision ``ImageFolder`` convention). Images directly in
the root make it unlabelled. Files are never trusted: ``load_rgb`` turns every image mode
(CMYK, 16-bit, palette, grayscale, alpha) into 8-bit RGB, applies EXIF rotation, and raises
``BadImageError`` for files that cannot be decoded so callers can skip them. Given the smallest
short side its caller needs, it reduces a larger image by a power of two, a JPEG while decoding it
(libjpeg's DCT scaling): a 12-megapixel photo then decodes and crops several times faster, and
its views are cut from an image still at least as large as every view needs. ``decode_plain_jpeg``
gives the same pixels of a plain JPEG as a ``3 x H x W`` uint8 tensor, without PIL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

try:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
except ImportError:  # a torchvision without its image codecs: PIL decodes every file
    decode_jpeg = None

EXIF_ORIENTATION = 0x0112  # the EXIF tag of the camera's orientation (1: upright)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 25_000 * 25_000  # larger files are refused as decompression bombs
#: What decoding an untrusted file can raise (``load_rgb`` turns it into ``BadImageError``)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


class DataError(ValueError):
    """A data folder that cannot be used (missing, empty, unlabelled where labels are needed)."""


class BadImageError(OSError):
    """One file that is not a readable image."""


@dataclass
class ImageList:
    """The images of a folder: paths, and labels with class names when the folder has them."""

    root: Path
    paths: list[Path]
    labels: list[int] | None = None
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def subset(self, indices: list[int] | np.ndarray) -> "ImageList":
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return ImageList(self.root, [self.paths[i] for i in indices], labels, list(self.classes))

    def fingerprint(self) -> str:
        """A short hash of the images, their paths relative to ``root`` (the same wherever the
        folder is mounted) and labels: a resume checks that its data is the run's."""
        h = hashlib.sha256()
        for i, path in enumerate(self.paths):
            label = self.labels[i] if self.labels is not None else -1
            relative = path.relative_to(self.root) if path.is_relative_to(self.root) else path
            h.update(f"{relative}:{label}\n".encode("utf-8", "surrogateescape"))  # names that are not UTF-8 too
        return f"{len(self)} images, {h.hexdigest()[:12]}"

    def require_labels(self, what: str) -> None:
        if not self.labelled:
            raise DataError(
                f"{what} needs labels, but {self.root} has images directly inside it; put each "
                "class's images in its own sub-folder (root/<class>/image.jpg)"
            )


def scan_folder(root: str | Path, skip: str | Path | None = None) -> ImageList:
    """Every image under ``root`` (recursive, extensions case-insensitive), sorted by path.
    Folders linked into it are followed (each real folder once); hidden files and folders
    (``.thumbs``, ``.ipynb_checkpoints``), dinokit run folders (``is_run_folder``) and the folder
    ``skip`` (this run's, before it holds anything) are left out. A folder that cannot be listed
    (no permission: a ``lost+found`` at a drive's root, a class folder of another user) is left out
    with a warning on stderr, not silently: its images, even a whole class, would be missing; so is
    a link named like an image that points to nothing."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    left_out: list[str] = []
    paths = sorted(_image_files(root, Path(skip).resolve() if skip is not None else None, left_out.append))
    for why in left_out:
        print(f"dinokit: warning: {why}", file=sys.stderr)
    if not paths:
        raise DataError(f"data folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
    tops = [p.relative_to(root).parts for p in paths]
    if any(len(parts) == 1 for parts in tops):
        return ImageList(root, paths)
    classes = sorted({parts[0] for parts in tops})
    index = {name: i for i, name in enumerate(classes)}
    return ImageList(root, paths, [index[parts[0]] for parts in tops], classes)


def image_list(images: ImageList | str | Path) -> ImageList:
    """``images`` as an ``ImageList``: a folder's path is scanned (``scan_folder``)."""
    if isinstance(images, ImageList):
        return images
    if isinstance(images, (str, Path)):
        return scan_folder(images)
    raise TypeError(f"expected an ImageList or a folder's path, got {type(images).__name__}")


def _image_files(root: Path, skip: Path | None, left_out: Callable[[str], None]) -> Iterator[Path]:
    """The image files under ``root`` (``scan_folder``); ``left_out`` is told what is missed and why."""

    def unlisted(err: OSError) -> None:
        left_out(f"cannot read the folder {err.filename} ({err.strerror or err}); the images in it are left out")

    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=unlisted):
        real = os.path.realpath(folder)
        if real in seen or (skip is not None and Path(real) == skip) or is_run_folder(Path(folder)):
            subfolders.clear()  # a link loop, or a run folder (its views.png is not a training image)
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            path = Path(folder) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                if path.is_file():
                    yield path
                elif path.is_symlink() and not path.exists():
                    left_out(f"{path} links to {os.readlink(path)}, which does not exist; it is left out")


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a dinokit run folder (``config.yaml`` beside ``metrics.jsonl``)."""
    return (folder / "config.yaml").is_file() and (folder / "metrics.jsonl").is_file()


def split_train_val(images: ImageList, val_fraction: float, seed: int = 0) -> tuple[ImageList, ImageList]:
    """A stratified, seeded split: ``val_fraction`` of each class (at least one image per class
    with two or more images) goes to validation. Unlabelled lists are split as one class."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i in range(len(images)):
        by_class.setdefault(images.labels[i] if images.labels else 0, []).append(i)
    train, val = [], []
    for members in by_class.values():
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        if val_fraction > 0 and len(members) > 1:
            n_val = min(max(n_val, 1), len(members) - 1)
        val += members[:n_val]
        train += members[n_val:]
    return images.subset(sorted(train)), images.subset(sorted(val))


def hold_out(images: ImageList, val_fraction: float, seed: int) -> tuple[ImageList, ImageList | None]:
    """The images a training run trains on and those it holds out for its k-NN monitor (``None``
    when it holds none out: see ``why_none_held_out``, or too few images per class)."""
    if why_none_held_out(images, val_fraction) is None:
        train, held_out = split_train_val(images, val_fraction, seed)
        if len(held_out):
            return train, held_out
    return images, None


def why_none_held_out(images: ImageList, val_fraction: float) -> str | None:
    """Why a run on ``images`` (the whole folder) holds none of them out for the k-NN monitor;
    None when it splits them (and holds some out unless there are too few per class)."""
    if not images.labelled:
        return "no labels: images lie directly in the folder, not all in class sub-folders"
    if len(images.classes) < 2:
        return "one class"
    return "val_fraction=0" if val_fraction == 0 else None


def load_rgb(path: str | Path, min_side: int = 0) -> Image.Image:
    """Decode any image file to 8-bit RGB, EXIF orientation applied. Raises ``BadImageError``.

    With ``min_side`` (pixels), an image whose short side is at least twice that is reduced by
    the largest power of two that keeps its short side ``>= min_side``: a JPEG while it is
    decoded (up to 1/8; libjpeg's DCT scaling), other formats, and beyond 1/8, by averaging
    blocks of pixels (``Image.reduce``).
    """
    try:
        with _untrusted_image(path) as img:
            if img.format in ("JPEG", "MPO"):
                _decode_reduced(img, min(8, reduction_for(img.size, min_side)))
            img.load()
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
                img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
            factor = reduction_for(img.size, min_side)
            return img.reduce(factor) if factor > 1 else img
    except DECODE_ERRORS as err:
        raise BadImageError(f"{path}: {type(err).__name__}: {err}") from None


def decode_plain_jpeg(path: str | Path, min_side: int = 0, max_side: int = 0) -> torch.Tensor | None:
    """The pixels ``load_rgb(path, min_side)`` gives, as a ``3 x H x W`` uint8 tensor decoded by
    torchvision's ``decode_jpeg`` without a PIL image and its copies, for a *plain* JPEG: RGB or
    grey, nothing to rotate (EXIF) or reduce, and (with ``max_side``) no side longer than that.
    ``None`` for any other file, one that cannot be decoded (``load_rgb`` then says why), and
    where torchvision lacks its image codecs (deprecated since 0.29)."""
    if decode_jpeg is None:
        return None
    try:
        with _untrusted_image(path) as img:  # the header alone
            if not (img.format == "JPEG" and img.mode in ("RGB", "L") and reduction_for(img.size, min_side) == 1
                    and (not max_side or max(img.size) <= max_side) and img.getexif().get(EXIF_ORIENTATION, 1) == 1):
                return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's codecs: None when they go
            return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    except (*DECODE_ERRORS, RuntimeError):
        return None


@contextlib.contextmanager
def _untrusted_image(path: str | Path):
    """``Image.open(path)`` with Pillow's pixel limit at ``MAX_IMAGE_PIXELS`` and its
    decompression-bomb warnings raised as errors."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            yield img


def reduction_for(size: tuple[int, int], min_side: int) -> int:
    """The largest power of two that divides ``size`` (width, height) into an image whose short
    side is still at least ``min_side`` pixels (1 where ``min_side`` is 0)."""
    factor = 1
    while min_side > 0 and min(size) // (2 * factor) >= min_side:
        factor *= 2
    return factor


def _decode_reduced(img: Image.Image, factor: int) -> None:
    """Ask the JPEG decoder of the not yet loaded ``img`` for ``1 / factor`` of its size (1, 2, 4 or 8)."""
    if factor > 1:  # Pillow takes the largest of 8, 4, 2 that fits the request: for this one, ``factor``
        img.draft(img.mode, (img.width // factor, img.height // factor))


def to_rgb(img: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB (16-bit grey scaled to 8 bits); RGB images are returned as they are."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        span = max(arr.max() - arr.min(), 1e-12)
        img = Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # convert would copy an RGB image
