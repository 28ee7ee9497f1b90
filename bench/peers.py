"""The same DINO training step through dinokit, the official DINO code and lightly, side by side.

    python bench/peers.py --official-dino PATH_TO_CLONE [--steps 5] [--out-dim 65536] ...

``PATH_TO_CLONE`` is a checkout of github.com/facebookresearch/dino: its ``vision_transformer``
(ViT and ``DINOHead``), ``utils`` (``MultiCropWrapper``, parameter groups, per-tensor clipping)
and ``main_dino.DINOLoss`` are imported from there at run time, and driven by a small loop that
follows ``main_dino.train_one_epoch`` (its own script needs a distributed launcher). The lightly
package (``pip install lightly``; not a dinokit dependency) is driven as its DINO benchmark
does: a timm ViT in ``MaskedVisionTransformerTIMM``, ``DINOProjectionHead``, ``DINOLoss``,
``update_momentum``. Nothing of either is copied into dinokit.

The workload is the same for all three: the same backbone size, patch, head (hidden 2048,
bottleneck 256, K prototypes, fixed weight-norm gain), views (random tensors of the same
shapes, the same for every implementation: the step alone, without the data pipeline),
batch, drop path 0.1 in the student, AdamW with two weight-decay groups, fp32, ``--threads``
threads. ``--only dinokit,dinokit-bf16,official,lightly`` adds dinokit with its bf16 autocast
(neither peer has a CPU mixed-precision path); ``dinokit+compiled-loss`` and
``dinokit-bf16+compiled-loss`` run dinokit with ``compile=loss`` (its loss through
``torch.compile``, compiled in the warm-up steps). Each implementation runs in its own process, so
that its peak memory is its own: dinokit with the host-memory setting of ``dinokit train`` on a
CPU (``keep_freed_memory``: malloc keeps what a step frees), the peers as they are;
``--keep-freed-memory all`` gives them the same setting (the step's code alone compared).
Prints images/s, process CPU time per step (the fair measure when other programs share the
cores), peak memory and dinokit's ratio to each peer; appends the results to
``<results>/<machine>-<date>.json`` (``--results``, default ``bench/results`` under the working
directory). ``--interleave`` runs them all in one process
instead, taking turns step by step, so that a machine whose speed drifts slows them alike: steadier
ratios of speed, but no peak memory of each.

``--device cuda`` runs the step on the GPU, each implementation with its own mixed precision:
dinokit its default bf16 autocast, the official code its default fp16 autocast with a gradient
scaler (``--use_fp16 true``), lightly bf16 autocast. Steps are timed between device
synchronisations, peak memory is ``torch.cuda.max_memory_allocated``. Each step checks its loss
as its own training loop does: the official code reads it every step (``loss.item()``, a wait
for the GPU), dinokit reads its steps' flags every ``log_every`` (10) steps. The paper's GPU workload:

    python bench/peers.py --device cuda --official-dino PATH --only dinokit,official \
        --arch vit_small --patch-size 16 --global-size 224 --local-size 96 --local-crops 10 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dinokit.method.schedules import StepHyperparameters
from dinokit.train.bench import describe_machine, peak_memory, save_result, synchronize
from dinokit.train.host_memory import use_memory_policy

IMPLEMENTATIONS = ("dinokit", "dinokit-bf16", "dinokit+compiled-loss", "dinokit-bf16+compiled-loss", "official",
                   "lightly")  # -bf16: its CPU bf16 autocast; +compiled-loss: compile=loss
PEERS = ("official", "lightly")


# --- choosing ------------------------------------------------------------------------------

def chosen(only: str, implementations: tuple[str, ...]) -> list[str]:
    """The names of ``--only`` (comma-separated); exits with one line on an unknown one."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = set(names) - set(implementations)
    if unknown:
        sys.exit(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(implementations)}")
    return names


def require_official_clone(clone: Path | None) -> None:
    """Exit with one line unless ``clone`` is a checkout of the official DINO code."""
    if not (clone and (clone / "main_dino.py").exists()):
        sys.exit("--official-dino must point at a checkout of github.com/facebookresearch/dino "
                 "(git clone https://github.com/facebookresearch/dino), or leave the official code out with --only")


# --- measuring -------------------------------------------------------------------------------

