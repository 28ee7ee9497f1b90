"""Where a training step's time goes on a GPU: the GPU's kernels by kind, its idle time, and the host's time.

    python bench/gpu_profile.py [--only dinokit,official] [--official-dino PATH] [workload options of bench/peers.py]

The workload defaults to the paper's (ViT-S/16, 2 x 224 px + 10 x 96 px views, batch 128, K =
65536), each implementation with ``bench/peers.py``'s step and its own mixed precision. For each,
after ``--warmup`` steps:

- **step**: the wall time of ``--steps`` steps between two synchronisations, per step;
- **host**: the time the host takes to issue one step to an idle GPU (synchronised before the
  step, not after; the median). Near the step's wall time, the GPU waits for Python's dispatch,
  and fewer kernels (``compile=all``) or a larger batch would help; a step that reads a value of
  the GPU (the official code's ``loss.item()``) includes the GPU's time up to that read;
- **GPU busy**: under ``torch.profiler``, the union of the intervals of the GPU's kernels,
  copies and memsets (streams that overlap count once), per step, and its share of the wall
  time; the rest the GPU was idle, waiting for the host;
- the kernels per step, and their time (summed per kernel) by kind: matrix multiplications,
  attention, copies and memsets, the rest (elementwise, reductions, normalisation, optimizer),
  and the longest kernels by name.

Appends them to ``bench/results/<machine>-<date>.json``. Needs a CUDA GPU.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py: the workload and each implementation's step)

from dinokit.train.bench import (busy_seconds, describe_machine, device_activities, save_result,  # noqa: E402
                                 synchronize)

#: Kernel name patterns of each kind, tried in this order; the rest is "other".
KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient_attention", re.I)),
    # nvjet: recent cuBLAS's own GEMMs on Hopper (nvjet_tst_..., nvjet_hsh_...); gemv: its matrix-vector kernels
    ("matmul", re.compile(r"gemm|gemv|xmma|cutlass|cublas|wgmma|nvjet|magma|splitk|sm\d\d_", re.I)),
    ("copy", re.compile(r"^memcpy|^memset|copy|cat_|CatArray", re.I)),
)


def kernel_kind(name: str) -> str:
    """``matmul``, ``attention``, ``copy`` or ``other``, from a kernel's name."""
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def summarise(activities: list[tuple[str, float, float]], steps: int, top: int) -> dict:
    """Per step: busy seconds, kernel count, seconds by kind, and the ``top`` kernels by seconds."""
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for name, start, end in activities:
        by_kind[kernel_kind(name)] += (end - start) / steps
        by_name[name] += (end - start) / steps
    longest = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"busy_s": busy_seconds([(s, e) for _, s, e in activities]) / steps, "kernels": len(activities) / steps,
            "kinds_s": {kind: by_kind.get(kind, 0.0) for kind in ("matmul", "attention", "copy", "other")},
            "longest_s": dict(longest)}


def profile_step(step, steps: int, warmup: int, device: torch.device, top: int) -> dict:
    timed = peers.time_steps(step, steps, warmup, device)
    host = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
    return {"step_s": timed["step_s"], "host_s": statistics.median(host),
            **summarise(device_activities(step, steps, device), steps, top)}


def main(argv: list[str] | None = None) -> int:
    parser = peers.build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=12, help="the longest kernels listed [default: 12]")
    parser.set_defaults(arch="vit_small", patch_size=16, global_size=224, local_size=96, local_crops=10,
                        batch_size=128, device="cuda", only="dinokit,official", steps=5, warmup=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        sys.exit(f"bench/gpu_profile.py profiles a CUDA GPU; --device {args.device} is not one here "
                 "(on a CPU: bench/step_profile.py)")
    names = peers.chosen(args.only, peers.IMPLEMENTATIONS)
    if "official" in names:
        peers.require_official_clone(args.official_dino)
    w = peers.workload(args)
    print(f"{w['arch']}/{w['patch_size']}, batch {w['batch_size']}, views 2x{w['global_size']}px + "
          f"{w['local_crops']}x{w['local_size']}px, K={w['out_dim']}, {torch.cuda.get_device_name(device)}", flush=True)
    results = {}
    for name in names:
        r = results[name] = profile_step(peers.build(name, w, args.official_dino), args.steps, args.warmup, device,
                                         args.top)
        ms = {key: 1000 * r[key] for key in ("step_s", "host_s", "busy_s")}
        print(f"{name}: step {ms['step_s']:.1f} ms ({w['batch_size'] / r['step_s']:.0f} images/s); host issues it in "
              f"{ms['host_s']:.1f} ms; GPU busy {ms['busy_s']:.1f} ms ({r['busy_s'] / r['step_s']:.0%}), "
              f"{r['kernels']:.0f} kernels")
        print("  by kind: " + ", ".join(f"{kind} {1000 * s:.1f} ms" for kind, s in r["kinds_s"].items()))
        for kernel, s in r["longest_s"].items():
            print(f"    {1000 * s:8.2f} ms  {kernel[:110]}")
        torch.cuda.empty_cache()
    if not args.no_save:
        record = {"kind": "gpu_profile", "machine": describe_machine(device), "workload": w, "steps": args.steps,
                  "warmup": args.warmup, "results": results}
        print(f"saved to {save_result(record, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
