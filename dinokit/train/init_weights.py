"""``dinokit train --init SOURCE``: a new run that starts from the weights of any file
``dinokit.hub.load`` reads (a checkpoint of ours or the official code's, a backbone-only file, an
official name), with the optimizer, schedules and step count fresh."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from dinokit.hub.load import (backbone_state, describe_arch, drop_classifier, infer_arch, load_state_strict,
                              read_weights, resolve_source, strip_prefixes)
from dinokit.models.vit import VisionTransformer
from dinokit.train.checkpoint import CheckpointError

if TYPE_CHECKING:
    from dinokit.train.loop import DINOState


def _head_settings(state: dict[str, torch.Tensor]) -> str:
    """The config values a checkpoint's ``head.*`` weights were made with, as ``key=value`` words."""
    linear = sorted(int(k.split(".")[2]) for k in state
                    if k.startswith("head.mlp.") and k.endswith(".weight") and state[k].dim() == 2)
    if not linear or "head.last_layer.weight_v" not in state:
        return ""
    widths = [state[f"head.mlp.{i}.weight"].shape[0] for i in linear]
    words = [f"out_dim={state['head.last_layer.weight_v'].shape[0]}", f"head_layers={len(widths)}",
             f"head_bottleneck_dim={widths[-1]}"]
    return " ".join(words + ([f"head_hidden_dim={widths[0]}"] if len(widths) > 1 else []))


def _network_settings(state: dict[str, torch.Tensor]) -> str:
    """The config values (arch, patch size, head) a backbone + head state dict was made with."""
    words = []
    with contextlib.suppress(CheckpointError):
        info = infer_arch(strip_prefixes(state))
        words += [f"arch={info['arch']}"] + ([f"patch_size={info['patch_size']}"] if info["patch_size"] else [])
    head = _head_settings(state)
    return " ".join(words + ([head] if head else []))


def _load_for_training(module: nn.Module, weights: dict[str, torch.Tensor], what: str) -> list[str]:
    """``load_state_strict`` whose error also says which config values would make the weights fit.

    Position embeddings made for another image size are resampled (bicubic, as at run time) to
    the grid the run's ViTs were built for, as timm does when it loads weights at another
    ``img_size``: the run's checkpoints then have the shapes of its config, so it can resume.
    Returns a line for the user when that happened.
    """
    grids = {vit: vit.pos_embed.shape for vit in module.modules() if isinstance(vit, VisionTransformer)}
    try:
        load_state_strict(module, weights, what)
    except CheckpointError as err:
        needed = _network_settings(weights)
        raise CheckpointError(f"{err}. To start from it, train with the same network"
                              f"{': ' + needed if needed else ''}") from None
    lines = []
    for vit, shape in grids.items():
        if vit.pos_embed.shape != shape:
            stored, side = math.isqrt(vit.pos_embed.shape[1] - 1), math.isqrt(shape[1] - 1)
            with torch.no_grad():
                vit.pos_embed.data = vit.interpolate_pos_encoding(side, side).clone()
            lines.append(f"init: position embeddings resampled from {stored}x{stored} to {side}x{side} patches "
                         f"(global_crops_size {side * vit.patch_size})")
    return lines


def init_training_state(state: DINOState, source: str | Path, trust: bool = False) -> list[str]:
    """Start a new training run from the weights of ``source`` (any ``load_backbone`` source).

    ``state`` is a fresh ``DINOState`` (``build_state``). A full training checkpoint (ours or
    official) gives the student, the teacher (backbone and head) and the loss centre; a
    backbone-only file gives the backbone of both, and the head starts from its random weights.
    The optimizer, schedules and step count always start fresh. Returns lines for the user.
    """
    path, _ = resolve_source(source)
    ckpt = read_weights(path, trust)
    if not any(isinstance(ckpt.get(k), dict) for k in ("student", "teacher")):
        backbone = drop_classifier(backbone_state(ckpt))
        resampled = dict.fromkeys(line for name in ("student", "teacher")  # the same line for both: said once
                                  for line in _load_for_training(getattr(state, name).backbone, backbone,
                                                                 f"{path} (backbone)"))
        return [f"init: student and teacher backbones from {path} ({describe_arch(backbone) or 'backbone-only'})",
                "init: the file has no DINO head: the head starts from random weights and the centre from zero",
                *resampled]

    lines = []
    nets = {name: strip_prefixes(ckpt[name], keep=None)
            for name in ("student", "teacher") if isinstance(ckpt.get(name), dict)}
    if len(nets) == 1:
        (only,) = nets
        lines.append(f"init: {path} holds only the {only}; it starts both student and teacher")
        nets = {"student": nets[only], "teacher": nets[only]}
    lines += dict.fromkeys(line for name, weights in nets.items()  # the same line for both: said once
                           for line in _load_for_training(getattr(state, name), weights, f"{path} ({name})"))
    loss_state = ckpt.get("dino_loss")
    center = loss_state.get("center") if isinstance(loss_state, dict) else None
    if center is None:
        lines.append(f"init: {path} has no dino_loss.center: the centre starts from zero")
    elif center.shape != state.loss.center.shape:
        raise CheckpointError(f"{path}: dino_loss.center has shape {tuple(center.shape)}, this run's centre "
                              f"{tuple(state.loss.center.shape)}; set out_dim={center.shape[-1]}")
    else:
        state.loss.center.copy_(center)
    epoch = ckpt.get("epoch")
    lines.insert(0, f"init: student and teacher (backbone and head){' and the centre' if center is not None else ''} "
                    f"from {path}{f' (after {epoch} epochs)' if isinstance(epoch, int) else ''}; "
                    "optimizer and schedules start fresh at step 0")
    return lines
