"""The processes of a run: the process group under a launcher, collectives, and what they must agree on.

With no launcher variables a single process runs with no process group. Under ``torchrun``
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or SLURM's ``srun`` (``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the address of the first node of the step is used
when ``MASTER_ADDR`` is not set) a process group is formed: NCCL on GPUs, gloo on CPUs.

Everything that can go wrong between processes ends in a ``DistributedError`` that says what
to check: a rendezvous that does not form, processes that disagree about the config, the data
or the checkpoint, a process that died.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from dinokit.train.checkpoint import resume_hint

RENDEZVOUS_TIMEOUT_ENV = "DINOKIT_RENDEZVOUS_TIMEOUT"  # seconds the processes wait for each other at start
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)   # a collective that takes longer means a peer is gone


class DistributedError(RuntimeError):
    """The processes of a run cannot work together; the message says why and what to check."""


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

    def __str__(self) -> str:
        return f"process {self.rank} of {self.world_size}"


def launcher_env() -> DistEnv:
    """The rank layout the launcher announced (a single process when there is none)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1:  # inside `srun`
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv()


def processes_on_this_node() -> int:
    """How many training processes the launcher started on this node: torchrun's
    ``LOCAL_WORLD_SIZE``; inside ``srun``, this node's entry of ``SLURM_STEP_TASKS_PER_NODE``
    (``4(x2),2``: 4 on the first two nodes, 2 on the third); else 1."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env:
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        counts = []
        for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not match:
                return 1
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        node = int(env.get("SLURM_NODEID", 0))
        return max(1, counts[node]) if node < len(counts) else 1
    return 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist.strip())
    if not match:
        raise DistributedError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to the first node")
    return match.group(1) + (match.group(2) or "")


def init_distributed(device: torch.device) -> DistEnv:
    """Join the launcher's process group (if any) and return this process's place in it.

    The processes wait ``$DINOKIT_RENDEZVOUS_TIMEOUT`` seconds (default 900) for each other;
    then every one of them stops with a message naming the address it tried.
    """
    env = launcher_env()
    if not env.distributed or dist.is_initialized():
        return env
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(env.rank), str(env.world_size)
    os.environ["LOCAL_RANK"] = str(env.local_rank)
    if "SLURM_PROCID" in os.environ:
        os.environ.setdefault("MASTER_ADDR", first_host(os.environ.get("SLURM_STEP_NODELIST", "")))
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))
    missing = [var for var in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(var)]
    if missing:
        raise DistributedError(f"{env}: RANK and WORLD_SIZE are set but {' and '.join(missing)} not; set them to "
                               "the address of process 0's node and a free port there (torchrun sets them for you)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    wait = float(os.environ.get(RENDEZVOUS_TIMEOUT_ENV, 900))
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    started = time.monotonic()
    try:
        if env.rank != 0 and not _port_opens(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], wait):
            raise TimeoutError(f"nothing was listening at {address}")  # said here: c10d's retries log C++ stacks
        left = max(wait - (time.monotonic() - started), 1.0)
        store, _, _ = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=left)))
        store.set_timeout(COLLECTIVE_TIMEOUT)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
    except (RuntimeError, ValueError, TimeoutError) as err:  # DistStoreError, DistNetworkError, a bad MASTER_PORT
        raise DistributedError(
            f"{env}: the {env.world_size} processes did not meet at {address} within {wait:.0f} s "
            f"({_first_line(err)}). Check that all {env.world_size} processes were started, that MASTER_ADDR is "
            f"the first node's address and reachable from every node, and that MASTER_PORT is free there "
            f"(wait longer with {RENDEZVOUS_TIMEOUT_ENV}=seconds)") from None
    return env


def _port_opens(host: str, port: str, seconds: float) -> bool:
    """Whether a TCP connection to ``host:port`` can be made within ``seconds`` (tried every 0.2 s;
    the connection is closed at once). A port that is not a number is left to the rendezvous."""
    if not port.isdigit():
        return True
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=max(min(deadline - time.monotonic(), 5.0), 0.1)).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        _HOST_GROUPS.clear()
        dist.destroy_process_group()


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another process is gone or stuck."""
    text = str(err)
    return isinstance(err, dist.DistError) or any(mark in text for mark in ("gloo", "NCCL", "Connection reset",
                                                                             "Connection closed"))


