import numpy as np
import pytest
from PIL import Image

from dinokit.data.folders import BadImageError, DataError, load_rgb, scan_folder, split_train_val


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


@pytest.mark.parametrize("content", [b"", b"this is not a jpeg", None])
def test_unreadable_files_raise_bad_image(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is None:  # truncated
        Image.new("RGB", (64, 64), "red").save(path)
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_bytes(content)
    with pytest.raises(BadImageError, match="bad.jpg"):
        load_rgb(path)
