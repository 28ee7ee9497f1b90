"""The images of the pictures: fitting them to the patch grid, naming the outputs, and what the
pictures share (patch maps to pixel maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dinokit.data.folders import DataError
from dinokit.viz.inputs import fit_to_patches, image_paths, output_names, upsample
from tests.viz.test_viz_attention import noise_image


def test_upsample_repeats_each_patch():
    maps = torch.arange(6.0).reshape(1, 2, 3)
    up = upsample(maps, 4)
    assert up.shape == (1, 8, 12)
    assert torch.equal(up[0, 4:8, 8:12], torch.full((4, 4), 5.0))


def test_crop_is_centred_and_never_squashes():
    image = noise_image(53, 30)
    fitted = fit_to_patches(image, 8)
    assert fitted.size == (48, 24)
    assert np.array_equal(np.asarray(fitted), np.asarray(image)[3:27, 2:50])
    padded = fit_to_patches(image, 8, fit="pad", fill=(0.0, 0.0, 0.0))
    assert padded.size == (56, 32)
    assert np.array_equal(np.asarray(padded)[1:31, 1:54], np.asarray(image))
    assert np.asarray(padded)[0].max() == 0


def test_image_size_resizes_the_shorter_side_keeping_aspect():
    fitted = fit_to_patches(noise_image(100, 60), 8, image_size=40)
    assert fitted.size == (64, 40)  # 100x60 -> 66x40 -> cropped to 64x40
    tall = fit_to_patches(noise_image(30, 90), 4, image_size=20)
    assert tall.size == (20, 60)


def test_image_smaller_than_a_patch():
    with pytest.raises(DataError, match=r"smaller than one .*--fit pad on the command line"):
        fit_to_patches(noise_image(6, 20), 8)
    assert fit_to_patches(noise_image(6, 20), 8, fit="pad").size == (8, 24)
    for size in (0, -5):
        with pytest.raises(ValueError, match="image_size must be positive"):
            fit_to_patches(noise_image(6, 20), 8, image_size=size)


def test_output_names_keep_the_extension_only_where_stems_collide():
    keys = [Path(p) for p in ("x.jpg", "x.png", "sub/x.jpg", "y.png", "Z.png", "z.jpg", "w.jpg", "w.jpg.png",
                              "w.png", "overview.jpg")]
    assert output_names(keys, reserved=("overview",)) == [Path(p) for p in (
        "x.jpg", "x.png", "sub/x", "y", "Z.png", "z.jpg", "w.jpg", "w.jpg-2", "w.png", "overview.jpg")]


def test_missing_image_path_is_named_as_such(tmp_path):
    with pytest.raises(DataError, match=r"nope.jpg does not exist \(give an image file or a folder"):
        image_paths(tmp_path / "nope.jpg")