def lost_peer_error(err: BaseException, env: DistEnv, out: str) -> DistributedError:
    return DistributedError(
        f"{env}: lost contact with the other processes ({_first_line(err)}). Another process stopped or hung: "
        f"its own message above (or the launcher's summary) says why. {resume_hint(out)}")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def sync_batch_norm(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """Batch norm computed over the global batch (GPUs only; a no-op for models without it).
    timm's converter keeps its fused norm + activation layers intact."""
    if arch.startswith("timm:"):
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


# --- collectives that are no-ops for a single process -------------------------------------

def mean_over_processes(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each 0-d tensor averaged over the processes (one all-reduce; no host synchronisation)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    stacked = torch.stack([v.detach().float() for v in values.values()])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(values, stacked.unbind()))


def sum_over_processes(counts: list[int]) -> list[int]:
    """Integer counts summed over all processes (returned as they are without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return counts
    value = torch.tensor(counts, dtype=torch.float64)
    dist.all_reduce(value, group=host_group())
    return [int(v) for v in value.tolist()]


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one (so that all stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=host_group())
    return bool(value.item())


_HOST_GROUPS: dict[Any, Any] = {}


def host_group():
    """The process group for host-side values (flags, counts): the default group under gloo;
    under NCCL a gloo group of the same processes, made on first use (by all of them, since every
    caller is collective). Reducing a CPU tensor there never waits for the GPU to drain its
    queue, as ``.item()`` on an NCCL result would: the training loop asks every step."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if dist.group.WORLD not in _HOST_GROUPS:
        _HOST_GROUPS[dist.group.WORLD] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[dist.group.WORLD]


@contextlib.contextmanager
def leaders_first(env: DistEnv) -> Iterator[None]:
    """Run the body on process 0, then on the first process of every other node, then on the
    rest: for work that fills a cache (shared or node-local) which the others then only read."""
    stage = 0 if env.rank == 0 else 1 if env.local_rank == 0 else 2
    for _ in range(stage if env.distributed else 0):
        dist.barrier()
    try:
        yield
    finally:  # also after an error, so that the others go on and meet the same error
        for _ in range(2 - stage if env.distributed else 0):
            dist.barrier()


def check_agreement(env: DistEnv, facts: dict[str, Any]) -> None:
    """Raise the same ``DistributedError`` on every process unless all processes hold the same
    ``facts`` (the config as a dict, fingerprints of the data, the checkpoint found, ...)."""
    if not env.distributed:
        return
    gathered: list[dict[str, Any] | None] = [None] * env.world_size
    dist.all_gather_object(gathered, facts)
    problem = describe_disagreement(gathered)
    if problem:
        raise DistributedError(f"the {env.world_size} processes disagree: {problem}. Every process must run the "
                               "same command, on the same data, with the same --out folder (shared by all nodes)")


def describe_disagreement(facts: list[dict[str, Any]]) -> str | None:
    """What process ``r`` holds differently from process 0 (first offender), or ``None``."""
    reference = facts[0]
    for rank, theirs in enumerate(facts[1:], start=1):
        for key, ours in reference.items():
            if isinstance(ours, dict):
                keys = sorted(k for k in set(ours) | set(theirs[key]) if ours.get(k) != theirs[key].get(k))
                if keys:
                    diffs = ", ".join(f"{k}={ours.get(k)!r} on process 0 but {theirs[key].get(k)!r} on process "
                                      f"{rank}" for k in keys[:3])
                    return f"{key} differs ({diffs}{' ...' if len(keys) > 3 else ''})"
            elif theirs[key] != ours:
                return f"{key} is {ours!r} on process 0 but {theirs[key]!r} on process {rank}"
    return None
