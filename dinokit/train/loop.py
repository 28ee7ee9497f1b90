"""DINO pretraining: ``train(cfg)`` from an image folder to a run folder.

A run folder holds ``config.yaml``, ``checkpoint.pth`` (latest, atomic), ``metrics.jsonl``,
``knn.json`` and ``tensorboard/``. Running ``train`` again with the same ``out`` resumes from
the latest checkpoint, exactly: the data order and every view depend only on
``(seed, epoch, image)``, the drop-path randomness only on ``(seed, rank, step)``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from dinokit.config import ConfigError, TrainConfig
from dinokit.data.datasets import ImageDataset, collate_views, StopSignalsToMain, prefetch_factor, sample_seed
from dinokit.data.folders import DataError, hold_out, scan_folder, why_none_held_out
from dinokit.data.public import resolve_data
from dinokit.data.sampler import TrainingSampler
from dinokit.data.device_views import view_pipeline
from dinokit.data.prefetch import ready_batches
from dinokit.method.loss import DINOLoss
from dinokit.method.schedules import Schedules, StepHyperparameters
from dinokit.method.teacher import make_teacher, update_teacher
from dinokit.models.backbones import build_backbone, enable_grad_checkpointing
from dinokit.models.head import DINOHead
from dinokit.models.multicrop import MultiCropModel
from dinokit.train.checkpoint import LATEST, SHARDED, keep_checkpoint, load_checkpoint, resume_hint, save_checkpoint
from dinokit.train.devices import autocast_for, cpu_has_amx, default_loader_workers, resolve_device
from dinokit.train.distributed import (DistEnv, any_process, check_agreement, init_distributed,
                                       leaders_first, sum_over_processes, lost_peer, lost_peer_error,
                                       mean_over_processes, shutdown_distributed, sync_batch_norm)
from dinokit.train.fsdp import (full_state_dict, gathered_copy, is_sharded, latest_sharded, load_sharded,
                                read_sharded_record, require_tested_torch, save_sharded, shard)
from dinokit.train.host_memory import KeepFreedMemoryInWorkers, use_memory_policy
from dinokit.train.init_weights import init_training_state
from dinokit.train.knn_monitor import KnnMonitor
from dinokit.train.monitor import Monitor, StallWatch
from dinokit.train.optim import build_optimizer, clip_gradients, set_hyperparameters, step_if_finite
from dinokit.train.run_folder import hold_run_folder


class TrainingError(RuntimeError):
    """A run that cannot go on (collapse into NaNs, too many unreadable images, ...)."""


@dataclass
class RunResult:
    out: Path
    steps: int
    interrupted: bool = False  # stopped by a signal, after saving a checkpoint
    knn: dict = field(default_factory=dict)  # by evaluation name ('final'), then by k: {'top1': %, 'top5': %}
    main: bool = True  # False on the other processes of a distributed run (the main one reports)
    stop_signal: int | None = None  # the signal that stopped it (SIGINT, SIGTERM)


@dataclass
class DINOState:
    """Everything a step changes: networks, optimizer, centre (in ``loss``) and the step count."""

    student: MultiCropModel
    teacher: MultiCropModel
    loss: DINOLoss
    optimizer: torch.optim.Optimizer
    step: int = 0

    def state_dict(self, cfg: TrainConfig, steps_per_epoch: int, images: dict[str, str]) -> dict:
        """The official DINO layout (plus ``step``, and ``images``: the fingerprints of the run's
        training and held-out images). Sharded (FSDP) networks are gathered onto the main process
        (a collective); under ``strategy=fsdp`` the optimizer is left out (it is in ``checkpoint.dcp``),
        on one process too."""
        return {
            "student": {f"module.{k}": v for k, v in full_state_dict(self.student).items()},
            "teacher": full_state_dict(self.teacher),
            "optimizer": None if cfg.strategy == "fsdp" else self.optimizer.state_dict(),
            "dino_loss": self.loss.state_dict(),
            "epoch": self.step // steps_per_epoch,
            "step": self.step,
            "args": cfg.to_dict(),
            "images": images,
            "fp16_scaler": None,
        }

    def compile(self, parts: Literal["off", "loss", "all"]) -> None:
        """``torch.compile`` in place, for the steps that follow (``cfg.compile``). ``parts``:
        ``off`` (nothing), ``loss`` (its K-wide softmax, cross-entropy and their backward fused
        into a few passes over the logits; seconds to compile), ``all``: also the backbones (one
        graph per view resolution) and the heads."""
        if parts == "off":
            return
        if parts == "all":
            for model in (self.student, self.teacher):
                model.backbone.compile()
                model.head.compile()
        self.loss.compile()

    def load_state_dict(self, ckpt: dict) -> None:
        """Everything ``state_dict`` saved. The optimizer keeps the kernels chosen for this machine
        (fused or multi-tensor: a checkpoint of a CPU run resumed on a GPU, or the reverse), not
        those of the machine that saved it, which ``Optimizer.load_state_dict`` would restore."""
        self.student.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["student"].items()})
        self.teacher.load_state_dict(ckpt["teacher"])
        saved, ours = ckpt["optimizer"], self.optimizer.param_groups
        if len(saved["param_groups"]) == len(ours):  # else load_state_dict says that the groups differ
            saved = {**saved, "param_groups": [{**group, "fused": mine.get("fused"), "foreach": mine.get("foreach")}
                                               for group, mine in zip(saved["param_groups"], ours)]}
        self.optimizer.load_state_dict(saved)
        self.loss.load_state_dict(ckpt["dino_loss"])
        self.step = int(ckpt["step"])


def build_state(cfg: TrainConfig, device: torch.device) -> DINOState:
    """Student, EMA teacher, loss and optimizer of a fresh run (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.arch, cfg.patch_size, cfg.global_crops_size, cfg.drop_path_rate)
    if cfg.grad_checkpointing:
        try:
            enable_grad_checkpointing(backbone, cfg.arch)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    head = DINOHead(backbone.num_features, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                    cfg.head_layers, cfg.norm_last_layer)
    student = MultiCropModel(backbone, head).to(device)
    if dist.is_initialized() and device.type == "cuda":  # batch norm over the global batch (ViTs have none)
        student = sync_batch_norm(student, cfg.arch)
    teacher = make_teacher(student)
    return DINOState(student, teacher, DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum).to(device),
                     build_optimizer(student, device))


