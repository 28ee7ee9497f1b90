"""The run folder of ``dinokit train``: made with a clear error, and used by one run at a time.

Two runs writing one folder (a job submitted twice, a second terminal) would interleave their
rows in ``metrics.jsonl`` and overwrite each other's checkpoints. The run's main process holds
an exclusive lock (``flock``) on ``<run folder>/.lock`` for as long as it trains; the system
drops it when the process ends, however it ends, so a killed run never leaves a stale lock.
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
        with open(out / LOCK, "a+") as lock:
            _lock(lock, out)
            try:
                yield
            finally:
                lock.truncate(0)
    finally:
        if made and [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
            out.rmdir()


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
    lock.write(f"{os.getpid()}\n")
    lock.flush()
