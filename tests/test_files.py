"""Files written whole or not at all."""

import numpy as np
import pytest

from dinokit.files import COMPLETE, atomic_write, folder_made_once, write_text_atomically


def test_a_write_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "new" / "folder" / "result.json"  # the folder is made
    assert write_text_atomically(path, "first") == path and path.read_text() == "first"
    write_text_atomically(path, "second")
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["result.json"]


@pytest.mark.parametrize("stop", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_write_stopped_half_way_keeps_the_previous_file_and_removes_its_own(tmp_path, stop):
    path = tmp_path / "knn.json"
    path.write_text('{"whole": true}')

    def torn(tmp):
        tmp.write_text('{"who')
        raise stop

    with pytest.raises(type(stop)):
        atomic_write(path, torn)
    assert path.read_text() == '{"whole": true}' and [p.name for p in tmp_path.iterdir()] == ["knn.json"]


def test_writers_that_go_by_the_suffix_see_the_real_one(tmp_path):
    path = atomic_write(tmp_path / "features.npz", lambda tmp: np.savez(tmp, x=np.arange(3)))  # savez adds .npz else
    with np.load(path) as data:
        assert data["x"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["features.npz"]


def test_a_leftover_of_a_killed_write_is_replaced(tmp_path):
    (tmp_path / ".checkpoint.tmp.pth").write_text("half of an old save")
    atomic_write(tmp_path / "checkpoint.pth", lambda tmp: tmp.write_text("new"), durable=True)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_a_folder_is_made_once_and_a_half_made_one_is_made_anew(tmp_path):
    folder, calls = tmp_path / "cache" / "textures", []

    def fill(staging):
        calls.append(staging)
        (staging / "a.txt").write_text("image")

    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("half of an interrupted attempt")  # no COMPLETE marker: not used
    assert folder_made_once(folder, fill) == folder and (folder / "a.txt").read_text() == "image"
    assert folder_made_once(folder, fill) == folder and len(calls) == 1  # the second call makes nothing
    assert (folder / COMPLETE).exists() and [p.name for p in folder.parent.iterdir()] == ["textures"]

    def fails(staging):
        (staging / "b.txt").write_text("part")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        folder_made_once(tmp_path / "other", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no staging folder, no half-made folder
