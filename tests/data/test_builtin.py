import numpy as np
import pytest

from dinokit.data.builtin import TEXTURES, builtin_textures, texture_mask
from dinokit.data.folders import DataError, load_rgb, scan_folder


def test_generated_once_labelled_and_cached(tmp_path):
    folder = builtin_textures(images_per_class=3, size=24, root=tmp_path)
    images = scan_folder(folder)
    assert images.classes == sorted(TEXTURES) and len(images) == 3 * len(TEXTURES)
    assert load_rgb(images.paths[0]).size == (24, 24)
    stamp = images.paths[0].stat().st_mtime_ns
    assert builtin_textures(images_per_class=3, size=24, root=tmp_path) == folder
    assert images.paths[0].stat().st_mtime_ns == stamp  # not regenerated
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".textures-")]  # no staging left


def test_same_seed_same_pictures(tmp_path):
    a = builtin_textures(images_per_class=2, size=16, root=tmp_path / "a")
    b = builtin_textures(images_per_class=2, size=16, root=tmp_path / "b")
    assert (a / "rings" / "0001.png").read_bytes() == (b / "rings" / "0001.png").read_bytes()


def test_images_are_grey_ink_on_paper(tmp_path):
    folder = builtin_textures(images_per_class=2, size=32, root=tmp_path)
    pixels = np.asarray(load_rgb(next((folder / "checkerboard").iterdir())), dtype=np.float32)
    assert np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() < 40  # grey up to noise
    assert pixels.min() < 80 and pixels.max() > 180  # dark ink and light paper both present


@pytest.mark.parametrize("texture", TEXTURES)
def test_every_texture_puts_ink_on_part_of_the_image(texture):
    mask = texture_mask(texture, 64, np.random.default_rng(0))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0.0, 1.0}
    assert 0.05 < mask.mean() < 0.95


def test_stripes_across_vary_down_the_image_and_stripes_down_across_it():
    rng = np.random.default_rng(1)
    across, down = texture_mask("stripes_across", 128, rng), texture_mask("stripes_down", 128, rng)
    # stripes across: rows are nearly constant, columns change; the other way round for stripes down
    assert across.std(axis=1).mean() < across.std(axis=0).mean()
    assert down.std(axis=0).mean() < down.std(axis=1).mean()


def test_unknown_texture_is_refused():
    with pytest.raises(ValueError, match="unknown texture"):
        texture_mask("zebra", 16, np.random.default_rng(0))


def test_a_cache_that_cannot_be_written_is_a_data_error_naming_the_setting(tmp_path):
    (tmp_path / "afile").write_text("")  # a place no folder can be made (as a read-only ~/.cache, even for root)
    with pytest.raises(DataError, match="cannot write the built-in data set into .*DINOKIT_CACHE"):
        builtin_textures(images_per_class=1, size=16, root=tmp_path / "afile" / "cache")
