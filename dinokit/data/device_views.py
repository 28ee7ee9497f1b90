"""Multi-crop views made on the accelerator: decode on the host, crop and colour on the device.

Where the CPU cannot feed the GPU (a core of a 2-core Xeon VM makes about 40 images/s of the
recipe's 2 x 224 px + 10 x 96 px views from 500 x 375 px JPEGs, and about 500 images/s for this
path onto the ``paper`` preset's 512 px canvas; an H100 trains ViT-S/16 on thousands per
second), the data loader workers only decode each image, shrink it to fit a square *canvas* and
draw the random parameters of its views; the device then applies them to the whole batch at
once (``views_on: device``).

The parameters are drawn per image, from the image's own seed, all views at once, with the
distributions of the host path's samplers (``RandomResizedCrop``, ``ColorJitter``) and the
recipe's probabilities: a view still depends only on (seed, epoch, image), not on the worker,
the number of processes or a resume. What
differs from the host path, by design: the crop is resampled with ``roi_align`` (bilinear,
averaging several samples per output pixel when it shrinks, which antialiases) instead of PIL's
bicubic filter, colour operations run in float instead of in 8-bit steps, the blur is a Gaussian
kernel truncated at 3 sigma (PIL's filter, on the host, approximates the Gaussian by box blurs),
and an image larger than the canvas is shrunk once before cropping.
``tests/data/test_device_views.py`` checks both the parameter distributions and the applied
transforms against the host path.

Shapes: a batch of canvases ``B x C x C x 3`` (uint8, channels last: the layout decoders write,
so that filling one is a copy of whole rows) and parameters ``B x V x NUM_PARAMS`` (float32)
become ``V`` views ``B x 3 x S_v x S_v`` (float32, normalised), global views first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align

from dinokit.config import TrainConfig
from dinokit.data.folders import decode_plain_jpeg, load_rgb
from dinokit.data.transforms import MultiCropAugmentation, NormalizeImages

# One row of parameters per view; the names say what each column holds.
PARAM_NAMES = ("top", "left", "height", "width", "flip", "jitter", "order_0", "order_1", "order_2", "order_3",
               "brightness", "contrast", "saturation", "hue", "grayscale", "blur", "sigma", "solarize")
NUM_PARAMS = len(PARAM_NAMES)
P = {name: i for i, name in enumerate(PARAM_NAMES)}
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision and PIL use
SOLARIZE_THRESHOLD = 128 / 255
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # ColorJitter's op indices 0..3


def canvas_side(cfg: TrainConfig) -> int:
    return cfg.canvas_size or 2 * cfg.global_crops_size


class ViewParameters:
    """Host side: PIL image -> ``(canvas, params)``, a ``C x C x 3`` uint8 tensor (the image,
    shrunk to fit if larger than ``C``, in the top-left corner) and the ``V x NUM_PARAMS``
    parameters of its views. Beyond the image, the canvas repeats its last row and column, so
    that resampling at the image's border sees the border (as PIL does), not black. Randomness
    comes from torch's global generator, which the training dataset seeds per image."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.canvas = canvas_side(cfg)
        self.min_source_side = self.canvas  # load_rgb's min_side: larger images are shrunk to the canvas anyway
        kinds = [0, 1] + [2] * cfg.local_crops_number  # global 1, global 2, local: per view
        scales = [cfg.global_crops_scale] * 2 + [cfg.local_crops_scale] * cfg.local_crops_number
        self.scale = torch.tensor(scales, dtype=torch.float64)  # V x 2: each view's area share range
        #: V x 5: each view's probability of flip, colour jitter, greyscale, blur, solarisation
        self.probs = torch.tensor([[cfg.flip_prob, cfg.color_jitter_prob, cfg.grayscale_prob, cfg.blur_prob[k],
                                    cfg.solarize_prob[k]] for k in kinds], dtype=torch.float64)
        jitter = T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)  # its factor ranges
        neutral = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
        self.jitter_range = torch.tensor([getattr(jitter, name) or [value, value] for name, value in neutral.items()],
                                         dtype=torch.float64)  # 4 x 2: brightness, contrast, saturation, hue

    def load_image(self, path: str | Path, min_side: int) -> Image.Image | torch.Tensor:
        """How ``ImageDataset`` loads an image for this transform: a plain JPEG that fits the canvas
        as a tensor decoded by torchvision (``decode_plain_jpeg``: ~1.2x the images/s of this path
        per core), any other as ``load_rgb``'s PIL image; the same pixels either way."""
        pixels = decode_plain_jpeg(path, min_side, max_side=self.canvas)
        return pixels if pixels is not None else load_rgb(path, min_side)

    def __call__(self, image: Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image``: PIL, or ``3 x H x W`` uint8; the same canvas either way."""
        pixels = image.permute(1, 2, 0) if isinstance(image, torch.Tensor) else None  # H x W x 3
        h, w = pixels.shape[:2] if pixels is not None else (image.height, image.width)
        if max(h, w) > self.canvas:  # shrunk by PIL's bicubic filter, however it came
            if pixels is not None:
                image, pixels = Image.fromarray(pixels.numpy()), None
            scale = self.canvas / max(h, w)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
            h, w = image.height, image.width
        canvas = torch.empty(self.canvas, self.canvas, 3, dtype=torch.uint8)  # every pixel is written below
        if pixels is not None:
            canvas[:h, :w] = pixels
        else:
            canvas.numpy()[:h, :w] = np.asarray(image, dtype=np.uint8)
        canvas[:h, w:] = canvas[:h, w - 1:w]
        canvas[h:] = canvas[h - 1:h]
        return canvas, self.sample(h, w)

    def sample(self, height: int, width: int) -> torch.Tensor:
        """The parameters of every view of a ``height x width`` image, ``V x NUM_PARAMS`` (float32,
        in ``PARAM_NAMES``' order), from torch's generator: the host path's distributions (the
        crop of ``RandomResizedCrop``, the probabilities, ``ColorJitter``'s factors and order,
        the blur's sigma), drawn for all views at once (tested against torchvision's samplers).
        Every parameter is drawn whether or not its operation applies."""
        views = len(self.scale)
        box = crop_boxes(height, width, self.scale, self.cfg.crop_ratio)
        applies = (torch.rand(views, 5, dtype=torch.float64) < self.probs).double()
        order = torch.rand(views, 4).argsort(dim=1).double()  # a uniform random order of the 4 jitter ops
        low, high = self.jitter_range[:, 0], self.jitter_range[:, 1]
        factors = low + (high - low) * torch.rand(views, 4, dtype=torch.float64)
        sigma_low, sigma_high = self.cfg.blur_sigma
        sigma = sigma_low + (sigma_high - sigma_low) * torch.rand(views, 1, dtype=torch.float64)
        flip, jitter, grey, blur, solarize = applies.unbind(1)
        return torch.cat([box, flip[:, None], jitter[:, None], order, factors, grey[:, None], blur[:, None], sigma,
                          solarize[:, None]], dim=1).float()


def crop_boxes(height: int, width: int, scale: torch.Tensor, ratio: tuple[float, float],
               tries: int = 10) -> torch.Tensor:
    """``V x 4`` boxes ``(top, left, height, width)`` (float64, whole pixels) of random resized
    crops of a ``height x width`` image, one per row of ``scale`` (``V x 2`` area share ranges),
    sampled as ``RandomResizedCrop`` samples them: the area share uniform in its range, the log
    aspect ratio (width / height) uniform in ``log(ratio)``, the first of ``tries`` draws that
    fits in the image, else the largest centred crop within ``ratio``; the position uniform."""
    views = scale.shape[0]
    share = scale[:, :1] + (scale[:, 1:] - scale[:, :1]) * torch.rand(views, tries, dtype=torch.float64)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * torch.rand(views, tries, dtype=torch.float64))
    w, h = torch.sqrt(share * aspect * (height * width)).round(), torch.sqrt(share / aspect * (height * width)).round()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits (0 where none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    position = torch.rand(views, 2, dtype=torch.float64)
    top = (position[:, 0] * (height - h + 1)).floor().clamp(max=height - h)
    left = (position[:, 1] * (width - w + 1)).floor().clamp(max=width - w)
    missed = ~fits.any(dim=1)
    if missed.any():  # the largest centred crop within the ratio range
        fallback_w, fallback_h = width, height
        if width / height < min(ratio):
            fallback_h = round(width / min(ratio))
        elif width / height > max(ratio):
            fallback_w = round(height * max(ratio))
        centred = torch.tensor([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w],
                               dtype=torch.float64)
        return torch.where(missed[:, None], centred, torch.stack([top, left, h, w], dim=1))
    return torch.stack([top, left, h, w], dim=1)


class DeviceMultiCrop:
    """Device side: ``(canvases, params)`` of a batch -> the list of its views, on the canvases'
    device. Build it once per run (``DeviceMultiCrop(cfg)``) and call it every step.

    The global views are made together, and so are the local ones (``B x views`` images through
    each kernel: on a GPU the launches do not grow with the number of views), and each operation
    but the jitter's blends runs on the images drawn for it alone, picked by indices planned on
    the host from ``params`` (``WorkPlan``): no host-device synchronisation, and no image
    transformed to be thrown away."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.sizes = [cfg.global_crops_size] * 2 + [cfg.local_crops_size] * cfg.local_crops_number
        #: (size, first view, number of views): the global views, then the local ones
        self.groups = [(cfg.global_crops_size, 0, 2)]
        if cfg.local_crops_number:
            self.groups.append((cfg.local_crops_size, 2, cfg.local_crops_number))
        self.normalize = NormalizeImages(cfg.mean, cfg.std)

    @torch.no_grad()
    def __call__(self, canvases: torch.Tensor, params: torch.Tensor) -> list[torch.Tensor]:
        """``canvases``: ``B x C x C x 3`` uint8 on the device that makes the views; ``params``:
        ``B x V x NUM_PARAMS``, best on the host (as collated): its flags plan the work there; from
        the device they are first copied back, which waits for it."""
        if params.shape[1] != len(self.sizes):
            raise ValueError(f"parameters for {params.shape[1]} views, but the config makes {len(self.sizes)}")
        device, (b, c) = canvases.device, canvases.shape[:2]
        host = params.cpu()  # once: from a device, a wait for it
        plans = WorkPlan.of_groups([_view_major(host, first, count) for _, first, count in self.groups], device)
        params = params.to(device, non_blocking=True)
        images = torch.empty(b, 3, c, c, dtype=torch.float32, device=device)  # B x C x C x 3 -> B x 3 x C x C
        images.copy_(canvases.permute(0, 3, 1, 2)).div_(255)  # floats in [0, 1], in one pass
        views: list[torch.Tensor] = []
        for (size, first, count), plan in zip(self.groups, plans):
            p = _view_major(params, first, count)  # (views x B) x NUM_PARAMS, view by view
            image_index = torch.arange(b, device=device).repeat(count)
            x = crop_and_resize(images, p[:, P["top"]], p[:, P["left"]], p[:, P["height"]], p[:, P["width"]], size,
                                image_index)
            views += self.normalize(self.transform(x, p, plan, size)).split(b)
        return views

    def transform(self, x: torch.Tensor, p: torch.Tensor, plan: WorkPlan, size: int) -> torch.Tensor:
        """Crops ``N x 3 x size x size`` in [0, 1] and their ``N x NUM_PARAMS`` -> the views before
        normalisation: flip, colour jitter (each image's factors and order), greyscale, blur, solarisation."""
        x = apply_to(x, p, plan.flip, lambda xs, _: xs.flip(-1))
        x = color_jitter(x, p, plan.hue)
        x = apply_to(x, p, plan.grey, lambda xs, _: grey(xs).expand_as(xs))
        kernel = blur_kernel_size(self.cfg.blur_sigma[1], size)
        x = apply_to(x, p, plan.blur, lambda xs, ps: gaussian_blur(xs, ps[:, P["sigma"]], kernel))
        return apply_to(x, p, plan.solarize, lambda xs, _: torch.where(xs >= SOLARIZE_THRESHOLD, 1 - xs, xs))


def _view_major(params: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """``B x V x NUM_PARAMS`` -> the rows of views ``first .. first + count - 1``, view by view:
    ``(count x B) x NUM_PARAMS``, row ``v * B + i`` for image ``i`` of view ``first + v``."""
    return params[:, first:first + count].transpose(0, 1).reshape(-1, params.shape[-1])


class WorkPlan(NamedTuple):
    """Which images of a group each operation but the jitter's blends transforms: index tensors on
    the device, of lengths the host knows (indexing with them makes the host wait for nothing)."""

    flip: torch.Tensor
    hue: list[torch.Tensor]  # per position of the jitter order: the images whose op there is hue
    grey: torch.Tensor
    blur: torch.Tensor
    solarize: torch.Tensor

    @staticmethod
    def of_groups(params: list[torch.Tensor], device: torch.device) -> list[WorkPlan]:
        """The plans of groups of views from their ``N x NUM_PARAMS`` parameters on the host; all
        indices go to the device in one copy (from pinned memory to a GPU: it does not wait)."""
        masks = []
        for p in params:
            jitter = p[:, P["jitter"]] > 0
            hue = [jitter & (p[:, P[f"order_{k}"]] == JITTER_OPS.index("hue")) for k in range(4)]
            masks += [p[:, P["flip"]] > 0, *hue, p[:, P["grayscale"]] > 0, p[:, P["blur"]] > 0, p[:, P["solarize"]] > 0]
        indices = [mask.nonzero().flatten() for mask in masks]
        flat = torch.cat(indices)
        if device.type == "cuda":
            flat = flat.pin_memory()
        parts = iter(flat.to(device, non_blocking=True).split([len(i) for i in indices]))
        return [WorkPlan(next(parts), [next(parts) for _ in range(4)], next(parts), next(parts), next(parts))
                for _ in params]


def crop_and_resize(images: torch.Tensor, top, left, height, width, size: int,
                    image_index: torch.Tensor | None = None) -> torch.Tensor:
    """Crop box ``[top, top + height) x [left, left + width)`` (pixels) of image ``image_index``
    (default: box ``i`` of image ``i``), resized to ``size x size`` by ``roi_align``: bilinear, with
    as many samples per output pixel as the box has input pixels per output pixel (an area
    average when shrinking). ``N`` boxes -> ``N x 3 x size x size``."""
    if image_index is None:
        image_index = torch.arange(images.shape[0], device=images.device)
    boxes = torch.stack([image_index.to(images.dtype), left, top, left + width, top + height], dim=1).to(images.dtype)
    return roi_align(images, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images ``N x 3 x H x W`` -> ``N x 1 x H x W``, summed as torchvision sums it (three kernels)."""
    r, g, b = x.unbind(1)
    return r.mul(GREY_WEIGHTS[0]).add_(g, alpha=GREY_WEIGHTS[1]).add_(b, alpha=GREY_WEIGHTS[2]).unsqueeze(1)


def color_jitter(x: torch.Tensor, p: torch.Tensor, hue_at: list[torch.Tensor]) -> torch.Tensor:
    """ColorJitter with each image's own factors and order of the four operations; images whose
    ``jitter`` flag is off pass unchanged. ``hue_at[k]``: the images whose operation ``k`` is the
    hue's (``WorkPlan``). At each position the other three are one blend of every image with what
    its operation blends it with (black, its mean grey, its grey), by factor 1 where there is no
    such operation, which returns the image itself."""
    jitter = p[:, P["jitter"]] > 0
    blends = torch.arange(3, device=x.device)  # brightness, contrast, saturation: ColorJitter's ops 0, 1, 2
    factors = p[:, P["brightness"]:P["saturation"] + 1]  # a slice: indexing by a list would copy it to the device
    for position in range(4):
        chosen = jitter[:, None] & (p[:, P[f"order_{position}"], None] == blends)  # N x 3, one true at most
        factor = torch.where(chosen, factors, 1.0).prod(dim=1).view(-1, 1, 1, 1)
        luma = grey(x)
        other = torch.where(chosen[:, 2, None, None, None], luma,
                            luma.mean(dim=(1, 2, 3), keepdim=True) * chosen[:, 1, None, None, None])
        x = torch.addcmul(other * (1 - factor), x, factor).clamp_(0, 1)  # factor x + (1 - factor) other
        x = apply_to(x, p, hue_at[position], lambda xs, ps: adjust_hue(xs, ps[:, P["hue"]]))
    return x


def apply_to(x: torch.Tensor, p: torch.Tensor, index: torch.Tensor, op) -> torch.Tensor:
    """``x`` (``N x 3 x H x W``) with ``op(images, their params)`` applied to the images at
    ``index`` (on ``x``'s device) and no others, in place."""
    if len(index):
        x.index_copy_(0, index, op(x.index_select(0, index), p.index_select(0, index)))
    return x


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (``N``, in turns, [-0.5, 0.5]) keeping saturation and
    value: RGB -> HSV, ``h + shift mod 1``, HSV -> RGB. ``N x 3 x H x W`` -> the same."""
    value, brightest = x.max(dim=1, keepdim=True)
    chroma = value - x.min(dim=1, keepdim=True).values  # = value x saturation
    r, g, b = x.unbind(1)
    safe = chroma.squeeze(1).clamp_min(1e-12)  # where chroma is 0 the hue is any finite number: it is multiplied by 0
    sector = torch.stack([(g - b) / safe, 2 + (b - r) / safe, 4 + (r - g) / safe], dim=1)  # 6 x hue, by brightest
    hue6 = sector.gather(1, brightest) + 6 * shift.view(-1, 1, 1, 1)
    # HSV -> RGB: channel n = 5, 3, 1 (R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6
    k = torch.remainder(hue6 + torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1), 6)
    return torch.addcmul(value, chroma, torch.minimum(k, 4 - k).clamp_(0, 1), value=-1)


def blur_kernel_size(sigma_max: float, crop_size: int) -> int:
    """An odd kernel covering +-3 sigma, no larger than the crop."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    largest_odd = crop_size if crop_size % 2 else crop_size - 1
    return max(3, min(k, largest_odd))


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels of ``size`` taps, one per sigma: ``N x size``."""
    x = torch.arange(size, device=sigma.device, dtype=sigma.dtype) - (size - 1) / 2
    kernels = torch.exp(-0.5 * (x / sigma.view(-1, 1)) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Blur each image ``N x 3 x H x W`` with its own sigma: a separable ``size``-tap Gaussian,
    borders reflected (as torchvision's ``gaussian_blur``)."""
    n, c, h, w = x.shape
    kernels = gaussian_kernels(sigma, size).repeat_interleave(c, dim=0)  # one per image and channel
    pad = size // 2
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernels.view(n * c, 1, 1, size), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernels.view(n * c, 1, size, 1), groups=n * c)
    return flat.view(n, c, h, w)


def view_pipeline(cfg: TrainConfig):
    """The two halves of making a batch's views, by ``cfg.views_on``: ``(transform, finish)``.

    ``transform`` runs in the data loader on each PIL image; ``finish(tensors, device)`` turns the
    collated batch (a list of tensors on the host, pinned for a GPU) into the views on the
    training device: copies that do not wait for it, then the rest of the work there.
    ``host``: ``MultiCropAugmentation`` making 8-bit views and a ``finish`` that normalises them
    into float32 (``NormalizeImages``); ``device``: ``ViewParameters`` and ``DeviceMultiCrop``
    (whose parameters stay on the host, where they plan the device's work).
    """
    if cfg.views_on == "device":
        make = DeviceMultiCrop(cfg)
        return ViewParameters(cfg), lambda tensors, device: make(tensors[0].to(device, non_blocking=True), tensors[1])
    normalize = NormalizeImages(cfg.mean, cfg.std)
    return (MultiCropAugmentation(cfg, as_uint8=True),
            lambda tensors, device: [normalize(t.to(device, non_blocking=True)) for t in tensors])
