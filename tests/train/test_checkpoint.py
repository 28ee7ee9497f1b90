import argparse
import errno
from fractions import Fraction

import pytest
import torch

from dinokit.train import checkpoint as ckpt_mod
from dinokit.train.checkpoint import (LATEST, SHARDED, CheckpointError, keep_checkpoint, load_checkpoint, resume_hint,
                                     save_checkpoint)


def test_round_trip_with_weights_only(tmp_path):
    state = {"teacher": {"w": torch.arange(3.0)}, "step": 7, "args": {"arch": "vit_tiny", "knn_k": [10, 20]}}
    save_checkpoint(state, tmp_path / "c.pth")
    back = load_checkpoint(tmp_path / "c.pth")
    assert back["step"] == 7 and torch.equal(back["teacher"]["w"], torch.arange(3.0))
    assert not list(tmp_path.glob(".*tmp*"))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    save_checkpoint({"step": 1}, path)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=f"no space left in {tmp_path}.*MiB needed.*previous checkpoint is intact"):
        save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_disk_that_fills_during_the_save_is_a_clear_error(tmp_path, monkeypatch):
    """A real full disk fails one of torch.save's writes, which PyTorch's zip writer then reports
    as a RuntimeError ("unexpected pos"), not as the OSError."""
    path = tmp_path / "c.pth"
    save_checkpoint({"step": 1}, path)

    class FillingFile:
        def __init__(self, f):
            self.f, self.room = f, 4096

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ckpt_mod, "open", lambda file, mode="r": FillingFile(open(file, mode)), raising=False)
    with pytest.raises(CheckpointError, match=f"no space left in {tmp_path}.*previous checkpoint is intact"):
        save_checkpoint({"step": 2, "w": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_failed_first_save_does_not_promise_a_checkpoint_to_resume_from(tmp_path, monkeypatch):
    def full_disk(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"MiB free\); no earlier checkpoint was written\. Free space and run "
                                              r"again\.$"):
        save_checkpoint({"step": 1}, tmp_path / LATEST)
    assert not list(tmp_path.iterdir())


def test_a_kept_checkpoint_is_a_link_that_outlives_the_next_save(tmp_path):
    latest, kept = tmp_path / LATEST, tmp_path / "checkpoint_epoch0001.pth"
    save_checkpoint({"step": 1}, latest)
    (tmp_path / f".{kept.stem}.tmp{kept.suffix}").write_bytes(b"left by a killed save")
    keep_checkpoint(latest, kept)
    assert kept.stat().st_ino == latest.stat().st_ino  # one copy on disk
    save_checkpoint({"step": 2}, latest)
    assert load_checkpoint(kept)["step"] == 1 and load_checkpoint(latest)["step"] == 2
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_kept_checkpoint_is_copied_where_links_fail_and_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    latest, kept = tmp_path / LATEST, tmp_path / "checkpoint_epoch0001.pth"
    save_checkpoint({"step": 1}, latest)
    save_checkpoint({"step": 0}, kept)

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(ckpt_mod.os, "link", no_links)
    keep_checkpoint(latest, kept)
    assert kept.stat().st_ino != latest.stat().st_ino and load_checkpoint(kept)["step"] == 1

    save_checkpoint({"step": 2}, latest)

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.shutil, "copyfile", full_disk)
    with pytest.raises(CheckpointError, match="no space left.*MiB needed.*previous checkpoint is intact"):
        keep_checkpoint(latest, kept)
    assert load_checkpoint(kept)["step"] == 1 and not list(tmp_path.glob(".*tmp*"))


def test_untrusted_pickles_are_refused(tmp_path):
    torch.save({"obj": Fraction(1, 3)}, tmp_path / "evil.pth")  # any class outside the weights-only allow-list
    with pytest.raises(CheckpointError, match="trust"):
        load_checkpoint(tmp_path / "evil.pth")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="x.pth is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "x.pth")
    (tmp_path / "empty.pth").touch()
    with pytest.raises(CheckpointError, match="empty.pth is empty"):
        load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pth")


def test_a_cut_short_checkpoint_names_the_epoch_checkpoint_beside_it(tmp_path):
    save_checkpoint({"step": 3}, tmp_path / "checkpoint_epoch0001.pth")
    whole = (tmp_path / "checkpoint_epoch0001.pth").read_bytes()
    (tmp_path / LATEST).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="is cut short .*checkpoint_epoch0001.pth beside it holds an earlier"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint_epoch0001.pth") == {"step": 3}
    (tmp_path / "checkpoint_epoch0001.pth").unlink()
    (tmp_path / "checkpoint_epoch0001.pth").hardlink_to(tmp_path / LATEST)  # the same file: no earlier state
    with pytest.raises(CheckpointError, match="is cut short") as err:
        load_checkpoint(tmp_path)
    assert "beside it" not in str(err.value)


def test_python_objects_load_only_when_trusted(tmp_path):
    torch.save({"args": argparse.Namespace(arch="vit_small")}, tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match="beyond tensors and plain values; it is loaded only if you trust it"):
        load_checkpoint(tmp_path / "official.pth")
    assert load_checkpoint(tmp_path / "official.pth", trust=True)["args"].arch == "vit_small"


def test_non_finite_weights_are_never_written(tmp_path):
    save_checkpoint({"teacher": {"w": torch.ones(2)}}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="non-finite values in teacher.w"):
        save_checkpoint({"teacher": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "c.pth")
    assert torch.equal(load_checkpoint(tmp_path / "c.pth")["teacher"]["w"], torch.ones(2))


def test_the_resume_hint_says_whether_a_checkpoint_was_written(tmp_path):
    assert "No checkpoint was written" in resume_hint(tmp_path)
    (tmp_path / SHARDED).mkdir()  # strategy=fsdp
    assert f"The last checkpoint in {tmp_path} is intact" in resume_hint(tmp_path)
    (tmp_path / SHARDED).rmdir()
    (tmp_path / LATEST).write_bytes(b"")
    assert f"The last checkpoint in {tmp_path} is intact" in resume_hint(tmp_path)
