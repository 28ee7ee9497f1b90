"""Linear probe on frozen features (the DINO protocol).

A single linear layer is trained with cross-entropy on features of a frozen backbone: for a
ViT, the [CLS] token of each of the last ``n_last_blocks`` blocks (each through the final norm),
concatenated, optionally followed by the mean patch token of the last block; for any other
backbone its pooled feature. SGD with momentum 0.9 and no weight decay, learning rate
``lr x batch_size / 256`` following a cosine to 0 over the epochs. Training images are seen
through random-resized-crop + horizontal flip (``augment=True``, one backbone pass per image
and epoch) or, for speed, as cached features of the evaluation transform (``augment=False``).
Test images always go through the evaluation transform; their features are computed once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import v2
from tqdm.auto import tqdm

from dinokit.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError
from dinokit.data.datasets import ImageDataset, collate_views, StopSignalsToMain
from dinokit.data.folders import ImageList, image_list
from dinokit.data.transforms import BICUBIC, NormalizeImages, crop_source_side
from dinokit.eval.features import Features, cached_features, check_label_sets, relabel
from dinokit.models.backbones import is_vit
from dinokit.train.devices import autocast_for


class ProbeFeatures(nn.Module):
    """Frozen ``backbone`` -> probe features ``B x D'``.

    ViT: ``D' = (n_last_blocks + avgpool) x D`` ([CLS] of the last n blocks, then the mean patch
    token of the last one); other backbones: their own ``B x D`` output (the options do not apply).
    """

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 4, avgpool: bool = False) -> None:
        super().__init__()
        if is_vit(backbone) and not 1 <= n_last_blocks <= backbone.depth:
            raise ConfigError(f"n_last_blocks must lie in [1, {backbone.depth}] for this ViT, got {n_last_blocks}")
        self.backbone = backbone
        self.n_last_blocks = n_last_blocks
        self.avgpool = avgpool

    @property
    def kind(self) -> str:
        """A name of this feature, part of the feature cache's key."""
        if not is_vit(self.backbone):
            return "cls"
        return f"probe{self.n_last_blocks}{'avg' if self.avgpool else ''}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_vit(self.backbone):
            return self.backbone(x)
        outputs = self.backbone.get_intermediate_layers(x, self.n_last_blocks)
        parts = [out[:, 0] for out in outputs]
        if self.avgpool:
            parts.append(outputs[-1][:, 1:].mean(dim=1))
        return torch.cat(parts, dim=-1)


PROBE_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults, as the official probe
PROBE_CROP_RATIO = (3 / 4, 4 / 3)


def probe_train_transform(crop_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """The probe's training augmentation: random-resized-crop (scale 0.08-1, bicubic) and flip."""
    return v2.Compose([
        v2.RandomResizedCrop(crop_size, PROBE_CROP_SCALE, PROBE_CROP_RATIO, interpolation=BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        NormalizeImages(mean, std),
    ])


@dataclass
class ProbeResult:
    """Accuracies in percent on the test images; ``history`` holds one entry per epoch."""

    best_top1: float
    best_epoch: int
    last_top1: float
    last_top5: float
    feature_dim: int
    augment: bool
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of ``head`` on ``N x D`` features."""
    device = next(head.parameters()).device
    top1 = top5 = 0
    for i in range(0, features.shape[0], chunk):
        logits = head(features[i:i + chunk].to(device))
        y = labels[i:i + chunk].to(device)[:, None]
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((ranked[:, :1] == y).sum())
        top5 += int((ranked == y).any(dim=1).sum())
    n = max(features.shape[0], 1)
    return 100.0 * top1 / n, 100.0 * top5 / n


def train_linear(train: Features | None, test: Features, num_classes: int, epochs: int = 100, lr: float = 0.001,
                 batch_size: int = 256, seed: int = 0, device: torch.device | str = "cpu", progress: bool = True,
                 train_batches=None) -> tuple[nn.Linear, ProbeResult]:
    """Train ``Linear(D, num_classes)`` on features and evaluate it after every epoch.

    Each epoch goes over the cached ``train`` features in a seeded random order, unless
    ``train_batches(epoch)`` is given: then it yields the epoch's ``(features B x D, labels B)``
    batches instead (augmented images) and ``train`` may be ``None``.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    dim = test.features.shape[1]
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, std=0.01, generator=generator)
    nn.init.zeros_(head.bias)
    head = head.to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0.0)

    def cached_batches(epoch: int):
        order = torch.randperm(train.features.shape[0], generator=generator)
        for i in range(0, len(order), batch_size):
            yield train.features[order[i:i + batch_size]], train.labels[order[i:i + batch_size]]

    history: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False)
    for epoch in bar:
        head.train()
        total, seen = 0.0, 0
        for x, y in (train_batches or cached_batches)(epoch):
            x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
            loss = F.cross_entropy(head(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        scheduler.step()
        head.eval()
        top1, top5 = accuracy(head, test.features, test.labels)
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1), "top1": top1, "top5": top5})
        bar.set_postfix(loss=f"{total / max(seen, 1):.3f}", top1=f"{top1:.1f}")
    best = max(history, key=lambda h: h["top1"])
    result = ProbeResult(best["top1"], best["epoch"], history[-1]["top1"], history[-1]["top5"], dim,
                         train_batches is not None, history)
    return head, result


