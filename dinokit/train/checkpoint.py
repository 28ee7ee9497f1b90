"""Checkpoints that survive kills and full disks, in the official DINO layout.

A checkpoint is a dict of tensors and plain values (loadable with
``torch.load(weights_only=True)``)::

    student     backbone + head, keys prefixed "module.backbone." / "module.head."
    teacher     backbone + head, keys "backbone." / "head."
    optimizer   AdamW state
    dino_loss   {"center": 1 x K}
    epoch, step, args (the config as a dict), fp16_scaler (None)
    images      fingerprints of the run's training and held-out images (a resume checks them)

``save_checkpoint`` writes to a temporary file in the same folder, flushes and fsyncs it, then
renames it over the old file, so at every instant the folder holds a complete checkpoint.
``keep_checkpoint`` keeps an epoch's checkpoint beside it the same way, as a hard link.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from dinokit.files import atomic_write

LATEST = "checkpoint.pth"  # the run folder's latest checkpoint
SHARDED = "checkpoint.dcp"  # its sharded checkpoint under strategy=fsdp, a folder (dinokit.train.fsdp)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message says what to do."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` to ``path`` (the previous file stays until the new one is whole).

    Refuses a state holding NaN or infinite floats: a checkpoint is always safe to resume from.
    """
    path = Path(path)
    bad = nonfinite_keys(state)
    if bad:
        raise CheckpointError(f"refusing to write {path}: non-finite values in {', '.join(bad[:5])}; "
                              "the previous checkpoint is intact")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as err:  # a full disk, as PyTorch's zip writer reports it
                raise _os_error_within(err) from None
            f.flush()
            os.fsync(f.fileno())

    _replace_atomically(path, write, lambda: _estimate_bytes(state), resumable=path.exists())


def keep_checkpoint(latest: str | Path, path: str | Path) -> None:
    """Atomically make ``path`` a checkpoint equal to ``latest`` (an epoch's checkpoint kept beside
    the latest): a hard link, so the two take the disk space of one, or a copy where the folder's
    file system has no links. Safe because dinokit replaces checkpoint files, never writes into them.
    """
    latest, path = Path(latest), Path(path)
    _replace_atomically(path, lambda tmp: link_or_copy(latest, tmp), lambda: latest.stat().st_size, resumable=True)


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """Make ``target`` a hard link to the file ``source``, or a copy (fsynced) where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())


def _replace_atomically(path: Path, write: Callable[[Path], None], size: Callable[[], int], resumable: bool) -> None:
    """``atomic_write(path, write)``, durable, with one message for a failed write: ``size()`` is
    the number of bytes it needs, for the message when the disk is full. ``resumable``: whether a
    checkpoint stays to resume from when this write fails (not at a run's first save), so the
    message does not promise one that does not exist."""
    def write_then_pause(tmp: Path) -> None:
        write(tmp)
        _test_pause()

    try:
        atomic_write(path, write_then_pause, durable=True)
    except OSError as err:
        kept = "the previous checkpoint is intact" if resumable else "no earlier checkpoint was written"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"no space left in {path.parent} to write a checkpoint (about {size() / 2**20:.0f} MiB "
                f"needed, {free / 2**20:.0f} MiB free); {kept}. Free space and run again"
                f"{' to resume' if resumable else ''}.") from None
        raise CheckpointError(f"could not write checkpoint {path}: {err}; {kept}") from None


def _os_error_within(err: BaseException) -> BaseException:
    """The ``OSError`` (no space left, an I/O error) behind ``err``, else ``err``: when a write of
    ``torch.save`` fails, PyTorch's zip writer raises a ``RuntimeError`` ("unexpected pos") while
    it closes the archive, with the ``OSError`` only as its context."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return cause or err


def load_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only``); ``trust=True`` allows full unpickling."""
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    unreadable = _not_a_checkpoint(path)
    if unreadable:
        raise CheckpointError(f"{path} {unreadable}{_earlier_checkpoints(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as err:
        if not trust and "weights_only" in str(err) and "invalid load key" not in str(err):
            raise CheckpointError(f"{path} holds Python objects beyond tensors and plain values; it is loaded only if "
                                  "you trust it (--trust-checkpoint on the commands that read weights, trust=True in "
                                  "Python)") from None
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(err).__name__}: {err}"
                              f"{_earlier_checkpoints(path)}") from None


def _not_a_checkpoint(path: Path) -> str | None:
    """Why the file at ``path`` cannot be a PyTorch checkpoint (empty, cut short, another kind of
    file), from its first and last bytes; None when it may be one."""
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 65558))  # the zip end record lies in the last 22 + 65535 bytes
        tail = f.read()
    if head == b"PK\x03\x04":  # torch.save's zip format
        return None if b"PK\x05\x06" in tail else "is cut short (its end is missing: a copy or a write that stopped)"
    if head[:1] == b"\x80":  # a pickle (torch.save's legacy format)
        return None
    return "is not a PyTorch checkpoint (a file of another kind)"


def _earlier_checkpoints(path: Path) -> str:
    """For a run's latest checkpoint: the epoch checkpoints beside it that could replace it."""
    if path.name != LATEST:
        return ""
    kept = sorted(p for p in path.parent.glob("checkpoint_epoch*.pth") if not p.samefile(path))  # not a link to it
    if not kept:
        return ""
    return (f"; {kept[-1].name} beside it holds an earlier state of the run: copy it to {path} to resume from "
            "there")


def resume_hint(out: str | Path) -> str:
    """What running the same command again does for the run folder ``out``, for a stop's message."""
    if any((Path(out) / name).exists() for name in (LATEST, SHARDED)):
        return f"The last checkpoint in {out} is intact; run the same command again to resume"
    return f"No checkpoint was written in {out} yet; the same command starts the run again"


def nonfinite_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the floating-point tensors in ``obj`` holding NaN or inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in nonfinite_keys(v, f"{prefix}.{key}" if prefix else str(key))]
    return []


def _test_pause() -> None:
    """Tests hold a write open here (``DINOKIT_TEST_SAVE_PAUSE`` seconds) to kill it mid-save."""
    pause = float(os.environ.get("DINOKIT_TEST_SAVE_PAUSE", 0) or 0)
    if pause > 0:
        import time

        time.sleep(pause)


def _estimate_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_estimate_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_estimate_bytes(v) for v in obj)
    return 64
