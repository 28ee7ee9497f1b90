"""``dinokit bench``: how fast the real training step runs on this machine, and where its time goes.

``run_bench(cfg, steps)`` builds the networks of ``cfg`` exactly as ``dinokit train`` does and
drives ``train_step`` (the loop's own step, not a copy) with a phase timer, on batches from the
real data pipeline (``data="pipeline"``) or on random tensors of the same shapes
(``data="synthetic"``, the step alone). It measures

- ``images_per_s``: source images per second, each with all its views (``batch_size`` per step);
- the time split of a step: waiting for data, the views (the batch's copy to the device and its
  normalisation; with ``views_on: device`` the crops and colours there too; with
  ``overlap_views`` on CUDA on a side stream, during the step before), teacher forward,
  student forward, loss, student backward, optimizer (clipping and AdamW), EMA, centre
  (milliseconds per step);
- peak memory: the process's peak resident set size on the CPU (MiB), the CUDA caching
  allocator's ``max_memory_allocated`` over the timed steps on a GPU;
- model FLOPs per step (``torch.utils.flop_counter``) and their share of the device's measured
  matmul rate (bf16 on GPU, the step's precision on the CPU): the MFU;
- on a GPU, its busy time per step (``torch.profiler``: the union of its kernels', copies' and
  memsets' intervals over a few more steps) as a share of the step: the rest it was idle,
  waiting for the host (Python's dispatch) or for the data;
- the data pipeline alone: decode + multi-crop images per second on one core.

Phases are timed with ``time.perf_counter`` on the CPU and with CUDA events on a GPU (no
synchronisation inside the step; the events are read once at the end).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import re
import resource
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from dinokit.config import ConfigError, TrainConfig
from dinokit.data.datasets import ImageDataset, prefetch_factor
from dinokit.data.folders import DataError, scan_folder
from dinokit.data.public import resolve_data
from dinokit.data.device_views import view_pipeline
from dinokit.data.prefetch import ReadyBatch, ready_batches
from dinokit.files import write_text_atomically
from dinokit.method.schedules import StepHyperparameters
from dinokit.train.devices import autocast_dtype, autocast_for, cpu_has_amx, resolve_device, usable_cores
from dinokit.train.host_memory import use_memory_policy
from dinokit.train.loop import build_state, train_step, training_loader, training_loader_workers

BF16_HINT_SPEEDUP = 1.3  # the bf16 / fp32 matmul rate above which the report suggests bf16 on a CPU
VIEWS_HINT_SHARE = 0.03  # the share of a GPU step the views take above which the report suggests overlap_views
PHASES = ("data", "views", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "ema", "centre")
DATA_MODES = ("pipeline", "synthetic")


class PhaseTimer:
    """``with timer("name"): ...`` adds the block's duration to ``name``.

    On the CPU a block is timed with ``perf_counter``. On CUDA a pair of events is recorded on the
    current stream (GPU time, no host synchronisation); ``seconds()`` synchronises once and adds
    them up. ``add(name, seconds)`` adds a time measured on the host (waiting for the loader).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.cuda:
            start = time.perf_counter()
            yield
            self.add(name, time.perf_counter() - start)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((name, start, end))

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def seconds(self) -> dict[str, float]:
        """Total seconds per phase so far."""
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.totals[name] += start.elapsed_time(end) / 1000
            self._events.clear()
        return dict(self.totals)

    def reset(self) -> None:
        self.totals.clear()
        self._events.clear()


@dataclass
class BenchResult:
    """One benchmark run; ``to_dict()`` is what goes into the results file."""

    machine: dict
    workload: dict
    steps: int
    images_per_s: float
    step_ms: float
    cpu_ms: float  # CPU time of this process per step, all threads: ~ threads x step_ms when the cores are its own
    phases_ms: dict[str, float]
    peak_memory_mib: float
    memory_kind: str
    first_step_s: float  # the first step: allocation, and compilation with --compile
    skipped_steps: int = 0
    flops_per_step: float | None = None
    matmul_tflops: float | None = None  # the device's measured matmul rate (dtype in workload)
    mfu: float | None = None
    bf16_matmul_speedup: float | None = None  # CPU, fp32 step: the measured bf16 matmul rate over the fp32 one
    gpu_busy: float | None = None  # CUDA: the share of the step's wall time the GPU was busy
    data_images_per_s_per_core: float | None = None
    load_average: tuple[float, float] | None = None  # the machine's 1-minute load, before and after

    def to_dict(self) -> dict:
        return asdict(self)


