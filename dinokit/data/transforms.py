"""The views of DINO: multi-crop augmentation for training and the evaluation transform.

``MultiCropAugmentation`` turns one PIL image into ``2 + local_crops_number`` normalised float
tensors: two global views (``3 x G x G``) and the local views (``3 x L x L``), each with the
recipe's random resized crop, flip, colour jitter, grayscale, blur and solarisation at that
view's probabilities. All randomness comes from torch's global generator, so seeding it before
a call fixes the views (the training dataset does that per image). With ``as_uint8`` the views
stay 8-bit and ``NormalizeImages`` makes them float where they are used: the training loader
sends a quarter of the bytes through shared memory, pinned memory and the copy to the GPU.
"""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from dinokit.config import TrainConfig
from dinokit.data.folders import to_rgb

BICUBIC = v2.InterpolationMode.BICUBIC


def _config(cfg: TrainConfig | None, changes: dict) -> TrainConfig:
    if cfg is None and not changes:
        return TrainConfig()
    return TrainConfig.build((cfg or TrainConfig()).to_dict(), changes)


def crop_source_side(size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> int:
    """The short side (pixels) an image needs so that no crop of ``RandomResizedCrop(size,
    scale, ratio)`` is enlarged: the crop's short side, ``sqrt(area_share * w * h * min(r, 1/r))``,
    is at least ``size`` for the smallest share and the most elongated ratio when the image's
    short side is at least ``size * sqrt(max(ratio[1], 1 / ratio[0]) / scale[0])``."""
    elongation = max(ratio[1], 1 / ratio[0])
    return math.ceil(size * math.sqrt(elongation / scale[0]))


class RandomGaussianBlur(torch.nn.Module):
    """PIL image -> the image blurred by PIL's Gaussian filter (``ImageFilter.GaussianBlur``,
    radius = sigma, as the official DINO code blurs), sigma uniform in ``sigma`` (pixels), drawn
    from torch's generator as torchvision's ``GaussianBlur`` draws it. On PIL images 5-20x faster
    than torchvision's, which converts to float and convolves with a truncated kernel."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, image: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        return image.filter(ImageFilter.GaussianBlur(sigma))


class NormalizeImages:
    """Images (``3 x H x W`` or ``B x 3 x H x W``) -> float32 ``(x - mean) / std`` per channel,
    computed on the images' device: 8-bit ones (``uint8``, 0-255) scaled to [0, 1] first (in place
    on the new float tensor, as torchvision's ``ToDtype`` + ``Normalize``), float ones taken as
    in [0, 1] and left unchanged."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)  # moved to the images' device on first use

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        if images.dtype == torch.uint8:
            return images.to(torch.float32).mul_(1 / 255).sub_(self.mean).div_(self.std)
        return (images - self.mean) / self.std


class MultiCropAugmentation:
    """PIL image -> list of views ``[global_1, global_2, local_1, ..., local_N]``: normalised
    float32 tensors, or with ``as_uint8`` the same views before ``NormalizeImages(cfg.mean, cfg.std)``.
    An image of any mode (grey, RGBA, palette, 16-bit) is made 8-bit RGB first, as ``load_rgb`` makes
    it; anything but a PIL image is refused (``TypeError``).

    Build with a config (``MultiCropAugmentation(cfg)``) or with the recipe's defaults changed
    by keyword (``MultiCropAugmentation(local_crops_number=10, global_crops_size=32)``).
    """

    def __init__(self, cfg: TrainConfig | None = None, as_uint8: bool = False, **changes) -> None:
        cfg = _config(cfg, changes)
        self.cfg = cfg
        finish = [] if as_uint8 else [NormalizeImages(cfg.mean, cfg.std)]
        g1, g2, local = (self._view(cfg, kind, finish) for kind in range(3))
        self.view_transforms = [g1, g2] + [local] * cfg.local_crops_number
        #: the short side (pixels) a source image needs for the views (``load_rgb``'s ``min_side``)
        sides = [crop_source_side(cfg.global_crops_size, cfg.global_crops_scale, cfg.crop_ratio)]
        if cfg.local_crops_number:
            sides.append(crop_source_side(cfg.local_crops_size, cfg.local_crops_scale, cfg.crop_ratio))
        self.min_source_side = max(sides)

    @staticmethod
    def _view(cfg: TrainConfig, kind: int, finish: list) -> v2.Compose:
        """The transform of one kind of view (0, 1: the global views; 2: the local ones), then ``finish``."""
        local = kind == 2
        size = cfg.local_crops_size if local else cfg.global_crops_size
        scale = cfg.local_crops_scale if local else cfg.global_crops_scale
        blur_p, solarize_p = cfg.blur_prob[kind], cfg.solarize_prob[kind]
        steps = [
            v2.RandomResizedCrop(size, scale=scale, ratio=cfg.crop_ratio, interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(cfg.flip_prob),
            v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.color_jitter_prob),
            v2.RandomGrayscale(cfg.grayscale_prob),
        ]
        if blur_p > 0:
            steps.append(v2.RandomApply([RandomGaussianBlur(cfg.blur_sigma)], p=blur_p))
        if solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
        return v2.Compose(steps + [v2.ToImage()] + finish)

    @property
    def num_views(self) -> int:
        return len(self.view_transforms)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        if not isinstance(image, Image.Image):
            raise TypeError(f"MultiCropAugmentation takes a PIL image, got {type(image).__name__}: "
                            f"open files with PIL.Image.open or dinokit.data.folders.load_rgb")
        image = to_rgb(image)
        return [t(image) for t in self.view_transforms]


def _pil_to_rgb(image):
    """A PIL image as 8-bit RGB (``load_rgb``'s conversion); tensors pass unchanged."""
    return to_rgb(image) if isinstance(image, Image.Image) else image


def eval_resize_side(crop_size: int = 224) -> int:
    """The short side (pixels) the evaluation transform resizes an image to: ``crop_size * 256 / 224``."""
    return int(round(crop_size * 256 / 224))


def eval_transform(crop_size: int = 224, mean=TrainConfig.model_fields["mean"].default,
                   std=TrainConfig.model_fields["std"].default) -> v2.Compose:
    """Resize the short side to ``eval_resize_side(crop_size)``, centre-crop ``crop_size``, normalise:
    a PIL image (of any mode, made 8-bit RGB first as ``load_rgb`` makes it) or a ``3 x H x W`` tensor
    (``uint8``, or float in [0, 1]) -> float32 ``3 x crop_size x crop_size``."""
    if crop_size < 1:
        raise ValueError(f"crop_size must be at least 1 pixel, got {crop_size}")
    return v2.Compose([
        _pil_to_rgb,
        v2.Resize(eval_resize_side(crop_size), interpolation=BICUBIC, antialias=True),
        v2.CenterCrop(crop_size),
        v2.ToImage(),
        NormalizeImages(mean, std),
    ])
