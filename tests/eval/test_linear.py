"""The linear probe: its features, its training on separable data, and real CIFAR-10 images."""

import pytest
import torch
from torch import nn

from dinokit.config import ConfigError
from dinokit.data import datasets
from dinokit.data.folders import ImageList, scan_folder, split_train_val
from dinokit.eval.features import Features
from dinokit.eval import linear
from dinokit.eval.linear import ProbeBatches, ProbeFeatures, linear_probe, train_linear
from dinokit.models.vit import vit

from tests.conftest import CIFAR10
from tests.eval.test_knn import COLOURS, make_folder


def separable(n: int, dim: int = 16, classes: int = 4, margin: float = 1.0, seed: int = 7) -> Features:
    """Points labelled by the largest of ``classes`` random linear scores, kept only where it leads by ``margin``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=g)
    x = torch.randn(8 * n, dim, generator=g)
    scores = x @ w.T
    best = scores.topk(2, dim=1).values
    keep = (best[:, 0] - best[:, 1] > margin).nonzero().squeeze(1)[:n]
    return Features(x[keep], scores[keep].argmax(1), [f"{i}" for i in range(n)])


def test_probe_reaches_near_perfect_accuracy_on_linearly_separable_features():
    data = separable(800)
    train = Features(data.features[:400], data.labels[:400], data.paths[:400])
    test = Features(data.features[400:], data.labels[400:], data.paths[400:])
    assert len(set(test.labels.tolist())) == 4
    head, result = train_linear(train, test, num_classes=4, epochs=10, lr=1.0, batch_size=64, progress=False)
    assert result.last_top1 >= 99.0 and result.best_top1 >= result.last_top1
    assert len(result.history) == 10 and result.feature_dim == 16 and not result.augment
    assert head.weight.shape == (4, 16)


def test_vit_probe_features_are_the_last_blocks_cls_tokens():
    model = vit("vit_tiny", patch_size=8, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        one = ProbeFeatures(model, n_last_blocks=1)(x)
        four_avg = ProbeFeatures(model, n_last_blocks=4, avgpool=True)(x)
        tokens = model.forward_features(x)
    assert torch.allclose(one, model(x), atol=1e-5)
    assert four_avg.shape == (2, 5 * 192)
    assert torch.allclose(four_avg[:, 3 * 192:4 * 192], tokens[:, 0], atol=1e-5)
    assert torch.allclose(four_avg[:, 4 * 192:], tokens[:, 1:].mean(1), atol=1e-5)
    assert ProbeFeatures(model, 4, True).kind == "probe4avg" and ProbeFeatures(nn.Flatten()).kind == "cls"
    with pytest.raises(ConfigError, match="n_last_blocks"):
        ProbeFeatures(model, n_last_blocks=13)


@pytest.mark.parametrize("augment", [False, True])
def test_linear_probe_on_image_folders(tmp_path, augment, monkeypatch):
    asked, load_rgb = set(), datasets.load_rgb  # the short sides the loading is asked to keep
    monkeypatch.setattr(datasets, "load_rgb", lambda path, min_side=0: asked.add(min_side) or load_rgb(path, min_side))
    train = scan_folder(make_folder(tmp_path / "train", COLOURS, per_class=4))
    test = scan_folder(make_folder(tmp_path / "test", ["red", "blue"], per_class=2))
    result = linear_probe(nn.Flatten(), train, test, epochs=5, lr=1.0, batch_size=4, augment=augment, crop_size=16,
                          progress=False, cache_dir=tmp_path / "cache", cache_tag="pixels")
    assert result.augment == augment and result.feature_dim == 3 * 16 * 16
    assert result.last_top1 == 100.0  # solid colours: crops and flips change nothing that matters
    assert len(list((tmp_path / "cache").glob("*.pt"))) == (1 if augment else 2)
    # evaluation resizes the short side to 18 px; the probe's crops at 8% of the image need 66
    assert asked == ({18, 66} if augment else {18})


def test_probe_batches_cover_every_image_once_per_epoch_and_never_span_two_epochs():
    sampler = ProbeBatches(10, 4, epochs=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9 and sampler.batches_per_epoch == 3
    assert [len(batch) for batch in batches] == [4, 4, 2] * 3
    for epoch in range(3):
        keys = [key for batch in batches[3 * epoch:3 * epoch + 3] for key in batch]
        assert {e for e, _ in keys} == {epoch} and sorted(i for _, i in keys) == list(range(10))
    assert batches[0] != [(1, i) for _, i in batches[3]]  # a new order every epoch
    assert list(ProbeBatches(10, 4, epochs=3, seed=1)) == batches != list(ProbeBatches(10, 4, epochs=3, seed=2))


def test_augmented_probe_reads_all_epochs_in_one_pass_of_its_loader(tmp_path, monkeypatch):
    passes = []  # the workers of each pass start once; one pass per epoch would start them every epoch

    class CountingLoader(linear.DataLoader):
        def __iter__(self):
            passes.append(self.num_workers)
            return super().__iter__()

    monkeypatch.setattr(linear, "DataLoader", CountingLoader)
    train = scan_folder(make_folder(tmp_path / "train", COLOURS, per_class=3))
    test = scan_folder(make_folder(tmp_path / "test", ["red", "blue"], per_class=2))
    results = [linear_probe(nn.Flatten(), train, test, epochs=3, lr=0.1, batch_size=5, crop_size=16, progress=False,
                            num_workers=workers).history for workers in (2, 0)]
    assert passes == [2, 0]
    assert results[0] == results[1]  # the same crops in the same order, whoever loads them


def cifar_subset(per_class: int) -> ImageList:
    """The first ``per_class`` images (by name) of every CIFAR-10 class, without scanning all 50 000."""
    classes = sorted(p.name for p in CIFAR10.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((CIFAR10 / name).iterdir())[:per_class]
        paths += files
        labels += [label] * len(files)
    return ImageList(CIFAR10, paths, labels, classes)


@pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 images not found at {CIFAR10}")
def test_probe_on_real_cifar10_pixels_beats_chance():
    train, test = split_train_val(cifar_subset(100), 0.3, seed=0)
    result = linear_probe(nn.Flatten(), train, test, epochs=15, lr=0.01, batch_size=100, augment=False,
                          crop_size=32, progress=False)
    assert result.last_top1 > 22.0  # chance: 10% +- 1.7% on 300 test images; raw pixels give about 30%