class ProbeBatches(Sampler):
    """Batches of ``(epoch, index)`` keys for ``ImageDataset``, all ``epochs`` of the probe in order.

    Each epoch is a permutation of ``num_images`` drawn from ``(seed, epoch)``, cut into
    ``batches_per_epoch`` batches of ``batch_size`` (the last one may be shorter): a batch never
    holds images of two epochs.
    """

    def __init__(self, num_images: int, batch_size: int, epochs: int, seed: int = 0) -> None:
        self.num_images, self.batch_size, self.epochs, self.seed = num_images, batch_size, epochs, seed

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def __iter__(self):
        for epoch in range(self.epochs):
            order = torch.randperm(self.num_images, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            for i in range(0, self.num_images, self.batch_size):
                yield [(epoch, index) for index in order[i:i + self.batch_size].tolist()]

    def __len__(self) -> int:
        return self.epochs * self.batches_per_epoch


def linear_probe(backbone: nn.Module, train_images: ImageList | str | Path, test_images: ImageList | str | Path,
                 epochs: int = 100, lr: float = 0.001, batch_size: int = 256, n_last_blocks: int = 4, avgpool: bool = False,
                 augment: bool = True, crop_size: int = 224, mean=None, std=None, device: torch.device | str = "cpu",
                 num_workers: int = 0, seed: int = 0, progress: bool = True, cache_dir: str | Path | None = None,
                 cache_tag: str | None = None) -> ProbeResult:
    """The DINO linear evaluation of ``backbone`` (frozen) on two labelled image lists (or folders' paths).

    ``lr`` is the base rate for a batch of 256. With ``augment=False`` the training features are
    extracted once (evaluation transform) and cached like the test features (``cache_dir`` and
    ``cache_tag`` as in ``cached_features``); with ``augment=True`` every epoch sees new random
    crops and flips of the training images. Best and last test accuracy are reported.
    """
    train_images, test_images = image_list(train_images), image_list(test_images)
    check_label_sets(train_images, test_images, "the linear probe")
    device = torch.device(device)
    mean = tuple(mean if mean is not None else IMAGENET_MEAN)
    std = tuple(std if std is not None else IMAGENET_STD)
    features = ProbeFeatures(backbone, n_last_blocks, avgpool).to(device).eval()
    common = dict(cache_dir=cache_dir, cache_tag=cache_tag, kind=features.kind, crop_size=crop_size, mean=mean,
                  std=std, batch_size=batch_size, device=device, num_workers=num_workers, progress=progress)
    test = relabel(cached_features(features, test_images, desc="probe test features", **common), test_images,
                   train_images.classes)
    train = None if augment else cached_features(features, train_images, desc="probe train features", **common)
    train_batches = None
    if augment:
        dataset = ImageDataset(train_images, probe_train_transform(crop_size, mean, std), seed=seed,
                               min_side=crop_source_side(crop_size, PROBE_CROP_SCALE, PROBE_CROP_RATIO))
        autocast = autocast_for(device)
        sampler = ProbeBatches(len(dataset), batch_size, epochs, seed)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_views,
                            pin_memory=device.type == "cuda", worker_init_fn=StopSignalsToMain())
        stream = iter(loader)  # one pass over all epochs: the workers start once and read ahead across epochs

        @torch.no_grad()
        def train_batches(epoch: int):
            for batch in itertools.islice(stream, sampler.batches_per_epoch):
                if len(batch):
                    with autocast:
                        x = features(batch.tensors[0].to(device, non_blocking=True))
                    yield x.float(), batch.labels

    _, result = train_linear(train, test, len(train_images.classes), epochs, lr, batch_size, seed, device,
                             progress, train_batches)
    return result
