"""Attention maps: the top-mass mask on constructed attention, and shapes for any image and patch size."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dinokit.models.vit import VisionTransformer
from dinokit.viz.attention import (AttentionMaps, attention_figure, attention_maps, cls_patch_attention,
                                   save_attention, top_mass_mask)
from dinokit.viz.inputs import NeedsViTError


def small_vit(patch_size: int) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=4 * patch_size, patch_size=patch_size, embed_dim=24, depth=2, num_heads=3).eval()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def mass_on(grid: tuple[int, int], patches: list[tuple[int, int]], share_each: float) -> torch.Tensor:
    """A map whose mass sits on ``patches`` (``share_each`` each); the rest spread evenly."""
    h, w = grid
    m = torch.full((h, w), (1 - share_each * len(patches)) / (h * w - len(patches)))
    for i, j in patches:
        m[i, j] = share_each
    return m


def test_mask_keeps_the_patches_holding_the_mass():
    # 4 patches hold 0.18 each (0.72 together): 3 of them (0.54) fall short of 0.6, all 4 reach it
    known = [(1, 1), (1, 2), (2, 1), (2, 2)]
    shares = mass_on((8, 8), known, 0.18)
    mask = top_mass_mask(shares, 0.6)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for i, j in known:
        expected[i, j] = True
    assert torch.equal(mask, expected)
    # at 0.5, three of the four suffice (0.54); at 0.9 the mask must reach into the rest
    assert int(top_mass_mask(shares, 0.5).sum()) == 3
    assert int(top_mass_mask(shares, 0.9).sum()) == 4 + int(np.ceil((0.9 - 0.72) / (0.28 / 60) - 1e-9))


def test_mask_from_full_attention_ignores_the_cls_to_cls_term():
    # the [CLS] row gives itself half of its attention; the patch shares are renormalised first
    grid, heads = (4, 6), 2
    targets = [[(0, 0), (3, 5)], [(2, 3)]]
    shares_each = [0.35, 0.7]
    attention = torch.rand(1, heads, 25, 25).softmax(-1)
    for k in range(heads):
        patch_row = mass_on(grid, targets[k], shares_each[k]).flatten()
        attention[0, k, 0] = torch.cat([torch.tensor([0.5]), 0.5 * patch_row])
    shares = cls_patch_attention(attention, grid)
    assert shares.shape == (1, heads, 4, 6)
    assert torch.allclose(shares.sum(dim=(-2, -1)), torch.ones(1, heads))
    masks = top_mass_mask(shares, 0.6)
    for k in range(heads):
        assert sorted(map(tuple, masks[0, k].nonzero().tolist())) == targets[k]


def test_mask_matches_the_official_formula_on_random_maps():
    # the DINO repository's rule: sort ascending, normalise, cumulative sum, keep where it exceeds 1 - threshold
    torch.manual_seed(0)
    shares = torch.rand(5, 3, 7, 9) ** 4
    for threshold in (0.1, 0.6, 0.9):
        flat = shares.flatten(-2)
        values, order = torch.sort(flat, dim=-1)
        values = values / values.sum(dim=-1, keepdim=True)
        keep_sorted = values.cumsum(dim=-1) > 1 - threshold
        reference = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted).reshape(shares.shape)
        assert torch.equal(top_mass_mask(shares, threshold), reference)


def test_mask_limits():
    shares = torch.rand(3, 5) + 0.01
    assert top_mass_mask(shares, 1.0).all()
    one = mass_on((3, 5), [(2, 4)], 0.7)
    assert top_mass_mask(one, 0.6).nonzero().tolist() == [[2, 4]]
    with pytest.raises(ValueError):
        top_mass_mask(shares, 0.0)


@pytest.mark.parametrize("patch_size", [4, 8, 16])
def test_shapes_for_non_square_images(patch_size):
    model = small_vit(patch_size)
    image = noise_image(70, 37)  # W x H
    [(key, crop)] = list(attention_maps(model, [("a", image)], fit="crop"))
    [(_, pad)] = list(attention_maps(model, [("a", image)], fit="pad"))
    p = patch_size
    for maps, (height, width) in ((crop, (37 // p * p, 70 // p * p)), (pad, (-(-37 // p) * p, -(-70 // p) * p))):
        assert maps.image.shape == (height, width, 3)
        assert maps.shares.shape == (3, height // p, width // p)
        assert maps.masks.shape == maps.shares.shape and maps.masks.dtype == bool
        assert maps.heatmaps().shape == maps.pixel_masks().shape == (3, height, width)
        assert np.allclose(maps.shares.sum(axis=(1, 2)), 1, atol=1e-5)
        assert maps.masks.any(axis=(1, 2)).all()
    assert key == "a"


def test_batches_give_the_same_maps_as_single_images_in_order():
    model = small_vit(8)
    images = [(f"img{i}", noise_image(*size, seed=i))
              for i, size in enumerate([(40, 24), (40, 24), (40, 24), (24, 40), (40, 24)])]
    batched = list(attention_maps(model, images, batch_size=2))
    single = list(attention_maps(model, images, batch_size=1))
    assert [k for k, _ in batched] == [k for k, _ in images]
    for (_, a), (_, b) in zip(batched, single):
        assert np.allclose(a.shares, b.shares, atol=1e-5)
        assert np.array_equal(a.image, b.image)


def test_non_vit_is_refused_with_a_clear_message():
    with pytest.raises(NeedsViTError, match="attention maps need a ViT"):
        list(attention_maps(nn.Conv2d(3, 8, 3), [("a", noise_image(32, 32))]))


def test_save_attention_writes_one_file_per_head(tmp_path):
    model = small_vit(8)
    [(_, maps)] = list(attention_maps(model, [("a", noise_image(48, 32))], threshold=0.6))
    grid = save_attention(maps, tmp_path / "a")
    assert grid.exists()
    for k in range(3):
        heat = np.asarray(Image.open(tmp_path / "a" / f"attn-head{k}.png"))
        mask = np.asarray(Image.open(tmp_path / "a" / f"mask-head{k}.png"))
        assert heat.shape == (32, 48, 3)
        assert np.array_equal(mask > 0, maps.pixel_masks()[k])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "image.png")), maps.image)


def test_figure_has_two_rows_of_a_column_per_head_plus_one_for_the_image():
    maps = AttentionMaps(np.zeros((16, 24, 3), np.uint8), np.full((4, 2, 3), 1 / 6, np.float32),
                         np.ones((4, 2, 3), bool), 8, 0.6)
    fig = attention_figure(maps, title="t")
    assert len(fig.axes) == 2 * 5
    assert {ax.get_subplotspec().get_gridspec().get_geometry() for ax in fig.axes} == {(2, 5)}  # 2 rows, 4 + 1 columns


def test_the_model_mode_is_restored():
    model = small_vit(8).train()
    list(attention_maps(model, [("a", noise_image(32, 32))]))
    assert model.training
