"""The run folder of ``dinokit train``: made with a clear error, and used by one run at a time.

Two runs writing one folder (a job submitted twice, a second terminal) would interleave their
rows in ``metrics.jsonl`` and overwrite each other's checkpoints. The run's main process holds
an exclusive lock (``flock``) on ``<run folder>/.lock`` for as long as it trains; the system
drops it when the process ends, however it ends, so a killed run never leaves a stale lock. A
child it forks (a data loader worker) lets go of its copy at once: one that outlives a killed run
by seconds, or hangs, would otherwise keep the folder locked.
Where the file system has no locks (some network file systems) or the platform has no
``fcntl`` (Windows), the run goes on unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from dinokit.config import ConfigError

LOCK = ".lock"

#: The descriptors of the lock files this process holds (``_release_in_child`` lets go of them)
_HELD: set[int] = set()


@contextlib.contextmanager
def hold_run_folder(out: Path, owner: bool = True) -> Iterator[None]:
    """Make ``out`` (and its parents) and hold it while the block runs. Raises ``ConfigError``
    when ``out`` cannot be a folder or another run holds it. ``owner``: False on the other
    processes of a distributed run, which neither make nor lock it. A folder made here and left
    empty (a run refused before it wrote anything) is removed again."""
    if not owner:
        yield
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run folder {out} is a file, not a folder; pick another --out")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot make the run folder {out}: {err.strerror or err}; pick another --out") from None
    try:
        with _open_lock(out) as lock:
            _lock(lock, out)
            _HELD.add(lock.fileno())
            try:
                yield
            finally:
                _HELD.discard(lock.fileno())
                lock.truncate(0)
    finally:
        if made and [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
            out.rmdir()


def _release_in_child() -> None:
    """In a forked child: let go of the parent's locks (an ``flock`` lasts while any process holds
    a descriptor of it). Each descriptor is pointed at ``/dev/null`` rather than closed, so that
    no file the child opens takes its number while the parent's file object still names it."""
    for fd in _HELD:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_release_in_child)


def _open_lock(out: Path):
    """The lock file of ``out``, open for writing; ``ConfigError`` where the folder (or an old lock
    file in it) is read-only or its disk full, rather than a traceback from ``open``."""
    try:
        return open(out / LOCK, "a+")
    except OSError as err:
        raise _cannot_write(out, err) from None


def _cannot_write(out: Path, err: OSError) -> ConfigError:
    """The error for a run folder that takes no writes: read-only, or on a full disk."""
    fix = "free space there" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return ConfigError(f"cannot write in the run folder {out}: {err.strerror or err}; {fix} or pick another --out")


def _lock(lock, out: Path) -> None:
    """Lock the open file ``lock`` for this process and write its id there, or raise naming the holder."""
    try:
        import fcntl
    except ImportError:  # Windows
        return
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            return  # a file system without locks
        lock.seek(0)
        holder = lock.read().strip()
        raise ConfigError(f"another dinokit train{f' (process {holder})' if holder else ''} is running in {out}; "
                          "wait for it to end or pick another --out") from None
    lock.truncate(0)
    try:  # unbuffered: a full disk fails here, not again when the file is closed
        os.write(lock.fileno(), f"{os.getpid()}\n".encode())
    except OSError as err:
        raise _cannot_write(out, err) from None
