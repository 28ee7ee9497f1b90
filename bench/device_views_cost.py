"""What making a batch's views on the device costs (``views_on=device``): kernels, memory traffic, time.

    python bench/device_views_cost.py [--config paper] [--batch-size 128] [--device cpu|cuda] [key=value ...]

Runs ``DeviceMultiCrop`` (``dinokit/data/device_views.py``) on random canvases with parameters
drawn as the loader draws them (for 500 x 375 px images, shrunk to fit a smaller canvas), and prints

- the aten ops it runs on the device per batch (the kernels a GPU launches, each with its
  launch cost on the host), beside the host's planning ops on the parameters;
- an estimate of the memory traffic of those ops: the bytes each reads and writes (an indexed
  copy counts the images it moves, ``roi_align`` its output three times over), and the time
  that traffic takes at 2.5 TB/s (an H100's HBM3, as streaming kernels reach it);
- the measured time per batch on ``--device`` (median of ``--steps``, each between two synchronisations).

The counts do not depend on the device: run on a CPU they say what a GPU would do. Appends the
figures to ``bench/results/<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from dinokit.config import TrainConfig, parse_overrides
from dinokit.data.device_views import DeviceMultiCrop, ViewParameters, WorkPlan
from dinokit.train.bench import describe_machine, save_result, synchronize

HBM_BYTES_PER_S = 2.5e12
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "select", "slice",
             "unbind", "as_strided", "alias", "detach", "split", "split_with_sizes", "empty", "lift_fresh"}


def _bytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


class TrafficCounter(TorchDispatchMode):
    """Ops (kernels) and the bytes they move; the ops of ``WorkPlan.of_groups`` (on the host's
    copy of the parameters) counted apart."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()
        self.traffic: Counter[str] = Counter()
        self.host_ops = 0
        self.planning = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        tensors = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)] + outs
        if name in NO_KERNEL:
            return out
        if self.planning:
            self.host_ops += 1
            return out
        if name == "index_select":
            moved = 2 * _bytes(out)
        elif name == "index_copy_":
            moved = 2 * _bytes(args[3])
        elif name == "roi_align":
            moved = 3 * _bytes(out)
        else:
            moved = sum(_bytes(t) for t in tensors)
        self.kernels[name] += 1
        self.traffic[name] += moved
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="paper", help="preset or YAML file [default: paper]")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args(argv)
    cfg = TrainConfig.build(args.config, {**parse_overrides(args.overrides), "batch_size": args.batch_size,
                                          "views_on": "device"})
    device = torch.device(args.device)
    b = cfg.batch_size
    draw = ViewParameters(cfg)
    torch.manual_seed(0)
    canvases = torch.randint(0, 256, (b, draw.canvas, draw.canvas, 3), dtype=torch.uint8, device=device)
    scale = min(1.0, draw.canvas / 500)  # a 500 x 375 image, shrunk onto the canvas as the loader shrinks it
    params = torch.stack([draw.sample(round(375 * scale), round(500 * scale)) for _ in range(b)])
    if device.type == "cuda":
        params = params.pin_memory()  # as the training loader hands them over
    make = DeviceMultiCrop(cfg)

    make(canvases, params)  # warm-up
    counter = TrafficCounter()
    plan = WorkPlan.of_groups

    def counted_apart(*plan_args):
        counter.planning = True
        try:
            return plan(*plan_args)
        finally:
            counter.planning = False

    WorkPlan.of_groups = counted_apart
    try:
        with counter:
            make(canvases, params)
    finally:
        WorkPlan.of_groups = plan
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        make(canvases, params)
        synchronize(device)
        times.append(time.perf_counter() - start)

    kernels, traffic = sum(counter.kernels.values()), sum(counter.traffic.values())
    step_s = statistics.median(times)
    views = f"2 x {cfg.global_crops_size} px + {cfg.local_crops_number} x {cfg.local_crops_size} px"
    print(f"views of a batch of {b} on {draw.canvas} px canvases ({views}), on {device}:")
    print(f"  kernels         {kernels:8d}  (+ {counter.host_ops} ops planning on the host)")
    print(f"  memory traffic  {traffic / 1e9:8.1f} GB  ({1e3 * traffic / HBM_BYTES_PER_S:.1f} ms at 2.5 TB/s); the "
          "largest: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in counter.traffic.most_common(5)))
    print(f"  time            {1e3 * step_s:8.1f} ms per batch (median of {args.steps}), "
          f"{b / step_s:.0f} images/s")
    if not args.no_save:
        record = {"kind": "device_views_cost", "machine": describe_machine(device), "batch_size": b,
                  "canvas": draw.canvas, "views": views, "kernels": kernels, "host_ops": counter.host_ops,
                  "traffic_bytes": traffic, "traffic_by_op": dict(counter.traffic), "step_s": times}
        print(f"saved to {save_result(record, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
