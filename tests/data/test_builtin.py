from dinokit.data.builtin import SHAPES, builtin_shapes
from dinokit.data.folders import load_rgb, scan_folder


def test_generated_once_labelled_and_cached(tmp_path):
    folder = builtin_shapes(images_per_class=3, size=24, root=tmp_path)
    images = scan_folder(folder)
    assert images.classes == sorted(SHAPES) and len(images) == 3 * len(SHAPES)
    assert load_rgb(images.paths[0]).size == (24, 24)
    stamp = images.paths[0].stat().st_mtime_ns
    assert builtin_shapes(images_per_class=3, size=24, root=tmp_path) == folder
    assert images.paths[0].stat().st_mtime_ns == stamp  # not regenerated
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shapes-")]  # no staging left


def test_same_seed_same_pictures(tmp_path):
    a = builtin_shapes(images_per_class=2, size=16, root=tmp_path / "a")
    b = builtin_shapes(images_per_class=2, size=16, root=tmp_path / "b")
    assert (a / "star" / "0001.png").read_bytes() == (b / "star" / "0001.png").read_bytes()
