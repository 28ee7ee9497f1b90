"""Backbone + head over a list of views: one backbone pass per resolution, one head pass."""

from __future__ import annotations

import torch
from torch import nn


class MultiCropModel(nn.Module):
    """``g = head . backbone`` applied to views of several resolutions.

    ``forward(views)`` takes a list of ``B x 3 x H_i x W_i`` tensors (views of one size are
    concatenated and go through the backbone together) and returns the logits of all views in
    order, ``(len(views) * B) x K``. ``backbone`` and ``head`` keep the official key prefixes.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(views, torch.Tensor):
            views = [views]
        features, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(views[start:end])))
            start = end
        return self.head(torch.cat(features))
