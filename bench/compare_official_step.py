"""Check dinokit's training step against the official DINO code's: the same weights after N steps.

    python bench/compare_official_step.py /tmp/dino [--steps 5] [--threads 2] [--results DIR | --no-save]

``/tmp/dino`` is a checkout of github.com/facebookresearch/dino, imported from there at run time
(``bench/compare_official.py``'s ``import_official``; nothing of it is copied into dinokit).

From the same initial weights (the official student's, loaded into both codes' student and
teacher) and the same views at every step (seeded random tensors: the step alone, without the
data pipeline), the script runs ``--steps`` training steps of

* the official code: its ``vision_transformer`` ViT and ``DINOHead`` in ``utils.MultiCropWrapper``,
  ``main_dino.DINOLoss``, AdamW over ``utils.get_params_groups``, ``utils.clip_gradients``,
  ``utils.cancel_gradients_last_layer`` and the EMA of the teacher, in the order of
  ``main_dino.train_one_epoch`` (one process, fp32, no DDP, no gradient scaler);
* dinokit: ``build_state`` and ``train_step`` (``dinokit/train/loop.py``), as ``dinokit train``
  runs them.

Both take every step's lr, weight decay, teacher momentum, teacher temperature and whether the
last layer is frozen from dinokit's ``Schedules`` (the official schedules differ from it by one
step, and its temperature is stepped per epoch: README, "Schedules"), so that only the step's
mechanics are compared. The official ``DINOLoss`` reads its temperature from
``teacher_temp_schedule[epoch]``; it is given the steps' temperatures, indexed by step. Drop path
is 0, so no random draw differs. Two cases, each from the same initial weights: ``frozen`` (the
first epoch's steps: lr warm-up, the last layer frozen) and ``trained`` (the second epoch's: the
last layer trained). ``--clip-grad`` is 1.0, below the recipe's 3.0, so that some gradients
are clipped at this size.

The two codes' ViTs interpolate their position embeddings differently for the local views
(README, "Against the official code"), which changes the forward pass, not the step. dinokit is
therefore run twice: as it is, and with the official interpolation (the official
``VisionTransformer.interpolate_pos_encoding`` on dinokit's own ``pos_embed``), which compares
the step alone.

Compared, per step: the loss, and the gradients the optimizer was given (after clipping and
cancelling); after the last step: the student's and teacher's weights and the loss centre, as
the largest absolute difference, relative (L2 norm of the difference over the L2 norm of all
tensors together) and relative to the steps' change (``rel_upd``: of the difference over that of
the weights' change since the start: how much of what training did disagrees). For scale, the
official code is also run in float64: official fp32 against official fp64 is what float32
rounding alone does to the official code. Prints the tables and appends them, with the machine,
to ``<results>/<machine>-<date>.json`` (``--results``, default ``bench/results``; ``--no-save``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from compare_official import import_official  # bench/compare_official.py
from peers import require_official_clone  # bench/peers.py

from dinokit.config import TrainConfig
from dinokit.method.schedules import Schedules
from dinokit.train.bench import describe_machine, save_result
from dinokit.train.loop import build_state, train_step

CASES = {"frozen": 0, "trained": 1}  # case: the epoch whose steps it runs (freeze_last_layer = 1 epoch)

State = dict[str, torch.Tensor]
Official = tuple[ModuleType, ModuleType, ModuleType]  # its vision_transformer, utils and main_dino


@dataclass
class Run:
    """What one implementation's steps left: per step the loss and the gradients the optimizer was
    given (after clipping and cancelling; official key names), at the end the weights and centre."""

    losses: list[float] = field(default_factory=list)
    grads: list[State] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)  # tensors whose gradient was clipped (official runs)
    student: State = field(default_factory=dict)
    teacher: State = field(default_factory=dict)
    center: torch.Tensor | None = None


def config(args: argparse.Namespace) -> TrainConfig:
    """dinokit's settings of the workload; its schedules give both codes their per-step values.
    Epochs of ``--steps`` steps, ``--epochs`` of them; the lr reaches ``--peak-lr`` after the first
    epoch's warm-up; the teacher temperature warms up over two epochs."""
    return TrainConfig.build({
        "arch": args.arch, "patch_size": args.patch_size, "global_crops_size": args.global_size,
        "local_crops_size": args.local_size, "local_crops_number": args.local_crops, "out_dim": args.out_dim,
        "batch_size": args.batch_size, "device": "cpu", "precision": "fp32", "drop_path_rate": 0.0,
        "epochs": args.epochs, "lr": args.peak_lr * 256 / args.batch_size, "warmup_epochs": 1,
        "warmup_teacher_temp_epochs": 2, "freeze_last_layer": 1, "clip_grad": args.clip_grad, "seed": args.seed,
    })


