"""Load a backbone from anything: a run folder, a checkpoint of ours, an official DINO file.

``load_backbone(source)`` accepts
  * a run folder of ``dinokit train`` (its ``checkpoint.pth``),
  * a training checkpoint with ``teacher``/``student`` entries (ours or the official code's,
    keys prefixed ``module.``/``backbone.``); the teacher by default,
  * a bare backbone state dict in the official / timm key layout.
Architecture and patch size come from the checkpoint's config or are inferred from the weight
shapes; a state dict that does not fit is refused with the offending keys named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinokit.models.backbones import build_backbone
from dinokit.models.vit import VIT_SIZES
from dinokit.train.checkpoint import LATEST, CheckpointError, load_checkpoint

BACKBONE_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def strip_prefixes(state: dict[str, torch.Tensor], keep: str | None = "backbone.") -> dict[str, torch.Tensor]:
    """Drop ``module.``; keep only keys under ``keep`` (when any key has it) and drop that prefix."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if keep and any(k.startswith(keep) for k in state):
        state = {k.removeprefix(keep): v for k, v in state.items() if k.startswith(keep)}
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def backbone_state(ckpt: dict[str, Any], which: str = "teacher") -> dict[str, torch.Tensor]:
    """The backbone weights inside any supported checkpoint dict."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    if which in ckpt and isinstance(ckpt[which], dict):
        return strip_prefixes(ckpt[which])
    for key in ("state_dict", "model"):
        if key in ckpt and isinstance(ckpt[key], dict):
            return strip_prefixes(ckpt[key])
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_prefixes(ckpt)
    raise CheckpointError(f"no backbone weights found (top-level keys: {sorted(ckpt)[:10]})")


def infer_arch(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{"arch", "patch_size", "img_size"}`` of a ViT state dict, from its weight shapes."""
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise CheckpointError("cannot infer the architecture: no 'patch_embed.proj.weight'/'pos_embed' "
                              "(not a ViT state dict); pass arch= explicitly")
    dim, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for name, (d, n_blocks, _) in VIT_SIZES.items():
        if d == dim and n_blocks == depth:
            grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
            return {"arch": name, "patch_size": patch, "img_size": grid * patch}
    raise CheckpointError(f"a ViT of width {dim} and depth {depth} matches none of {', '.join(VIT_SIZES)}")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that names missing, unexpected and mis-shaped keys in one clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape
                    and not (k == "pos_embed" and own[k].shape[-1] == state[k].shape[-1]))
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''} ({len(keys)})")
        raise CheckpointError(f"{what} does not fit the architecture; " + "; ".join(parts))
    if "pos_embed" in state and own.get("pos_embed") is not None and own["pos_embed"].shape != state["pos_embed"].shape:
        model.pos_embed = nn.Parameter(torch.zeros_like(state["pos_embed"]))
    model.load_state_dict(state)


def load_backbone(source: str | Path, arch: str | None = None, patch_size: int | None = None,
                  which: str = "teacher", trust: bool = False) -> nn.Module:
    """A backbone in eval mode with the weights of ``source`` (see the module doc)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / LATEST
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    ckpt = load_checkpoint(path, trust=trust)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    state = backbone_state(ckpt, which)
    saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if arch is None and saved.get("arch"):
        arch, patch_size = saved["arch"], patch_size or saved.get("patch_size")
        img_size = saved.get("global_crops_size", 224)
    elif arch is None or (arch in VIT_SIZES and patch_size is None):
        inferred = infer_arch(state)
        if arch is not None and arch != inferred["arch"]:
            raise CheckpointError(f"{path} holds a {inferred['arch']}, not a {arch}")
        arch, patch_size, img_size = inferred["arch"], inferred["patch_size"], inferred["img_size"]
    else:
        img_size = 224
    model = build_backbone(arch, patch_size or 16, img_size)
    if arch in VIT_SIZES and "patch_embed.proj.weight" in state:
        stored = state["patch_embed.proj.weight"].shape[-1]
        if stored != model.patch_size:
            raise CheckpointError(f"{path} has patch size {stored}, but patch_size={model.patch_size} was asked for")
    load_state_strict(model, state, f"{path} ({which})")
    return model.eval()
