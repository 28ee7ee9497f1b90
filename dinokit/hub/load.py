"""Load a backbone from anything: a run folder, a checkpoint of ours, an official DINO file, timm weights.

``load_backbone(source)`` accepts
  * a run folder of ``dinokit train`` (its ``checkpoint.pth``) or an export folder
    (``backbone.safetensors`` / timm's ``model.safetensors``),
  * a training checkpoint with ``teacher``/``student`` entries (ours or the official code's,
    keys prefixed ``module.``/``backbone.``, ``args`` a dict or an ``argparse.Namespace``);
    the teacher by default,
  * a bare backbone state dict in the official / timm / torchvision key layout
    (``.pth`` or ``.safetensors``; an image classifier's ``head.*``/``fc.*`` is dropped),
  * an official name (``dino_vits16``, ...; see ``dinokit.hub.names``), with ``weights=PATH``
    for a local copy of the file,
  * ``random:<arch>[/<patch>]`` (``random:vit_tiny/8``): untrained weights, the baseline every
    trained network is compared with.
Architecture and patch size come from the checkpoint's config or are inferred from the weight
shapes; weights that do not fit are refused with the offending keys named, never loaded in part.

``dinokit.train.init_weights`` starts a new training run from such a file (``dinokit train --init``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinokit.config import IMAGENET_MEAN, IMAGENET_STD
from dinokit.hub.names import OFFICIAL, close_name, official_file
from dinokit.models.backbones import build_backbone
from dinokit.models.vit import VIT_SIZES
from dinokit.train.checkpoint import LATEST, CheckpointError, load_checkpoint

METADATA_FILE = "backbone.json"  # written beside every export (see dinokit.hub.export)
EXPORT_WEIGHTS = ("backbone.safetensors", "model.safetensors")  # our safetensors export, the timm export
CLASSIFIER_KEYS = ("head.weight", "head.bias", "fc.weight", "fc.bias")  # timm / torchvision image classifiers
RESNET_LAYOUTS = {  # blocks per stage, bottleneck blocks -> torchvision name
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


@dataclass
class LoadedBackbone:
    """A backbone in eval mode and what is known about it.

    ``img_size`` is the side in pixels it was trained at (its position embeddings' size for a
    ViT); ``mean``/``std`` the per-channel normalisation of its inputs (pixels in [0, 1]).
    """

    model: nn.Module
    arch: str
    patch_size: int | None
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    which: str

    @property
    def embed_dim(self) -> int:
        return int(self.model.num_features)

    def metadata(self) -> dict[str, Any]:
        """Plain values for JSON: architecture, patch and image size, feature width, normalisation."""
        return {"arch": self.arch, "patch_size": self.patch_size, "img_size": self.img_size,
                "embed_dim": self.embed_dim, "mean": list(self.mean), "std": list(self.std),
                "source": self.source, "which": self.which}


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
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_prefixes(ckpt)
    raise CheckpointError(f"no backbone weights found (top-level keys: {sorted(ckpt)[:10]})")


def drop_classifier(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without an image classifier's weights (timm ``head.*``, torchvision ``fc.*``): a backbone has none."""
    return {k: v for k, v in state.items() if k not in CLASSIFIER_KEYS}