# --- the machine ---------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (runnable processes; above the core count the cores are shared)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). Whether bf16 autocast pays is
    another question, measured by ``run_bench`` (``bf16_matmul_speedup``): without AMX, bf16
    matmuls ran at half the fp32 rate on a 2-core Xeon VM."""
    return cpu_has_amx() or bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def describe_machine(device: torch.device) -> dict:
    """CPU model, cores, threads, versions and the accelerator, for the results file."""
    info = {"cpu": cpu_model(), "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
            "cpu_native_bf16": native_bf16(), "cpu_amx": cpu_has_amx(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def machine_slug(machine: dict) -> str:
    """A file-name-safe name: ``cpu-amd-epyc-2c``, ``cpu-intel-xeon-amx-2c`` (a CPU with AMX, whose
    model name is often the same as that of one without) or ``cuda-nvidia-h100-80gb-hbm3``."""
    if "gpu" in machine:
        name = f"cuda-{machine['gpu']}"
    else:
        name = f"cpu-{machine['cpu']}{'-amx' if machine.get('cpu_amx') else ''}-{machine['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, kind): the process's peak RSS on the CPU, the allocator's peak on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "peak_rss"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """The best measured rate (FLOP/s) of a square ``size`` matmul in ``dtype`` on ``device``."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    a @ b  # warm-up: kernels picked, memory allocated
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals (seconds): overlapping ones count once."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def device_activities(step, steps: int, device: torch.device) -> list[tuple[str, float, float]]:
    """``(name, start_s, end_s)`` of every CUDA kernel, copy and memset of ``steps`` calls of
    ``step()``, recorded by ``torch.profiler`` (which slows the host: time the step without it)."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    cuda = torch.autograd.DeviceType.CUDA
    return [(e.name(), e.start_ns() / 1e9, (e.start_ns() + e.duration_ns()) / 1e9)
            for e in prof.profiler.kineto_results.events() if e.device_type() == cuda and e.duration_ns() > 0]


def gpu_busy_seconds(step, steps: int, device: torch.device) -> float:
    """GPU seconds busy per ``step()`` (kernels, copies, memsets; streams that overlap count once)."""
    return busy_seconds([(start, end) for _, start, end in device_activities(step, steps, device)]) / steps


# --- the workload ----------------------------------------------------------------------------

def default_config(device: torch.device) -> TrainConfig:
    """A workload sensible for the machine: the laptop preset on a CPU, the paper's ViT-S/16 with
    its views (2 x 224 px + 10 x 96 px, K = 65536) at batch 128 on a GPU."""
    if device.type == "cuda":
        return TrainConfig.build("paper", {"batch_size": 128})
    return TrainConfig.build("laptop")


def view_shapes(cfg: TrainConfig) -> list[tuple[int, int]]:
    """(count, side) of the views: ``[(2, global), (local_crops_number, local)]``."""
    shapes = [(2, cfg.global_crops_size)]
    if cfg.local_crops_number:
        shapes.append((cfg.local_crops_number, cfg.local_crops_size))
    return shapes


def describe_workload(cfg: TrainConfig, data: str, device: torch.device, workers: int) -> dict:
    views = " + ".join(f"{n}x{s}px" for n, s in view_shapes(cfg))
    precision = "bf16" if autocast_dtype(device, cfg.precision) == torch.bfloat16 else "fp32"
    return {"arch": cfg.arch, "patch_size": cfg.patch_size, "batch_size": cfg.batch_size, "views": views,
            "out_dim": cfg.out_dim, "head_hidden_dim": cfg.head_hidden_dim, "precision": precision,
            "compile": cfg.compile, "grad_checkpointing": cfg.grad_checkpointing,
            "data": data if data == "synthetic" else str(resolve_data(cfg.data)), "workers": workers,
            "overlap_views": cfg.overlap_views and device.type == "cuda" and data != "synthetic"}


def describe_pipeline(cfg: TrainConfig, workers: int) -> dict:
    """The workload of the data pipeline alone (``dinokit bench --data-only``): no model, precision
    or compilation takes part."""
    views = " + ".join(f"{n}x{s}px" for n, s in view_shapes(cfg))
    return {"batch_size": cfg.batch_size, "views": views, "views_on": cfg.views_on,
            "data": str(resolve_data(cfg.data)), "workers": workers}


def synthetic_views(cfg: TrainConfig, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """One batch of random views with the workload's shapes (``batch_size x 3 x S x S`` each)."""
    g = torch.Generator().manual_seed(seed)
    views = []
    for count, side in view_shapes(cfg):
        views += [torch.randn(cfg.batch_size, 3, side, side, generator=g) for _ in range(count)]
    return [v.to(device) for v in views]


