"""Export a backbone for other tools: safetensors, TorchScript, ONNX, timm.

``export_backbone(source, out, fmt)`` loads the backbone of ``source`` (any ``load_backbone``
source; the teacher by default) and writes into the folder ``out``:

    safetensors   backbone.safetensors       the state dict (official / timm key names)
    torchscript   backbone.torchscript.pt    ``torch.jit.load(f)(images)`` -> features
    onnx          backbone.onnx              input ``images`` B x 3 x H x W, output ``features``
                                             B x D; B, H and W dynamic (H, W multiples of the patch)
    timm          model.safetensors, config.json   ``timm.create_model("local-dir:OUT", pretrained=True)``

and ``backbone.json`` beside them: architecture, patch size, image size, feature width,
normalisation (mean/std of pixels in [0, 1]) and, per format, its file and how to load it.
Images go in normalised, features come out as the model's ``forward`` gives them ([CLS] after
the final norm for a ViT). Every format but safetensors is checked against PyTorch at two batch
sizes and two image sizes (timm's ViTs, made for one size, at that size) before the export counts
as done.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from dinokit.files import write_text_atomically
from dinokit.hub.load import METADATA_FILE, LoadedBackbone, open_backbone
from dinokit.models.backbones import RESNETS
from dinokit.models.vit import VIT_SIZES
from dinokit.train.checkpoint import CheckpointError

FORMATS = ("safetensors", "torchscript", "onnx", "timm")
ONNX_OPSET = 17
TOLERANCE = 1e-3  # largest |exported - PyTorch| accepted on the check inputs (features are O(1))


def check_shapes(loaded: LoadedBackbone) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The input shape to trace with and the shapes to check the export on (``B x 3 x H x W``).

    A ViT is traced at a size other than its own, so that the position-embedding interpolation
    is part of the graph and every size works; the checks cover its own size and another.
    """
    s, p = loaded.img_size, loaded.patch_size or 16
    return (2, 3, s + p, s), [(1, 3, s, s), (3, 3, s + 2 * p, s + p)]


