"""Files and folders written whole or not at all: a kill, a crash or a full disk in the middle
of a write leaves the previous file (or none), never a torn one that a resume or a reader then
trips on; and the cache where dinokit keeps what it makes or downloads once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

COMPLETE = ".complete"  # the marker of a folder made whole by ``folder_made_once``


def cache_dir() -> Path:
    """Where dinokit keeps what it makes or downloads once (data sets, official weights):
    ``$DINOKIT_CACHE``, by default ``~/.cache/dinokit``."""
    return Path(os.environ.get("DINOKIT_CACHE", Path.home() / ".cache" / "dinokit")).expanduser()


def folder_made_once(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """``folder`` as ``fill(staging)`` makes it, once: ``fill`` writes into a staging folder beside
    it, which is marked complete and renamed into place; later calls return it at once. A folder
    left half made (a kill, an error: no ``COMPLETE`` marker) is never used, and made anew.
    ``OSError`` (a folder that cannot be written, a full disk) goes to the caller."""
    folder = Path(folder)
    if (folder / COMPLETE).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        fill(staging)
        (staging / COMPLETE).touch()
        if folder.exists():  # an earlier, interrupted attempt
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def atomic_write(path: str | Path, write: Callable[[Path], None], durable: bool = False) -> Path:
    """Make ``path`` by ``write(tmp)`` on a temporary file beside it, renamed over ``path`` once
    written; returns ``path``. The folder is made if missing.

    The temporary file is ``.{stem}.tmp{suffix}``: writers that go by the suffix (``np.savez``,
    pandas) see the real one. Whatever stops ``write`` (an error, Ctrl-C), the temporary file is
    removed and the error raised again. ``durable``: the folder is fsynced after the rename, so
    that the new name survives a power cut too (``write`` fsyncs the file's own bytes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a killed write (a hard link cannot be made over it)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """``Path(path).write_text(text)``, through ``atomic_write``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
