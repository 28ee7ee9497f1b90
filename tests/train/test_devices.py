"""The device, its precision and the loader workers that feed it (dinokit/train/devices.py)."""

import contextlib
import os

import pytest
import torch

from dinokit.config import ConfigError
from dinokit.train.devices import (MAX_GPU_LOADER_WORKERS, autocast_dtype, autocast_for, default_loader_workers,
                                   resolve_device)

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                 "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID")


@pytest.mark.parametrize("spec, message", [
    ("gpu", "expected auto, cpu, cuda, cuda:N or mps"),
    ("xla", "expected auto, cpu, cuda, cuda:N or mps"),
    pytest.param("cuda", "no CUDA GPU is available", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_a_device_that_is_not_here_is_a_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_device(spec)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device, precision, dtype", [
    (CUDA, "auto", torch.bfloat16), (CPU, "auto", torch.float32), (MPS, "auto", torch.float32),
    (CUDA, "bf16", torch.bfloat16), (CPU, "bf16", torch.bfloat16), (MPS, "bf16", torch.bfloat16),
    (CUDA, "fp32", torch.float32), (CPU, "fp32", torch.float32), (MPS, "fp32", torch.float32),
])
def test_auto_precision_is_bf16_on_cuda_only(device, precision, dtype):
    assert autocast_dtype(device, precision) == dtype


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_the_autocast_context_is_bf16_autocast_or_none():
    assert isinstance(autocast_for(CUDA), torch.autocast) and autocast_for(CUDA).fast_dtype == torch.bfloat16
    assert isinstance(autocast_for(CPU), contextlib.nullcontext)
    assert isinstance(autocast_for(CPU, "fp32"), contextlib.nullcontext)
    bf16 = autocast_for(CPU, "bf16")
    assert isinstance(bf16, torch.autocast) and bf16.device == "cpu" and bf16.fast_dtype == torch.bfloat16


def test_fp32_overrides_an_enclosing_autocast_only_when_asked():
    """A caller's bf16 autocast reaches a plain fp32 forward pass; with
    ``override_enclosing_autocast`` (cached features) the pass stays in fp32."""
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast_for(CPU):
            assert (a @ b).dtype == torch.bfloat16
        with autocast_for(CPU, override_enclosing_autocast=True):
            assert (a @ b).dtype == torch.float32
        with autocast_for(CPU, "bf16", override_enclosing_autocast=True):
            assert (a @ b).dtype == torch.bfloat16
    with autocast_for(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16


def test_the_default_loader_workers_come_from_this_process_share_of_the_cores(monkeypatch):
    """On a GPU all cores of the share but one, for training and evaluation alike; on a CPU half of
    them for training (``on_cpu="half"``), none for evaluation (``on_cpu="none"``)."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)

    def workers() -> tuple[int, int, int]:
        return (default_loader_workers(CUDA, on_cpu="half"), default_loader_workers(CPU, on_cpu="half"),
                default_loader_workers(CPU, on_cpu="none"))

    assert workers() == (31, 16, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")  # 4 processes on this node (srun)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "10")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4(x2),2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert workers() == (7, 4, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes on this node (torchrun)
    assert workers() == (3, 2, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # one core each: one worker still, but none for evaluation
    assert workers() == (1, 1, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    assert default_loader_workers(CUDA, on_cpu="none") == MAX_GPU_LOADER_WORKERS
    assert workers() == (MAX_GPU_LOADER_WORKERS, 64, 0)
    assert default_loader_workers(MPS, on_cpu="half") == 64 and default_loader_workers(MPS, on_cpu="none") == 0
