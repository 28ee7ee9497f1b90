"""Backbone + head over a list of views: one backbone pass per resolution, one head pass."""

from __future__ import annotations

import torch
from torch import nn

from dinokit.models.vit import check_floating_images


class MultiCropModel(nn.Module):
    """``g = head . backbone`` applied to views of several resolutions.

    ``forward(views)`` takes a list of ``B x 3 x H_i x W_i`` tensors (views of one size are
    concatenated and go through the backbone together) and returns the logits of all views in
    order, ``(len(views) * B) x K``; ``ValueError`` for anything else (no views, a view of one
    image, views of different batch sizes, integer images), whatever the backbone. ``backbone``
    and ``head`` keep the official key prefixes.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        views = [views] if isinstance(views, torch.Tensor) else list(views)
        shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in views]
        batched = all(isinstance(s, tuple) and len(s) == 4 for s in shapes)
        if not shapes or not batched or len({s[0] for s in shapes}) > 1:
            raise ValueError(f"views must be a non-empty list of B x 3 x H x W tensors with the same B (the views "
                             f"of B images stacked: torch.stack, or a DataLoader's collate), got {shapes}")
        for view in views:
            check_floating_images(view)
        features, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(views[start:end])))
            start = end
        return self.head(torch.cat(features))
