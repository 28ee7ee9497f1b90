"""The run folder: made with clear errors, held by one run at a time."""

import pytest

from dinokit.config import ConfigError
from dinokit.train.run_folder import LOCK, hold_run_folder


def test_a_second_run_in_the_same_folder_is_refused_until_the_first_ends(tmp_path):
    out = tmp_path / "runs" / "a"
    with hold_run_folder(out):
        (out / "metrics.jsonl").write_text("")
        assert out.is_dir()
        with pytest.raises(ConfigError, match=rf"another dinokit train \(process \d+\) is running in {out}"):
            with hold_run_folder(out):
                pass
        with hold_run_folder(tmp_path / "runs" / "b"):  # another folder: no conflict
            pass
    with hold_run_folder(out):  # released
        pass
    assert (out / "metrics.jsonl").exists()


def test_a_folder_made_for_a_run_refused_at_once_is_removed(tmp_path):
    with pytest.raises(ValueError, match="refused"):
        with hold_run_folder(tmp_path / "new" / "run"):
            raise ValueError("refused")
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    with hold_run_folder(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").is_dir() and (tmp_path / "kept" / LOCK).exists()


def test_a_file_or_an_impossible_folder_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        with hold_run_folder(tmp_path / "afile"):
            pass
    with pytest.raises(ConfigError, match="cannot make the run folder .*afile/sub"):
        with hold_run_folder(tmp_path / "afile" / "sub"):
            pass


def test_other_processes_of_a_distributed_run_neither_make_nor_lock(tmp_path):
    with hold_run_folder(tmp_path / "run"):
        with hold_run_folder(tmp_path / "run", owner=False):
            pass
    with hold_run_folder(tmp_path / "elsewhere", owner=False):
        pass
    assert not (tmp_path / "elsewhere").exists()
