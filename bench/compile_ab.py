"""dinokit's training step with and without ``torch.compile`` of a part, alternating in one process.

    python bench/compile_ab.py [--compile loss] [--precision fp32|bf16] [--steps 4] [--device cpu]

Separate processes on a shared machine drift by 10-20% from one minute to the next (see
``bench/peers.py --rounds``); here the eager and the compiled step take turns (ABBA order) on
the same views, so a drift slows both alike. The workload is ``bench/peers.py``'s (its options
give the sizes: ViT-tiny/4, 2 x 32 px + 6 x 16 px views, batch 64, K = 65536 by default).
Prints each step's time and the medians, and appends them to
``bench/results/<machine>-<date>.json``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py: the workload and dinokit's step on it)

from dinokit.train.bench import describe_machine, save_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = peers.build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--compile", dest="parts", choices=("loss", "all"), default="loss",
                        help="what the compiled step compiles [default: loss]")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: fp32 on a CPU, bf16 on CUDA [default: auto]")
    args = parser.parse_args(argv)
    compile_parts, precision = args.parts, args.precision  # what the record and the printout name
    w = peers.workload(args)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    steps = {"eager": peers.build_dinokit(w, precision, "off"),
             f"compile={compile_parts}": peers.build_dinokit(w, precision, compile_parts)}
    runs = peers.take_turns(steps, args.steps, args.warmup, device)  # the compiled one compiles in its warm-up
    times = {name: run["wall_s"] for name, run in runs.items()}
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{w['arch']}/{w['patch_size']}, batch {w['batch_size']}, views 2x{w['global_size']}px + "
          f"{w['local_crops']}x{w['local_size']}px, K={w['out_dim']}, precision {precision}, {device}, "
          f"{args.threads} threads; {args.steps} steps each after {args.warmup}, alternating")
    for name, ts in times.items():
        print(f"  {name:<14} median {1000 * medians[name]:7.0f} ms/step   ({', '.join(f'{1000 * t:.0f}' for t in ts)})")
    eager, compiled = medians.values()
    print(f"  compiled / eager: {eager / compiled:.2f}x steps/s")
    if not args.no_save:
        record = {"kind": "compile_ab", "machine": describe_machine(device), "workload": w, "precision": precision,
                  "compile": compile_parts, "steps": args.steps, "warmup": args.warmup,
                  "step_s": times, "median_step_s": medians}
        print(f"saved to {save_result(record, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