def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, steps: int, warmup: int, device: torch.device) -> dict:
    """Run ``step()`` ``warmup`` times, then time ``steps`` runs: wall and process CPU seconds per step."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    synchronize(device)
    return {"step_s": (time.perf_counter() - start) / steps, "cpu_s": (time.process_time() - cpu_start) / steps}


def take_turns(steps: dict[str, Callable[[], object]], count: int, warmup: int,
               device: torch.device) -> dict[str, dict[str, list]]:
    """Run the step functions in turn (ABC, then CBA, ...), ``count`` times each after ``warmup``
    untimed runs, so that a drift of the machine slows them alike. Per name, of each timed run:
    ``wall_s``, ``cpu_s`` (process CPU seconds) and ``page_faults`` (minor faults: fresh memory)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    runs: dict[str, dict[str, list]] = {name: {"wall_s": [], "cpu_s": [], "page_faults": []} for name in steps}
    order = list(steps)
    for i in range(count):
        for name in (order if i % 2 == 0 else order[::-1]):
            synchronize(device)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            synchronize(device)
            runs[name]["wall_s"].append(time.perf_counter() - start)
            runs[name]["cpu_s"].append(time.process_time() - cpu_start)
            runs[name]["page_faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return runs


def views_for(w: dict) -> list[torch.Tensor]:
    """The random views of the workload (the same tensors for every implementation), on its device."""
    g = torch.Generator().manual_seed(0)
    shapes = [w["global_size"]] * 2 + [w["local_size"]] * w["local_crops"]
    return [torch.randn(w["batch_size"], 3, s, s, generator=g).to(w["device"]) for s in shapes]


def on_cuda(w: dict) -> bool:
    return torch.device(w["device"]).type == "cuda"


HYPER = {"lr": 1.25e-4, "weight_decay": 0.04, "momentum": 0.996, "teacher_temp": 0.07, "clip": 3.0}  # mid-run values


# --- the three implementations ---------------------------------------------------------------

def build_dinokit(w: dict, precision: str, compile_: str):
    """dinokit's own training step (``dinokit.train.loop.train_step``) on the workload."""
    from dinokit.config import TrainConfig
    from dinokit.train.devices import autocast_for
    from dinokit.train.loop import build_state, train_step

    cfg = TrainConfig.build({
        "arch": w["arch"], "patch_size": w["patch_size"], "global_crops_size": w["global_size"],
        "local_crops_size": w["local_size"], "local_crops_number": w["local_crops"], "out_dim": w["out_dim"],
        "head_hidden_dim": 2048, "head_bottleneck_dim": 256, "batch_size": w["batch_size"], "device": w["device"],
        "precision": precision, "drop_path_rate": 0.1, "lr": HYPER["lr"] * 256 / w["batch_size"],
        "weight_decay": HYPER["weight_decay"], "momentum_teacher": HYPER["momentum"],
        "teacher_temp": HYPER["teacher_temp"], "clip_grad": HYPER["clip"], "compile": compile_,
        "keep_freed_memory": w["keep_freed_memory"] != "none",
    })
    device = torch.device(w["device"])
    use_memory_policy(cfg.keep_freed_memory, device)  # as dinokit train does
    state = build_state(cfg, device)
    state.compile(cfg.compile)
    autocast, hp, views = autocast_for(device, cfg.precision), StepHyperparameters.mid_run(cfg), views_for(w)
    finite: list[torch.Tensor] = []
    read_every = cfg.log_every if device.type == "cuda" else 1  # as dinokit train reads them: no wait per GPU step

    def step() -> None:
        finite.append(train_step(state, views, hp, cfg, state.student, autocast)["finite"])
        if len(finite) == read_every:
            if not torch.stack(finite).all():
                raise RuntimeError("dinokit: non-finite loss")
            finite.clear()

    return step


def build_official(w: dict, clone: Path):
    import torch.distributed as dist

    sys.path.insert(0, str(clone))
    import main_dino
    import utils
    import vision_transformer as vits

    # main_dino's DINOLoss all-reduces the centre: a process group of one.
    store = tempfile.NamedTemporaryFile(prefix="dino-peers-", delete=False)
    dist.init_process_group("nccl" if on_cuda(w) else "gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    torch.manual_seed(0)
    arch = getattr(vits, w["arch"])
    student_backbone = arch(patch_size=w["patch_size"], img_size=[w["global_size"]], drop_path_rate=0.1)
    embed = student_backbone.embed_dim
    student = utils.MultiCropWrapper(student_backbone,
                                     vits.DINOHead(embed, w["out_dim"], use_bn=False, norm_last_layer=True))
    teacher = utils.MultiCropWrapper(arch(patch_size=w["patch_size"], img_size=[w["global_size"]]),
                                     vits.DINOHead(embed, w["out_dim"], use_bn=False))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    student, teacher = student.to(w["device"]), teacher.to(w["device"])
    ncrops = 2 + w["local_crops"]
    dino_loss = main_dino.DINOLoss(w["out_dim"], ncrops, 0.04, HYPER["teacher_temp"], 0, 100).to(w["device"])
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    fp16 = on_cuda(w)  # main_dino's default --use_fp16 true (it needs CUDA)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    images = views_for(w)
    epoch = 1  # past the first epoch: the last layer is trained

    def step() -> None:  # main_dino.train_one_epoch without DDP and logging (one process)
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = HYPER["lr"]
            if i == 0:
                group["weight_decay"] = HYPER["weight_decay"]
        with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
            teacher_output = teacher(images[:2])
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, epoch)
        if not math.isfinite(loss.item()):
            raise RuntimeError("official: non-finite loss")
        optimizer.zero_grad()
        scaler.scale(loss).backward()  # without fp16 the scaler passes everything through
        scaler.unscale_(optimizer)
        utils.clip_gradients(student, HYPER["clip"])
        utils.cancel_gradients_last_layer(epoch, student, 1)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            m = HYPER["momentum"]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)

    Path(store.name).unlink(missing_ok=True)  # the group is set up; the process ends with the run
    return step


