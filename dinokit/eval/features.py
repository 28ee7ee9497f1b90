"""Batched feature extraction over an image folder, with an on-disk cache.

``extract_features`` runs a backbone in eval mode over an ``ImageList`` (evaluation transform:
resize to 256/224 of the crop, centre crop) and returns a ``Features`` of ``N x D`` float32
CPU features for the N images that decoded (unreadable files are skipped and listed).
``cached_features`` keys that result by the weights, the feature kind, the crop and the file
list (each file's size and modification time included), so the same evaluation twice computes
it once; under a launcher each process extracts a share of the images (``gather_features``).
What to extract with, from what a user names: ``dinokit.eval.source``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dinokit.config import IMAGENET_MEAN, IMAGENET_STD
from dinokit.data.datasets import ImageDataset, collate_views, StopSignalsToMain
from dinokit.data.folders import DataError, ImageList, image_list
from dinokit.data.transforms import eval_resize_side, eval_transform
from dinokit.files import atomic_write
from dinokit.train.devices import autocast_for
from dinokit.train.distributed import DistEnv, any_process


@dataclass
class Features:
    features: torch.Tensor          # N x D, float32
    labels: torch.Tensor            # N, -1 where unlabelled
    paths: list[str]
    failed: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        state = {"features": self.features, "labels": self.labels, "paths": self.paths, "failed": self.failed}
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    @classmethod
    def load(cls, path: str | Path) -> "Features":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["features"], d["labels"], list(d["paths"]), list(d["failed"]))


def cache_key(*parts) -> str:
    """A short stable hash of the things a cached result depends on."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(backbone: nn.Module | Callable[[torch.Tensor], torch.Tensor], images: ImageList | str | Path,
                     crop_size: int = 224, mean=None, std=None, batch_size: int = 256,
                     device: torch.device | str = "cpu", num_workers: int = 0, progress: bool = True,
                     cache: str | Path | None = None, desc: str = "features") -> Features:
    """Features of every image (an ``ImageList`` or a folder's path); ``backbone`` maps
    ``B x 3 x S x S`` to ``B x D``.

    With ``cache`` (a file path) a previous result stored there is returned as is, and a new
    one is written there. Rows follow ``images.paths`` minus the files that failed to load.
    """
    if cache is not None and Path(cache).exists():
        return Features.load(cache)
    images = image_list(images)
    device = torch.device(device)
    kwargs = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    dataset = ImageDataset(images, eval_transform(crop_size, **kwargs), min_side=eval_resize_side(crop_size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_views,
                        pin_memory=device.type == "cuda", worker_init_fn=StopSignalsToMain())
    was_training = getattr(backbone, "training", False)
    if isinstance(backbone, nn.Module):
        backbone.eval()
    feats, labels, paths, failed = [], [], [], []
    # fp32 on a CPU even inside a caller's autocast: a cache of features has no precision in its key
    autocast = autocast_for(device, override_enclosing_autocast=True)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        failed += batch.failed
        if not len(batch):
            continue
        with autocast:
            out = backbone(batch.tensors[0].to(device, non_blocking=True))
        feats.append(out.float().cpu())
        labels.append(batch.labels)
        paths += [str(images.paths[i]) for i in batch.indices.tolist()]
    if isinstance(backbone, nn.Module):
        backbone.train(was_training)
    if not feats:
        raise ValueError(f"none of the {len(images)} images could be read")
    result = Features(torch.cat(feats), torch.cat(labels), paths, failed)
    if cache is not None:
        result.save(cache)
    return result


def cached_features(backbone: nn.Module | Callable[[torch.Tensor], torch.Tensor], images: ImageList | str | Path,
                    cache_dir: str | Path | None = None, cache_tag: str | None = None, kind: str = "cls",
                    crop_size: int = 224, mean=None, std=None, env: DistEnv | None = None,
                    **kwargs) -> Features | None:
    """``extract_features`` cached in ``cache_dir/<kind>-<key>.pt``.

    The key is a fingerprint of ``cache_tag`` (what identifies the weights), ``kind`` (which
    feature of the backbone, e.g. ``cls``), the crop size, the normalisation and the file list
    with each file's size and modification time (an image replaced in place makes a new key);
    without ``cache_dir`` or ``cache_tag`` nothing is cached. ``kwargs`` go to ``extract_features``.

    Under a launcher (``env``, a ``DistEnv`` of several processes, called on every process) each
    process extracts its share of the images and process 0 gets them all, reads and writes the
    cache; the other processes get ``None``.
    """
    images = image_list(images)
    mean = tuple(float(m) for m in (mean if mean is not None else IMAGENET_MEAN))
    std = tuple(float(s) for s in (std if std is not None else IMAGENET_STD))
    cache = None
    if cache_dir is not None and cache_tag is not None:
        key = cache_key(cache_tag, kind, crop_size, mean, std, [_file_version(p) for p in images.paths])
        cache = Path(cache_dir) / f"{kind}-{key}.pt"
    if env is None or not env.distributed:
        return _report_unreadable(extract_features(backbone, images, crop_size, mean, std, cache=cache, **kwargs),
                                  len(images))
    if any_process(env.is_main and cache is not None and cache.exists()):  # process 0's cache decides
        return _report_unreadable(Features.load(cache), len(images)) if env.is_main else None
    kwargs["progress"] = kwargs.get("progress", True) and env.is_main
    features = gather_features(lambda mine: extract_features(backbone, mine, crop_size, mean, std, **kwargs),
                               images, env)
    if features is not None and cache is not None:
        features.save(cache)
    return None if features is None else _report_unreadable(features, len(images))


def gather_features(extract: Callable[[ImageList], Features], images: ImageList, env: DistEnv) -> Features | None:
    """``extract(images)`` with the images shared out over the processes (process ``r`` takes
    images ``r, r + W, ...``). Process 0 gets the ``Features`` of all images, rows in the order of
    ``images.paths`` (minus unreadable files); the other processes get ``None``."""
    if not env.distributed:
        return extract(images)
    mine = images.subset(list(range(env.rank, len(images), env.world_size)))
    try:
        part = extract(mine) if len(mine) else None
    except ValueError:  # none of this process's images could be read
        part = None
    parts: list[Features | None] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(part, parts, dst=0)
    if not env.is_main:
        return None
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError(f"none of the {len(images)} images could be read")
    position = {str(p): i for i, p in enumerate(images.paths)}
    paths = [path for p in parts for path in p.paths]
    order = sorted(range(len(paths)), key=lambda j: position[paths[j]])
    return Features(torch.cat([p.features for p in parts])[order], torch.cat([p.labels for p in parts])[order],
                    [paths[j] for j in order], [f for p in parts for f in p.failed])


def _report_unreadable(features: Features, images: int) -> Features:
    """``features``, after a warning on standard error when some of the ``images`` could not be read."""
    if features.failed:
        tqdm.write(f"dinokit: warning: {len(features.failed)} of {images} images could not be read and are left "
                   f"out ({features.failed[0]}{', ...' if len(features.failed) > 1 else ''})", file=sys.stderr)
    return features


def _file_version(path: str | Path) -> tuple[str, int, int]:
    """``(path, size in bytes, modification time in ns)``; ``-1`` for a file that cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return str(path), -1, -1
    return str(path), stat.st_size, stat.st_mtime_ns


def check_label_sets(train_images: ImageList, test_images: ImageList, what: str) -> None:
    """Both lists labelled, and every test class present in the training data (``DataError`` otherwise).

    Training classes absent from the test data are fine.
    """
    train_images.require_labels(what)
    test_images.require_labels(what)
    missing = sorted(set(test_images.classes) - set(train_images.classes))
    if missing:
        raise DataError(f"{what}: the test data {test_images.root} has classes {missing[:8]}"
                        f"{' ...' if len(missing) > 8 else ''} that the training data {train_images.root} lacks "
                        f"(training classes: {', '.join(train_images.classes[:8])}"
                        f"{' ...' if len(train_images.classes) > 8 else ''})")


def relabel(features: Features, images: ImageList, classes: list[str]) -> Features:
    """``features`` of ``images`` with labels re-indexed from ``images.classes`` to ``classes``."""
    if images.classes == classes:
        return features
    index = torch.tensor([classes.index(c) for c in images.classes], dtype=torch.long)
    return Features(features.features, index[features.labels], features.paths, features.failed)