def pipeline_loader(cfg: TrainConfig, workers: int, device: torch.device, transform=None) -> DataLoader:
    """The training data pipeline (decode + multi-crop + collate), shuffled, repeating forever.

    ``transform``: the loader's half of ``view_pipeline(cfg)`` (built from ``cfg`` when not given).
    """
    images = scan_folder(resolve_data(cfg.data))
    if len(images) < cfg.batch_size:
        raise DataError(f"batch_size {cfg.batch_size} is larger than the {len(images)} images of {images.root}")
    transform = transform or view_pipeline(cfg)[0]
    dataset = ImageDataset(images, transform, seed=cfg.seed, min_side=transform.min_source_side)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9,
                                             generator=torch.Generator().manual_seed(cfg.seed))
    return training_loader(cfg, dataset, sampler, cfg.batch_size, workers, device)


def pipeline_batches(batches: int, warmup: int, workers: int) -> tuple[int, int]:
    """(timed, untimed) batches for ``measure_pipeline``: with workers, at least one untimed batch
    per worker (every worker started) and at least 4 times the batches they make ahead
    (``prefetch_factor``) timed, so that those made before the clock started count for a quarter
    at most; a few batches alone would time the workers' start or their head start."""
    if batches < 1 or warmup < 1:
        raise ConfigError("steps and warmup must be at least 1")
    if workers:
        return max(batches, 4 * workers * prefetch_factor(workers)), max(warmup, workers)
    return batches, warmup


def measure_pipeline(cfg: TrainConfig, batches: int, workers: int = 0, warmup: int = 1) -> float:
    """Images per second of the data pipeline alone (each image with all its views), over
    ``batches`` batches after ``warmup`` untimed ones (with workers, at least ``pipeline_batches``).

    ``workers=0`` decodes and crops in this process on one thread: the rate per core.
    """
    batches, warmup = pipeline_batches(batches, warmup, workers)
    loader = pipeline_loader(cfg, workers, torch.device("cpu"))
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    it = iter(loader)
    try:
        for _ in range(warmup):  # worker start, file cache
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * cfg.batch_size / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
        del it


def _batches(cfg: TrainConfig, data: str, workers: int, device: torch.device,
             timer: PhaseTimer) -> Iterator[ReadyBatch]:
    """An endless iterator of ``ReadyBatch``: the step's views on ``device``, made as ``dinokit
    train`` makes them (``ready_batches``: on CUDA with ``overlap_views`` on a side stream while
    the previous step runs) and timed as the ``views`` phase: the copy to the device, and with
    ``views_on=device`` the crops there. Synthetic views are made on the device once."""
    if data == "synthetic":
        views = synthetic_views(cfg, device)
        return ready_batches(itertools.repeat(views), lambda _: views, device, overlap=False)
    transform, finish_views = view_pipeline(cfg)

    def finish(batch) -> list[torch.Tensor]:
        with timer("views"):
            return finish_views(batch.tensors, device)

    return ready_batches(pipeline_loader(cfg, workers, device, transform), finish, device, cfg.overlap_views)


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_step_flops(state, views: list[torch.Tensor], cfg: TrainConfig, autocast) -> float:
    """Model FLOPs of one training step (matmuls, convolutions and attention, forward and
    backward), counted by ``FlopCounterMode`` while running a real step. The CPU's attention
    kernel, which the counter does not know, is counted with its formula for the GPU kernels.

    With ``grad_checkpointing`` the forward recomputed in the backward is not the model's work
    (MFU does not count it), and a step at the run's batch without recomputing would set the
    peak memory that the setting avoids: the steps counted then run without recomputing on 2 and
    on 4 of the images, and the count is extrapolated to the batch (it is affine in the batch
    size: per-image work plus the head's weight normalisation)."""
    if not cfg.grad_checkpointing:
        return _counted_step(state, views, cfg, autocast)
    backbone = state.student.backbone
    backbone.set_grad_checkpointing(False)
    try:
        if cfg.batch_size <= 4:
            return _counted_step(state, views, cfg, autocast)
        two, four = (_counted_step(state, [v[:n] for v in views], cfg, autocast) for n in (2, 4))
        return two + (four - two) / 2 * (cfg.batch_size - 2)
    finally:
        backbone.set_grad_checkpointing(True)