def train_step(state: DINOState, views: list[torch.Tensor], hp: StepHyperparameters, cfg: TrainConfig,
               student: nn.Module, autocast, timer=None) -> dict[str, torch.Tensor]:
    """One DINO step on a batch of views (``views[:2]`` global). Returns the step's metrics as
    0-d tensors, among them ``finite``: 0 when the loss or a gradient was not finite, and then
    nothing was updated (optimizer, teacher, centre).

    Nothing here waits for the device: the skip is decided there (the fused AdamW's
    ``found_inf``, a masked EMA and centre update), except with an unfused optimizer (FSDP
    shards, PyTorch before 2.4 on a CPU), which asks the host.

    ``student`` is ``state.student`` or its DDP wrapper. ``timer(phase)``, when given, returns a
    context manager that times each phase of the step (``dinokit bench``).
    """
    phase = timer or (lambda name: contextlib.nullcontext())
    set_hyperparameters(state.optimizer, hp.lr, hp.weight_decay)
    with autocast:
        with phase("teacher_forward"), torch.no_grad():
            teacher_logits = state.teacher(views[:2])
        with phase("student_forward"):
            student_logits = student(views)
    with phase("loss"):
        loss, stats = state.loss(student_logits, teacher_logits, hp.teacher_temp)

    with phase("backward"):
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with phase("optimizer"):
        params = [p for p in state.student.parameters() if p.requires_grad]
        grad_norms = clip_gradients(params, cfg.clip_grad)
        finite = (torch.isfinite(loss) & torch.isfinite(grad_norms).all()).float()
        if hp.freeze_last_layer:
            for p in state.student.head.last_layer.parameters():
                p.grad = None
        stepped = step_if_finite(state.optimizer, finite)
    with phase("ema"):
        update_teacher(state.teacher, state.student, hp.momentum, apply=stepped)
    with phase("centre"):
        state.loss.update_center(teacher_logits, apply=stepped)
    return {"loss": loss.detach(), **stats, "finite": finite}


