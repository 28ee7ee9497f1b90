"""Never lose a run: bad images, non-finite losses, SIGTERM and SIGKILL at any moment."""

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.method.loss import DINOLoss
from dinokit.train import loop
from dinokit.train.checkpoint import load_checkpoint
from dinokit.train.knn_monitor import KnnMonitor
from dinokit.train.loop import TrainingError, train
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _bomb_png(path: Path) -> None:
    """A valid 1x1 PNG whose header claims 40000 x 40000 pixels (a decompression bomb)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[16:29]
    ihdr[0:8] = struct.pack(">II", 40000, 40000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    path.write_bytes(bytes(data))


def make_messy_folder(root: Path) -> tuple[int, int]:
    """16 good pictures, 8 odd but readable ones, 4 unreadable ones; returns (total, unreadable)."""
    rng = np.random.default_rng(0)
    good = root / "good"
    good.mkdir(parents=True)
    for i in range(16):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(good / f"{i}.png")
    odd = root / "odd"
    odd.mkdir()
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(odd / "cmyk.jpg")
    Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(odd / "sixteen.png")
    Image.new("P", (40, 40)).save(odd / "palette.png", transparency=0)
    Image.new("LA", (40, 40)).save(odd / "grey_alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (50, 30), "blue").save(odd / "rotated.jpg", exif=exif)
    Image.new("RGB", (3, 2), "green").save(odd / "tiny.png")
    Image.new("RGBA", (40, 40), (1, 2, 3, 4)).save(odd / "alpha.webp")
    Image.new("1", (40, 40)).save(odd / "bilevel.bmp")
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("definitely not a png")
    Image.new("RGB", (200, 200), "red").save(bad / "truncated.jpg")
    (bad / "truncated.jpg").write_bytes((bad / "truncated.jpg").read_bytes()[:300])
    _bomb_png(bad / "bomb.png")
    return 16 + 8 + 4, 4


def test_bad_images_are_skipped_counted_and_bounded(tmp_path, capsys):
    total, unreadable = make_messy_folder(tmp_path / "data")
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", batch_size=total // 2, epochs=2, max_bad_fraction=0.2)
    assert train(cfg).steps == 4
    events = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summaries = [e for e in events if e.get("event") == "bad_images"]
    assert [(e["epoch"], e["failed"], e["seen"]) for e in summaries] == [(0, unreadable, total), (1, unreadable, total)]
    captured = capsys.readouterr()
    log = captured.out + captured.err
    for name in ("empty.jpg", "text.png", "truncated.jpg", "bomb.png"):
        assert log.count(f"skipped unreadable image {tmp_path / 'data' / 'bad' / name}") == 2  # once per epoch
    assert "cmyk" not in log and "sixteen" not in log

    strict = tiny_config(tmp_path / "data", tmp_path / "strict", batch_size=total // 2, max_bad_fraction=0.1)
    with pytest.raises(TrainingError, match="4 of 28 images failed to load in epoch 0.*checkpoint in .* is intact"):
        train(strict)
    assert load_checkpoint(tmp_path / "strict")["step"] == 2  # the epoch's steps on the readable images are kept


def test_a_folder_of_unreadable_files_stops_the_run_within_a_few_steps(tmp_path, capsys):
    """Not at the end of an epoch: files that are not images (say, HEIC photos named .jpg)."""
    (tmp_path / "data").mkdir()
    for i in range(80):
        (tmp_path / "data" / f"{i:02d}.jpg").write_text("not a jpeg")
    with pytest.raises(TrainingError, match="the last 32 images of the data could not be read, not one of them"):
        train(tiny_config(tmp_path / "data", tmp_path / "run", batch_size=8, epochs=1))
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("skipped unreadable image") == 32


def test_non_finite_steps_are_skipped_then_the_run_stops(textures_dir, tmp_path, monkeypatch):
    real_forward = DINOLoss.forward
    poisoned = {2, 3}
    counter = {"n": 0}

    def forward(self, *args, **kwargs):
        loss, stats = real_forward(self, *args, **kwargs)
        counter["n"] += 1
        return (loss * float("nan"), stats) if counter["n"] - 1 in poisoned else (loss, stats)

    monkeypatch.setattr(DINOLoss, "forward", forward)
    cfg = tiny_config(textures_dir, tmp_path / "run", epochs=1)
    assert train(cfg).steps == 8
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [0, 1, 4, 5, 6, 7]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())

    poisoned.update(range(100))
    counter["n"] = 0
    cfg = tiny_config(textures_dir, tmp_path / "nan", epochs=2, max_nonfinite_steps=3)
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss"):
        train(cfg)
    assert not (tmp_path / "nan" / "checkpoint.pth").exists()  # nothing finite to save was ever reached


def _launch(cfg_path: Path, extra_env: dict | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "dinokit", "train", "--config", str(cfg_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum(1 for l in path.read_text().splitlines() if '"loss"' in l) if path.exists() else 0


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_a_run_stopped_during_an_epoch_end_knn_makes_it_when_resumed(textures_dir, tmp_path, monkeypatch):
    cfg = tiny_config(textures_dir, tmp_path / "run", val_fraction=0.25, knn_k=(1, 5), knn_every=1, epochs=3)
    real_run = KnnMonitor.run

    def dies_in_epoch_2(self, name, *args):
        if name == "epoch 2":
            raise RuntimeError("killed while evaluating")
        real_run(self, name, *args)

    monkeypatch.setattr(KnnMonitor, "run", dies_in_epoch_2)
    with pytest.raises(RuntimeError, match="killed while evaluating"):
        train(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] == 2  # saved before the k-NN began
    monkeypatch.setattr(KnnMonitor, "run", real_run)
    train(cfg)
    assert list(json.loads((tmp_path / "run" / "knn.json").read_text())) == \
        ["untrained", "raw pixels", "epoch 1", "epoch 2", "final"]


def test_sigkill_at_any_moment_loses_nothing(textures_dir, tmp_path):
    reference = tiny_config(textures_dir, tmp_path / "reference", checkpoint_every_steps=1)
    train(reference)

    killed = tiny_config(textures_dir, tmp_path / "killed", checkpoint_every_steps=1)
    cfg_path = tmp_path / "killed.yaml"
    killed.to_yaml(cfg_path)
    out = tmp_path / "killed"
    rng = np.random.default_rng(1)
    rounds = 0
    for target in sorted(rng.choice(np.arange(1, 15), size=2, replace=False)):  # kill between steps
        proc = _launch(cfg_path)
        _wait_for(lambda: _steps_logged(out) >= target, proc)
        proc.kill()
        proc.wait()
        rounds += 1
        load_checkpoint(out / "checkpoint.pth")  # always loadable
    # Kill while a checkpoint write is held open half-way (the temporary file exists, not yet renamed).
    proc = _launch(cfg_path, {"DINOKIT_TEST_SAVE_PAUSE": "30"})
    _wait_for(lambda: (out / ".checkpoint.tmp.pth").exists(), proc)
    before = load_checkpoint(out / "checkpoint.pth")["step"]
    proc.kill()
    proc.wait()
    rounds += 1
    assert load_checkpoint(out / "checkpoint.pth")["step"] == before
    proc = _launch(cfg_path)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    a = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    b = load_checkpoint(out / "checkpoint.pth")
    assert rounds == 3 and b["step"] == a["step"] == 16
    for part in ("teacher", "student"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    assert _loss_by_step(out) == _loss_by_step(tmp_path / "reference")  # each step logged once, as if never killed


def _loss_by_step(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def test_sigterm_saves_and_explains_how_to_resume(textures_dir, tmp_path):
    cfg = tiny_config(textures_dir, tmp_path / "run", epochs=4)
    cfg_path = tmp_path / "run.yaml"
    cfg.to_yaml(cfg_path)
    proc = _launch(cfg_path)
    _wait_for(lambda: _steps_logged(tmp_path / "run") >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM
    assert f"dinokit train --out {tmp_path / 'run'}" in output
    step = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["step"]
    assert 3 <= step < 32
    assert train(cfg).steps == 32



def test_a_second_ctrl_c_stops_at_once_without_saving_and_exits_with_130(textures_dir, tmp_path, monkeypatch):
    """The first Ctrl-C asks for a checkpoint after the step; a second one before that step ends
    gives up at once: the last checkpoint stays as it was, and the command ends with Ctrl-C's code."""
    from click.testing import CliRunner

    from dinokit.cli import main

    cfg = tiny_config(textures_dir, tmp_path / "run", epochs=1, checkpoint_every_steps=2)
    cfg.to_yaml(tmp_path / "run.yaml")
    real_step, ctrl_c = loop.train_step, signal.getsignal(signal.SIGINT)

    def ctrl_c_twice_in_step_3(state, *args, **kwargs):
        if state.step == 3:
            stop = signal.getsignal(signal.SIGINT).__self__  # the run's _StopSignal
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 10
            while stop.received is None and time.monotonic() < deadline:  # the first one only sets a flag
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the second one ends this at once
        return real_step(state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", ctrl_c_twice_in_step_3)
    result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "run.yaml")])
    assert result.exit_code == 130, result.output
    assert "dinokit: SIGINT: stopping after this step, with a checkpoint" in result.output
    assert "dinokit: stopping now, without saving; the last checkpoint is intact" in result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["step"] == 2  # not saved at step 3 or 4
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # the handler before the run is back

