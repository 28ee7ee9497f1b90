"""Batched feature extraction over an image folder, with an optional on-disk cache.

``extract_features`` runs a backbone in eval mode over an ``ImageList`` (evaluation transform:
resize to 256/224 of the crop, centre crop) and returns a ``Features`` of ``N x D`` float32
CPU features for the N images that decoded (unreadable files are skipped and listed).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dinokit.data.datasets import ImageDataset, collate_views
from dinokit.data.folders import ImageList
from dinokit.data.transforms import eval_transform


@dataclass
class Features:
    features: torch.Tensor          # N x D, float32
    labels: torch.Tensor            # N, -1 where unlabelled
    paths: list[str]
    failed: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"features": self.features, "labels": self.labels, "paths": self.paths, "failed": self.failed}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Features":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["features"], d["labels"], list(d["paths"]), list(d["failed"]))


def fingerprint(*parts) -> str:
    """A short stable hash of the things a cached result depends on."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(backbone: nn.Module | Callable[[torch.Tensor], torch.Tensor], images: ImageList,
                     crop_size: int = 224, mean=None, std=None, batch_size: int = 256,
                     device: torch.device | str = "cpu", num_workers: int = 0, progress: bool = True,
                     cache: str | Path | None = None, desc: str = "features") -> Features:
    """Features of every image; ``backbone`` maps ``B x 3 x S x S`` to ``B x D``.

    With ``cache`` (a file path) a previous result stored there is returned as is, and a new
    one is written there. Rows follow ``images.paths`` minus the files that failed to load.
    """
    if cache is not None and Path(cache).exists():
        return Features.load(cache)
    device = torch.device(device)
    kwargs = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    dataset = ImageDataset(images, eval_transform(crop_size, **kwargs))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_views,
                        pin_memory=device.type == "cuda")
    was_training = getattr(backbone, "training", False)
    if isinstance(backbone, nn.Module):
        backbone.eval()
    feats, labels, paths, failed = [], [], [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        failed += batch.failed
        if not len(batch):
            continue
        with autocast:
            out = backbone(batch.views[0].to(device, non_blocking=True))
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
