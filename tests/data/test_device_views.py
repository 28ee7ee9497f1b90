"""Views made on the device: the same distributions and the same transforms as the host path."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dinokit.config import TrainConfig
from dinokit.data import device_views
from dinokit.data.datasets import ImageDataset, collate_views, sample_seed
from dinokit.data.device_views import (JITTER_OPS, NUM_PARAMS, P, DeviceMultiCrop, ViewParameters, WorkPlan, adjust_hue,
                                       blur_kernel_size, color_jitter, crop_and_resize, crop_boxes, gaussian_blur)
from dinokit.data.folders import BadImageError, load_rgb, scan_folder
from dinokit.data.transforms import MultiCropAugmentation

CFG = TrainConfig.build({"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 3, "patch_size": 8,
                         "views_on": "device"})


def photo(seed: int = 0, size=(48, 40)) -> Image.Image:
    """A smooth colourful picture with some edges (not noise: resampling filters must agree on it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]] / max(size)
    channels = [np.sin(2 * math.pi * (f1 * xx + f2 * yy) + ph) for f1, f2, ph in rng.uniform(0.3, 1.5, (3, 3))]
    pixels = (np.stack(channels, -1) * 0.45 + 0.5) * 255
    pixels[size[1] // 3: size[1] // 2, size[0] // 4: size[0] // 2] = rng.uniform(0, 255, 3)  # a flat block
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def as_float(image: Image.Image) -> torch.Tensor:
    return TF.to_dtype(TF.to_image(image), torch.float32, scale=True)


def sample_params(n: int, cfg: TrainConfig = CFG, seed: int = 0) -> torch.Tensor:
    make = ViewParameters(cfg)
    torch.manual_seed(seed)
    return torch.stack([make(photo())[1] for _ in range(n)])  # n x V x NUM_PARAMS


def test_canvas_holds_the_image_and_repeats_its_border():
    canvas, params = ViewParameters(CFG)(photo(size=(48, 40)))
    assert canvas.dtype == torch.uint8 and canvas.shape == (64, 64, 3)  # rows, columns, channels
    assert params.shape == (2 + 3, NUM_PARAMS)
    assert torch.equal(canvas[:40, :48], TF.to_image(photo(size=(48, 40))).permute(1, 2, 0))
    assert torch.equal(canvas[:40, 48:], canvas[:40, 47:48].expand(-1, 16, -1))
    assert torch.equal(canvas[40:], canvas[39:40].expand(24, -1, -1))
    big, _ = ViewParameters(CFG)(photo(size=(200, 100)))  # larger than the canvas: shrunk to 64 x 32
    assert big.shape == (64, 64, 3) and torch.equal(big[32:], big[31:32].expand(32, -1, -1))


@pytest.mark.parametrize("size", [(48, 40), (200, 100)])  # the second is shrunk onto the canvas
def test_a_tensor_image_gives_the_canvas_and_parameters_of_the_pil_image(size, tmp_path):
    """``ImageDataset`` loads images for ``ViewParameters`` by its ``load_image`` (plain JPEGs as
    tensors): the same result as from ``load_rgb``'s PIL image."""
    make, image = ViewParameters(CFG), photo(size=size)
    torch.manual_seed(3)
    from_pil = make(image)
    torch.manual_seed(3)
    from_tensor = make(TF.pil_to_tensor(image))
    assert all(torch.equal(a, b) for a, b in zip(from_pil, from_tensor))
    image.save(tmp_path / "a.jpg", quality=95)
    dataset = ImageDataset(scan_folder(tmp_path), make)
    fits = max(size) <= make.canvas  # a plain JPEG that fits comes as a tensor
    assert dataset.load == make.load_image and isinstance(make.load_image(tmp_path / "a.jpg", 0), torch.Tensor) == fits
    torch.manual_seed(sample_seed(0, 0, 0))  # as the dataset seeds image 0 of epoch 0
    expected = make(load_rgb(tmp_path / "a.jpg"))
    assert all(torch.equal(a, b) for a, b in zip(dataset[(0, 0)][0], expected))


def test_view_parameters_load_what_fits_as_tensors_and_the_rest_through_pil(tmp_path):
    """A JPEG larger than the canvas, a PNG: PIL images (the shrink is PIL's); a bad file: ``BadImageError``."""
    make = ViewParameters(CFG)  # a 64 px canvas
    photo(size=(100, 60)).save(tmp_path / "large.jpg")
    photo().save(tmp_path / "b.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    assert isinstance(make.load_image(tmp_path / "large.jpg", 0), Image.Image)
    assert isinstance(make.load_image(tmp_path / "b.png", 0), Image.Image)
    with pytest.raises(BadImageError, match="bad.jpg"):
        make.load_image(tmp_path / "bad.jpg", 0)


def test_parameter_distributions_are_the_recipes():
    p = sample_params(1500)
    globals_, locals_ = p[:, :2], p[:, 2:]
    area = lambda q: q[..., P["height"]] * q[..., P["width"]] / (40 * 48)  # noqa: E731
    assert 0.4 - 0.02 <= area(globals_).min() and area(globals_).max() <= 1.0
    assert 0.05 - 0.01 <= area(locals_).min() and area(locals_).max() <= 0.4 + 0.02
    # the host path's own sampler (v2.RandomResizedCrop) on the same image: the same area distribution
    from torchvision.transforms import v2

    host_crop = v2.RandomResizedCrop(32, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3))
    make_params = getattr(host_crop, "make_params", None) or host_crop._get_params
    host_crops = [make_params([photo()]) for _ in range(3000)]
    host_area = torch.tensor([c["height"] * c["width"] / (40 * 48) for c in host_crops])
    ours = area(globals_).flatten()
    assert abs(ours.mean() - host_area.mean()) < 0.015 and abs(ours.std() - host_area.std()) < 0.015
    log_ratio = torch.log(p[..., P["width"]] / p[..., P["height"]])
    assert log_ratio.abs().max() <= math.log(4 / 3) + 0.15 and abs(log_ratio.mean()) < 0.02
    rate = lambda name, view=slice(None): p[:, view, P[name]].mean().item()  # noqa: E731
    assert abs(rate("flip") - 0.5) < 0.03 and abs(rate("jitter") - 0.8) < 0.03 and abs(rate("grayscale") - 0.2) < 0.03
    assert rate("blur", 0) == 1.0 and abs(rate("blur", 1) - 0.1) < 0.03 and abs(rate("blur", slice(2, None)) - 0.5) < 0.03
    assert rate("solarize", 0) == 0 and abs(rate("solarize", 1) - 0.2) < 0.03 and rate("solarize", slice(2, None)) == 0
    for name, low, high in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2), ("hue", -0.1, 0.1)):
        values = p[..., P[name]]
        assert low <= values.min() and values.max() <= high and abs(values.mean() - (low + high) / 2) < 0.02
    orders = p[..., [P[f"order_{i}"] for i in range(4)]]
    assert torch.equal(orders.sort(-1).values, torch.arange(4.0).expand_as(orders))  # a permutation per view
    assert abs((orders[..., 0] == 3).float().mean() - 0.25) < 0.03
    assert 0.1 <= p[..., P["sigma"]].min() and p[..., P["sigma"]].max() <= 2.0


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (48, 40), (7, 300), (2000, 30), (1, 1)])
@pytest.mark.parametrize("scale, ratio", [((0.4, 1.0), (3 / 4, 4 / 3)), ((0.05, 0.4), (3 / 4, 4 / 3)),
                                          ((0.9, 1.0), (0.5, 2.0))])