def build_lightly(w: dict):
    try:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import get_weight_decay_parameters, update_momentum
    except ImportError:
        raise SystemExit("lightly is not installed: pip install lightly (it is not a dinokit dependency)")
    from timm.models.vision_transformer import VisionTransformer

    from dinokit.models.vit import VIT_SIZES

    dim, depth, heads = VIT_SIZES[w["arch"]]
    torch.manual_seed(0)

    def vit(drop_path: float) -> VisionTransformer:
        return VisionTransformer(img_size=w["global_size"], patch_size=w["patch_size"], embed_dim=dim, depth=depth,
                                 num_heads=heads, num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path)

    student_backbone = MaskedVisionTransformerTIMM(vit=vit(0.1))
    student_head = DINOProjectionHead(dim, 2048, 256, w["out_dim"], norm_last_layer=True)
    teacher_backbone = MaskedVisionTransformerTIMM(vit=vit(0.0))
    teacher_backbone.load_state_dict(student_backbone.state_dict())
    teacher_head = DINOProjectionHead(dim, 2048, 256, w["out_dim"], norm_last_layer=True)  # (weight norm: no deepcopy)
    teacher_head.load_state_dict(student_head.state_dict())
    for p in [*teacher_backbone.parameters(), *teacher_head.parameters()]:
        p.requires_grad = False
    for module in (student_backbone, student_head, teacher_backbone, teacher_head):
        module.to(w["device"])
    criterion = DINOLoss(w["out_dim"]).to(w["device"])
    params, params_no_wd = get_weight_decay_parameters([student_backbone, student_head])
    optimizer = torch.optim.AdamW([{"params": params, "weight_decay": HYPER["weight_decay"]},
                                   {"params": params_no_wd, "weight_decay": 0.0}], lr=HYPER["lr"])
    views = views_for(w)
    n_views = len(views)

    def student(x: torch.Tensor) -> torch.Tensor:
        return student_head(student_backbone(x).flatten(start_dim=1))

    def step() -> None:  # lightly's DINO benchmark training_step, with Lightning's optimizer calls
        update_momentum(student_backbone, teacher_backbone, m=HYPER["momentum"])
        update_momentum(student_head, teacher_head, m=HYPER["momentum"])
        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda(w)):
            with torch.no_grad():
                teacher_projections = teacher_head(teacher_backbone(global_views).flatten(start_dim=1))
            student_projections = torch.cat([student(global_views), student(local_views)])
            loss = criterion(teacher_out=teacher_projections.chunk(2), student_out=student_projections.chunk(n_views),
                             teacher_temp=HYPER["teacher_temp"])
        optimizer.zero_grad()
        loss.backward()
        student_head.cancel_last_layer_gradients(current_epoch=1)
        optimizer.step()

    return step


def build(name: str, w: dict, clone: Path | None):
    """The step function of implementation ``name`` on the workload."""
    if name in PEERS and w["keep_freed_memory"] == "all":
        use_memory_policy(True, torch.device(w["device"]))
    if name.startswith("dinokit"):
        return build_dinokit(w, "bf16" if "-bf16" in name else "auto",  # auto: fp32 on a CPU, bf16 on CUDA
                             "loss" if name.endswith("+compiled-loss") else "off")
    if name == "official":
        return build_official(w, clone)
    return build_lightly(w)


