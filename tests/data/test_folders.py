import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data import folders
from dinokit.data.folders import (BadImageError, DataError, ImageList, decode_plain_jpeg, hold_out, load_rgb,
                                   reduction_for, scan_folder, split_train_val, why_none_held_out)


def _img(path, mode="RGB", size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def test_recursive_scan_with_labels_from_subfolders(tmp_path):
    _img(tmp_path / "cat" / "a.JPG")
    _img(tmp_path / "cat" / "deep" / "b.png")
    _img(tmp_path / "dog" / "c.webp")
    _img(tmp_path / "dog" / "d.TIFF")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    images = scan_folder(tmp_path)
    assert len(images) == 4 and images.labelled
    assert images.classes == ["cat", "dog"] and images.labels == [0, 0, 1, 1]


def test_linked_folders_are_followed_and_hidden_ones_and_the_skipped_one_left_out(tmp_path):
    store, data = tmp_path / "store", tmp_path / "data"
    _img(store / "cats" / "a.png")
    _img(store / "dogs" / "b.png")
    data.mkdir()
    (data / "cats").symlink_to(store / "cats")  # a subset built from links
    (data / "dogs").symlink_to(store / "dogs")
    (data / "dogs" / "loop").symlink_to(data)  # a link back up is followed once
    _img(data / ".ipynb_checkpoints" / "c.png")
    _img(data / "cats" / ".thumbs" / "d.png")
    _img(data / "run" / "views.png")
    images = scan_folder(data, skip=data / "run")
    assert [p.relative_to(data).as_posix() for p in images.paths] == ["cats/a.png", "dogs/b.png"]
    assert images.classes == ["cats", "dogs"]


def test_a_link_to_nothing_named_like_an_image_is_left_out_with_a_warning(tmp_path, capsys):
    _img(tmp_path / "cats" / "a.png")
    (tmp_path / "cats" / "b.png").symlink_to(tmp_path / "moved" / "b.png")  # its target moved away
    assert [p.name for p in scan_folder(tmp_path).paths] == ["a.png"]
    assert f"{tmp_path / 'cats' / 'b.png'} links to {tmp_path / 'moved' / 'b.png'}, which does not exist" \
        in capsys.readouterr().err


def test_other_run_folders_in_the_data_are_left_out_and_look_alikes_kept(tmp_path):
    _img(tmp_path / "cats" / "a.png")
    _img(tmp_path / "cats" / "old-run" / "views.png")  # an earlier dinokit run's folder
    (tmp_path / "cats" / "old-run" / "config.yaml").write_text("epochs: 1\n")
    (tmp_path / "cats" / "old-run" / "metrics.jsonl").write_text("")
    _img(tmp_path / "dogs" / "b.png")
    (tmp_path / "dogs" / "config.yaml").write_text("camera: x\n")  # a config alone is not a run
    assert [p.relative_to(tmp_path).as_posix() for p in scan_folder(tmp_path).paths] == ["cats/a.png", "dogs/b.png"]


def test_a_folder_that_cannot_be_read_is_left_out_with_a_warning(tmp_path, monkeypatch, capsys):
    """chmod 000 on a class folder (simulated: root reads it anyway) must not drop the class silently."""
    _img(tmp_path / "cats" / "a.png")
    _img(tmp_path / "dogs" / "b.png")
    scandir = folders.os.scandir

    def no_permission(path="."):
        if str(path) == str(tmp_path / "dogs"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(folders.os, "scandir", no_permission)
    images = scan_folder(tmp_path)
    monkeypatch.undo()
    assert [p.name for p in images.paths] == ["a.png"]
    assert f"cannot read the folder {tmp_path / 'dogs'} (Permission denied)" in capsys.readouterr().err


def test_images_in_root_make_the_folder_unlabelled(tmp_path):
    _img(tmp_path / "x.bmp")
    _img(tmp_path / "sub" / "y.jpeg")
    images = scan_folder(tmp_path)
    assert not images.labelled and len(images) == 2
    with pytest.raises(DataError, match="needs labels"):
        images.require_labels("k-NN")


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="holds no images"):
        scan_folder(tmp_path / "empty")


def test_split_is_stratified_and_disjoint(tmp_path):
    for c in range(3):
        for i in range(10):
            _img(tmp_path / f"c{c}" / f"{i}.png")
    train, val = split_train_val(scan_folder(tmp_path), 0.2, seed=1)
    assert len(train) == 24 and len(val) == 6
    assert sorted(val.labels) == [0, 0, 1, 1, 2, 2]
    assert not set(train.paths) & set(val.paths)
    assert split_train_val(scan_folder(tmp_path), 0.2, seed=1)[1].paths == val.paths


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    Image.new(mode, (5, 4)).save(path)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (5, 4)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "x.png")
    assert np.asarray(load_rgb(tmp_path / "x.png")).min() == 255


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (6, 3))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (3, 6)


