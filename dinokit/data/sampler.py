"""The order in which training sees images: a resumable, shardable stream of ``(epoch, index)``.

Every epoch is a permutation of the data set drawn from ``(seed, epoch)``; it is cut into
global batches of ``global_batch`` images (the tail that does not fill one is dropped), and
process ``rank`` of ``world_size`` takes its contiguous slice of every global batch. So the
images of step ``s`` are the same whatever the number of processes, and a run resumed at step
``s`` continues the very same stream.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class TrainingSampler(Sampler):
    """Yields ``(epoch, index)`` for steps ``start_step .. total_steps - 1`` (this rank's share)."""

    def __init__(self, num_images: int, global_batch: int, total_steps: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start_step: int = 0) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {world_size} processes")
        if num_images < global_batch:
            raise ValueError(f"batch_size {global_batch} is larger than the data set ({num_images} images)")
        self.num_images = num_images
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.total_steps = total_steps
        self.seed = seed
        self.rank = rank
        self.start_step = start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.num_images // self.global_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_images, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, order_epoch = None, -1
        for step in range(self.start_step, self.total_steps):
            epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = self.epoch_order(epoch), epoch
            begin = step_in_epoch * self.global_batch + self.rank * self.local_batch
            for index in order[begin:begin + self.local_batch].tolist():
                yield epoch, index

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.local_batch