def views_at(step: int, cfg: TrainConfig, seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The views of ``step``: 2 global and ``local_crops_number`` local ones, seeded by (seed, step),
    drawn in float64 so that the float32 and float64 runs see the same values (up to rounding)."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    sizes = [cfg.global_crops_size] * 2 + [cfg.local_crops_size] * cfg.local_crops_number
    return [torch.randn(cfg.batch_size, 3, s, s, generator=g, dtype=torch.float64).to(dtype) for s in sizes]


def official_networks(official: Official, cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """The official student and teacher of ``main_dino.train_dino`` (drop path 0 in both)."""
    vits, utils, _ = official

    def network(norm_last_layer: bool) -> nn.Module:
        backbone = getattr(vits, cfg.arch)(patch_size=cfg.patch_size, img_size=[cfg.global_crops_size],
                                           drop_path_rate=0.0)
        return utils.MultiCropWrapper(backbone, vits.DINOHead(backbone.embed_dim, cfg.out_dim, use_bn=False,
                                                              norm_last_layer=norm_last_layer))

    return network(cfg.norm_last_layer), network(True)


def snapshot(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def gradients(model: nn.Module) -> State:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def run_official(official: Official, cfg: TrainConfig, init: State, steps: list[int], schedules: Schedules, seed: int,
                 dtype: torch.dtype) -> Run:
    """The official code's steps, as ``main_dino.train_one_epoch`` runs them on one process."""
    _, utils, main_dino = official
    student, teacher = official_networks(official, cfg)
    student.load_state_dict(init)
    teacher.load_state_dict(init)
    for p in teacher.parameters():
        p.requires_grad = False
    student, teacher = student.to(dtype), teacher.to(dtype)
    dino_loss = main_dino.DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.warmup_teacher_temp,
                                   cfg.teacher_temp, 1, 1, cfg.student_temp, cfg.center_momentum).to(dtype)
    # its per-epoch temperature schedule (made from the warm-up arguments above), replaced by the steps':
    hps = [schedules.at(step) for step in steps]
    dino_loss.teacher_temp_schedule = np.array([hp.teacher_temp for hp in hps])  # indexed by i below
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    run = Run()
    for i, (step, hp) in enumerate(zip(steps, hps)):
        epoch = step // schedules.steps_per_epoch
        for k, group in enumerate(optimizer.param_groups):
            group["lr"] = hp.lr
            if k == 0:  # only the first group is regularised
                group["weight_decay"] = hp.weight_decay
        images = views_at(step, cfg, seed, dtype)
        teacher_output = teacher(images[:2])
        student_output = student(images)
        loss = dino_loss(student_output, teacher_output, i)
        optimizer.zero_grad()
        loss.backward()
        norms = utils.clip_gradients(student, cfg.clip_grad)
        utils.cancel_gradients_last_layer(epoch, student, cfg.freeze_last_layer)
        optimizer.step()
        with torch.no_grad():
            m = hp.momentum
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        run.losses.append(loss.item())
        run.grads.append(gradients(student))
        run.clipped.append(sum(norm + 1e-6 > cfg.clip_grad for norm in norms))
    run.student, run.teacher, run.center = snapshot(student), snapshot(teacher), dino_loss.center.detach().clone()
    return run


def use_official_positions(backbone: nn.Module, vits: ModuleType) -> None:
    """Make a dinokit ViT interpolate its position embeddings with the official
    ``VisionTransformer.interpolate_pos_encoding`` (a scale factor with 0.1 added to the grid,
    where dinokit resizes to the exact grid: README, "Against the official code"), on its own
    ``pos_embed``, so that gradients reach it as before."""
    shim = SimpleNamespace(pos_embed=backbone.pos_embed, patch_embed=SimpleNamespace(patch_size=backbone.patch_size))

    def official_positions(height: int, width: int) -> torch.Tensor:
        tokens = backbone.pos_embed.new_empty(1, 1 + height * width, backbone.pos_embed.shape[-1])  # shape only
        return vits.VisionTransformer.interpolate_pos_encoding(shim, tokens, height * backbone.patch_size,
                                                               width * backbone.patch_size)

    backbone.interpolate_pos_encoding = official_positions


def run_dinokit(cfg: TrainConfig, init: State, steps: list[int], schedules: Schedules, seed: int,
                positions_from: ModuleType | None = None) -> Run:
    """dinokit's steps: ``build_state`` and ``train_step`` with the schedules' values, fp32; with
    ``positions_from`` (the official ``vision_transformer``), its position-embedding interpolation
    in the student and the teacher."""
    state = build_state(cfg, torch.device("cpu"))
    state.student.load_state_dict(init)
    state.teacher.load_state_dict(init)
    if positions_from is not None:
        for model in (state.student, state.teacher):
            use_official_positions(model.backbone, positions_from)
    run = Run()
    for step in steps:
        metrics = train_step(state, views_at(step, cfg, seed, torch.float32), schedules.at(step), cfg,
                             state.student, contextlib.nullcontext())
        run.losses.append(metrics["loss"].item())
        run.grads.append(gradients(state.student))
    run.student, run.teacher = snapshot(state.student), snapshot(state.teacher)
    run.center = state.loss.center.detach().clone()
    return run


# --- comparing -------------------------------------------------------------------------------

def largest(values: dict[str, float]) -> tuple[float, str]:
    """The largest value and its key ('' when there is none)."""
    return max(((v, k) for k, v in values.items()), default=(0.0, ""))


def norm(state: State) -> float:
    """The L2 norm of all of ``state``'s tensors together (in float64)."""
    return sum(t.double().square().sum().item() for t in state.values()) ** 0.5


def state_difference(ref: State, other: State, init: State | None = None) -> dict[str, float | str]:
    """How far ``other`` is from ``ref``, over all tensors: ``max_abs``, the largest |ref - other|;
    ``rel``, ||ref - other|| / ||ref|| (L2 norms over all tensors together); ``worst_rel`` and
    ``worst_at``, the tensor with the largest max|ref - other| / max|ref| (a tensor of small
    values, such as a bias started at 0, leads it). With ``init``: ``rel_update``, ||ref - other||
    / ||ref - init||, the share of the steps' change that disagrees, and ``unchanged_max_abs``, the
    largest difference in the tensors that ``ref`` left exactly as they were (a frozen last layer)."""
    diff = {k: ref[k].double() - other[k].double() for k in ref}
    per_tensor = {k: d.abs().max().item() / max(ref[k].double().abs().max().item(), 1e-30) for k, d in diff.items()}
    out: dict[str, float | str] = {"max_abs": max(d.abs().max().item() for d in diff.values()),
                                   "rel": norm(diff) / norm(ref)}
    out["worst_rel"], out["worst_at"] = largest(per_tensor)
    if init is not None:
        change = {k: ref[k].double() - init[k].double() for k in ref}
        out["rel_update"] = norm(diff) / norm(change)
        out["unchanged_max_abs"] = max((diff[k].abs().max().item() for k in ref if not change[k].any()), default=0.0)
    return out


def compare(ref: Run, other: Run, init: State) -> dict:
    """Per step: loss and gradient differences; at the end: student, teacher, centre."""
    steps = [{"loss_abs": abs(a - b), "loss_rel": abs(a - b) / abs(a),
              "grad": state_difference(ga, gb), "same_gradients": sorted(ga) == sorted(gb)}
             for a, b, ga, gb in zip(ref.losses, other.losses, ref.grads, other.grads)]
    return {"steps": steps, "student": state_difference(ref.student, other.student, init),
            "teacher": state_difference(ref.teacher, other.teacher, init),
            "center": state_difference({"center": ref.center}, {"center": other.center})}


# --- the driver ------------------------------------------------------------------------------

def run_case(official: Official, cfg: TrainConfig, init: State, epoch: int, args: argparse.Namespace) -> dict:
    schedules = Schedules.from_config(cfg, args.steps)
    steps = [epoch * args.steps + i for i in range(args.steps)]
    runs = {"official": run_official(official, cfg, init, steps, schedules, args.seed, torch.float32),
            "dinokit": run_dinokit(cfg, init, steps, schedules, args.seed),
            "dinokit_official_positions": run_dinokit(cfg, init, steps, schedules, args.seed, official[0]),
            "official_fp64": run_official(official, cfg, init, steps, schedules, args.seed, torch.float64)}
    pairs = {"dinokit vs official": ("official", "dinokit"),
             "dinokit, official positions": ("official", "dinokit_official_positions"),
             "official vs official fp64": ("official_fp64", "official"),
             "dinokit, official positions, vs fp64": ("official_fp64", "dinokit_official_positions")}
    comparisons = {name: compare(runs[ref], runs[other], init) for name, (ref, other) in pairs.items()}
    print_steps(steps, schedules, runs, comparisons)
    print_comparisons(comparisons)
    return {"steps": steps, "hyperparameters": [schedules.at(s).as_dict() for s in steps],
            "losses": {name: run.losses for name, run in runs.items()},
            "clipped_tensors": runs["official"].clipped, "comparisons": comparisons}


def print_steps(steps: list[int], schedules: Schedules, runs: dict[str, Run], comparisons: dict[str, dict]) -> None:
    """Per step: the schedules' values, the tensors the official code clipped, its loss, and of
    each dinokit run its loss's difference and its gradients' relative difference."""
    dinokit = {"dinokit": "dinokit vs official", "official positions": "dinokit, official positions"}
    print(f"  {'step':>4} {'lr':>9} {'wd':>7} {'momentum':>8} {'t_temp':>7} {'frozen':>6} {'clipped':>7} "
          f"{'official loss':>14}" + "".join(f" {name + ': loss |diff|':>30} {'grad rel':>9}" for name in dinokit))
    for i, step in enumerate(steps):
        hp = schedules.at(step)
        line = (f"  {step:>4} {hp.lr:>9.2e} {hp.weight_decay:>7.4f} {hp.momentum:>8.5f} "
                f"{hp.teacher_temp:>7.4f} {int(hp.freeze_last_layer):>6} {runs['official'].clipped[i]:>7} "
                f"{runs['official'].losses[i]:>14.8f}")
        for pair in dinokit.values():
            c = comparisons[pair]["steps"][i]
            line += f" {c['loss_abs']:>30.2e} {c['grad']['rel']:>9.1e}"
        print(line)


def print_comparisons(comparisons: dict[str, dict]) -> None:
    """After the last step: the largest loss difference of the steps, and the weights' and centre's."""
    print(f"  {'after the last step':<36} {'loss max|diff|':>14} {'student abs':>11} {'rel':>8} {'rel_upd':>8} "
          f"{'teacher abs':>11} {'rel':>8} {'rel_upd':>8} {'centre abs':>10} {'rel':>8}")
    for name, c in comparisons.items():
        s, t, z = c["student"], c["teacher"], c["center"]
        loss = max(step["loss_abs"] for step in c["steps"])
        print(f"  {name:<36} {loss:>14.2e} {s['max_abs']:>11.2e} {s['rel']:>8.1e} {s['rel_update']:>8.1e} "
              f"{t['max_abs']:>11.2e} {t['rel']:>8.1e} {t['rel_update']:>8.1e} {z['max_abs']:>10.2e} {z['rel']:>8.1e}")
    for name, c in comparisons.items():
        same = "the same" if all(step["same_gradients"] for step in c["steps"]) else "NOT the same"
        print(f"  {name}: {same} tensors given gradients at every step; worst student tensor "
              f"{c['student']['worst_at']} ({c['student']['worst_rel']:.1e} of its largest value); the tensors left "
              f"unchanged differ by {c['student']['unchanged_max_abs']:.1e}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("clone", type=Path, help="checkout of github.com/facebookresearch/dino")
    p.add_argument("--steps", type=int, default=5, help="steps per case, and per epoch [default: %(default)s]")
    p.add_argument("--epochs", type=int, default=10, help="the schedules' length [default: %(default)s]")
    p.add_argument("--arch", default="vit_tiny", choices=("vit_tiny", "vit_small", "vit_base"),
                   help="[default: %(default)s]")
    p.add_argument("--patch-size", type=int, default=4, help="[default: %(default)s]")
    p.add_argument("--global-size", type=int, default=32, help="side of the 2 global views [default: %(default)s]")
    p.add_argument("--local-size", type=int, default=16, help="side of the local views [default: %(default)s]")
    p.add_argument("--local-crops", type=int, default=4, help="[default: %(default)s]")
    p.add_argument("--batch-size", type=int, default=8, help="[default: %(default)s]")
    p.add_argument("--out-dim", type=int, default=256, help="K [default: %(default)s]")
    p.add_argument("--peak-lr", type=float, default=0.0005, help="lr after the warm-up [default: %(default)s]")
    p.add_argument("--clip-grad", type=float, default=1.0,
                   help="per-tensor gradient norm limit; below the recipe's 3.0, so that this small step clips some "
                        "[default: %(default)s]")
    p.add_argument("--seed", type=int, default=0, help="initial weights and views [default: %(default)s]")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="[default: %(default)s]")
    p.add_argument("--results", default="bench/results", help="folder of the results files [default: %(default)s]")
    p.add_argument("--no-save", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_official_clone(args.clone)
    if args.steps < 1:
        sys.exit("--steps must be at least 1")
    torch.set_num_threads(args.threads)
    official = import_official(args.clone.resolve())
    cfg = config(args)
    torch.manual_seed(args.seed)
    init = snapshot(official_networks(official, cfg)[0])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:  # the centre's all-reduce: a process group of one
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            for case, epoch in CASES.items():
                print(f"\n{case}: epoch {epoch}'s steps ({args.arch}/{args.patch_size}, batch {args.batch_size}, "
                      f"2 x {args.global_size} + {args.local_crops} x {args.local_size} px, K = {args.out_dim})")
                results[case] = run_case(official, cfg, init, epoch, args)
        finally:
            dist.destroy_process_group()
    if not args.no_save:
        record = {"kind": "compare_official_step", "machine": describe_machine(torch.device("cpu")),
                  "workload": {k: v for k, v in vars(args).items() if k not in ("clone", "results", "no_save")},
                  "cases": results}
        print(f"saved to {save_result(record, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
