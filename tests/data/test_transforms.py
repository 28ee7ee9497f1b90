"""Multi-crop views: shapes, value ranges, and each transform's probability per view, measured."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from dinokit.config import TrainConfig
from dinokit.data.folders import to_rgb
from dinokit.data.transforms import (MultiCropAugmentation, NormalizeImages, RandomGaussianBlur, crop_source_side,
                                     eval_resize_side, eval_transform)

DRAWS = 400
TOL = 0.07  # > 3 binomial standard deviations for 400 draws

# Isolate one transform at a time: every other random transform is off, crops keep the whole image.
QUIET = dict(global_crops_size=32, local_crops_size=16, local_crops_number=2, global_crops_scale=(1.0, 1.0),
             local_crops_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, color_jitter_prob=0.0,
             grayscale_prob=0.0, blur_prob=(0.0, 0.0, 0.0), solarize_prob=(0.0, 0.0, 0.0),
             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), patch_size=8)


def _rates(aug, image, detect) -> np.ndarray:
    torch.manual_seed(0)
    hits = np.zeros(aug.num_views)
    for _ in range(DRAWS):
        for v, view in enumerate(aug(image)):
            hits[v] += bool(detect(view))
    return hits / DRAWS


def test_default_views_shapes_and_normalisation():
    aug = MultiCropAugmentation()
    views = aug(Image.new("RGB", (300, 200), (255, 255, 255)))
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    assert all(v.dtype == torch.float32 for v in views)
    cfg = TrainConfig()
    low = min((0 - m) / s for m, s in zip(cfg.mean, cfg.std))
    high = max((1 - m) / s for m, s in zip(cfg.mean, cfg.std))
    assert all(low - 1e-4 <= v.min() and v.max() <= high + 1e-4 for v in views)


def test_sizes_counts_and_statistics_are_configurable():
    sizes = dict(global_crops_size=64, local_crops_size=32, local_crops_number=3, patch_size=8)
    image = Image.fromarray((np.random.default_rng(0).random((80, 80, 3)) * 255).astype(np.uint8))
    torch.manual_seed(0)
    own = MultiCropAugmentation(**sizes, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))(image)
    torch.manual_seed(0)
    plain = MultiCropAugmentation(**sizes, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(image)
    assert [v.shape[-1] for v in own] == [64, 64, 32, 32, 32]
    mean, std = torch.tensor([0.5, 0.4, 0.3])[:, None, None], torch.tensor([0.2, 0.3, 0.4])[:, None, None]
    assert all(torch.allclose(a, (b - mean) / std, atol=1e-5) for a, b in zip(own, plain))


def test_solarize_only_on_the_second_global_view():
    aug = MultiCropAugmentation(**{**QUIET, "solarize_prob": (0.0, 0.2, 0.0)})
    rates = _rates(aug, Image.new("RGB", (32, 32), (200, 200, 200)), lambda v: v.mean() < 0.5)
    assert rates[0] == 0 and rates[2:].max() == 0
    assert abs(rates[1] - 0.2) < TOL


def test_blur_probabilities_per_view():
    board = (np.indices((32, 32)).sum(0) // 4 % 2 * 255).astype(np.uint8)
    image = Image.fromarray(np.stack([board] * 3, -1))
    aug = MultiCropAugmentation(**{**QUIET, "blur_prob": (1.0, 0.1, 0.5), "blur_sigma": (1.5, 2.0)})
    sharp = MultiCropAugmentation(**QUIET)(image)
    rates = _rates(aug, image, lambda v: v.std() < 0.6 * sharp[0 if v.shape[-1] == 32 else 2].std())
    assert rates[0] == 1.0
    assert abs(rates[1] - 0.1) < TOL
    assert all(abs(r - 0.5) < TOL for r in rates[2:])


def test_blur_is_pils_gaussian_filter_with_sigma_uniform_from_torch():
    """The official DINO code's blur (PIL, radius = sigma); close to an exact Gaussian of that sigma."""
    yy, xx = np.mgrid[0:64, 0:64] / 64
    image = Image.fromarray((np.stack([np.sin(6 * xx + c) * np.cos(5 * yy) for c in range(3)], -1) * 120 + 128)
                            .astype(np.uint8))
    blur = RandomGaussianBlur((0.1, 2.0))
    torch.manual_seed(0)
    sigmas = torch.empty(20).uniform_(0.1, 2.0)  # what the blur draws, one per call
    torch.manual_seed(0)
    for sigma in sigmas.tolist():
        out = blur(image)
        assert np.array_equal(np.asarray(out), np.asarray(image.filter(ImageFilter.GaussianBlur(sigma))))
        exact = v2.functional.gaussian_blur(image, [13, 13], [sigma, sigma])
        assert np.abs(np.asarray(out, dtype=float) - np.asarray(exact, dtype=float))[8:-8, 8:-8].mean() < 1.0


