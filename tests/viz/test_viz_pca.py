"""Patch-feature PCA: known directions land in the known channels, background removal, shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.models.vit import VisionTransformer
from dinokit.viz.pca import patch_features, pca_figure, pca_rgb, principal_components, save_pca


def unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_known_directions_land_in_channels_in_order():
    # features = 5 a u1 + 2 b u2 + 1 c u3 + small noise, with a, b, c uncorrelated over the patches:
    # u1 must be red, u2 green, u3 blue
    d = 32
    directions = torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(1)))[0].T
    g = torch.Generator().manual_seed(2)
    grids = [(6, 9), (5, 5)]
    raw = torch.randn(6 * 9 + 5 * 5, 3, generator=g)
    uncorrelated = torch.linalg.qr(raw - raw.mean(0))[0] * len(raw) ** 0.5
    coefficients = [c.reshape(h, w, 3) for c, (h, w) in zip(uncorrelated.split([54, 25]), grids)]
    features = [(c * torch.tensor([5.0, 2.0, 1.0])) @ directions + 0.05 * torch.randn(h, w, d, generator=g)
                for c, (h, w) in zip(coefficients, grids)]
    colours = pca_rgb(features)
    assert [c.shape for c in colours] == [(6, 9, 3), (5, 5, 3)]
    all_colours = np.concatenate([c.reshape(-1, 3) for c in colours])
    all_coeffs = torch.cat([c.reshape(-1, 3) for c in coefficients]).numpy()
    for channel in range(3):
        assert abs(correlation(all_colours[:, channel], all_coeffs[:, channel])) > 0.99
        # min-max over all images together: each channel spans exactly [0, 1]
        assert all_colours[:, channel].min() == pytest.approx(0, abs=1e-6)
        assert all_colours[:, channel].max() == pytest.approx(1, abs=1e-6)


def test_principal_components_find_the_dominant_direction():
    d = 16
    u = unit(d, 0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 1, generator=g) * 3 * u + 0.1 * torch.randn(500, d, generator=g) + 7.0
    mean, components = principal_components(x, k=3)
    assert components.shape == (3, d)
    assert abs(float(components[0].double() @ u.double())) > 0.999
    assert torch.allclose(components @ components.T, torch.eye(3, dtype=components.dtype), atol=1e-8)
    assert torch.allclose(mean.float(), x.mean(0), atol=1e-5)
    # signs are fixed: the largest-magnitude coordinate is positive
    assert (components.gather(1, components.abs().argmax(1, keepdim=True)) > 0).all()


@pytest.mark.parametrize("flip", [1.0, -1.0])
def test_background_removal_keeps_the_centre_whatever_the_sign(flip):
    # object in the centre 4x4 of an 8x8 grid, background around it; the first component separates them
    d = 24
    fg, bg = unit(d, 10) * 4, unit(d, 11) * -4
    g = torch.Generator().manual_seed(4)
    features = []
    centre = torch.zeros(8, 8, dtype=torch.bool)
    centre[2:6, 2:6] = True
    for _ in range(2):
        f = torch.where(centre[..., None], fg, bg) + 0.3 * torch.randn(8, 8, d, generator=g)
        features.append(flip * f)
    colours = pca_rgb(features, background_threshold=0.5)
    for c in colours:
        kept = c.max(axis=-1) > 0
        assert np.array_equal(kept, centre.numpy())
        assert (c[~centre.numpy()] == 0).all()


def test_background_removal_without_any_foreground_says_so():
    one_patch = [torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(5))]
    for threshold in (0.0, 0.5):
        with pytest.raises(ValueError, match="no foreground patch"):
            pca_rgb(one_patch, background_threshold=threshold)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        pca_rgb(one_patch, background_threshold=1.0)
    assert pca_rgb(one_patch)[0].shape == (1, 1, 3)  # without background removal: one colour
    two = [torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(6))]
    assert pca_rgb(two, background_threshold=0.99)[0].shape == (2, 2, 3)  # the top patch is always foreground


@pytest.mark.parametrize("patch_size", [4, 8, 16])
def test_patch_features_of_non_square_images(patch_size, tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=4 * patch_size, patch_size=patch_size, embed_dim=24, depth=1, num_heads=2)
    rng = np.random.default_rng(0)
    images = [("wide", Image.fromarray(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8))),
              ("tall", Image.fromarray(rng.integers(0, 256, (65, 33, 3), dtype=np.uint8)))]
    results = list(patch_features(model, images))
    p = patch_size
    assert [key for key, _, _ in results] == ["wide", "tall"]
    assert results[0][2].shape == (40 // p, 72 // p, 24)
    assert results[1][2].shape == (65 // p, 33 // p, 24)
    colours = pca_rgb([f for _, _, f in results])
    path = save_pca(results[1][1], colours[1], tmp_path / "tall.png")
    written = np.asarray(Image.open(path))
    assert written.shape == (65 // p * p, 33 // p * p, 3)
    assert np.array_equal(written[:p, :p], np.broadcast_to((colours[1][0, 0] * 255).round().astype(np.uint8), (p, p, 3)))
    assert len(pca_figure([(k, pic, c) for (k, pic, _), c in zip(results, colours)]).axes) == 4
