"""Where dinokit's training step spends its time on a CPU: every aten op timed by the wall clock.

    python bench/step_profile.py [--precision fp32|bf16] [--steps 3] [workload options of bench/peers.py]

The step (``bench/peers.py``'s workload: ViT-tiny/4, 2 x 32 px + 6 x 16 px views, batch 64,
K = 65536 by default) runs ``--steps`` times plainly, then ``--steps`` times under a
``TorchDispatchMode`` that times each aten op it runs (forward, backward, optimizer, EMA) between
two ``perf_counter`` calls. Prints the plain step time; the time in matrix multiplications
(``mm``, ``addmm``, ``bmm``, ``baddbmm``), their rate against this CPU's measured matmul rate, and
the step time they alone would set at that rate; the other ops by name; what is left outside the
ops (Python, autograd's bookkeeping, the timer's own cost); and the matrix multiplications by
shape. Appends them to ``bench/results/<machine>-<date>.json``.

Why not ``torch.profiler``: on a CPU its own allocations defeat ``keep_freed_memory`` (see
``dinokit/train/host_memory.py``), so that the step's large tensors are faulted in anew and their
ops look several times slower than they run (``log_softmax`` of the student logits: 250 ms under
the profiler, 17 ms without it). The dispatch mode allocates nothing per op.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py: the workload and dinokit's step on it)

from dinokit.train.bench import describe_machine, matmul_rate, save_result  # noqa: E402

MATMULS = ("mm", "addmm", "bmm", "baddbmm")


def matmul_flop(name: str, args: tuple) -> tuple[int, str]:
    """FLOPs of one matrix multiplication (2 per multiply-add) and its shape as ``MxK @ KxN``
    (``b x`` in front for a batch): its last two tensor arguments are the factors."""
    a, b = [x for x in args if isinstance(x, torch.Tensor)][-2:]
    batch = f"{a.shape[0]} x " if name in ("bmm", "baddbmm") else ""
    return 2 * a.numel() * b.shape[-1], f"{batch}{a.shape[-2]}x{a.shape[-1]} @ {b.shape[-2]}x{b.shape[-1]}"


class OpTimer(TorchDispatchMode):
    """Wall-clock seconds and calls of each aten op run under it; FLOPs of the matrix
    multiplications, by shape."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.flop: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func.overloadpacket.__name__
        if name in MATMULS:
            flop, shape = matmul_flop(name, args)
            name = f"{name} {shape}"
            self.flop[name] += flop
        self.seconds[name] += elapsed
        self.calls[name] += 1
        return out


def main(argv: list[str] | None = None) -> int:
    parser = peers.build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: dinokit's CPU bf16 autocast [default: fp32]")
    parser.add_argument("--top", type=int, default=12, help="lines of each table [default: 12]")
    parser.set_defaults(steps=3)
    args = parser.parse_args(argv)
    if torch.device(args.device).type != "cpu":
        sys.exit("bench/step_profile.py times ops on a CPU; on a GPU use torch.profiler (kernels run asynchronously)")
    w = peers.workload(args)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    step = peers.build_dinokit(w, args.precision, "off")
    for _ in range(args.warmup):
        step()
    plain = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        plain.append(time.perf_counter() - start)
    timer = OpTimer()
    start = time.perf_counter()
    with timer:
        for _ in range(args.steps):
            step()
    timed_s = (time.perf_counter() - start) / args.steps

    per_step = {name: s / args.steps for name, s in timer.seconds.items()}
    matmul_names = list(timer.flop)  # the op timer keys matmuls by op and shape
    matmul_s = sum(per_step[n] for n in matmul_names)
    matmul_flop_per_step = sum(timer.flop.values()) / args.steps
    others = {name: s for name, s in per_step.items() if name not in timer.flop}
    other_s = sum(others.values())
    outside_s = timed_s - matmul_s - other_s
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rate = matmul_rate(device, dtype)
    step_s = statistics.median(plain)

    print(f"{w['arch']}/{w['patch_size']}, batch {w['batch_size']}, views 2x{w['global_size']}px + "
          f"{w['local_crops']}x{w['local_size']}px, K={w['out_dim']}, {args.precision}, {args.threads} threads")
    print(f"  step                 {1000 * step_s:8.0f} ms  (median of {args.steps}); under the op timer "
          f"{1000 * timed_s:.0f} ms, split:")
    print(f"  matrix multiplies    {1000 * matmul_s:8.0f} ms  {matmul_s / timed_s:5.1%}  "
          f"{matmul_flop_per_step / 1e9:.1f} GFLOP at {matmul_flop_per_step / matmul_s / 1e9:.0f} GFLOP/s "
          f"({matmul_flop_per_step / matmul_s / rate:.0%} of the measured {args.precision} rate, "
          f"{rate / 1e9:.0f} GFLOP/s: {1000 * matmul_flop_per_step / rate:.0f} ms at that rate)")
    print(f"  other ops            {1000 * other_s:8.0f} ms  {other_s / timed_s:5.1%}")
    print(f"  outside the ops      {1000 * outside_s:8.0f} ms  {outside_s / timed_s:5.1%}  "
          "(Python, autograd bookkeeping, the timer itself)")
    print(f"other ops, the {args.top} longest (ms per step, calls per step):")
    for name, s in sorted(others.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {name:<44} {1000 * s:8.1f} ms  {timer.calls[name] // args.steps:5d}")
    print(f"matrix multiplies, the {args.top} longest shapes (ms per step, calls per step, GFLOP/s):")
    for name in sorted(matmul_names, key=lambda n: -per_step[n])[:args.top]:
        print(f"  {name:<44} {1000 * per_step[name]:8.1f} ms  {timer.calls[name] // args.steps:5d}  "
              f"{timer.flop[name] / timer.seconds[name] / 1e9:6.0f}")
    if not args.no_save:
        record = {"kind": "step_profile", "machine": describe_machine(device), "workload": w,
                  "precision": args.precision, "steps": args.steps, "warmup": args.warmup, "step_s": plain,
                  "timed_step_s": timed_s, "matmul_s": matmul_s, "matmul_flop": matmul_flop_per_step,
                  "measured_matmul_flop_per_s": rate, "other_ops_s": others, "outside_ops_s": outside_s,
                  "matmul_by_shape_s": {n: per_step[n] for n in matmul_names}}
        print(f"saved to {save_result(record, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