def test_flip_grayscale_and_colour_jitter_rates():
    half = np.zeros((32, 32, 3), dtype=np.uint8)
    half[:, 16:] = 255
    aug = MultiCropAugmentation(**{**QUIET, "flip_prob": 0.5})
    assert all(abs(r - 0.5) < TOL for r in _rates(aug, Image.fromarray(half), lambda v: v[:, :, :v.shape[-1] // 2].mean() > 0.5))

    aug = MultiCropAugmentation(**{**QUIET, "grayscale_prob": 0.2})
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    assert all(abs(r - 0.2) < TOL for r in _rates(aug, red, lambda v: (v[0] - v[1]).abs().max() < 1e-3))

    aug = MultiCropAugmentation(**{**QUIET, "color_jitter_prob": 0.8, "contrast": 0.0, "saturation": 0.0, "hue": 0.0})
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    rates = _rates(aug, grey, lambda v: abs(v.mean().item() - 128 / 255) > 1.5 / 255)
    assert all(abs(r - 0.8 * 0.99) < TOL for r in rates)  # ~1% of brightness factors are too close to 1 to see


def test_crop_scales_follow_the_config():
    # A white square on black covering 1/4 of the image: a global crop (scale >= 0.4) can never
    # fall entirely inside it, a small local crop often does.
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[:32, :32] = 255
    aug = MultiCropAugmentation(**{**QUIET, "global_crops_scale": (0.4, 1.0), "local_crops_scale": (0.05, 0.1),
                                   "crop_ratio": (0.75, 4 / 3)})
    rates = _rates(aug, Image.fromarray(img), lambda v: v.min() > 0.9)
    assert rates[0] == rates[1] == 0
    assert rates[2] > 0.1


@pytest.mark.parametrize("aspect", [1.0, 4 / 3, 3.0])
@pytest.mark.parametrize("size, scale", [(224, (0.4, 1.0)), (96, (0.05, 0.4))])
def test_no_crop_is_enlarged_from_an_image_of_the_crop_source_side(size, scale, aspect):
    ratio = (3 / 4, 4 / 3)
    short = crop_source_side(size, scale, ratio)
    image = Image.new("RGB", (round(short * aspect), short))
    torch.manual_seed(0)
    smallest = min(min(v2.RandomResizedCrop.get_params(image, list(scale), list(ratio))[2:]) for _ in range(3000))
    assert smallest >= size - 1  # the crop's sides are rounded to whole pixels
    if aspect == 1.0:  # and the side is no larger than needed: the smallest possible crop is just the size
        assert size ** 2 * 4 / 3 / scale[0] <= short ** 2 < (size + 1) ** 2 * 4 / 3 / scale[0]


def test_the_views_and_the_evaluation_say_the_source_side_they_need():
    assert MultiCropAugmentation(TrainConfig()).min_source_side == 496  # the 96 px local views at 5%
    assert MultiCropAugmentation(local_crops_number=0, global_crops_size=224).min_source_side == 409
    assert eval_resize_side(224) == 256


def test_normalising_images_is_torchvisions_arithmetic():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(images[0]))
    normalize = NormalizeImages(mean, std)
    assert torch.equal(normalize(images[0]), reference) and torch.equal(normalize(images)[0], reference)
    floats = v2.ToDtype(torch.float32, scale=True)(images)  # views made on the device: floats in [0, 1]
    kept = floats.clone()
    assert torch.allclose(normalize(floats)[0], reference, atol=1e-6) and torch.equal(floats, kept)


def test_the_training_loader_sends_8_bit_views_normalised_where_they_are_used():
    """The host pipeline's two halves (``view_pipeline``) give the float views of
    ``MultiCropAugmentation`` exactly, with a quarter of the bytes in between."""
    from dinokit.data.device_views import view_pipeline

    cfg = TrainConfig.build({**QUIET, "color_jitter_prob": 0.8, "blur_prob": (1.0, 0.1, 0.5), "mean": (0.4, 0.5, 0.6),
                             "std": (0.2, 0.25, 0.3), "global_crops_scale": (0.4, 1.0), "flip_prob": 0.5})
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    to_host, finish = view_pipeline(cfg)
    torch.manual_seed(1)
    small = to_host(image)
    torch.manual_seed(1)
    expected = MultiCropAugmentation(cfg)(image)
    assert all(v.dtype == torch.uint8 for v in small)
    assert sum(v.nbytes for v in small) * 4 == sum(v.nbytes for v in expected)
    batched = finish([torch.stack([v, v]) for v in small], torch.device("cpu"))
    assert all(torch.equal(b[1], e) for b, e in zip(batched, expected))


def test_eval_transform_resizes_then_centre_crops():
    t = eval_transform(32, mean=(0, 0, 0), std=(1, 1, 1))
    out = t(Image.new("RGB", (100, 50), (255, 0, 0)))
    assert out.shape == (3, 32, 32) and torch.allclose(out[0], torch.ones(32, 32), atol=1e-3)


def test_same_seed_same_views():
    aug = MultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=2, patch_size=8)
    img = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    torch.manual_seed(5)
    a = aug(img)
    torch.manual_seed(5)
    b = aug(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_images_of_any_mode_become_rgb_views_as_load_rgb_makes_them(mode):
    image = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    aug = MultiCropAugmentation(**QUIET)
    views = aug(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    torch.manual_seed(0)
    expected = aug(to_rgb(image))
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(aug(image), expected))
    assert eval_transform(32)(image).shape == (3, 32, 32)


@pytest.mark.parametrize("wrong", [torch.zeros(3, 40, 40, dtype=torch.uint8), np.zeros((40, 40, 3), np.uint8), "x.jpg"])
def test_views_of_anything_but_a_pil_image_are_refused_with_one_message(wrong):
    with pytest.raises(TypeError, match=f"takes a PIL image, got {type(wrong).__name__}"):
        MultiCropAugmentation(**QUIET)(wrong)


@pytest.mark.parametrize("size", [0, -32])
def test_eval_transform_refuses_a_crop_of_no_pixels(size):
    with pytest.raises(ValueError, match=f"crop_size must be at least 1 pixel, got {size}"):
        eval_transform(size)