def _photo(path, size, **save):
    """A smooth colour picture (a JPEG compresses it as it would a photo) of ``size`` (w, h)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1).astype(np.uint8)
    Image.fromarray(arr).save(path, **save)
    return arr


def test_reduction_keeps_the_short_side_at_least_min_side():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        size = tuple(int(v) for v in rng.integers(1, 30_000, size=2))
        min_side = int(rng.integers(1, 600))
        factor = reduction_for(size, min_side)
        assert factor & (factor - 1) == 0  # a power of two
        assert factor == 1 or min(size) // factor >= min_side
        assert min(size) // (2 * factor) < min_side  # and the largest that keeps it
    assert reduction_for((4032, 3024), 496) == 4 and reduction_for((500, 375), 496) == 1
    assert reduction_for((4032, 3024), 0) == 1


@pytest.mark.parametrize("size, min_side, decoded", [
    ((1600, 1200), 300, (400, 300)),    # 1/4: 300 px is still enough
    ((1600, 1200), 301, (800, 600)),    # 1/4 would be 300 px: 1/2
    ((1600, 1200), 700, (1600, 1200)),  # full size
    ((1000, 3000), 100, (125, 375)),    # 1/8, portrait
    ((1001, 1003), 250, (251, 251)),    # 1/4, rounded up
    ((3000, 2000), 100, (188, 125)),    # 1/16: 1/8 while decoding, then 1/2
])
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_large_images_are_reduced_to_what_is_needed(tmp_path, size, min_side, decoded, suffix):
    arr = _photo(tmp_path / f"p{suffix}", size, quality=95)
    image = load_rgb(tmp_path / f"p{suffix}", min_side)
    assert image.size == decoded and image.mode == "RGB" and min(image.size) >= min_side
    full = Image.fromarray(arr).resize(decoded, Image.Resampling.BOX)
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(full, dtype=int)).mean() < 3  # the same picture


def test_reduced_images_keep_their_exif_rotation_and_colours(tmp_path):
    img = Image.new("RGB", (800, 400))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg", 100).size == (100, 200)
    assert load_rgb(tmp_path / "r.jpg").size == (400, 800)
    Image.new("CMYK", (800, 600), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red
    cmyk = load_rgb(tmp_path / "cmyk.jpg", 100)
    assert cmyk.mode == "RGB" and cmyk.size == (200, 150) and cmyk.getpixel((100, 75))[0] > 200
    Image.new("I;16", (800, 600), 65535).save(tmp_path / "grey16.tif")
    grey = load_rgb(tmp_path / "grey16.tif", 100)
    assert grey.size == (200, 150) and np.asarray(grey).min() == 255


@pytest.mark.parametrize("content", [b"", b"this is not a jpeg", None])
def test_unreadable_files_raise_bad_image(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is None:  # truncated
        Image.new("RGB", (64, 64), "red").save(path)
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_bytes(content)
    for min_side in (0, 8):
        with pytest.raises(BadImageError, match="bad.jpg"):
            load_rgb(path, min_side)
        assert decode_plain_jpeg(path, min_side) is None  # load_rgb then says why


def _rgb_files(tmp_path) -> dict[str, tuple]:
    """Files of every kind ``decode_plain_jpeg`` tells apart, with the ``min_side`` to load them at."""
    files = {}
    for name, save in {"q95.jpg": dict(quality=95), "444.jpg": dict(quality=90, subsampling=0),
                       "422.jpg": dict(quality=80, subsampling=1), "progressive.jpg": dict(progressive=True),
                       "p.png": {}}.items():
        _photo(tmp_path / name, (50, 37), **save)
        files[name] = (tmp_path / name, 0)
    Image.fromarray(np.arange(48 * 40, dtype=np.uint8).reshape(40, 48)).save(tmp_path / "grey.jpg")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rotated = Image.fromarray(_photo(tmp_path / "tmp.png", (40, 20)))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    _photo(tmp_path / "large.jpg", (800, 600), quality=90)
    Image.new("RGBA", (9, 7), (255, 0, 0, 128)).save(tmp_path / "alpha.png")
    files.update({name: (tmp_path / name, 0) for name in ("grey.jpg", "cmyk.jpg", "rotated.jpg", "alpha.png")})
    files["large.jpg, reduced"] = (tmp_path / "large.jpg", 100)
    files["large.jpg"] = (tmp_path / "large.jpg", 0)
    return files


def test_plain_jpegs_decode_to_load_rgbs_pixels_and_other_files_to_none(tmp_path, monkeypatch):
    """Plain JPEGs (RGB or grey, upright, not reduced, within ``max_side``) are decoded by
    torchvision into the same pixels as ``load_rgb``'s, as 3 x H x W uint8; every other file is
    left to ``load_rgb`` (``None``), also where torchvision lacks its image codecs."""
    decoded = []
    monkeypatch.setattr(folders, "decode_jpeg", lambda data, **kw: decoded.append(1) or torchvision_decode(data, **kw))
    files = _rgb_files(tmp_path)
    for name, (path, min_side) in files.items():
        decoded.clear()
        tensor = decode_plain_jpeg(path, min_side)
        plain = name in ("q95.jpg", "444.jpg", "422.jpg", "progressive.jpg", "grey.jpg", "large.jpg")
        assert (tensor is not None) == plain == bool(decoded), name
        if plain:
            expected = np.asarray(load_rgb(path, min_side)).transpose(2, 0, 1)
            assert tensor.dtype == torch.uint8 and tensor.shape == expected.shape, name
            assert np.array_equal(tensor.numpy(), expected), name
    large = files["large.jpg"][0]  # 800 x 600
    assert decode_plain_jpeg(large, max_side=799) is None and decode_plain_jpeg(large, max_side=800) is not None
    monkeypatch.setattr(folders, "decode_jpeg", None)  # a torchvision without its image codecs: PIL for all
    assert all(decode_plain_jpeg(path, min_side) is None for path, min_side in files.values())


def torchvision_decode(data, **kw):
    from torchvision.io import decode_jpeg

    return decode_jpeg(data, **kw)


def test_images_whose_names_are_not_utf8_are_fingerprinted(tmp_path):
    odd = tmp_path / os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name from an old archive
    assert ImageList(tmp_path, [odd]).fingerprint() != ImageList(tmp_path, [tmp_path / "cafe.jpg"]).fingerprint()


def test_the_fingerprint_is_the_same_wherever_the_folder_is_mounted(tmp_path):
    here = ImageList(tmp_path / "a", [tmp_path / "a" / "x" / "1.jpg"], [0], ["x"])
    moved = ImageList(tmp_path / "b", [tmp_path / "b" / "x" / "1.jpg"], [0], ["x"])
    relabelled = ImageList(tmp_path / "b", [tmp_path / "b" / "x" / "1.jpg"], [1], ["w", "x"])
    assert here.fingerprint() == moved.fingerprint() != relabelled.fingerprint()
    assert here.fingerprint().startswith("1 images, ")


def test_a_run_holds_out_labelled_images_of_two_classes_or_more_only(tmp_path):
    paths = [tmp_path / c / f"{i}.png" for c in ("a", "b") for i in range(4)]
    two = ImageList(tmp_path, paths, [0] * 4 + [1] * 4, ["a", "b"])
    train, held_out = hold_out(two, 0.25, seed=0)
    assert len(train) == 6 and len(held_out) == 2 and sorted(held_out.labels) == [0, 1]
    assert (train.paths, held_out.paths) == tuple(s.paths for s in split_train_val(two, 0.25, 0))  # the same split
    for images, fraction, why in [(two, 0.0, "val_fraction=0"), (ImageList(tmp_path, paths), 0.25, "no labels"),
                                  (ImageList(tmp_path, paths, [0] * 8, ["a"]), 0.25, "one class")]:
        assert hold_out(images, fraction, seed=0) == (images, None) and why in why_none_held_out(images, fraction)
    assert why_none_held_out(two, 0.25) is None
