"""The augmented-views grid written at the start of a run."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dinokit.data.folders import scan_folder
from dinokit.viz.views import save_views_grid, unnormalise
from tests.conftest import tiny_config


def test_unnormalise_inverts_the_normalisation():
    pixels = torch.rand(3, 5, 7)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    back = unnormalise(TF.normalize(pixels, mean, std), mean, std)
    assert back.shape == (5, 7, 3)
    assert np.allclose(back, pixels.permute(1, 2, 0).numpy(), atol=1e-6)


def test_grid_is_reproducible_and_leaves_the_global_generator_alone(textures_dir, tmp_path):
    cfg = tiny_config(textures_dir, tmp_path)
    images = scan_folder(textures_dir)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = save_views_grid(cfg, images, tmp_path / "a" / "views.png")
    assert torch.equal(torch.random.get_rng_state(), before)
    second = save_views_grid(cfg, images, tmp_path / "b.png")
    other_seed = save_views_grid(tiny_config(textures_dir, tmp_path, seed=1), images, tmp_path / "c.png")
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other_seed.read_bytes()
    width, height = Image.open(first).size
    assert width > height  # 4 rows of 1 + 2 + 2 columns


def test_unreadable_images_are_passed_over(textures_dir, tmp_path):
    cfg = tiny_config(textures_dir, tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    images = scan_folder(textures_dir)
    good = save_views_grid(cfg, images, tmp_path / "good.png", num_images=2)
    images.paths[0] = bad
    one_row = save_views_grid(cfg, images, tmp_path / "views.png", num_images=2)
    assert Image.open(one_row).size[1] < Image.open(good).size[1]



def test_a_list_with_no_readable_image_gives_a_figure_saying_so(textures_dir, tmp_path, monkeypatch):
    from matplotlib.image import AxesImage
    from matplotlib.text import Text

    from dinokit.viz import views

    figures = []

    class Kept(views.Figure):  # the figure drawn, kept to read what it says
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(views, "Figure", Kept)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    images = scan_folder(textures_dir)
    images.paths[0] = bad
    empty = save_views_grid(tiny_config(textures_dir, tmp_path), images.subset([0]), tmp_path / "empty.png")
    [figure] = figures
    assert "no readable image" in [t.get_text() for t in figure.findobj(Text)]
    assert figure.findobj(AxesImage) == []  # no picture of any view
    pixels = np.asarray(Image.open(empty).convert("L"))
    assert pixels.min() < 128 < pixels.max()  # written on, not a blank page