def _counted_step(state, views: list[torch.Tensor], cfg: TrainConfig, autocast) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    })
    with counter:
        train_step(state, views, StepHyperparameters.mid_run(cfg), cfg, state.student, autocast)
    return float(counter.get_total_flops())


def run_bench(cfg: TrainConfig, steps: int = 20, warmup: int = 2, data: str = "pipeline",
              measure_data: bool = True, count_flops: bool = True) -> BenchResult:
    """Time ``steps`` training steps of ``cfg`` after ``warmup`` untimed ones (see the module doc)."""
    if data not in DATA_MODES:
        raise ConfigError(f"data: {data!r} is not one of {', '.join(DATA_MODES)}")
    if steps < 1 or warmup < 1:
        raise ConfigError("steps and warmup must be at least 1")
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    load_before = load_average()
    workers = 0 if data == "synthetic" else training_loader_workers(cfg, device)
    timer = PhaseTimer(device)
    batches = _batches(cfg, data, workers, device, timer)  # first: a bad data folder fails fast
    kept = use_memory_policy(cfg.keep_freed_memory, device)
    torch.manual_seed(cfg.seed)
    state = build_state(cfg, device)
    autocast = autocast_for(device, cfg.precision)
    hp = StepHyperparameters.mid_run(cfg)

    flops = None
    if count_flops:  # one eager step (before any compilation), counted as a warm-up step
        flops = count_step_flops(state, next(batches).views, cfg, autocast)
    state.compile(cfg.compile)

    finite: list[torch.Tensor] = []  # per timed step, on the device: read once at the end
    first_step_s = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            if device.type == "cuda":  # the timed steps' peak, not that of the eager step counted above (under
                torch.cuda.reset_peak_memory_stats(device)  # compile=all) or of compiling in the warm-up
            timer.reset()
            finite.clear()
            start, cpu_start = time.perf_counter(), time.process_time()
        batch = next(batches)  # with overlap_views on CUDA, the next batch's views are queued first
        timer.add("data", batch.data_wait_s)
        t0 = time.perf_counter()
        finite.append(train_step(state, batch.views, hp, cfg, state.student, autocast, timer=timer)["finite"])
        if i == 0:
            synchronize(device)
            first_step_s = time.perf_counter() - t0
    synchronize(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    phases = timer.seconds()
    memory, memory_kind = peak_memory(device)
    matmul = mfu = bf16_speedup = None
    dtype = torch.bfloat16 if device.type == "cuda" else autocast_dtype(device, cfg.precision)
    if flops:
        matmul = matmul_rate(device, dtype)
        mfu = flops * steps / elapsed / matmul
    if device.type == "cpu" and dtype == torch.float32:  # would --precision bf16 pay here?
        bf16_speedup = matmul_rate(device, torch.bfloat16) / (matmul or matmul_rate(device, torch.float32))
    busy = None  # after the matmul rates, which the profiler cannot slow then
    if device.type == "cuda":
        def step() -> None:
            train_step(state, next(batches).views, hp, cfg, state.student, autocast)

        try:  # a diagnostic: a profiler that cannot trace here (CUPTI) leaves it out, not the run
            busy = gpu_busy_seconds(step, min(steps, 5), device) / (elapsed / steps) or None
        except RuntimeError as err:
            print(f"dinokit bench: GPU busy time not measured ({err})", file=sys.stderr)

    per_core = None
    if measure_data:
        per_core = measure_pipeline(cfg, batches=2 if device.type == "cpu" else 4, workers=0)
    return BenchResult(
        machine=describe_machine(device),
        workload={**describe_workload(cfg, data, device, workers), "keep_freed_memory": kept},
        steps=steps,
        images_per_s=steps * cfg.batch_size / elapsed,
        step_ms=1000 * elapsed / steps,
        cpu_ms=1000 * cpu / steps,
        phases_ms={name: 1000 * phases.get(name, 0.0) / steps for name in PHASES},
        peak_memory_mib=memory,
        memory_kind=memory_kind,
        first_step_s=first_step_s,
        skipped_steps=int(len(finite) - torch.stack(finite).sum().item()),
        flops_per_step=flops,
        matmul_tflops=matmul / 1e12 if matmul else None,
        mfu=mfu,
        bf16_matmul_speedup=bf16_speedup,
        gpu_busy=busy,
        data_images_per_s_per_core=per_core,
        load_average=(load_before, load_average()),
    )


# --- reporting -------------------------------------------------------------------------------

def results_path(results_dir: str | Path, machine: dict, day: date | None = None) -> Path:
    """``<results_dir>/<machine>-<YYYY-MM-DD>.json``."""
    return Path(results_dir) / f"{machine_slug(machine)}-{(day or date.today()).isoformat()}.json"


def save_result(record: dict, results_dir: str | Path) -> Path:
    """Append ``record`` (with ``machine``) to the day's results file of its machine; returns its
    absolute path (a relative ``results_dir`` is under the working directory).

    The file holds ``{"machine": ..., "runs": [...]}``; each run keeps its own ``machine`` too.
    """
    path = results_path(Path(results_dir).absolute(), record["machine"])
    content = {"machine": record["machine"], "runs": []}
    if path.exists():
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err}); move it away to start a new file") from None
    content["runs"].append({"date": date.today().isoformat(), **record})
    return write_text_atomically(path, json.dumps(content, indent=1))