class _SkippedSteps:
    """The steps skipped for a non-finite loss or gradient. Each step's ``finite`` flag stays on
    the device; ``check()`` (every ``log_every`` steps and before a checkpoint, on every process)
    reads them at once, warns about each skipped step and stops the run after ``limit`` in a row."""

    def __init__(self, limit: int, write, checkpoint_path: Path) -> None:
        self.limit, self.write, self.checkpoint_path = limit, write, checkpoint_path
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.in_a_row = 0

    def record(self, step: int, finite: torch.Tensor) -> None:
        self.pending.append((step, finite))

    def check(self) -> None:
        if not self.pending:
            return
        flags = torch.stack([finite for _, finite in self.pending]).tolist()
        steps = [step for step, _ in self.pending]
        self.pending.clear()
        for step, finite in zip(steps, flags):
            if finite:
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            self.write(f"warning: step {step} skipped (non-finite loss or gradient)")
            if self.in_a_row >= self.limit:
                saved = (f"the last checkpoint ({self.checkpoint_path}) holds finite weights" if
                         self.checkpoint_path.exists() else "no checkpoint was written yet")
                raise TrainingError(
                    f"{self.in_a_row} steps in a row had a non-finite loss or gradient; {saved}. Likely causes: lr "
                    "too high for the batch size, a teacher temperature too low, corrupted images")


class _UnreadableImages:
    """The images that could not be read: each named in a warning; the run stops when the data
    yields nothing readable (``UNREADABLE_IN_A_ROW`` images in a row) and, at the end of an epoch,
    when more than ``max_bad_fraction`` of the epoch's images failed (counted over all processes)."""

    def __init__(self, cfg: TrainConfig, monitor: Monitor, world_size: int) -> None:
        self.cfg, self.monitor, self.world_size = cfg, monitor, world_size
        self.failed_in_epoch = self.seen_in_epoch = self.in_a_row = 0

    def count(self, batch) -> None:
        """A batch's failed files (``batch.failed``), each warned about, and its readable images."""
        for path in batch.failed:
            self.monitor.write(f"warning: skipped unreadable image {path}")
        self.failed_in_epoch += len(batch.failed)
        self.seen_in_epoch += len(batch) + len(batch.failed)

    def step_skipped(self, step: int, empty_processes: int) -> None:
        """``empty_processes``: how many processes had no readable image in this step's batch
        (0: the step runs). ``TrainingError`` once the data has yielded nothing readable for long."""
        if not empty_processes:
            self.in_a_row = 0
            return
        self.monitor.write(f"warning: step {step} skipped (no readable image in a batch)")
        self.in_a_row = self.in_a_row + self.cfg.batch_size if empty_processes == self.world_size else 0
        if self.in_a_row >= max(UNREADABLE_IN_A_ROW, 2 * self.cfg.batch_size):
            raise TrainingError(f"the last {self.in_a_row} images of the data could not be read, not one of them "
                                "(the warnings above name them); check the data folder")

    def end_epoch(self, epoch: int, step: int) -> str | None:
        """Logs the epoch's count (a collective) and starts the next; returns why the run must stop
        when more than ``max_bad_fraction`` of the epoch's images failed, else None."""
        failed, seen = sum_over_processes([self.failed_in_epoch, self.seen_in_epoch])
        self.failed_in_epoch = self.seen_in_epoch = 0
        if not failed:
            return None
        self.monitor.event("bad_images", {"epoch": epoch, "failed": failed, "seen": seen}, step)
        self.monitor.write(f"epoch {epoch}: {failed} of {seen} images could not be read")
        if failed > self.cfg.max_bad_fraction * seen:
            return (f"{failed} of {seen} images failed to load in epoch {epoch}, more than "
                    f"max_bad_fraction={self.cfg.max_bad_fraction}")
        return None


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag checked between steps (restored on exit)."""

    def __init__(self, announce: bool = True) -> None:
        self.received: int | None = None
        self.previous = {}
        self.announce = announce  # say what happens (the main process of a distributed run)

    def __enter__(self) -> "_StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second Ctrl-C: give up at once
            self._say("stopping now, without saving; the last checkpoint is intact")
            raise KeyboardInterrupt
        self.received = signum
        self._say(f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint (Ctrl-C again: "
                  "stop now, losing the steps since the last checkpoint)")

    def _say(self, text: str) -> None:
        if self.announce:
            print(f"\ndinokit: {text}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def training_loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """Loader processes of this training process: ``cfg.num_workers``, or from its share of the
    node's cores (``default_loader_workers``): all but one on a GPU; half of them on a CPU, where
    the step needs the others."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return default_loader_workers(device, on_cpu="half")