def worker(name: str, w: dict, steps: int, warmup: int, clone: Path | None) -> dict:
    torch.set_num_threads(w["threads"])
    device = torch.device(w["device"])
    start_rss, start_load = peak_rss_mib(), os.getloadavg()[0]
    out = time_steps(build(name, w, clone), steps, warmup, device)
    return {**out, "images_per_s": w["batch_size"] / out["step_s"], "peak_memory_mib": peak_memory(device)[0],
            "rss_after_imports_mib": start_rss, "load_average": (start_load, os.getloadavg()[0])}


def interleaved(names: list[str], w: dict, steps: int, warmup: int, clone: Path | None) -> dict[str, dict]:
    """All implementations in this process, taking turns step by step: the medians of each."""
    torch.set_num_threads(w["threads"])
    built = {name: build(name, w, clone) for name in names}
    results = {}
    for name, run in take_turns(built, steps, warmup, torch.device(w["device"])).items():
        step_s = statistics.median(run["wall_s"])
        results[name] = {"step_s": step_s, "cpu_s": statistics.median(run["cpu_s"]),
                         "images_per_s": w["batch_size"] / step_s, "all_step_s": run["wall_s"]}
    return results


# --- the driver ------------------------------------------------------------------------------

def summarise(runs: list[dict], batch_size: int) -> dict:
    """The median step time (wall and CPU) over rounds, the largest peak memory."""
    step_s = statistics.median(r["step_s"] for r in runs)
    return {"step_s": step_s, "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "images_per_s": batch_size / step_s, "peak_memory_mib": max(r["peak_memory_mib"] for r in runs)}


def build_parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    """The workload's options (``bench/compile_ab.py`` shares them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--official-dino", type=Path, help="checkout of github.com/facebookresearch/dino")
    p.add_argument("--only", default="dinokit,official,lightly",
                   help="comma-separated, from " + ", ".join(IMPLEMENTATIONS) + " [default: dinokit,official,lightly]")
    p.add_argument("--arch", default="vit_tiny", choices=("vit_tiny", "vit_small", "vit_base"),
                   help="[default: %(default)s]")
    p.add_argument("--patch-size", type=int, default=4, help="[default: %(default)s]")
    p.add_argument("--global-size", type=int, default=32, help="side of the 2 global views (px) [default: %(default)s]")
    p.add_argument("--local-size", type=int, default=16, help="side of the local views (px) [default: %(default)s]")
    p.add_argument("--local-crops", type=int, default=6, help="number of local views [default: %(default)s]")
    p.add_argument("--batch-size", type=int, default=64, help="[default: %(default)s]")
    p.add_argument("--out-dim", type=int, default=65536, help="K, the same for all [default: %(default)s]")
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation [default: %(default)s]")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them [default: %(default)s]")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the implementations this many times, in alternating order, and take the median: "
                        "fairer where other programs share the cores [default: %(default)s]")
    p.add_argument("--interleave", action="store_true",
                   help="run all implementations in one process, taking turns step by step: steadier ratios on a "
                        "shared machine; peak memory is then not per implementation and is not reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads per implementation [default: %(default)s, torch's on this machine]")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N [default: cpu]")
    p.add_argument("--keep-freed-memory", choices=("dinokit", "all", "none"), default=None,
                   help="which implementations run with glibc's malloc keeping freed memory for the next step, as "
                        "dinokit train does on a CPU (dinokit/train/host_memory.py): dinokit, all (the step's code "
                        "alone compared), none [default: dinokit; all with --interleave, one process]")
    p.add_argument("--results", default="bench/results",
                   help="folder of the results files, relative to the working directory [default: %(default)s]")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


PRECISION = {"cpu": "fp32 (dinokit-bf16: bf16 autocast)",
             "cuda": "each its own: dinokit bf16 autocast, official fp16 autocast + GradScaler, lightly bf16 autocast"}


def check_args(args: argparse.Namespace) -> None:
    """Exit with one line on a device this machine cannot run or counts below 1, before any work."""
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        kind = None
    if kind not in PRECISION:
        sys.exit(f"--device {args.device}: choose cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: this machine has no CUDA GPU")
    small = [name for name in ("steps", "warmup", "rounds") if getattr(args, name, 1) < 1]
    if small:
        sys.exit(f"{' and '.join('--' + name for name in small)} must be at least 1")


def workload(args: argparse.Namespace) -> dict:
    check_args(args)
    kind = torch.device(args.device).type
    keep = args.keep_freed_memory or ("all" if getattr(args, "interleave", False) else "dinokit")
    if keep == "dinokit" and getattr(args, "interleave", False):
        sys.exit("--interleave runs every implementation in one process: --keep-freed-memory all or none")
    return {"arch": args.arch, "patch_size": args.patch_size, "global_size": args.global_size,
            "local_size": args.local_size, "local_crops": args.local_crops, "batch_size": args.batch_size,
            "out_dim": args.out_dim, "threads": args.threads, "device": args.device, "precision": PRECISION[kind],
            "memory": "torch.cuda.max_memory_allocated" if kind == "cuda" else "peak RSS", "data": "synthetic",
            "keep_freed_memory": keep if kind == "cpu" else "none"}


def separate_processes(names: list[str], args: argparse.Namespace, argv: list[str] | None, width: int) -> dict:
    """Each implementation in its own process (so that its peak memory is its own), ``--rounds``
    times in alternating order; the runs of each, printed as they finish."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            cmd = [sys.executable, __file__, "--worker", name, *(argv if argv is not None else sys.argv[1:])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{name}: failed\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name].append(r)
            print(f"  {name:<{width}} {r['images_per_s']:8.2f} images/s  {1000 * r['step_s']:8.0f} ms/step  "
                  f"(CPU {1000 * r['cpu_s']:8.0f} ms/step)  peak memory {r['peak_memory_mib']:6.0f} MiB  "
                  f"load {r['load_average'][0]:.1f}->{r['load_average'][1]:.1f}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    w = workload(args)
    if args.worker:
        print(json.dumps(worker(args.worker, w, args.steps, args.warmup, args.official_dino)))
        return 0
    names = chosen(args.only, IMPLEMENTATIONS)
    device = torch.device(args.device)
    if "official" in names:
        require_official_clone(args.official_dino)

    print(f"workload: {args.arch}/{args.patch_size}, batch {args.batch_size}, views 2x{args.global_size}px + "
          f"{args.local_crops}x{args.local_size}px, K={args.out_dim}, {device.type}: {w['precision']}, {args.threads} threads, "
          f"{args.steps} timed steps after {args.warmup}"
          f"{'' if device.type != 'cpu' else '; freed memory kept by: ' + w['keep_freed_memory']}", flush=True)
    width = max(12, *map(len, names))
    if args.interleave:
        results, runs = interleaved(names, w, args.steps, args.warmup, args.official_dino), {}
        print(f"medians of {args.steps} steps each, taking turns in one process:")
        for name, r in results.items():
            print(f"  {name:<{width}} {r['images_per_s']:8.2f} images/s  {1000 * r['step_s']:8.0f} ms/step  "
                  f"(CPU {1000 * r['cpu_s']:8.0f} ms/step)")
        complete = True
    else:
        runs = separate_processes(names, args, argv, width)
        results = {name: summarise(rs, args.batch_size) for name, rs in runs.items() if rs}
        if args.rounds > 1:
            print(f"median of {args.rounds} rounds:")
            for name, r in results.items():
                print(f"  {name:<{width}} {r['images_per_s']:8.2f} images/s  {1000 * r['step_s']:8.0f} ms/step  "
                      f"(CPU {1000 * r['cpu_s']:8.0f} ms/step)  peak memory {r['peak_memory_mib']:6.0f} MiB")
        complete = all(len(rs) == args.rounds for rs in runs.values())
    for ours in (n for n in results if n.startswith("dinokit")):
        for peer in (n for n in results if n in PEERS):
            speed = results[ours]["images_per_s"] / results[peer]["images_per_s"]
            cpu = results[peer]["cpu_s"] / results[ours]["cpu_s"]
            memory = "" if args.interleave else \
                f", {results[ours]['peak_memory_mib'] / results[peer]['peak_memory_mib']:.2f}x peak memory"
            print(f"  {ours} / {peer}: {speed:.2f}x images/s ({cpu:.2f}x by CPU time){memory}")
    if results and not args.no_save:
        record = {"kind": "peers", "machine": describe_machine(device), "workload": w,
                  "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "interleaved": args.interleave,
                  "results": results, "all_runs": runs}
        print(f"saved to {save_result(record, args.results)}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
