"""The augmented views of a few training images, as one picture, so users can check their crops.

Each row is one image: the original, then the views ``MultiCropAugmentation(cfg)`` makes of
it (two global, then the local ones), un-normalised with the run's mean and std. The images
are spread evenly over the list (in a class-sorted folder: several classes), and the views
are drawn with the run's seed, so the picture is the same every time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from dinokit.config import TrainConfig
from dinokit.data.folders import BadImageError, ImageList, load_rgb
from dinokit.data.transforms import MultiCropAugmentation


def unnormalise(view: torch.Tensor, mean, std) -> np.ndarray:
    """A normalised ``3 x H x W`` view -> ``H x W x 3`` floats in [0, 1]."""
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    return (view * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()


def save_views_grid(cfg: TrainConfig, images: ImageList, path: Path, num_images: int = 4) -> Path:
    """Write the views grid of ``num_images`` images of ``images`` to ``path`` (PNG); returns ``path``.

    Unreadable files are passed over; a list with no readable image gives a figure saying so.
    """
    augment = MultiCropAugmentation(cfg)
    picks = np.linspace(0, len(images) - 1, num=min(num_images, len(images))).round().astype(int).tolist()
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for index in dict.fromkeys(picks):
            try:
                image = load_rgb(images.paths[index])
            except BadImageError:
                continue
            rows.append((images.paths[index].name, image, augment(image)))
    columns = ["original", f"global 1 ({cfg.global_crops_size} px)", f"global 2 ({cfg.global_crops_size} px)"]
    columns += [f"local {i + 1} ({cfg.local_crops_size} px)" for i in range(cfg.local_crops_number)]
    fig = Figure(figsize=(1.5 * len(columns), 1.6 * max(len(rows), 1) + 0.4), layout="constrained")
    axes = fig.subplots(max(len(rows), 1), len(columns), squeeze=False)
    for r, (name, image, views) in enumerate(rows):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(name, fontsize=7)
        for c, view in enumerate(views, start=1):
            axes[r, c].imshow(unnormalise(view, cfg.mean, cfg.std))
            if r == 0:
                axes[r, c].set_title(columns[c], fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    if not rows:
        axes[0, 0].text(0, 0.5, "no readable image", fontsize=9)
    fig.suptitle("augmented views (what the student sees; the teacher sees the two global ones)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
