"""FSDP2 (``strategy: fsdp``): student and teacher sharded over the processes, and checkpoints
that load on any number of processes.

Every parameter is split along its first dimension over the processes
(``torch.distributed.fsdp.fully_shard``); each transformer block (or convnet stage), the head
and the rest are gathered just before they run and freed after. The teacher is sharded exactly
like the student, so the EMA update ``torch._foreach_lerp_`` runs on matching local shards
(DTensors) with no communication, and the per-parameter gradient clipping of
``dinokit.train.optim`` works unchanged (DTensor all-reduces the norms).

Checkpoints go through ``torch.distributed.checkpoint`` (DCP) into a folder, ``checkpoint.dcp/``,
where every process writes its own shards; loading it onto another number of processes
(one included, with no process group) reshards it. Beside it the main process writes the
consolidated ``checkpoint.pth`` (official layout, full weights, no optimizer) for evaluation
and export.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from dinokit.config import ConfigError
from dinokit.train.checkpoint import link_or_copy

if TYPE_CHECKING:
    from dinokit.train.loop import DINOState

RECORD_KEYS = ("args", "images")  # the plain values saved beside the tensors (save_sharded)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds FSDP shards (``DTensor`` parameters): ``fully_shard``'s module or
    a part of it, such as the teacher's backbone."""
    return any(isinstance(p, DTensor) for p in module.parameters())


#: The oldest PyTorch on which dinokit's FSDP runs are checked to train as one process does
#: (``tests/train/test_distributed.py``): on a CPU, 2.6 and 2.7 fail in FSDP2's collectives, 2.8
#: drifts from the one-process losses after two steps, 2.9 cannot resume a sharded checkpoint on
#: one process; 2.10 and later pass.
FSDP_MIN_TORCH = "2.10"


def require_tested_torch() -> None:
    """Raise ``ConfigError`` for ``strategy=fsdp`` on a PyTorch older than ``FSDP_MIN_TORCH``."""
    if torch.__version__ < FSDP_MIN_TORCH:
        raise ConfigError(f"strategy=fsdp needs torch >= {FSDP_MIN_TORCH} (older FSDP2 fails or trains differently "
                          f"from one process); this is torch {torch.__version__}: upgrade it, or use strategy=ddp")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The sub-modules gathered one at a time: the backbone's blocks (ViTs) or stages (timm
    convnets) or ``layer1..4`` (torchvision ResNets), and the head."""
    backbone = model.backbone
    for name in ("blocks", "stages", "layers"):
        units = getattr(backbone, name, None)
        if isinstance(units, (nn.Sequential, nn.ModuleList)):
            return [*units, model.head]
    return [m for name, m in backbone.named_children() if name.startswith("layer")] + [model.head]


def shard(student: nn.Module, teacher: nn.Module, device: torch.device) -> None:
    """Shard both networks in place over all processes, with the same layout. The optimizer
    must be built afterwards (the parameters are replaced by sharded ones)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for model, root_reshard in ((student, False), (teacher, True)):
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh)
        # The student's root stays gathered from forward to backward (what newer FSDP does for
        # a root by default; torch 2.6 needs it said); the teacher has no backward, so it
        # reshards at once and its shards match the student's.
        fully_shard(model, mesh=mesh, reshard_after_forward=root_reshard)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with whole tensors. Sharded: a collective that leaves the gathered
    tensors (on the CPU) on the main process and an empty dict on the others."""
    if not is_sharded(module):
        return module.state_dict()
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_copy(module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """``module`` itself when it is not sharded; otherwise ``build()`` (a fresh module of the same
    architecture, on the right device) loaded with ``module``'s gathered weights on every
    process, so that each process can run it on its own inputs (collective)."""
    if not is_sharded(module):
        return module
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()}
    copy = build()
    copy.load_state_dict(state)
    return copy


def _training_state(state: "DINOState") -> dict[str, Any]:
    return {
        "student": get_model_state_dict(state.student),
        "teacher": get_model_state_dict(state.teacher),
        "optimizer": get_optimizer_state_dict(state.student, state.optimizer),
        "dino_loss": state.loss.state_dict(),
        "step": state.step,
    }


def save_sharded(folder: Path, state: "DINOState", record: dict[str, Any], copy_to: Path | None = None) -> None:
    """Write ``state`` and ``record`` (plain values by name: the run's config ``args``, the
    fingerprints of its ``images``) to the DCP folder ``folder``; a collective.

    The new folder replaces the old one only once it is complete. ``copy_to`` also keeps it
    there (the epoch checkpoints), its files hard links to the new folder's.
    """
    main = _single() or dist.get_rank() == 0
    tmp = folder.with_name(f".{folder.name}.tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    with _no_single_process_warning():
        dcp.save({**_training_state(state), **{k: json.dumps(v) for k, v in record.items()}}, checkpoint_id=tmp,
                 no_dist=_single())
    if main:
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        if copy_to is not None:  # its files linked (DCP files are never rewritten), complete before it is renamed
            staged = copy_to.with_name(f".{copy_to.name}.tmp")
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(folder, staged, copy_function=link_or_copy)
            shutil.rmtree(copy_to, ignore_errors=True)
            staged.rename(copy_to)
    _barrier()


def latest_sharded(folder: Path) -> Path | None:
    """The complete DCP checkpoint at ``folder`` (or the previous one, when a save was cut short
    between its two renames)."""
    for candidate in (folder, folder.with_name(f".{folder.name}.old")):
        if (candidate / ".metadata").exists():
            return candidate
    return None


def read_sharded_record(folder: Path) -> dict[str, Any]:
    """The record saved beside a DCP checkpoint's tensors (``save_sharded``), read without building
    any model; the entries an older checkpoint lacks are left out."""
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    values = {key: "" for key in RECORD_KEYS if key in saved}
    with _no_single_process_warning():
        dcp.load(values, checkpoint_id=folder, no_dist=_single())
    return {key: json.loads(value) for key, value in values.items()}


def load_sharded(folder: Path, state: "DINOState") -> None:
    """Load a DCP checkpoint into ``state`` (sharded over any number of processes, or not at all)."""
    values = _training_state(state)
    # Parameters that never had a gradient (the head's last layer while frozen) have no AdamW
    # state in the checkpoint, and must have none after loading either.
    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    with_state = {key.removeprefix("optimizer.state.").rsplit(".", 1)[0] for key in saved
                  if key.startswith("optimizer.state.")}
    values["optimizer"]["state"] = {name: v for name, v in values["optimizer"]["state"].items() if name in with_state}
    with _no_single_process_warning():
        dcp.load(values, checkpoint_id=folder, no_dist=_single())
    set_model_state_dict(state.student, values["student"])
    set_model_state_dict(state.teacher, values["teacher"])
    set_optimizer_state_dict(state.student, state.optimizer, values["optimizer"],
                             options=StateDictOptions(strict=False))
    state.loss.load_state_dict(values["dino_loss"])
    state.step = int(values["step"])


def _single() -> bool:
    return not dist.is_initialized()


@contextlib.contextmanager
def _no_single_process_warning() -> Iterator[None]:
    """DCP warns at every use without a process group; for us one process is a normal case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if not _single():
        dist.barrier()
