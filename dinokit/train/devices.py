"""What a process computes on: the device, its precision (autocast), the CPU's features, and
how many data-loader processes feed it.

Training, ``dinokit bench`` and evaluation all decide these here, so that they decide them alike.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

from dinokit.config import ConfigError
from dinokit.train.distributed import processes_on_this_node

#: The most data-loader processes a training or evaluation process on a GPU starts by default.
MAX_GPU_LOADER_WORKERS = 32


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA (this process's local GPU), then Apple's MPS, then the CPU; a device that
    is not here, or not one of these, is a ``ConfigError``."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for, but no CUDA GPU is available (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {spec!r} asked for, but Apple's MPS is not available here (use --device cpu)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


# --- precision -------------------------------------------------------------------------------

def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype of a forward pass's matmuls and convolutions on ``device`` at ``precision``
    (``auto``, ``fp32`` or ``bf16``, as in ``TrainConfig.precision``):

    - ``auto``: ``torch.bfloat16`` on CUDA; ``torch.float32`` on a CPU or MPS (bf16 autocast pays
      on a CPU with AMX only, and then ``precision="bf16"`` asks for it);
    - ``bf16``: ``torch.bfloat16`` on every device;
    - ``fp32``: ``torch.float32`` on every device.
    """
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def autocast_for(device: torch.device, precision: str = "auto", *, override_enclosing_autocast: bool = False):
    """The context manager a forward pass on ``device`` runs in at ``precision`` (what
    ``autocast_dtype`` says): ``torch.autocast(device.type, dtype=torch.bfloat16)`` for bf16; for
    fp32 ``contextlib.nullcontext()``, which leaves an autocast the caller is already inside on.

    ``override_enclosing_autocast=True`` makes fp32 hold inside a caller's autocast too: it turns
    CUDA's autocast off on CUDA, the CPU's elsewhere (on MPS an MPS autocast of the caller stays
    on). For results that must not depend on the context they are computed in, such as cached
    features, whose cache key has no precision.
    """
    if autocast_dtype(device, precision) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if override_enclosing_autocast:
        return torch.autocast("cuda" if device.type == "cuda" else "cpu", enabled=False)
    return contextlib.nullcontext()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (recent Xeons): bf16 matmuls several times as fast as fp32."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


# --- data-loader processes ---------------------------------------------------------------------

def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of the node's where it has none),
    shared with the launcher's other processes on this node."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cores_of_this_process() -> int:
    """This process's share of the node's cores: ``usable_cores()`` over the launcher's processes
    on this node (``processes_on_this_node``), at least 1."""
    return max(1, usable_cores() // processes_on_this_node())


def default_loader_workers(device: torch.device, *, on_cpu: Literal["half", "none"]) -> int:
    """Data-loader processes of a process computing on ``device`` when none are asked for.

    On a GPU: every core of this process's share but one (left to the process itself and its
    pin-memory thread), at least 1, at most ``MAX_GPU_LOADER_WORKERS``. Making the paper's views
    takes a core per ~40 images/s (500 x 375 JPEGs, 2-core Xeon VM), well below what one GPU
    trains on, so the loader gets all it can.

    Elsewhere (a CPU, MPS) the loader and the model share the cores, and the two callers split
    them differently:

    - ``on_cpu="half"`` (training, ``dinokit bench``): half the share, at least 1. Multi-crop
      views cost as much as a step, so half the cores make the next batch while the others step;
    - ``on_cpu="none"`` (evaluation): 0, the images load in the process between batches. The
      evaluation transform (resize + centre crop) is cheap next to the forward pass, which gets
      every core.
    """
    if device.type == "cuda":
        return min(MAX_GPU_LOADER_WORKERS, max(1, cores_of_this_process() - 1))
    return max(1, cores_of_this_process() // 2) if on_cpu == "half" else 0
