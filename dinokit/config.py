"""The training configuration: one typed object holding every number of the DINO recipe.

``TrainConfig()`` *is* the DINO defaults, the recipe of the paper and the official code (ViT-S/16,
2 x 224 px + 8 x 96 px views, K = 65536, ...). Presets (``laptop``, ``cifar``, ``paper``) are YAML
files in ``dinokit/configs/`` that change a few of them. A configuration is built in layers::

    defaults  <-  preset or YAML file  <-  key=value overrides (command line)

and is validated before any work starts: unknown keys, wrong types and impossible values are
rejected with the key named.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dinokit.files import write_text_atomically

PRESET_DIR = Path(__file__).parent / "configs"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class TrainConfig(BaseModel):
    """Every setting of a DINO pretraining run. Defaults are the paper's recipe."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # --- run -------------------------------------------------------------------------------
    data: str | None = Field(None, description="image folder (searched recursively); None: the built-in textures data set")
    out: str = Field("runs/dino", description="run folder: checkpoints, metrics, report; an existing run there is resumed")
    init: str | None = Field(None, description="start from this checkpoint (ours or official DINO) instead of random weights")
    seed: int = Field(0, description="seeds weights, data order and every augmentation")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 elsewhere")
    num_workers: int | None = Field(None, ge=0, description="data loader processes; None: from this process's share of the "
                                       "node's cores: all but one on a GPU (at most 32), half of them on a CPU")
    compile: Literal["off", "loss", "all"] = Field(
        "off", description="torch.compile: loss (seconds to compile), all: backbones, heads and loss (minutes on a CPU); "
                           "true means all")
    grad_checkpointing: bool = Field(
        False, description="recompute the student backbone's activations in the backward pass instead of keeping "
                           "them: far less memory, about a third more compute in the backbone (ViTs, timm models)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="how several processes share the work (torchrun)")
    keep_freed_memory: bool = Field(
        True, description="Linux: malloc keeps what is freed for the next step (CPU runs) and the next image (data "
                          "loader workers) instead of returning it to the system (no page faults on large tensors; "
                          "a few percent more memory)")

    # --- model -----------------------------------------------------------------------------
    arch: str = Field("vit_small", description="vit_tiny | vit_small | vit_base | resnet18/34/50 | timm:<name>")
    patch_size: int = Field(16, ge=1, description="ViT patch size in pixels")
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0, description="stochastic depth of the student's last block")
    out_dim: int = Field(65536, ge=2, description="K, the number of prototypes of the DINO head")
    head_hidden_dim: int = Field(2048, ge=1, description="width of the head's hidden layers")
    head_bottleneck_dim: int = Field(256, ge=1, description="width of the normalised bottleneck before the K prototypes")
    head_layers: int = Field(3, ge=1, description="linear layers of the head's MLP")
    norm_last_layer: bool = Field(True, description="fix the weight-norm gain of the head's last layer at 1")

    # --- loss and teacher ------------------------------------------------------------------
    student_temp: float = Field(0.1, gt=0.0, description="softmax temperature of the student's outputs")
    warmup_teacher_temp: float = Field(0.04, gt=0.0, description="teacher temperature at the start; linear to teacher_temp")
    teacher_temp: float = Field(0.07, gt=0.0, description="teacher temperature after the warm-up")
    warmup_teacher_temp_epochs: float = Field(30, ge=0.0, description="epochs of the teacher temperature's warm-up")
    center_momentum: float = Field(0.9, ge=0.0, le=1.0, description="EMA momentum of the centre of the teacher's outputs")
    momentum_teacher: float = Field(0.996, ge=0.0, le=1.0, description="EMA momentum at the start; cosine to the final one")
    momentum_teacher_final: float = Field(1.0, ge=0.0, le=1.0, description="EMA momentum at the end")

    # --- optimisation ----------------------------------------------------------------------
    epochs: int = Field(100, ge=1, description="passes over the training images")
    batch_size: int = Field(64, ge=1, description="global batch: source images per step over all processes")
    lr: float = Field(0.0005, ge=0.0, description="peak lr for a batch of 256; scaled by batch_size / 256")
    min_lr: float = Field(1e-6, ge=0.0, description="lr at the end of the cosine schedule")
    warmup_epochs: float = Field(10, ge=0.0, description="epochs of linear lr warm-up from 0")
    weight_decay: float = Field(0.04, ge=0.0, description="AdamW weight decay at the start; cosine to weight_decay_end")
    weight_decay_end: float = Field(0.4, ge=0.0, description="weight decay at the end")
    clip_grad: float = Field(3.0, ge=0.0, description="per-parameter gradient norm limit; 0 disables")
    freeze_last_layer: float = Field(1, ge=0.0, description="epochs during which the head's last layer is frozen")

    # --- views (multi-crop) ----------------------------------------------------------------
    global_crops_size: int = Field(224, ge=1, description="side of the 2 global views in pixels")
    global_crops_scale: tuple[float, float] = Field((0.4, 1.0), description="area share range of the global crops")
    local_crops_number: int = Field(8, ge=0, description="local views per image (student only)")
    local_crops_size: int = Field(96, ge=1, description="side of the local views in pixels")
    local_crops_scale: tuple[float, float] = Field((0.05, 0.4), description="area share range of the local crops")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="aspect ratio range (width / height) of every crop")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    color_jitter_prob: float = Field(0.8, ge=0.0, le=1.0, description="probability of the colour jitter")
    brightness: float = Field(0.4, ge=0.0, description="colour jitter: brightness factor range 1 +- this")
    contrast: float = Field(0.4, ge=0.0, description="colour jitter: contrast factor range 1 +- this")
    saturation: float = Field(0.2, ge=0.0, description="colour jitter: saturation factor range 1 +- this")
    hue: float = Field(0.1, ge=0.0, le=0.5, description="colour jitter: hue shift range +- this, in turns")
    grayscale_prob: float = Field(0.2, ge=0.0, le=1.0, description="probability of greyscale")
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="Gaussian blur sigma range in pixels")
    blur_prob: tuple[float, float, float] = Field((1.0, 0.1, 0.5), description="global 1, global 2, local")
    solarize_prob: tuple[float, float, float] = Field((0.0, 0.2, 0.0), description="global 1, global 2, local")
    views_on: Literal["host", "device"] = Field("host", description="where the views are made: host (data loader "
                                                "workers) or device (workers only decode; crops and colours on the GPU)")
    canvas_size: int | None = Field(None, ge=1, description="views_on=device: side of the square the decoded "
                                    "image is shrunk to fit before it goes to the device; None: 2 x global_crops_size "
                                    "(the paper preset: 512, ImageNet's images unshrunk)")
    overlap_views: bool = Field(False, description="CUDA: make the next batch's views on the GPU (its copy there, "
                                "and the crops with views_on=device) on a side stream while the step runs")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="per-channel mean subtracted from the views (RGB, 0..1)")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="per-channel standard deviation the views are divided by")

    # --- data policy -----------------------------------------------------------------------
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0, description="stop when more of an epoch's images fail to load")

    # --- monitoring, evaluation and checkpoints --------------------------------------------
    log_every: int = Field(10, ge=1, description="steps between progress-bar and TensorBoard updates")
    knn_every: int = Field(0, ge=0, description="epochs between k-NN evaluations (0: only before and after training)")
    knn_k: tuple[int, ...] = Field((10, 20, 100, 200), description="neighbour counts of the k-NN evaluations")
    knn_temperature: float = Field(0.07, gt=0.0, description="temperature of the k-NN votes")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of labelled images held out for k-NN")
    eval_batch_size: int = Field(256, ge=1, description="images per batch of the k-NN feature extraction")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: every epoch only)")
    keep_checkpoints: int = Field(1, ge=0, description="epoch checkpoints kept besides the latest")
    max_nonfinite_steps: int = Field(5, ge=1, description="stop after this many steps in a row with a non-finite loss or gradient")
    report: bool = Field(True, description="write views.png at the start and report.html at the end of the run")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_from_bool(cls, value: Any) -> Any:
        """``compile: true`` / ``false`` (configs written before the choice existed): all / off."""
        if isinstance(value, bool):
            return "all" if value else "off"
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> "TrainConfig":
        def bad(key: str, why: str) -> None:
            raise ValueError(f"{key}: {why}")

        if self.arch.startswith("vit"):
            for key in ("global_crops_size", "local_crops_size"):
                if getattr(self, key) % self.patch_size:
                    bad(key, f"{getattr(self, key)} px is not a multiple of patch_size {self.patch_size}")
        if self.local_crops_number and self.local_crops_size > self.global_crops_size:
            bad("local_crops_size", f"{self.local_crops_size} px is larger than global_crops_size {self.global_crops_size}")
        for key in ("global_crops_scale", "local_crops_scale", "crop_ratio", "blur_sigma"):
            low, high = getattr(self, key)
            if not 0 < low <= high:
                bad(key, f"needs 0 < low <= high, got {(low, high)}")
        for key in ("global_crops_scale", "local_crops_scale"):
            if getattr(self, key)[1] > 1:
                bad(key, "crop scales are shares of the image area, at most 1")
        for key in ("blur_prob", "solarize_prob"):
            if not all(0 <= p <= 1 for p in getattr(self, key)):
                bad(key, f"probabilities must lie in [0, 1], got {getattr(self, key)}")
        if self.canvas_size is not None and self.canvas_size < self.global_crops_size:
            bad("canvas_size", f"{self.canvas_size} px is smaller than global_crops_size {self.global_crops_size}")
        if any(s <= 0 for s in self.std):
            bad("std", "must be positive")
        if any(k < 1 for k in self.knn_k):
            bad("knn_k", "every k must be at least 1")
        if self.momentum_teacher_final < self.momentum_teacher:
            bad("momentum_teacher_final", "must not be below momentum_teacher")
        return self

    # --- building --------------------------------------------------------------------------
    @classmethod
    def build(cls, base: str | Path | dict | None = None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Defaults <- ``base`` (a preset name, a YAML path or a dict) <- ``overrides``.

        Raises ``ConfigError`` naming the key for anything invalid.
        """
        values: dict[str, Any] = {}
        if isinstance(base, dict):
            values.update(base)
        elif base is not None:
            values.update(load_yaml(base))
        for key, value in (overrides or {}).items():
            values[key] = value
        _check_keys(values)
        try:
            return cls(**values)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err)) from None

    def to_yaml(self, path: str | Path) -> None:
        write_text_atomically(path, yaml.safe_dump(self.to_dict(), sort_keys=False))  # a resume reads it

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (lists for tuples), safe for YAML, JSON and ``torch.load(weights_only=True)``."""
        return self.model_dump(mode="json")


def presets() -> list[str]:
    """Names of the built-in presets (``dinokit/configs/*.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(source: str | Path) -> dict[str, Any]:
    """Read a preset by name or a YAML file by path into a dict (not yet validated).

    A preset's bare name means the preset even where a file or folder of that name is in the
    working directory (a data folder named ``cifar``); ``./cifar`` means the file.
    """
    path = Path(source)
    if str(source) in presets():
        path = PRESET_DIR / f"{source}.yaml"
    if not path.exists():
        raise ConfigError(f"config {source!r}: no such file and no such preset (presets: {', '.join(presets())})")
    if path.is_dir():
        hint = (f"; it holds a run: resume it with --out {path}, or start a new run from its settings with "
                f"--config {path / 'config.yaml'} --out NEW_FOLDER") if (path / "config.yaml").is_file() else ""
        raise ConfigError(f"config {path} is a folder, not a YAML file{hint}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path}: not valid YAML ({err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: not UTF-8 text (saved as UTF-16? save it as UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"config {path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config {path}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=300", "knn_k=[10,20]"]`` -> ``{"epochs": 300, "knn_k": [10, 20]}`` (``parse_setting``)."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        key = key.strip().replace("-", "_")
        result[key] = parse_setting(key, raw)
    return result


def parse_setting(key: str, raw: str) -> Any:
    """A command-line value of setting ``key``, the same as ``--key VALUE`` or ``key=VALUE``: a
    text setting keeps the text (``data=2024`` is a folder named 2024; ``none`` or ``null``
    clears an optional one), a list setting takes comma-separated items (``0.3,1.0``, or one: ``knn_k=20``), and the
    rest is read as YAML (``0.07`` -> float, ``[1,2]`` -> list, ``none`` -> None)."""
    field = TrainConfig.model_fields.get(key)
    annotation = field.annotation if field is not None else None
    if annotation in (str, str | None):
        return None if annotation != str and raw.strip().lower() in ("none", "null") else raw
    if get_origin(annotation) not in (list, tuple):
        return parse_value(raw)
    value = parse_value(raw if raw.strip().startswith("[") else f"[{raw}]")  # 0.3,1.0 or a single 5
    return value if isinstance(value, list) else raw


def parse_value(raw: str) -> Any:
    """A value read as YAML: ``0.07`` and ``1e-3`` -> float, ``[1,2]`` -> list, ``none`` -> None."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    if isinstance(value, str):
        try:
            return float(value)  # 1e-3, which YAML 1.1 reads as text
        except ValueError:
            return value
    return raw if value is None and raw.strip() else value


def _check_keys(values: dict[str, Any]) -> None:
    known = set(TrainConfig.model_fields)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error":
            lines.append(msg)
        else:
            lines.append(f"{key}: {msg} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)
