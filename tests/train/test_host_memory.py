import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from dinokit.config import TrainConfig
from dinokit.data.datasets import StopSignalsToMain
from dinokit.train.host_memory import use_memory_policy
from dinokit.train.loop import loader_worker_init

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the setting is glibc's (Linux); other C libraries are left as they are")

# Steps in miniature: a 64 MiB tensor made and freed again and again. Prints the page faults of
# the last four (16 384 pages each, faulted in anew when the one before went back to the system).
REALLOCATE = textwrap.dedent("""
    import resource, sys, torch
    from dinokit.train.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    for step in range(10):  # the heap settles: a reuse can miss by the 64-byte alignment's few bytes
        torch.empty(16 << 20).fill_(1.0)  # (seen up to the 4th block), and the heap grows by a block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for step in range(4):
        torch.empty(16 << 20).fill_(2.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults_of_last_blocks(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", REALLOCATE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@glibc
def test_kept_memory_is_reused_without_page_faults():
    """In a process of its own (the setting is the whole process's): with the default malloc each
    new 64 MiB block is faulted in page by page; with keep_freed_memory() it is memory that an
    earlier block left."""
    assert _page_faults_of_last_blocks("default") > 4 * 10_000
    assert _page_faults_of_last_blocks("keep") < 500


def test_policy_is_for_cpu_runs_that_ask_for_it():
    assert TrainConfig().keep_freed_memory
    assert TrainConfig.build({"keep_freed_memory": False}).keep_freed_memory is False
    assert use_memory_policy(False, torch.device("cpu")) is False  # asked not to: nothing done
    assert use_memory_policy(True, torch.device("meta")) is False  # not a CPU run: nothing done


# A loader worker in miniature: each item makes and frees a 64 MiB block; the last item reports
# the page faults of the worker's last four blocks.
WORKER = textwrap.dedent("""
    import resource, sys, torch
    from torch.utils.data import DataLoader
    from dinokit.config import TrainConfig
    from dinokit.train.loop import loader_worker_init

    def item(i):
        if i == 14:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(4):
                torch.empty(16 << 20).fill_(2.0)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        torch.empty(16 << 20).fill_(1.0)
        return 0

    cfg = TrainConfig.build({"keep_freed_memory": sys.argv[1] == "keep"})
    loader = DataLoader(range(15), batch_size=None, num_workers=1, collate_fn=item,
                        worker_init_fn=loader_worker_init(cfg), multiprocessing_context="fork")
    print(list(loader)[-1])
""")


@glibc
def test_training_loader_workers_keep_freed_memory_on_every_device():
    """The training loader's workers keep what they free for the next image whether the run is
    on a CPU or a GPU (the main process, here, never sets it)."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", WORKER, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert faults("default") > 4 * 10_000
    assert faults("keep") < 500
    assert type(loader_worker_init(TrainConfig.build({"keep_freed_memory": False}))) is StopSignalsToMain