def loader_worker_init(cfg: TrainConfig):
    """The training loader's ``worker_init_fn``: signals to the main process alone, and with
    ``keep_freed_memory`` the worker's freed memory kept for its next image (GPU runs too)."""
    return KeepFreedMemoryInWorkers(StopSignalsToMain()) if cfg.keep_freed_memory else StopSignalsToMain()


def training_loader(cfg: TrainConfig, dataset: ImageDataset, sampler, batch_size: int, workers: int,
                    device: torch.device) -> DataLoader:
    """The training data loader (``dinokit train``'s and ``dinokit bench``'s): ``workers`` processes
    (``loader_worker_init``) making ``prefetch_factor(workers)`` batches ahead each, ``collate_views``
    batches of ``batch_size`` images in the order of ``sampler``, pinned for a GPU."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_views,
                      pin_memory=device.type == "cuda", worker_init_fn=loader_worker_init(cfg),
                      prefetch_factor=prefetch_factor(workers))


def _data_bound_hint(cfg: TrainConfig, device: torch.device, workers: int) -> str:
    """What to try when the step waits for the data loader."""
    tries = [f"more loader workers (num_workers={workers} now)"]
    if device.type == "cuda" and cfg.views_on == "host":
        tries.append("views_on=device (crops and colours on the GPU, the workers only decode: several times the "
                     "images/s per core)")
    return f"try {' or '.join(tries)}; `dinokit bench --data-only` measures the pipeline"


#: Images in a row (and at least two whole steps), every one unreadable, that stop a run before the
#: end of its epoch, where ``max_bad_fraction`` is checked: a folder of files that are not images.
UNREADABLE_IN_A_ROW = 32

#: Settings a run keeps from its start (the networks' shapes, the views' sizes and number, the data
#: order, the schedules' length): resuming with another value is refused.
FIXED_SETTINGS = ("arch", "patch_size", "out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers",
                  "norm_last_layer", "global_crops_size", "local_crops_size", "local_crops_number", "batch_size",
                  "epochs", "seed", "strategy")
#: What resuming reads from a checkpoint.pth (``DINOState.load_state_dict``).
TRAINING_STATE = ("student", "teacher", "optimizer", "dino_loss", "step")
#: Settings of how or where a run is carried out, not of what it learns: not reported when changed on resuming.
RUNTIME_SETTINGS = ("out", "data", "init", "device", "num_workers", "compile", "grad_checkpointing",
                    "keep_freed_memory", "overlap_views", "log_every", "eval_batch_size", "report",
                    "checkpoint_every_steps", "keep_checkpoints")


def check_resumable(saved: dict, cfg: TrainConfig, images: dict[str, str], path: Path) -> list[str]:
    """Whether the run saved at ``path`` can go on as ``cfg`` asks, on the ``images`` (fingerprints
    of the training and held-out images). ``saved``: the checkpoint's record, its config ``args``
    and its ``images`` (absent from checkpoints written before they were saved). Raises
    ``TrainingError`` for a changed fixed setting or other images; returns the other settings
    that changed (not the runtime ones), as ``"key old -> new"``, for the resume message."""
    args, new = saved.get("args", {}), cfg.to_dict()
    start_anew = f"pick another --out to start a new run (add --init {path} to start it from these weights)"
    for key in FIXED_SETTINGS:
        if key in args and args[key] != new[key]:
            raise TrainingError(f"{path} was trained with {key}={args[key]!r}, but this run asks for {new[key]!r}; "
                                f"{start_anew}")
    for what, now in images.items():
        before = saved.get("images", {}).get(what)
        if before is not None and before != now:
            raise TrainingError(f"{path} was trained with {what} ({before}), but the data now gives {now} (another "
                                f"folder, images added or removed, or another val_fraction); {start_anew}")
    return [f"{key} {args[key]!r} -> {new[key]!r}" for key in new
            if key in args and args[key] != new[key] and key not in RUNTIME_SETTINGS]


def _start_or_resume(state: DINOState, cfg: TrainConfig, env: DistEnv, device: torch.device,
                     images: dict[str, str]) -> None:
    """Fill ``state`` for this run: from the run folder's latest checkpoint when it has one (refused
    when it is not a training checkpoint or ``check_resumable`` says no), else from ``cfg.init``'s
    weights when given; under FSDP on several processes the networks are sharded in between (the
    weights of ``init`` go in whole, a resume's sharded checkpoint loads into the shards)."""
    out = Path(cfg.out)
    ckpt_path = out / LATEST
    if cfg.strategy == "fsdp":
        require_tested_torch()
    sharded_path = latest_sharded(out / SHARDED) if cfg.strategy == "fsdp" else None
    resume_from = sharded_path or (ckpt_path if ckpt_path.exists() else None)
    check_agreement(env, {"config": cfg.to_dict(), **images, "checkpoint found": str(resume_from)})
    if resume_from is None and cfg.init:
        for line in init_training_state(state, cfg.init):
            if env.is_main:
                print(line)
    if cfg.strategy == "fsdp" and env.distributed:
        shard(state.student, state.teacher, device)
        state.optimizer = build_optimizer(state.student, device)
    if resume_from is not None:
        ckpt = read_sharded_record(resume_from) if sharded_path else load_checkpoint(resume_from)
        if not sharded_path and (missing := [k for k in TRAINING_STATE if k not in ckpt]):
            raise TrainingError(f"{resume_from} is not a dinokit training checkpoint (it has no {', '.join(missing)}); "
                                f"pick another --out, and add --init {resume_from} to start from its weights")
        changed = check_resumable(ckpt, cfg, images, resume_from)
        if sharded_path:
            load_sharded(resume_from, state)
        else:
            state.load_state_dict(ckpt)
        del ckpt
        if env.is_main:
            print(f"dinokit: resuming {resume_from} at step {state.step}"
                  + (f"; settings changed since: {', '.join(changed)}" if changed else ""))


def train(cfg: TrainConfig) -> RunResult:
    """Pretrain with DINO as ``cfg`` says; resume from ``cfg.out`` when it holds a checkpoint."""
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    env = init_distributed(device)
    try:
        with hold_run_folder(Path(cfg.out), owner=env.is_main):
            return _train(cfg, device, env)
    except RuntimeError as err:
        if env.distributed and lost_peer(err):
            raise lost_peer_error(err, env, cfg.out) from None
        if re.search(r"DataLoader worker \(pid.*\) is killed", str(err)):  # by the out-of-memory killer, mostly
            raise TrainingError(f"a data loader worker was killed ({str(err).splitlines()[0]}): out of memory? "
                                f"Fewer num_workers need less. {resume_hint(cfg.out)}") from None
        raise
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):  # the logs (metrics.jsonl, TensorBoard); checkpoints say it
            raise TrainingError(f"no space left to write {err.filename or 'the logs'}: free space in {cfg.out}. "
                                f"{resume_hint(cfg.out)}") from None
        raise
    finally:
        shutdown_distributed()