def format_result(result: BenchResult) -> str:
    """The human-readable report that ``dinokit bench`` prints."""
    w, m = result.workload, result.machine
    device = m.get("gpu", f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} threads)")
    compiled = "" if w["compile"] == "off" else f", compiled ({w['compile']})"
    compiled += ", recomputing activations" if w.get("grad_checkpointing") else ""
    lines = [
        f"dinokit bench: {w['arch']}/{w['patch_size']}, batch {w['batch_size']}, views {w['views']}, "
        f"K={w['out_dim']}, {w['precision']}{compiled}, data: {w['data']} "
        f"({w['workers']} workers)",
        f"device: {device}; torch {m['torch']}",
        f"  images/s           {result.images_per_s:10.1f}   (source images, each with all its views)",
        f"  step               {result.step_ms:10.1f} ms  (first step {result.first_step_s:.1f} s; process CPU time "
        f"{result.cpu_ms / result.step_ms:.2f} x wall time with {m['torch_threads']} threads)",
    ]
    for name in PHASES:
        ms = result.phases_ms[name]
        side = name == "views" and w.get("overlap_views")
        lines.append(f"    {name:<16} {ms:10.1f} ms  {100 * ms / result.step_ms:5.1f}%"
                     f"{'  (on a side stream, while the step before runs)' if side else ''}")
    kind = "peak RSS" if result.memory_kind == "peak_rss" else "peak CUDA memory allocated"
    if result.memory_kind == "peak_rss":
        kind += "; freed memory kept for the next step" if w.get("keep_freed_memory") else "; freed memory returned"
    lines.append(f"  memory             {result.peak_memory_mib:10.0f} MiB ({kind})")
    if result.mfu is not None:
        lines.append(f"  model FLOPs        {result.flops_per_step / 1e9:10.1f} GFLOP/step; MFU {100 * result.mfu:.1f}% "
                     f"of the measured {w['precision'] if m.get('gpu') is None else 'bf16'} matmul rate "
                     f"({result.matmul_tflops:.2f} TFLOP/s)")
    if result.gpu_busy is not None:
        lines.append(f"  GPU busy           {100 * result.gpu_busy:10.1f} % of the step (the rest it waited for the "
                     "host: Python's dispatch, or the data)")
    if result.data_images_per_s_per_core is not None:
        cores_needed = result.images_per_s / result.data_images_per_s_per_core
        lines.append(f"  data pipeline      {result.data_images_per_s_per_core:10.1f} images/s per core "
                     f"(decode + multi-crop); this step needs {cores_needed:.2f} cores to be fed")
    if result.load_average and result.load_average[0] is not None:
        busy = max(result.load_average) > m["cores"] + 0.5
        lines.append(f"  load average       {result.load_average[0]:6.1f} -> {result.load_average[1]:.1f} on {m['cores']} "
                     f"cores{': other programs shared the cores, the figures are low' if busy else ''}")
    if (result.bf16_matmul_speedup or 0) > BF16_HINT_SPEEDUP:
        lines.append(f"  hint: this CPU multiplies bf16 {result.bf16_matmul_speedup:.1f}x as fast as fp32 (measured); "
                     "--precision bf16 may pay")
    views_share = result.phases_ms["views"] / result.step_ms
    if m.get("gpu") and w["data"] != "synthetic" and not w.get("overlap_views") and views_share > VIEWS_HINT_SHARE:
        lines.append(f"  hint: the views take {100 * views_share:.0f}% of the step on the GPU; overlap_views=true makes "
                     "the next batch's views during the step, on a side stream")
    if result.skipped_steps:
        lines.append(f"  warning: {result.skipped_steps} steps skipped (non-finite loss or gradient)")
    return "\n".join(lines)
