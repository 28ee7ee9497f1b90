"""ImageDataset decodes each image at the size its transform needs."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.config import TrainConfig
from dinokit.data.datasets import ImageDataset, Sample, collate_views, prefetch_factor
from dinokit.data.device_views import view_pipeline
from dinokit.data.folders import scan_folder


def test_a_large_image_is_loaded_at_the_size_its_transform_needs(tmp_path):
    arr = (np.random.default_rng(0).random((1200, 1600, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "photo.jpg")
    Image.fromarray(arr).save(tmp_path / "photo.png")
    images = scan_folder(tmp_path)
    sizes = [ImageDataset(images, lambda image: image.size, min_side=300)[i][0] for i in range(2)]
    assert sizes == [(400, 300), (400, 300)]  # the JPEG decoded at 1/4, the PNG reduced after
    assert ImageDataset(images, lambda image: image.size)[0][0] == (1600, 1200)


@pytest.mark.parametrize(("views_on", "needed"), [("host", 496), ("device", 448)])
def test_the_training_views_say_how_large_a_source_they_need(views_on, needed):
    """The recipe's 96 px local views at 5% of the image need a 496 px short side; views made
    on the device need the canvas (2 x 224 px), to which larger images are shrunk anyway."""
    transform, _ = view_pipeline(TrainConfig.build({"views_on": views_on}))
    assert transform.min_source_side == needed


def test_prefetch_factor_keeps_a_few_batches_ahead_without_piling_them_up():
    """In-process loading prefetches nothing; one worker keeps 4 batches ahead, many keep 2 each."""
    assert prefetch_factor(0) is None
    assert [prefetch_factor(w) for w in (1, 2, 3, 15, 32)] == [4, 2, 2, 2, 2]
    assert all(w * prefetch_factor(w) >= 4 for w in range(1, 40))


def test_an_images_draws_depend_on_seed_epoch_and_index_alone_and_seed_the_cpu_generator_only(tmp_path, monkeypatch):
    """``ImageDataset[(epoch, i)]`` draws from the CPU generator seeded by (seed, epoch, i), whatever
    was drawn before, and leaves the generator as it was. It does not call ``torch.manual_seed``,
    which in a loader worker (no GPU started) also queues a seed for each accelerator backend,
    recording a stack trace every time: ~0.6 ms an image, a quarter of a worker's time with
    views_on=device."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    dataset = ImageDataset(scan_folder(tmp_path), lambda image: torch.rand(3), seed=5)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: pytest.fail("torch.manual_seed seeds every device"))
    first = dataset[(2, 0)][0]
    torch.rand(7)
    state = torch.get_rng_state()
    assert torch.equal(dataset[(2, 0)][0], first) and not torch.equal(dataset[(3, 0)][0], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(ImageDataset(scan_folder(tmp_path), lambda image: torch.rand(3), seed=6)[(2, 0)][0], first)


def test_a_worker_collates_straight_into_the_shared_memory_the_batch_is_sent_through(monkeypatch):
    samples = [Sample((torch.full((4, 4, 3), i, dtype=torch.uint8), torch.rand(3, 2, 2)), i, i, None) for i in range(3)]
    in_main = collate_views(samples)
    assert not any(view.is_shared() for view in in_main.tensors)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as in a DataLoader worker
    in_worker = collate_views(samples)
    assert all(view.is_shared() for view in in_worker.tensors)  # nothing left to copy when it is sent
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(in_worker.tensors, in_main.tensors))
    assert in_worker.tensors[0].shape == (3, 4, 4, 3) and in_worker.labels.tolist() == [0, 1, 2]
