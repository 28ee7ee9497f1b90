"""Views made on the device from the loader's batches: in turn, or on CUDA one batch ahead on a side stream."""

import time

import pytest
import torch

from dinokit.config import TrainConfig
from dinokit.data.prefetch import ReadyBatch, one_ahead, ready_batches

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def logged_items(log: list, count: int):
    for i in range(count):
        log.append(f"fetch {i}")
        yield i


@pytest.mark.parametrize("overlap", [True, False])
def test_on_the_cpu_each_batch_is_finished_when_it_is_handed_over(overlap):
    log = []

    def finish(i):
        log.append(f"finish {i}")
        return [torch.full((2,), float(i))]

    for item, views, _ in ready_batches(logged_items(log, 3), finish, torch.device("cpu"), overlap):
        log.append(f"use {item}")
        assert views[0].tolist() == [item, item]
    assert log == ["fetch 0", "finish 0", "use 0", "fetch 1", "finish 1", "use 1", "fetch 2", "finish 2", "use 2"]


def test_one_ahead_starts_the_next_batch_before_handing_over_the_current_one():
    log = []

    def start(i):
        log.append(f"start {i}")
        return f"started {i}"

    def hand_over(i, started):
        assert started == f"started {i}"
        log.append(f"hand over {i}")
        return [torch.tensor([i])]

    for ready in one_ahead(logged_items(log, 3), start, hand_over):
        log.append(f"use {ready.item}")
        assert ready.views == [torch.tensor([ready.item])]
    assert log == ["fetch 0", "start 0", "fetch 1", "start 1", "hand over 0", "use 0",
                   "fetch 2", "start 2", "hand over 1", "use 1", "hand over 2", "use 2"]
    assert list(one_ahead(iter([]), start, hand_over)) == []


def test_the_wait_reported_is_the_time_spent_fetching():
    def slow_items():
        for i in range(3):
            time.sleep(0.05 if i == 1 else 0)
            yield i

    readies = list(one_ahead(slow_items(), lambda i: None, lambda i, _: None))
    assert [r.item for r in readies] == [0, 1, 2]
    assert readies[0].data_wait_s >= 0.05  # item 1 was fetched before item 0 was handed over
    assert readies[1].data_wait_s < 0.05 and readies[2].data_wait_s < 0.05
    readies = list(ready_batches(slow_items(), lambda i: None, torch.device("cpu")))
    assert readies[1].data_wait_s >= 0.05 and readies[0].data_wait_s < 0.05


def test_an_empty_batch_is_handed_over_without_views():
    ready = next(ready_batches(iter([[]]), lambda batch: None if not batch else [batch], torch.device("cpu")))
    assert ready == ReadyBatch([], None, ready.data_wait_s)


def test_overlap_views_is_off_by_default():
    assert TrainConfig().overlap_views is False
    assert TrainConfig.build({"overlap_views": True}).overlap_views is True


# --- CUDA: the side stream -----------------------------------------------------------------------

def pinned_batches(count: int, numel: int = 1 << 22):
    return [torch.full((numel,), float(i + 1)).pin_memory() for i in range(count)]


@cuda
def test_cuda_side_stream_hands_views_over_only_once_they_are_made():
    """The side stream is kept busy before each copy; a step that did not wait for the views' event
    would read memory not yet written."""
    def slow_copy(host):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time on the side stream
        return [host.to("cuda", non_blocking=True) * 1]

    sums = [views[0].sum() for _, views, _ in ready_batches(pinned_batches(6), slow_copy, torch.device("cuda"))]
    assert [s.item() for s in sums] == pytest.approx([float((i + 1) << 22) for i in range(6)], rel=1e-5)


@cuda
def test_cuda_side_stream_views_keep_their_memory_until_the_step_has_read_them():
    """The step's stream is kept busy before it reads each batch's views, which the caller drops at
    once: without ``record_stream`` the allocator would give their memory to the next views, made on
    the side stream meanwhile."""
    sums = []
    for _, views, _ in ready_batches(pinned_batches(6), lambda host: [host.to("cuda", non_blocking=True) * 1],
                                       torch.device("cuda")):
        torch.cuda._sleep(20_000_000)
        sums.append(views[0].sum())
        del views
    assert [s.item() for s in sums] == pytest.approx([float((i + 1) << 22) for i in range(6)], rel=1e-5)


@cuda
@pytest.mark.parametrize("views_on", ["host", "device"])
def test_cuda_side_stream_gives_the_views_made_in_turn_without_waiting_for_the_gpu(views_on):
    from dinokit.data.datasets import Sample, collate_views
    from dinokit.data.device_views import view_pipeline
    from tests.data.test_device_views import photo

    cfg = TrainConfig.build({"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 3,
                             "patch_size": 8, "views_on": views_on})
    transform, finish_views = view_pipeline(cfg)
    torch.manual_seed(0)
    batches = [collate_views([Sample(transform(photo(4 * b + i)), -1, i, None) for i in range(4)]).pin_memory()
               for b in range(3)]

    def finish(batch):
        return finish_views(batch.tensors, torch.device("cuda"))

    in_turn = [ready.views for ready in ready_batches(batches, finish, torch.device("cuda"), overlap=False)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        ahead = [ready.views for ready in ready_batches(batches, finish, torch.device("cuda"), overlap=True)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(in_turn, ahead, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


@cuda
@pytest.mark.parametrize("views_on", ["host", "device"])
def test_training_on_cuda_with_overlapped_views_gives_the_same_losses(textures_dir, tmp_path, views_on):
    import json

    from dinokit.train.loop import train
    from tests.conftest import tiny_config

    losses = {}
    for overlap in (False, True):
        out = tmp_path / f"overlap-{overlap}"
        cfg = tiny_config(textures_dir, out, views_on=views_on, epochs=1, device="cuda",
                          precision="fp32", overlap_views=overlap)
        assert train(cfg).steps == 64 // 8
        losses[overlap] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                           if "loss" in line]
    assert len(losses[True]) == 8
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