def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(textures_dir, tmp_path):
    """SLURM's preemption and ``kill -- -PGID`` signal the data loader workers too: they must leave
    the signal to the main process (they used to die of it, and the main process with them)."""
    cfg = tiny_config(textures_dir, tmp_path / "run", epochs=4, num_workers=2)
    cfg_path = tmp_path / "run.yaml"
    cfg.to_yaml(cfg_path)
    proc = _launch(cfg_path, start_new_session=True)  # its own process group, as under a launcher
    _wait_for(lambda: _steps_logged(tmp_path / "run") >= 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert "killed by signal" not in output and "Traceback" not in output, output
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert f"dinokit train --out {tmp_path / 'run'}" in output
    assert 3 <= load_checkpoint(tmp_path / "run" / "checkpoint.pth")["step"] < 32


def test_a_killed_loader_worker_is_one_clear_error(textures_dir, tmp_path, monkeypatch):
    class KilledWorker:  # what the DataLoader raises when the out-of-memory killer takes a worker
        def __iter__(self):
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

        def close(self):
            pass

    monkeypatch.setattr(loop, "ready_batches", lambda *args: KilledWorker())
    with pytest.raises(TrainingError, match=r"a data loader worker was killed \(DataLoader worker \(pid 4242\).*"
                                            r"out of memory\? Fewer num_workers need less\. No checkpoint was written"):
        train(tiny_config(textures_dir, tmp_path / "run", epochs=1))


def test_a_disk_that_fills_while_logging_is_one_clear_error(textures_dir, tmp_path, monkeypatch):
    def full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop.Monitor, "flush", full_disk)
    with pytest.raises(TrainingError, match=r"no space left to write the logs: free space in .*run\. No checkpoint"):
        train(tiny_config(textures_dir, tmp_path / "run", epochs=1))
