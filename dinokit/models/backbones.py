"""Backbones by name: our ViTs, torchvision ResNets and any timm model (``timm:<name>``).

``build_backbone`` returns a module mapping ``B x 3 x H x W`` images to ``B x D`` features and
sets ``module.num_features = D`` (found by a dry run where the library does not say).
"""

from __future__ import annotations

import torch
from torch import nn

from dinokit.models.vit import VIT_SIZES, VisionTransformer, vit

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class UnknownArchError(ValueError):
    """An architecture name that no registry knows."""


def available_archs() -> list[str]:
    return list(VIT_SIZES) + list(RESNETS) + ["timm:<any timm model name>"]


def build_backbone(arch: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0) -> nn.Module:
    """A randomly initialised backbone. ``drop_path_rate`` applies to ViTs (ours and timm's)."""
    if arch in VIT_SIZES:
        return vit(arch, patch_size=patch_size, img_size=img_size, drop_path_rate=drop_path_rate)
    if arch in RESNETS:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        model.num_features = model.fc.in_features
        model.fc = nn.Identity()
        return model
    if arch.startswith("timm:"):
        return _timm_backbone(arch.removeprefix("timm:"), img_size, drop_path_rate)
    raise UnknownArchError(f"unknown architecture {arch!r}; known: {', '.join(available_archs())}")


def _timm_backbone(name: str, img_size: int, drop_path_rate: float) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise UnknownArchError(f"timm has no model {name!r} (see timm.list_models())")
    attempts = [dict(img_size=img_size, dynamic_img_size=True), dict(dynamic_img_size=True), {}]
    for extra in attempts:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **extra)
            break
        except TypeError:
            continue
    if not getattr(model, "num_features", None):
        with torch.no_grad():
            model.num_features = model(torch.zeros(1, 3, img_size, img_size)).shape[-1]
    return model


def enable_grad_checkpointing(backbone: nn.Module, arch: str) -> None:
    """Turn on activation checkpointing (``set_grad_checkpointing``, the method our ViTs and
    timm's models share); ``ValueError`` for a backbone without it (torchvision's ResNets)."""
    hint = f"; timm's ResNets can: arch=timm:{arch}" if arch in RESNETS else ""
    problem = f"grad_checkpointing: {arch} cannot recompute its activations{hint}"
    setter = getattr(backbone, "set_grad_checkpointing", None)
    if setter is None:
        raise ValueError(problem)
    try:
        setter(True)
    except (AssertionError, NotImplementedError) as err:  # timm models that lack it assert
        raise ValueError(problem) from err


def is_vit(backbone: nn.Module) -> bool:
    """Whether ``backbone`` can give attention maps and patch tokens (our ViT interface)."""
    return isinstance(backbone, VisionTransformer)
