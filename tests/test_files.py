"""Files written whole or not at all."""

import numpy as np
import pytest

from dinokit.files import atomic_write, write_text_atomically


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