def _train(cfg: TrainConfig, device: torch.device, env: DistEnv) -> RunResult:
    out = Path(cfg.out)
    with leaders_first(env):  # the first process of each node fills a data cache, the others read it
        train_images, val_images = hold_out(scan_folder(resolve_data(cfg.data), skip=cfg.out), cfg.val_fraction,
                                            cfg.seed)
    if cfg.batch_size % env.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} (the global batch) does not split evenly over "
                          f"{env.world_size} processes; use a multiple of {env.world_size}")
    if len(train_images) < cfg.batch_size:
        raise DataError(f"batch_size {cfg.batch_size} is larger than the {len(train_images)} training images; "
                        f"lower batch_size")
    images = {"training images": train_images.fingerprint(),
              "held-out images": val_images.fingerprint() if val_images is not None else "none"}
    use_memory_policy(cfg.keep_freed_memory, device)
    state = build_state(cfg, device)
    ckpt_path = out / LATEST
    _start_or_resume(state, cfg, env, device, images)
    if env.is_main:
        cfg.to_yaml(out / "config.yaml")
    steps_per_epoch = len(train_images) // cfg.batch_size
    schedules = Schedules.from_config(cfg, steps_per_epoch)
    sampler = TrainingSampler(len(train_images), cfg.batch_size, schedules.total_steps, cfg.seed, env.rank,
                              env.world_size, start_step=state.step)
    transform, finish_views = view_pipeline(cfg)  # on the host, or decode there and crop on the device
    dataset = ImageDataset(train_images, transform, seed=cfg.seed, min_side=transform.min_source_side)
    workers = training_loader_workers(cfg, device)
    loader = training_loader(cfg, dataset, sampler, sampler.local_batch, workers, device)
    student: nn.Module = state.student
    if env.distributed and not is_sharded(state.student):
        student = nn.parallel.DistributedDataParallel(state.student, device_ids=[device.index] if device.type == "cuda" else None)
    state.compile(cfg.compile)
    autocast = autocast_for(device, cfg.precision)

    monitor = Monitor(out, schedules.total_steps, state.step, cfg.batch_size, enabled=env.is_main,
                      data_bound_hint=_data_bound_hint(cfg, device, workers))
    knn = KnnMonitor(cfg, train_images, val_images, out, device)
    why_not = why_none_held_out(train_images, cfg.val_fraction) or "too few images per class to hold any out"
    held_out = f"{len(val_images)} held out for k-NN" if val_images else f"no k-NN ({why_not})"
    model = f"{cfg.arch}/{cfg.patch_size}" if cfg.arch.startswith("vit") else cfg.arch
    monitor.write(f"dinokit: {len(train_images)} training images from {train_images.root}, {held_out}; {model} "
                  f"on {device} x {env.world_size} ({cfg.strategy if env.distributed else 'one process'}); "
                  f"{steps_per_epoch} steps/epoch x {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}")
    if device.type == "cpu" and cfg.precision == "auto" and cpu_has_amx():
        monitor.write("hint: this CPU has AMX: precision=bf16 (bf16 autocast) may train faster (a step 1.5-2x as fast "
                      "as in fp32 on such CPUs); `dinokit bench --precision bf16` measures it here")

    def knn_backbone() -> nn.Module:  # under FSDP a gathered copy, so each process can run its share
        return gathered_copy(state.teacher.backbone,
                             lambda: build_backbone(cfg.arch, cfg.patch_size, cfg.global_crops_size).to(device))

    if env.is_main and cfg.report and state.step == 0:
        from dinokit.viz.views import save_views_grid

        save_views_grid(cfg, train_images, out / "views.png")
    knn.baselines(knn_backbone, monitor, state.step, env)
    if state.step % steps_per_epoch == 0 and (name := knn.due(state.step // steps_per_epoch, cfg.epochs)):
        knn.run(name, knn_backbone(), monitor, state.step, env)  # the last attempt stopped before making it

    skipped = _SkippedSteps(cfg.max_nonfinite_steps, monitor.write, ckpt_path)
    unreadable = _UnreadableImages(cfg, monitor, env.world_size)

    def checkpoint(tag: str | None = None) -> None:
        skipped.check()  # a run that only skips steps stops before saving
        monitor.flush()
        keep = out / f"checkpoint_{tag}" if tag and cfg.keep_checkpoints else None
        if cfg.strategy == "fsdp":  # every process writes its shards; loads on any number of processes
            save_sharded(out / SHARDED, state, {"args": cfg.to_dict(), "images": images},
                         copy_to=keep and keep.with_suffix(".dcp"))
        payload = state.state_dict(cfg, steps_per_epoch, images)  # a collective when sharded
        if not env.is_main:
            return
        save_checkpoint(payload, ckpt_path)
        if keep:
            keep_checkpoint(ckpt_path, keep.with_suffix(".pth"))
            for suffix in (".pth", ".dcp"):
                for old in sorted(out.glob(f"checkpoint_epoch*{suffix}"))[:-cfg.keep_checkpoints]:
                    shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)

    interrupted = False
    ready = ready_batches(loader, lambda batch: finish_views(batch.tensors, device) if len(batch) else None,
                          device, cfg.overlap_views)
    with (_StopSignal(announce=env.is_main) as stop, StallWatch(monitor.write) as stall,
          contextlib.closing(ready),  # closed: the loader's workers end
          contextlib.closing(monitor.bar)):  # closed: an error's message starts on a line of its own
        for batch, views, data_wait in ready:
            stall.tick()
            step = state.step
            epoch = step // steps_per_epoch
            unreadable.count(batch)
            hp = schedules.at(step)
            torch.manual_seed(sample_seed(cfg.seed, 1_000_003 + env.rank, step))  # drop path
            empty = sum_over_processes([int(not len(batch))])[0]  # processes without a readable image
            unreadable.step_skipped(step, empty)
            if not empty:  # all processes step, or none (DDP would hang)
                metrics = train_step(state, views, hp, cfg, student, autocast)
                skipped.record(step, metrics["finite"])
                monitor.step(step, epoch, {**mean_over_processes(metrics), **hp.as_dict()}, data_wait)
            state.step += 1
            if state.step % cfg.log_every == 0:
                skipped.check()
                monitor.flush()

            end_of_epoch = state.step % steps_per_epoch == 0
            if end_of_epoch:
                if too_many := unreadable.end_epoch(epoch, step):
                    checkpoint()  # the epoch's steps on the images that could be read are kept
                    raise TrainingError(f"{too_many}; check the data folder. {resume_hint(cfg.out)}")
                checkpoint(f"epoch{epoch + 1:04d}")
                if name := knn.due(epoch + 1, cfg.epochs):
                    knn.run(name, knn_backbone(), monitor, state.step, env)
            elif cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                checkpoint()
            if any_process(stop.received is not None):  # all processes stop at the same step
                interrupted = True
                if not end_of_epoch:
                    checkpoint()
                break
            stall.tick()  # k-NN and checkpoints above are not waiting for data

    skipped.check()
    if not interrupted:
        knn.final(knn_backbone, monitor, state.step, env)
    monitor.close()
    if env.is_main and cfg.report and not interrupted:
        from dinokit.viz.report import write_report

        print(f"dinokit: report {write_report(out)}")
    if env.distributed:
        dist.barrier()
    return RunResult(out, state.step, interrupted, knn.scores(), env.is_main,
                     (stop.received or signal.SIGTERM) if interrupted else None)
