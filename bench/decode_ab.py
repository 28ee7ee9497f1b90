"""The data loader's work per image with large images reduced as they load, against full size.

    python bench/decode_ab.py DIR [--rounds 2] [--threads 1]

For each transform of the data pipeline (the training views made on the host, as the loader
makes them; the decode onto the canvas of ``views_on=device``; the evaluation transform), every
image of DIR goes through ``ImageDataset`` once with ``min_side`` at what the transform needs
(``load_rgb`` then reduces a larger image by a power of two) and once with ``min_side=0`` (full
size), the two taking turns (``take_turns`` of ``bench/peers.py``). Prints images/s of each and
their ratio, on ``--threads`` threads (default 1: the rate of one loader worker), and appends
them to ``bench/results/<machine>-<date>.json``. Images the views need no reduction for (a
short side under twice ``min_side``) go the same way both times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py: take_turns)

from dinokit.config import TrainConfig  # noqa: E402
from dinokit.data.datasets import ImageDataset  # noqa: E402
from dinokit.data.device_views import view_pipeline  # noqa: E402
from dinokit.data.folders import scan_folder  # noqa: E402
from dinokit.data.transforms import eval_resize_side, eval_transform  # noqa: E402
from dinokit.train.bench import describe_machine, save_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="an image folder (e.g. camera photos)")
    p.add_argument("--rounds", type=int, default=2, help="timed passes over the folder, per way")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default="bench/results")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = scan_folder(args.data)
    host_views = view_pipeline(TrainConfig.build({"views_on": "host"}))[0]
    device_canvas = view_pipeline(TrainConfig.build({"views_on": "device"}))[0]
    transforms = {"host views": (host_views, host_views.min_source_side),
                  "device canvas": (device_canvas, device_canvas.min_source_side),
                  "evaluation": (eval_transform(224), eval_resize_side(224))}
    print(f"{len(images)} images of {images.root}, {args.threads} thread(s), {args.rounds} passes each way")
    rates: dict[str, dict[str, float]] = {}
    for name, (transform, side) in transforms.items():
        def one_pass(min_side: int, transform=transform):
            dataset = ImageDataset(images, transform, min_side=min_side)
            return lambda: [dataset[(0, i)] for i in range(len(dataset))]

        runs = peers.take_turns({"full": one_pass(0), "reduced": one_pass(side)}, args.rounds, 0, torch.device("cpu"))
        rates[name] = {way: len(images) / statistics.median(run["wall_s"]) for way, run in runs.items()}
        full, reduced = rates[name]["full"], rates[name]["reduced"]
        print(f"  {name:<14} min_side {side:4d} px: {reduced:7.1f} images/s reduced, {full:7.1f} full size: "
              f"{reduced / full:.2f}x")
    if not args.no_save:
        record = {"kind": "decode_ab", "machine": describe_machine(torch.device("cpu")), "data": str(images.root),
                  "images": len(images), "rounds": args.rounds, "images_per_s": rates}
        print(f"saved to {save_result(record, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
