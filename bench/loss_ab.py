"""The DINO loss alone: dinokit's hand-written backward against autograd through the same formula.

    python bench/loss_ab.py [--batch-size 64] [--views 8] [--out-dim 65536] [--dtype fp32|bf16] [--device cpu]

Both take the same random student logits (``views * batch`` x K, in ``--dtype``) and teacher
logits (2 x batch x K) and run forward and backward, taking turns (ABBA order, ``take_turns`` of
``bench/peers.py``) so that a drift of the machine hits both. The autograd variant is the formula
dinokit's ``DINOLoss`` computes (the sum over all view pairs by two reductions, minus the pairs of
a view with itself), written with differentiable tensor ops (without the collapse statistics that
``DINOLoss`` also computes, so the comparison favours it). Prints the median time and page faults
of each (fresh large tensors are faulted in anew: a cost of the allocations, not the arithmetic)
and appends them to ``bench/results/<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py: take_turns)

from dinokit.method.loss import DINOLoss  # noqa: E402
from dinokit.train.bench import describe_machine, save_result  # noqa: E402


def autograd_loss(loss_fn: DINOLoss, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  teacher_temp: float, num_teacher_views: int = 2) -> torch.Tensor:
    """``DINOLoss``'s value, with the gradient left to autograd."""
    num_student_views = student_logits.shape[0] * num_teacher_views // teacher_logits.shape[0]
    batch = teacher_logits.shape[0] // num_teacher_views
    student_logp = F.log_softmax(student_logits.float() / loss_fn.student_temp, dim=-1)
    teacher_p = F.softmax((teacher_logits.float() - loss_fn.center) / teacher_temp, dim=-1)
    all_pairs = (teacher_p.view(num_teacher_views, batch, -1).sum(0)
                 * student_logp.view(num_student_views, batch, -1).sum(0)).sum()
    same = min(num_teacher_views, num_student_views)
    same_view = (teacher_p[:same * batch] * student_logp[:same * batch]).sum()
    return -(all_pairs - same_view) / (batch * (num_teacher_views * num_student_views - same))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--views", type=int, default=8, help="student views (2 global + locals)")
    p.add_argument("--out-dim", type=int, default=65536, help="K")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="of the logits")
    p.add_argument("--steps", type=int, default=8, help="timed forward+backward runs of each")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    student = torch.randn(args.views * args.batch_size, args.out_dim, generator=g).to(device, dtype).requires_grad_()
    teacher = torch.randn(2 * args.batch_size, args.out_dim, generator=g).to(device, dtype)
    loss_fn = DINOLoss(args.out_dim).to(device)
    values: dict[str, float] = {}

    def forward_backward(name: str, loss_of):
        def run() -> None:
            loss = loss_of()
            loss.backward()
            student.grad = None
            values[name] = loss.item()
        return run

    variants = {"hand-written": forward_backward("hand-written", lambda: loss_fn(student, teacher, 0.07)[0]),
                "autograd": forward_backward("autograd", lambda: autograd_loss(loss_fn, student, teacher, 0.07))}
    runs = peers.take_turns(variants, args.steps, 1, device)
    times = {name: run["wall_s"] for name, run in runs.items()}
    faults = {name: run["page_faults"] for name, run in runs.items()}
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"DINO loss forward+backward: {args.views} x {args.batch_size} student rows, K={args.out_dim}, "
          f"{args.dtype} logits, {device}, {args.threads} threads; {args.steps} runs each, alternating")
    for name in variants:
        print(f"  {name:<13} median {1000 * medians[name]:7.1f} ms   page faults {statistics.median(faults[name]):8.0f}"
              f"   loss {values[name]:.6f}")
    print(f"  autograd / hand-written: {medians['autograd'] / medians['hand-written']:.2f}x time")
    if not args.no_save:
        record = {"kind": "loss_ab", "machine": describe_machine(device), "batch_size": args.batch_size,
                  "views": args.views, "out_dim": args.out_dim, "dtype": args.dtype, "steps": args.steps,
                  "step_s": times, "median_step_s": medians, "page_faults": faults}
        print(f"saved to {save_result(record, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