def infer_arch(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{"arch", "patch_size", "img_size"}`` of a ViT or torchvision ResNet state dict, from its
    weight shapes (``patch_size`` is ``None`` for a ResNet, ``img_size`` then 224)."""
    if "patch_embed.proj.weight" in state and "pos_embed" in state:
        dim, _, patch, _ = state["patch_embed.proj.weight"].shape
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        for name, (d, n_blocks, _) in VIT_SIZES.items():
            if d == dim and n_blocks == depth:
                grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
                return {"arch": name, "patch_size": patch, "img_size": grid * patch}
        raise CheckpointError(f"a ViT of width {dim} and depth {depth} matches none of {', '.join(VIT_SIZES)}")
    if "layer1.0.conv1.weight" in state:
        blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        layout = (blocks, "layer1.0.conv3.weight" in state)
        if layout in RESNET_LAYOUTS:
            return {"arch": RESNET_LAYOUTS[layout], "patch_size": None, "img_size": 224}
        known = ", ".join(RESNET_LAYOUTS.values())
        raise CheckpointError(f"a ResNet with {blocks} blocks per stage matches none of {known}")
    raise CheckpointError("cannot infer the architecture: neither a ViT ('patch_embed.proj.weight', 'pos_embed') "
                          "nor a ResNet ('layer1.0.conv1.weight') state dict; pass arch= explicitly")


def describe_arch(state: dict[str, torch.Tensor]) -> str | None:
    """``"vit_small/16"``, ``"resnet50"``, or ``None`` when the weights say nothing recognisable."""
    try:
        info = infer_arch(state)
    except CheckpointError:
        return None
    return f"{info['arch']}/{info['patch_size']}" if info["patch_size"] else info["arch"]


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that names missing, unexpected and mis-shaped keys in one clear error.

    A ViT ``pos_embed`` made for another image size is taken as stored (it is interpolated at
    run time); the parameter object stays the same, so an optimizer holding it still works.
    """
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
        theirs, ours = describe_arch(state), describe_arch(own)
        hint = f" (the weights are a {theirs}, the model a {ours})" if theirs and ours and theirs != ours else ""
        raise CheckpointError(f"{what} does not fit the architecture{hint}; " + "; ".join(parts))
    if "pos_embed" in state and own["pos_embed"].shape != state["pos_embed"].shape:
        param = model.get_parameter("pos_embed")
        param.data = torch.empty(state["pos_embed"].shape, dtype=param.dtype, device=param.device)
    model.load_state_dict(state)


def _official_args_allowed():
    """A context in which ``torch.load(weights_only=True)`` may rebuild the ``argparse.Namespace``
    that official training checkpoints keep under ``args`` (nothing else is allowed)."""
    return torch.serialization.safe_globals([argparse.Namespace])


def read_weights(path: Path, trust: bool = False) -> dict[str, Any]:
    """The dict stored in a ``.pth`` checkpoint (``args`` as a dict) or a ``.safetensors`` file.

    Pickled files are read with ``weights_only`` unless ``trust``; official checkpoints load so.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    with _official_args_allowed():
        ckpt = load_checkpoint(path, trust=trust)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def resolve_source(source: str | Path, weights: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The file to read for ``source`` and what its name says about it (arch, patch size)."""
    if isinstance(source, str) and source in OFFICIAL:
        entry = OFFICIAL[source]
        return official_file(source, weights), {"arch": entry.arch, "patch_size": entry.patch_size}
    if weights is not None:
        raise CheckpointError(f"weights= goes with an official name ({', '.join(OFFICIAL)}), not with {source}")
    path = Path(source).expanduser()
    if path.is_dir():
        for name in (LATEST, *EXPORT_WEIGHTS):
            if (path / name).is_file():
                return path / name, {}
        raise CheckpointError(f"{path} holds neither a training checkpoint ({LATEST}) nor an exported "
                              f"backbone ({' or '.join(EXPORT_WEIGHTS)})")
    if not path.exists():
        if _looks_like_path(str(source)):
            raise CheckpointError(f"{path}: no such file or folder")
        typo = close_name(str(source))
        hint = f"did you mean {typo!r}?" if typo else f"official backbones by name: {', '.join(OFFICIAL)}"
        raise CheckpointError(f"no checkpoint, run folder or official name {str(source)!r} ({hint})")
    return path, {}


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` names a file rather than a word (an official name): a folder part or a suffix."""
    return "/" in text or "\\" in text or bool(Path(text).suffix)


def _saved_metadata(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """What the file says about its backbone: the run config (``args``) of a training checkpoint,
    or the ``backbone.json`` beside an export."""
    if isinstance(ckpt.get("args"), dict):
        args = ckpt["args"]
        meta = {k: args[k] for k in ("arch", "patch_size", "mean", "std") if args.get(k) is not None}
        if args.get("global_crops_size"):
            meta["img_size"] = args["global_crops_size"]
        return meta
    beside = path.parent / METADATA_FILE
    if path.suffix == ".safetensors" and beside.is_file():
        saved = json.loads(beside.read_text())
        return {k: saved[k] for k in ("arch", "patch_size", "img_size", "mean", "std") if saved.get(k) is not None}
    return {}


def open_backbone(source: str | Path, arch: str | None = None, patch_size: int | None = None,
                  which: str = "teacher", trust: bool = False, weights: str | Path | None = None) -> LoadedBackbone:
    """The backbone of ``source`` (see the module doc) with its architecture and normalisation.

    ``arch``/``patch_size`` override what the file says; ``which`` picks the teacher or the
    student of a training checkpoint (``"student"`` is refused for a file holding one network);
    ``trust`` allows full unpickling (only for files you trust). An official name's file
    (``weights``) must hold that name's architecture and patch size.
    """
    if str(source).startswith("random:"):
        return open_untrained(str(source), patch_size=patch_size)
    path, meta = resolve_source(source, weights)
    named = dict(meta)  # what an official name says: its file must hold that network
    ckpt = read_weights(path, trust)
    if which == "student" and not isinstance(ckpt.get("student"), dict):
        held = "only the teacher" if isinstance(ckpt.get("teacher"), dict) else \
            "one network (a backbone, not a training checkpoint with a student and a teacher)"
        raise CheckpointError(f"{path} holds {held}: which='student' (--which student) needs a training checkpoint")
    state = drop_classifier(backbone_state(ckpt, which))
    meta.update(_saved_metadata(ckpt, path))
    try:
        inferred = infer_arch(state)
    except CheckpointError:
        if arch is None and "arch" not in meta:
            raise
        inferred = {}
    if named and inferred and (inferred["arch"], inferred["patch_size"]) != (named["arch"], named["patch_size"]):
        theirs, ours = (f"{d['arch']}/{d['patch_size']}" if d["patch_size"] else d["arch"] for d in (inferred, named))
        raise CheckpointError(f"{path} holds a {theirs}, but {source} is a {ours}; give the file of {source} "
                              f"or the name that fits the file")
    arch = arch or meta.get("arch") or inferred["arch"]
    patch_size = patch_size or inferred.get("patch_size") or meta.get("patch_size") or 16
    if inferred.get("patch_size") and patch_size != inferred["patch_size"]:
        raise CheckpointError(f"{path} has patch size {inferred['patch_size']} (patch_embed.proj.weight), "
                              f"but patch_size={patch_size} was asked for")
    img_size = inferred.get("img_size") if inferred.get("patch_size") else meta.get("img_size", 224)
    model = build_backbone(arch, patch_size, img_size)
    load_state_strict(model, state, f"{path} ({which})" if "teacher" in ckpt else str(path))
    mean, std = meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD)
    return LoadedBackbone(model.eval(), arch, patch_size if arch in VIT_SIZES else None, int(img_size),
                          tuple(map(float, mean)), tuple(map(float, std)), str(path), which)


def open_untrained(spec: str, seed: int = 0, patch_size: int | None = None) -> LoadedBackbone:
    """``random:<arch>[/<patch>]``: a backbone with untrained weights seeded by ``seed``; the
    patch size comes from the spec, else ``patch_size``, else 16."""
    arch, _, patch = spec.removeprefix("random:").partition("/")
    if not arch or (patch and not patch.isdigit()):
        raise CheckpointError(f"{spec!r}: expected random:<arch>[/<patch size>], e.g. random:vit_tiny/16")
    patch_size = int(patch) if patch else (patch_size or 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = build_backbone(arch, patch_size)
        except ValueError as err:
            raise CheckpointError(f"{spec!r}: {err}") from None
    return LoadedBackbone(model.eval(), arch, patch_size if arch in VIT_SIZES else None, 224,
                          IMAGENET_MEAN, IMAGENET_STD, spec, "untrained")


def load_backbone(source: str | Path, arch: str | None = None, patch_size: int | None = None,
                  which: str = "teacher", trust: bool = False, weights: str | Path | None = None) -> nn.Module:
    """A backbone in eval mode with the weights of ``source``: ``B x 3 x H x W`` -> ``B x D``.

    ``load_backbone("runs/x")``, ``load_backbone("ckpt.pth", which="student")``,
    ``load_backbone("dino_vits16")``, ``load_backbone("dino_vits8", weights="local.pth")``.
    """
    return open_backbone(source, arch, patch_size, which, trust, weights).model
