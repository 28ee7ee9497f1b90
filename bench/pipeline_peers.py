"""The data loader's work per image through dinokit, the official DINO code and lightly, side by side.

    python bench/pipeline_peers.py DIR --official-dino PATH_TO_CLONE [--images 256] [--rounds 2] [--local-crops 10]

Every image of DIR (``--images`` of them at most, spread evenly over its sorted list) goes from
its file to the paper's views (2 x 224 px + ``--local-crops`` x 96 px, with the recipe's crops,
flips, colour jitter, greyscale, blur and solarisation), the implementations taking turns
(``take_turns`` of ``bench/peers.py``, a pass over the folder each) on ``--threads`` threads
(default 1: the rate of one loader worker):

- ``dinokit``: what a ``dinokit train`` loader worker does (``ImageDataset`` with the host half of
  ``view_pipeline``): large images reduced as they load, 8-bit views, which are normalised to
  float on the training device.
- ``dinokit+normalise``: the same views normalised to float on the CPU (``NormalizeImages``): the
  output the peers give, the fair figure where the step runs on the CPU.
- ``dinokit-device``: the loader's half of ``views_on=device``: decode onto the canvas (the ``paper``
  preset's, 512 px) and draw the views' parameters. The views themselves are made on the GPU, not here.
- ``official``: ``main_dino.DataAugmentationDINO`` of a checkout of
  github.com/facebookresearch/dino, on each image as its ``ImageFolder`` loads it (PIL, RGB).
- ``lightly``: ``lightly.transforms.DINOTransform`` (``pip install lightly``; not a dinokit
  dependency) on the same.

All get the same view sizes, crop scales and count. Prints images/s of each and dinokit's ratios
to each peer; appends them to ``bench/results/<machine>-<date>.json``. Nothing of either peer is
copied into dinokit: they are imported at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py: choosing and take_turns)

from dinokit.config import TrainConfig  # noqa: E402
from dinokit.data.datasets import ImageDataset  # noqa: E402
from dinokit.data.device_views import view_pipeline  # noqa: E402
from dinokit.data.folders import ImageList, scan_folder  # noqa: E402
from dinokit.data.transforms import NormalizeImages  # noqa: E402
from dinokit.train.bench import describe_machine, save_result  # noqa: E402

IMPLEMENTATIONS = ("dinokit", "dinokit+normalise", "dinokit-device", "official", "lightly")
PEERS = ("official", "lightly")


def open_rgb(path: str) -> Image.Image:
    """An image as torchvision's ``ImageFolder`` (and lightly's dataset) loads it: PIL, RGB, full size."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def views_of_each(name: str, images: ImageList, cfg: TrainConfig, clone: Path | None) -> Callable[[int], object]:
    """``name``'s loader work for image ``i`` of ``images``: from its file to its views."""
    if name.startswith("dinokit"):
        views_on = "device" if name == "dinokit-device" else "host"
        transform = view_pipeline(TrainConfig.build(cfg.to_dict(), {"views_on": views_on}))[0]
        dataset = ImageDataset(images, transform, seed=cfg.seed, min_side=transform.min_source_side)
        if name != "dinokit+normalise":
            return lambda i: dataset[(0, i)]
        normalize = NormalizeImages(cfg.mean, cfg.std)
        return lambda i: [normalize(view) for view in dataset[(0, i)][0]]
    if name == "official":
        sys.path.insert(0, str(clone))
        import main_dino

        official = main_dino.DataAugmentationDINO(cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number)
        return lambda i: official(open_rgb(images.paths[i]))
    from lightly.transforms import DINOTransform

    lightly = DINOTransform(global_crop_size=cfg.global_crops_size, global_crop_scale=cfg.global_crops_scale,
                            local_crop_size=cfg.local_crops_size, local_crop_scale=cfg.local_crops_scale,
                            n_local_views=cfg.local_crops_number)
    return lambda i: lightly(open_rgb(images.paths[i]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="an image folder (e.g. JPEGs of ImageNet's typical size, or camera photos)")
    p.add_argument("--official-dino", type=Path, help="checkout of github.com/facebookresearch/dino")
    p.add_argument("--only", default=",".join(IMPLEMENTATIONS),
                   help="comma-separated, from " + ", ".join(IMPLEMENTATIONS) + " [default: all]")
    p.add_argument("--images", type=int, default=256, help="at most this many images of DIR [default: 256]")
    p.add_argument("--local-crops", type=int, default=10, help="local views per image [default: 10, the paper's]")
    p.add_argument("--rounds", type=int, default=2, help="timed passes over the folder, each implementation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default="bench/results")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = peers.chosen(args.only, IMPLEMENTATIONS)
    if "official" in names:
        peers.require_official_clone(args.official_dino)
    if "lightly" in names and importlib.util.find_spec("lightly") is None:
        sys.exit("lightly is not installed (pip install lightly), or leave it out with --only")
    if args.rounds < 1 or args.images < 1 or args.local_crops < 0:
        sys.exit("--rounds and --images must be at least 1, --local-crops at least 0")
    torch.set_num_threads(args.threads)
    images = scan_folder(args.data)
    if len(images) > args.images:
        images = images.subset(np.linspace(0, len(images) - 1, args.images).round().astype(int))
    cfg = TrainConfig.build("paper", {"local_crops_number": args.local_crops})  # the paper's views (and canvas)
    work = {name: views_of_each(name, images, cfg, args.official_dino) for name in names}
    passes = {name: (lambda make=make: [make(i) for i in range(len(images))]) for name, make in work.items()}
    print(f"{len(images)} images of {images.root}; views 2 x {cfg.global_crops_size} px + {cfg.local_crops_number} x "
          f"{cfg.local_crops_size} px; {args.threads} thread(s), {args.rounds} passes each, taking turns")
    runs = peers.take_turns(passes, args.rounds, 0, torch.device("cpu"))
    rates = {name: len(images) / statistics.median(run["wall_s"]) for name, run in runs.items()}
    width = max(map(len, names))
    for name, rate in rates.items():
        print(f"  {name:<{width}} {rate:8.1f} images/s")
    for ours in (n for n in rates if n.startswith("dinokit")):
        for peer in (n for n in rates if n in PEERS):
            print(f"  {ours} / {peer}: {rates[ours] / rates[peer]:.2f}x")
    if not args.no_save:
        record = {"kind": "pipeline_peers", "machine": describe_machine(torch.device("cpu")), "data": str(images.root),
                  "images": len(images), "global_crops": [2, cfg.global_crops_size],
                  "local_crops": [cfg.local_crops_number, cfg.local_crops_size], "threads": args.threads,
                  "rounds": args.rounds, "images_per_s": rates}
        print(f"saved to {save_result(record, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
