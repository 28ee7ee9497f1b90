from collections import Counter

import pytest

from dinokit.data.sampler import TrainingSampler


def test_each_image_once_per_epoch_across_processes():
    n, batch, steps_per_epoch = 50, 8, 6
    seen = Counter()
    for rank in range(2):
        for epoch, index in TrainingSampler(n, batch, 2 * steps_per_epoch, seed=3, rank=rank, world_size=2):
            seen[(epoch, index)] += 1
    assert max(seen.values()) == 1
    for epoch in (0, 1):
        assert sum(1 for e, _ in seen if e == epoch) == steps_per_epoch * batch  # tail of 2 images dropped


def test_ranks_split_the_single_process_batches():
    single = list(TrainingSampler(40, 8, 10, seed=1))
    r0 = list(TrainingSampler(40, 8, 10, seed=1, rank=0, world_size=2))
    r1 = list(TrainingSampler(40, 8, 10, seed=1, rank=1, world_size=2))
    for step in range(10):
        assert single[step * 8:(step + 1) * 8] == r0[step * 4:(step + 1) * 4] + r1[step * 4:(step + 1) * 4]


def test_resume_continues_the_same_stream():
    full = list(TrainingSampler(30, 4, 20, seed=7))
    assert list(TrainingSampler(30, 4, 20, seed=7, start_step=9)) == full[9 * 4:]


def test_orders_differ_between_epochs_and_seeds():
    s = TrainingSampler(100, 10, 20, seed=0)
    assert s.epoch_order(0).tolist() != s.epoch_order(1).tolist()
    assert s.epoch_order(0).tolist() != TrainingSampler(100, 10, 20, seed=1).epoch_order(0).tolist()


def test_bad_batch_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        TrainingSampler(100, 10, 5, world_size=3)
    with pytest.raises(ValueError, match="larger than the data set"):
        TrainingSampler(5, 10, 5)