def test_crop_boxes_are_distributed_as_torchvisions(size, scale, ratio):
    """Area share, aspect ratio and position of 4000 boxes against 4000 of ``RandomResizedCrop``'s,
    all inside the image; images too elongated for any crop get its centred crop (2000 x 30)."""
    from torchvision.transforms import RandomResizedCrop

    width, height = size
    torch.manual_seed(0)
    ours = crop_boxes(height, width, torch.tensor([scale] * 4000, dtype=torch.float64), ratio)
    theirs = torch.tensor([RandomResizedCrop.get_params(Image.new("RGB", size), list(scale), list(ratio))
                           for _ in range(4000)], dtype=torch.float64)

    def stats(boxes):
        top, left, h, w = boxes.unbind(1)
        assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all() and torch.equal(boxes, boxes.round())
        share, log_ratio = h * w / (height * width), torch.log(w / h)
        return torch.stack([share.mean(), share.std(), log_ratio.mean(), log_ratio.std(),
                            (top / (height - h + 1)).mean(), (left / (width - w + 1)).mean()])

    assert torch.allclose(stats(ours), stats(theirs), atol=0.02), (stats(ours), stats(theirs))
    if size == (2000, 30):
        assert torch.equal(ours.unique(dim=0), theirs.unique(dim=0))


def test_crop_and_resize_matches_torchvision():
    image = as_float(photo())
    top, left, height, width = 5, 7, 30, 36
    ours = crop_and_resize(image[None], *(torch.tensor([v], dtype=torch.float32) for v in (top, left, height, width)), 24)
    reference = TF.resized_crop(image, top, left, height, width, [24, 24], antialias=True)  # bilinear
    assert ours.shape == (1, 3, 24, 24) and (ours[0] - reference).abs().mean() < 0.01
    upscaled = crop_and_resize(image[None], *(torch.tensor([v], dtype=torch.float32) for v in (0, 0, 12, 12)), 24)
    assert (upscaled[0] - TF.resized_crop(image, 0, 0, 12, 12, [24, 24], antialias=True)).abs().mean() < 0.01


def jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``color_jitter`` of images ``N x 3 x H x W`` by their ``N x NUM_PARAMS``, planned as ``DeviceMultiCrop`` plans."""
    return color_jitter(images.clone(), params, WorkPlan.of_groups([params], images.device)[0].hue)


TV_JITTER = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation,
             "hue": TF.adjust_hue}


@pytest.mark.parametrize("name, factor", [("brightness", 1.3), ("contrast", 0.7), ("saturation", 1.2), ("hue", 0.08),
                                          ("hue", -0.1)])
@pytest.mark.parametrize("position", [0, 3])
def test_colour_operations_match_torchvision(name, factor, position):
    """Each jitter operation alone (the others neutral), wherever the order puts it."""
    image = as_float(photo(1))
    params = torch.zeros(1, NUM_PARAMS)
    params[0, [P["jitter"], P["brightness"], P["contrast"], P["saturation"]]] = 1.0
    params[0, P[name]] = factor
    others = [op for op in range(4) if op != JITTER_OPS.index(name)]
    order = others[:position] + [JITTER_OPS.index(name)] + others[position:]
    params[0, [P[f"order_{k}"] for k in range(4)]] = torch.tensor(order, dtype=torch.float32)
    assert (jitter(image[None], params)[0] - TV_JITTER[name](image, factor)).abs().max() < 1e-4


def test_colour_jitter_of_a_batch_follows_each_images_factors_and_order():
    """A batch at once (the three blends of each position merged, hue on its images alone) against
    torchvision's operations applied image by image in each image's order; images without jitter
    unchanged."""
    images = torch.stack([as_float(photo(i)) for i in range(16)])
    params = sample_params(16)[:, 0]
    params[:4, P["jitter"]], params[4:, P["jitter"]] = 0.0, 1.0
    ours = jitter(images, params)
    for i in range(16):
        expected = images[i]
        if params[i, P["jitter"]]:
            for k in range(4):
                name = JITTER_OPS[int(params[i, P[f"order_{k}"]])]
                expected = TV_JITTER[name](expected, float(params[i, P[name]]))
        assert (ours[i] - expected).abs().max() < 1e-4, i


def test_hue_of_grey_is_unchanged_and_a_full_turn_is_identity():
    image = as_float(photo(2))
    for turns in (0.0, 1.0):
        assert torch.allclose(adjust_hue(image[None].clone(), torch.tensor([turns]))[0], image, atol=1e-5)
    grey_image = image.mean(0, keepdim=True).expand(3, -1, -1)
    assert torch.allclose(adjust_hue(grey_image[None].clone(), torch.tensor([0.3]))[0], grey_image, atol=1e-6)


def test_blur_matches_torchvision_per_image_sigma():
    images = torch.stack([as_float(photo(3)), as_float(photo(4))])
    sigmas = torch.tensor([0.4, 1.7])
    ours = gaussian_blur(images, sigmas, 9)
    for i, s in enumerate(sigmas.tolist()):
        assert (ours[i] - TF.gaussian_blur(images[i], [9, 9], [s, s])).abs().max() < 1e-5


def test_every_view_follows_its_parameters():
    """The whole device path against torchvision's functional ops applied one by one with the
    same parameters: crop, flip, jitter in the drawn order, grayscale, blur, solarize, normalise."""
    make, device_views = ViewParameters(CFG), DeviceMultiCrop(CFG)
    torch.manual_seed(3)
    samples = [make(photo(i)) for i in range(12)]
    canvases, params = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    views = device_views(canvases, params)
    assert [v.shape for v in views] == [(12, 3, 32, 32)] * 2 + [(12, 3, 16, 16)] * 3
    ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}
    for i in range(12):
        image = as_float(photo(i))
        for v, size in enumerate([32, 32, 16, 16, 16]):
            q = params[i, v]
            x = TF.resized_crop(image, *(int(q[P[k]]) for k in ("top", "left", "height", "width")), [size, size],
                                antialias=True)
            if q[P["flip"]]:
                x = TF.horizontal_flip(x)
            if q[P["jitter"]]:
                for position in range(4):
                    op = int(q[P[f"order_{position}"]])
                    x = ops[op](x, float(q[P[("brightness", "contrast", "saturation", "hue")[op]]]))
            if q[P["grayscale"]]:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            if q[P["blur"]]:
                k = blur_kernel_size(CFG.blur_sigma[1], size)
                x = TF.gaussian_blur(x, [k, k], [float(q[P["sigma"]])] * 2)
            if q[P["solarize"]]:
                x = torch.where(x >= 128 / 255, 1 - x, x)
            x = TF.normalize(x, list(CFG.mean), list(CFG.std))
            assert (views[v][i] - x).abs().mean() < 0.05, (i, v)


def test_device_views_have_the_host_views_statistics(textures_dir):
    """Pixel statistics of each kind of view over many images: device path ~ host path."""
    cfg = TrainConfig.build(CFG.to_dict(), {"global_crops_size": 16, "local_crops_size": 8})
    images = scan_folder(textures_dir)
    keys = [(epoch, i) for epoch in range(4) for i in range(len(images))]  # 256 images' views
    host = collate_views([ImageDataset(images, MultiCropAugmentation(cfg))[key] for key in keys])
    raw = collate_views([ImageDataset(images, ViewParameters(cfg))[key] for key in keys])
    device = DeviceMultiCrop(cfg)(*raw.tensors)
    for v in range(cfg.local_crops_number + 2):
        for stat in (torch.mean, torch.std):
            assert abs(stat(device[v]) - stat(host.tensors[v])) < 0.15, (v, stat)


def test_views_of_a_batch_are_each_images_views_made_alone():
    """The views of one size are made together and the selective operations indexed: image ``i``
    of view ``v`` still follows its own parameters alone."""
    make = ViewParameters(CFG)
    torch.manual_seed(4)
    samples = [make(photo(i)) for i in range(8)]
    canvases, params = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    batch = DeviceMultiCrop(CFG)(canvases, params)
    for i in range(8):
        alone = DeviceMultiCrop(CFG)(canvases[i:i + 1], params[i:i + 1])
        for v in range(len(batch)):
            assert (batch[v][i] - alone[v][0]).abs().max() < 1e-5, (i, v)


def test_hue_and_blur_transform_only_the_images_that_need_them(monkeypatch):
    seen = {"hue": 0, "blur": 0}

    def counted(name, op):
        def run(x, *args):
            seen[name] += len(x)
            return op(x, *args)
        return run

    monkeypatch.setattr(device_views, "adjust_hue", counted("hue", device_views.adjust_hue))
    monkeypatch.setattr(device_views, "gaussian_blur", counted("blur", device_views.gaussian_blur))
    params = sample_params(32)
    DeviceMultiCrop(CFG)(torch.zeros(32, 64, 64, 3, dtype=torch.uint8), params)
    assert seen == {"hue": int(params[..., P["jitter"]].sum()), "blur": int(params[..., P["blur"]].sum())}
    assert 0 < seen["hue"] < params.shape[0] * params.shape[1]


def test_views_never_read_the_devices_values():
    """On the ``meta`` device, which has shapes but no values, every op that would make the host
    wait for a GPU to know a value (``nonzero``, ``item``, a tensor in an ``if``, boolean
    indexing) raises: the views are made there all the same, as the parameters on the host plan
    the work."""
    params = sample_params(8)
    canvases = torch.zeros(8, 64, 64, 3, dtype=torch.uint8, device="meta")
    views = DeviceMultiCrop(CFG)(canvases, params)
    shapes = [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
    assert [(v.device.type, tuple(v.shape)) for v in views] == [("meta", shape) for shape in shapes]
    with pytest.raises(NotImplementedError):  # what planning on the device would have run into
        DeviceMultiCrop(CFG)(canvases, params.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_views_never_wait_for_the_gpu():
    make = ViewParameters(CFG)
    torch.manual_seed(5)
    samples = [make(photo(i)) for i in range(8)]
    canvases = torch.stack([s[0] for s in samples]).cuda()
    params = torch.stack([s[1] for s in samples]).pin_memory()  # as the loader hands them over
    device_views_of = DeviceMultiCrop(CFG)
    device_views_of(canvases, params)  # first call: lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        device_views_of(canvases, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_views_equal_cpu_views():
    make = ViewParameters(CFG)
    torch.manual_seed(5)
    samples = [make(photo(i)) for i in range(8)]
    canvases, params = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    cpu = DeviceMultiCrop(CFG)(canvases, params)
    cuda = DeviceMultiCrop(CFG)(canvases.cuda(), params)
    for a, b in zip(cpu, cuda):
        assert b.device.type == "cuda" and (a - b.cpu()).abs().max() < 1e-3


def test_training_and_bench_run_with_views_on_the_device(textures_dir, tmp_path):
    import json

    from dinokit.train import bench
    from dinokit.train.loop import train
    from tests.conftest import tiny_config

    cfg = tiny_config(textures_dir, tmp_path / "run", views_on="device", epochs=1)
    assert train(cfg).steps == 64 // 8
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    result = bench.run_bench(cfg, steps=2, warmup=1, measure_data=False, count_flops=False)
    assert result.phases_ms["views"] > 0 and result.skipped_steps == 0


def test_canvas_smaller_than_the_global_view_is_refused():
    from dinokit.config import ConfigError

    with pytest.raises(ConfigError, match="canvas_size: 16 px is smaller than global_crops_size 32"):
        TrainConfig.build(CFG.to_dict(), {"canvas_size": 16})
