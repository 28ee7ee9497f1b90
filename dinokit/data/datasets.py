"""Datasets over an ``ImageList`` that never crash on a bad file, and their collate function.

``ImageDataset[i]`` returns a ``Sample(views, label, i, error)``; ``ImageDataset[(epoch, i)]``
does the same with the augmentation's randomness seeded from ``(seed, epoch, i)`` alone, so that
an image's views do not depend on the worker that loads it, the process count, or a resume. A
file that cannot be decoded yields ``None`` in place of its views and the reason as ``error``
(else ``None``); ``collate_views`` drops it and reports its path so the training loop can count
and log it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch.utils.data import Dataset, default_collate

from dinokit.data.folders import BadImageError, ImageList, load_rgb


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, index)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Sample(NamedTuple):
    """One item of ``ImageDataset``: what the transform made of the image (``None`` when it could
    not be read), its label (-1 without labels), its index in the list, and why it could not be
    read (else ``None``)."""

    transformed: Any
    label: int
    index: int
    error: str | None


class ImageDataset(Dataset):
    """Images of an ``ImageList`` through ``transform``; labels are -1 when the list has none.

    ``min_side``: the short side (pixels) ``transform`` needs of an image; a larger one is
    reduced by a power of two towards it (``load_rgb``). 0 keeps every image at full size.
    Images are loaded by ``transform.load_image(path, min_side)`` where the transform has one
    (``ViewParameters``: tensors of plain JPEGs), else by ``load_rgb``.
    """

    def __init__(self, images: ImageList, transform: Callable, seed: int = 0, min_side: int = 0) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed
        self.min_side = min_side
        self.load = getattr(transform, "load_image", load_rgb)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        label = self.images.labels[index] if self.images.labels is not None else -1
        try:
            image = self.load(self.images.paths[index], self.min_side)
        except BadImageError as err:
            return Sample(None, label, index, str(err))
        if epoch is None:
            return Sample(self.transform(image), label, index, None)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed would also queue a seed for every accelerator
            # backend not started in this process, recording a stack trace each time (~0.6 ms an image)
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return Sample(self.transform(image), label, index, None)


@dataclass
class Batch:
    """A collated batch of ``B`` readable images: ``tensors`` holds what the transform made of them,
    stacked: one ``B x 3 x H x W`` tensor per view (8-bit for training, ``MultiCropAugmentation(cfg,
    as_uint8=True)``), for views made on the device the canvases (``B x C x C x 3`` uint8) and their
    views' parameters (``dinokit.data.device_views``), or for plain (single-view) datasets one
    tensor; ``labels`` and ``indices`` are ``B`` int64; ``failed`` lists the files that did not load."""

    tensors: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    failed: list[str]

    def __len__(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> "Batch":
        return Batch([t.pin_memory() for t in self.tensors], self.labels.pin_memory(), self.indices.pin_memory(),
                     self.failed)


class StopSignalsToMain:
    """DataLoader ``worker_init_fn`` (make it in the main process): the worker ignores SIGINT, and
    SIGTERM unless the main process itself sent it, so that a signal sent to the whole process
    group (Ctrl-C in a terminal, SLURM's preemption, ``kill -- -PGID``) reaches the main process
    alone, which checkpoints and shuts the workers down. Without it a worker dies of the signal
    and the main process fails with "DataLoader worker is killed by signal" before it can save.
    The main process's own SIGTERM (``Process.terminate()``: PyTorch's shutdown, Python's exit)
    still ends the worker at once, and a worker whose main process dies exits (PyTorch's
    watchdog). Where the sender of a signal cannot be known (no ``sigwaitinfo``: macOS, Windows),
    SIGTERM keeps its default."""

    def __init__(self) -> None:
        self.main_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "sigwaitinfo"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
            threading.Thread(target=self._end_on_sigterm_from_main, daemon=True).start()

    def _end_on_sigterm_from_main(self) -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == self.main_pid:
                os._exit(0)


def collate_views(samples: list[Sample]) -> Batch:
    """Samples of ``ImageDataset`` -> a ``Batch``, each view stacked by PyTorch's ``default_collate``
    (in a loader worker straight into the shared memory the batch is sent through)."""
    good = [s for s in samples if s.transformed is not None]
    failed = [s.error for s in samples if s.transformed is None]
    if not good:
        return Batch([], torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), failed)
    first = good[0].transformed
    if isinstance(first, (list, tuple)):
        tensors = [default_collate([s.transformed[v] for s in good]) for v in range(len(first))]
    else:
        tensors = [default_collate([s.transformed for s in good])]
    labels = torch.tensor([s.label for s in good], dtype=torch.long)
    indices = torch.tensor([s.index for s in good], dtype=torch.long)
    return Batch(tensors, labels, indices, failed)


def prefetch_factor(workers: int) -> int | None:
    """``DataLoader``'s ``prefetch_factor`` (batches made ahead per loader process) for ``workers``
    processes: 2 each, and at least 4 batches ahead in all; ``None`` without workers. Many workers
    keep few batches each: 32 workers at 4 would hold 128 batches of shared memory (9 GiB of the
    paper's 8-bit views at batch 128)."""
    return max(2, -(-4 // workers)) if workers else None
