"""Where the run executes: device choice and the process group under a launcher.

With no launcher variables a single process runs with no process group. Under ``torchrun``
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or SLURM's ``srun`` (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID`` with ``MASTER_ADDR``/``MASTER_PORT`` set) a process group
is formed: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launcher_env() -> DistEnv:
    """The rank layout the launcher announced (a single process when there is none)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "MASTER_ADDR" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv()


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA (this process's local GPU), then Apple's MPS, then the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but no CUDA GPU is available (use --device cpu)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def init_distributed(device: torch.device) -> DistEnv:
    """Join the launcher's process group (if any) and return this process's place in it."""
    env = launcher_env()
    if env.distributed and not dist.is_initialized():
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        except Exception as err:  # the rendezvous failed: say so plainly
            raise RuntimeError(f"could not form the process group of {env.world_size} processes "
                               f"(rank {env.rank}, backend {backend}): {err}") from None
    return env


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