def max_difference(run: Callable[[torch.Tensor], torch.Tensor], loaded: LoadedBackbone,
                   shapes: list[tuple[int, ...]] | None = None) -> float:
    """Largest ``|run(x) - model(x)|`` over random inputs of ``shapes`` (the check shapes by default)."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in shapes or check_shapes(loaded)[1]:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            worst = max(worst, (run(x) - loaded.model(x)).abs().max().item())
    return worst


def _checked(diff: float, export: str, written: Path | None = None) -> float:
    """``diff`` if within ``TOLERANCE``; otherwise ``written`` (the exported file, if written yet)
    is deleted and the export refused."""
    if not diff <= TOLERANCE:
        if written is not None:
            written.unlink(missing_ok=True)
        raise CheckpointError(f"{export} differs from the PyTorch model by {diff:.2e} (more than {TOLERANCE:g}) "
                              f"on the check inputs; {'it was deleted' if written else 'not exported'}")
    return diff


def _trace(loaded: LoadedBackbone) -> torch.jit.ScriptModule:
    example = torch.zeros(check_shapes(loaded)[0])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape checks traced as constants: fine
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        return torch.jit.trace(loaded.model, example)


def _write_safetensors(loaded: LoadedBackbone, out: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    file = "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(out / file),
              metadata={"format": "pt"})
    return {"file": file, "load": f"dinokit.load_backbone({str(out)!r})"}


def _write_torchscript(loaded: LoadedBackbone, out: Path) -> dict[str, Any]:
    file = out / "backbone.torchscript.pt"
    _trace(loaded).save(str(file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        reloaded = torch.jit.load(str(file))
    diff = _checked(max_difference(reloaded, loaded), f"the export {file.name}", file)
    return {"file": file.name, "load": "torch.jit.load(file)", "max_abs_diff": diff}


def _write_onnx(loaded: LoadedBackbone, out: Path) -> dict[str, Any]:
    from dinokit.extras import require

    require("onnx", "onnx", "export")
    ort = require("onnxruntime", "onnxruntime", "export")
    file = out / "backbone.onnx"
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch"}}
    # The TorchScript-based exporter follows the ViT's shape arithmetic symbolically, so image
    # size stays dynamic; torch >= 2.5 defaults to the dynamo exporter, which fixes it.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    example = torch.zeros(check_shapes(loaded)[0])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about what is handled here
        torch.onnx.export(loaded.model, (example,), str(file), input_names=["images"], output_names=["features"],
                          dynamic_axes=axes, opset_version=ONNX_OPSET, **legacy)
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

    diff = _checked(max_difference(run, loaded), f"the export {file.name}", file)
    return {"file": file.name, "input": "images", "output": "features", "opset": ONNX_OPSET,
            "dynamic_axes": {name: list(dims.values()) for name, dims in axes.items()}, "max_abs_diff": diff}


def timm_config(loaded: LoadedBackbone) -> tuple[str, dict[str, Any]]:
    """The timm model name and ``timm.create_model`` keyword arguments that rebuild this backbone."""
    import timm

    if loaded.arch in VIT_SIZES:
        p = loaded.patch_size
        name = f"{loaded.arch}_patch{p}_224"
        if not timm.is_model(name):  # same network; the patch size is set by the arguments
            name = f"{loaded.arch}_patch16_224"
        return name, {"num_classes": 0, "img_size": loaded.img_size, "patch_size": p}
    if loaded.arch in RESNETS:
        return loaded.arch, {"num_classes": 0}
    if loaded.arch.startswith("timm:"):
        extra = {"img_size": loaded.img_size} if hasattr(loaded.model, "pos_embed") else {}
        return loaded.arch.removeprefix("timm:"), {"num_classes": 0, **extra}
    raise CheckpointError(f"no timm equivalent of {loaded.arch!r}")


def _write_timm(loaded: LoadedBackbone, out: Path) -> dict[str, Any]:
    import timm
    from safetensors.torch import save_file

    name, kwargs = timm_config(loaded)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    state = loaded.model.state_dict()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"timm's {name} does not take these weights: {err}") from None
    shapes = check_shapes(loaded)[1]
    if hasattr(model, "pos_embed"):  # timm's ViTs take the image size they were made for only
        shapes = [(b, 3, loaded.img_size, loaded.img_size) for b, *_ in shapes]
    diff = _checked(max_difference(model, loaded, shapes), f"timm's {name}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    size = [3, loaded.img_size, loaded.img_size]
    config = {
        "architecture": name, "num_classes": 0, "num_features": loaded.embed_dim,
        "model_args": {k: v for k, v in kwargs.items() if k != "num_classes"},
        "pretrained_cfg": {"input_size": size, "mean": list(loaded.mean), "std": list(loaded.std),
                           "interpolation": "bicubic", "crop_pct": 0.875, "num_classes": 0,
                           "fixed_input_size": loaded.arch in VIT_SIZES},
    }
    write_text_atomically(out / "config.json", json.dumps(config, indent=2))
    return {"file": "model.safetensors", "config": "config.json", "timm_model": name, "timm_kwargs": kwargs,
            "load": f'timm.create_model("local-dir:{out}", pretrained=True)', "max_abs_diff": diff}


WRITERS: dict[str, Callable[[LoadedBackbone, Path], dict[str, Any]]] = {
    "safetensors": _write_safetensors, "torchscript": _write_torchscript, "onnx": _write_onnx, "timm": _write_timm,
}


def _write_metadata(loaded: LoadedBackbone, out: Path, fmt: str, info: dict[str, Any]) -> Path:
    """``backbone.json``; the entries of other formats exported from the same backbone are kept."""
    path = out / METADATA_FILE
    meta = loaded.metadata()
    if path.is_file():
        previous = json.loads(path.read_text())
        if all(previous.get(k) == v for k, v in meta.items()):
            meta["formats"] = previous.get("formats", {})
    meta.setdefault("formats", {})[fmt] = info
    return write_text_atomically(path, json.dumps(meta, indent=2))


def export_backbone(source: str | Path, out: str | Path, fmt: str, which: str = "teacher", trust: bool = False,
                    weights: str | Path | None = None) -> list[Path]:
    """Write the backbone of ``source`` in format ``fmt`` into the folder ``out``; returns the files."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    loaded = open_backbone(source, which=which, trust=trust, weights=weights)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = WRITERS[fmt](loaded, out)
    files = [out / info["file"]] + ([out / info["config"]] if "config" in info else [])
    return files + [_write_metadata(loaded, out, fmt, info)]
