"""Batches turned into the step's views on the training device, on CUDA while the previous step runs.

``ready_batches(batches, finish, device, overlap)`` yields ``ReadyBatch(item, views,
data_wait_s)`` for each item of ``batches`` (a ``DataLoader``), where ``views = finish(item)``
makes the views on the device: the copy of the batch there and its normalisation, or with
``views_on=device`` the crops and colours too (``view_pipeline``).

On CUDA with ``overlap`` the next item is fetched, and its ``finish`` queued on a side stream,
before the current item is handed over, so the copy engine and the views' memory-bound kernels
run while the GPU is busy with the current step's matmuls (the pattern of timm's
``PrefetchLoader``, with the memory rules made explicit):

- the step's stream waits for an event recorded after that item's views alone, not for the whole
  side stream (which by then holds the next item's work);
- each view is marked as used by the step's stream (``record_stream``), so that the caching
  allocator does not give its memory to the side stream's next views until the step that reads
  it has run;
- the pinned host batch is safe to drop at once: PyTorch's pinned-memory allocator keeps it until
  the copy that reads it has run.

Elsewhere, and with ``overlap=False``, ``finish`` runs when its item is handed over, in the
caller's stream: the same views, one batch's views in memory at a time.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, TypeVar

import torch

Item = TypeVar("Item")
Pending = TypeVar("Pending")
Views = list[torch.Tensor]
_END = object()


class ReadyBatch(NamedTuple):
    """An item of the loader, its views on the device (``None`` where ``finish`` gave none, as for
    an empty batch), and the seconds this hand-over waited for the loader."""

    item: Any
    views: Views | None
    data_wait_s: float


def ready_batches(batches: Iterable[Item], finish: Callable[[Item], Views | None], device: torch.device,
                  overlap: bool = True) -> Iterator[ReadyBatch]:
    """``ReadyBatch(item, finish(item), wait)`` for each item, in order (see the module doc)."""
    if overlap and device.type == "cuda":
        return one_ahead(iter(batches), *_side_stream(finish, device))
    return _in_turn(iter(batches), finish)


def _timed_next(items: Iterator) -> tuple[object, float]:
    start = time.perf_counter()
    item = next(items, _END)
    return item, time.perf_counter() - start


def _in_turn(items: Iterator[Item], finish: Callable[[Item], Views | None]) -> Iterator[ReadyBatch]:
    while (got := _timed_next(items))[0] is not _END:
        yield ReadyBatch(got[0], finish(got[0]), got[1])


def one_ahead(items: Iterator[Item], start: Callable[[Item], Pending],
              hand_over: Callable[[Item, Pending], Views | None]) -> Iterator[ReadyBatch]:
    """Item ``i + 1`` is fetched and ``start``-ed before item ``i`` is handed over
    (``hand_over(item, started)`` gives its views) and yielded; the wait reported with a
    hand-over is the time it spent fetching."""
    pending, waited = None, 0.0
    while True:
        item, seconds = _timed_next(items)
        waited += seconds
        started = (item, start(item)) if item is not _END else None
        if pending is not None:
            yield ReadyBatch(pending[0], hand_over(*pending), waited)
            waited = 0.0
        if started is None:
            return
        pending = started


def _side_stream(finish: Callable[[Item], Views | None], device: torch.device):
    """``(start, hand_over)`` for ``one_ahead``: ``finish`` queued on a stream of its own, and its
    views handed to the caller's stream with the event after them and their memory marked as used
    there."""
    side = torch.cuda.Stream(device)

    def start(item: Item) -> tuple[Views | None, torch.cuda.Event]:
        with torch.cuda.stream(side):
            views = finish(item)
            return views, side.record_event()

    def hand_over(item: Item, started: tuple[Views | None, torch.cuda.Event]) -> Views | None:
        views, done = started
        stream = torch.cuda.current_stream(device)
        stream.wait_event(done)
        for view in views or ():
            view.record_stream(stream)
        return views

    return start, hand_over
