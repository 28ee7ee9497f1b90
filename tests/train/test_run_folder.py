"""The run folder: made with clear errors, held by one run at a time."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from dinokit.config import ConfigError
from dinokit.train import run_folder
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


HOLD_AND_FORK = """
import os, sys, time
from pathlib import Path
from dinokit.train.run_folder import hold_run_folder
with hold_run_folder(Path(sys.argv[1])):
    child = os.fork()  # a data loader worker
    if child == 0:
        time.sleep(60)
        os._exit(0)
    Path(sys.argv[2]).write_text(str(child))
    time.sleep(60)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_killed_runs_forked_children_do_not_keep_its_folder_locked(tmp_path):
    """kill -9 of a run: its data loader workers outlive it for seconds (forever if one hangs);
    they must not hold the folder, or the resume is refused naming a process that has ended."""
    out, child_pid = tmp_path / "run", tmp_path / "child"
    run = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(out), str(child_pid)])
    try:
        for _ in range(200):
            if child_pid.exists() and child_pid.read_text():
                break
            time.sleep(0.05)
        run.kill()
        run.wait()
        with hold_run_folder(out):  # the resume, at once
            pass
    finally:
        run.kill()
        if child_pid.exists() and child_pid.read_text():
            os.kill(int(child_pid.read_text()), signal.SIGKILL)


def test_a_read_only_run_folder_is_a_clear_error(tmp_path, monkeypatch):
    """chmod 555 on an existing run folder: the lock file cannot be made (simulated, since root may write anyway)."""
    (tmp_path / "ro").mkdir()

    def read_only(path, mode="r", *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(run_folder, "open", read_only, raising=False)
    with pytest.raises(ConfigError, match=f"cannot write in the run folder {tmp_path / 'ro'}: Permission denied; "
                                          "make it writable or pick another --out"):
        with hold_run_folder(tmp_path / "ro"):
            pass


def test_a_full_disk_is_a_clear_error_and_leaves_no_folder_behind(tmp_path, monkeypatch):
    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder.os, "write", full_disk)
    with pytest.raises(ConfigError, match=f"cannot write in the run folder {tmp_path / 'new'}: No space left on "
                                          "device; free space there or pick another --out"):
        with hold_run_folder(tmp_path / "new"):
            pass
    monkeypatch.undo()
    assert not (tmp_path / "new").exists()


def test_other_processes_of_a_distributed_run_neither_make_nor_lock(tmp_path):
    ran = []
    with hold_run_folder(tmp_path / "elsewhere", owner=False):  # neither make ...
        assert not (tmp_path / "elsewhere").exists()
        ran.append("new")
    (tmp_path / "run").mkdir()
    with hold_run_folder(tmp_path / "run", owner=False):  # ... nor lock: the owner takes the folder meanwhile
        assert not (tmp_path / "run" / LOCK).exists()
        with hold_run_folder(tmp_path / "run"):
            ran.append("owner")
    with hold_run_folder(tmp_path / "run"):  # and, held by the owner, the folder is not refused to the others
        with hold_run_folder(tmp_path / "run", owner=False):
            ran.append("held")
    assert ran == ["new", "owner", "held"]
