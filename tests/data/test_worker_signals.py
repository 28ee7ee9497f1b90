"""Loader workers leave a process group's stop signals to the main process, yet end when it ends them."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    from torch.utils.data import DataLoader
    from dinokit.data.datasets import StopSignalsToMain

    loader = DataLoader(list(range(100)), batch_size=2, num_workers=2, persistent_workers=True,
                        worker_init_fn=StopSignalsToMain())
    batches = iter(loader)  # alive until the interpreter exits: Python's exit terminates the workers
    next(batches)
    print("exiting", flush=True)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="the sender of a signal is known on Linux only")
def test_a_process_exits_with_loader_workers_still_alive():
    # Workers that ignored SIGTERM outright made Python's exit (terminate, then join) wait forever.
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr
