"""Host memory on a CPU: keep what a step frees for the next step, instead of faulting it in again.

glibc's ``malloc`` hands large blocks (32 MiB and up, fewer at start) to the system on ``free``
and maps fresh ones on the next request; the system then faults every 4 KiB page in again on
its first touch and zeroes it. A DINO step on a CPU allocates and frees such blocks by the dozen
(the ``(views x B) x K`` logits, their log-probabilities and gradient, the head's ``K x d``
weights and their gradients, the larger activations): about 210 000 page faults a step on
``bench/peers.py``'s workload (ViT-tiny/4, batch 64, K = 65536). On a virtual machine a fault
costs microseconds (the host backs the page too), and the faults took a quarter of the step on
a 2-core cloud VM.

``keep_freed_memory()`` has ``malloc`` serve blocks up to 1 GiB from its heap and never give the
heap back: after the first steps every block a step asks for is one an earlier step freed, and
the step makes no page faults. The process keeps its peak (a few percent above it, for the
heap's fragmentation), as it would reach it again at every step anyway. It is a setting of the
whole process (of data loader workers forked after it too); dinokit turns it on for CPU runs
and in the training loader's workers of every run (``TrainConfig.keep_freed_memory``). Other C
libraries (macOS, Windows, musl) are left as they are.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from typing import Callable

import torch

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
LARGEST_HEAP_BLOCK = 1 << 30  # bytes; larger blocks are still mapped on their own and given back


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` serve blocks up to ``LARGEST_HEAP_BLOCK`` from its heap and never
    trim the heap (-1: no limit). Returns whether the setting took (False off glibc).

    glibc releases that cap ``M_MMAP_THRESHOLD`` at 32 MiB refuse the threshold; there ``malloc``
    maps no block on its own at all (``M_MMAP_MAX`` 0) instead."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    heap_serves_large = mallopt(_M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK) or mallopt(_M_MMAP_MAX, 0)
    return bool(heap_serves_large) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


class KeepFreedMemoryInWorkers:
    """A DataLoader ``worker_init_fn``: ``init`` (if any), then ``keep_freed_memory()`` in the
    worker. A loader worker makes and frees the same large buffers for every image and batch
    (decoded pixels, canvases, views), and with glibc's default each is faulted in anew: 6-9% of
    a ``views_on=device`` worker's time. A class, so that it pickles where workers are spawned."""

    def __init__(self, init: Callable[[int], None] | None = None) -> None:
        self.init = init

    def __call__(self, worker_id: int) -> None:
        if self.init is not None:
            self.init(worker_id)
        keep_freed_memory()


def use_memory_policy(enabled: bool, device: torch.device) -> bool:
    """The run's choice (``cfg.keep_freed_memory``) for a run on ``device``: applied to CPU runs
    only (on a GPU the step's tensors are not in host memory). Returns whether it is in force."""
    return enabled and device.type == "cpu" and keep_freed_memory()


@functools.cache
def _glibc_mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
