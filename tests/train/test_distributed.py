"""Several processes (``torchrun --nproc-per-node 2``, gloo on the CPU) against one.

The runs are tiny (ViT-tiny/8 on 32 px views, 24 training images, 3 steps per epoch, 2 epochs)
and deterministic (no drop path, no loader workers), so two processes with the same global
batch must give the loss, the centre and the teacher of one process to float tolerance.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dinokit.config import ConfigError, TrainConfig
from dinokit.data.builtin import builtin_textures
from dinokit.data.sampler import TrainingSampler
from dinokit.train.distributed import (DistEnv, describe_disagreement, first_host, launcher_env, lost_peer_error,
                                       processes_on_this_node)
from dinokit.train.fsdp import FSDP_MIN_TORCH, require_tested_torch
from dinokit.train.loop import train
from tests.conftest import tiny_config

STEPS = 6  # 24 training images / batch 8 = 3 steps per epoch, 2 epochs
RUN = dict(drop_path_rate=0.0, val_fraction=0.25, knn_k=[1, 3], eval_batch_size=4)
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_NODELIST", "SLURM_JOB_ID")

# Runs `dinokit train` under torchrun with one process misbehaving (see _torchrun's `mode`).
HARNESS = textwrap.dedent("""
    import importlib, os, signal, sys
    loop = importlib.import_module("dinokit.train.loop")
    from dinokit.cli import main

    mode, rank = sys.argv[1], int(os.environ["RANK"])
    args = sys.argv[2:]
    if mode == "disagree" and rank == 1:
        args.append("lr=0.002")
    step_of = loop.train_step

    def misbehaving_step(state, *rest):
        if rank == 1 and state.step == 1:
            if mode == "die":
                os._exit(7)
            if mode == "stop":
                os.kill(os.getpid(), signal.SIGINT)  # only this process is asked to stop
        return step_of(state, *rest)

    loop.train_step = misbehaving_step
    main(args, prog_name="dinokit")
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The data (8 classes x 4 images, a quarter held out for k-NN) and the YAML config."""
    root = tmp_path_factory.mktemp("dist")
    data = builtin_textures(images_per_class=4, size=32, seed=0, root=root / "data")
    config = tiny_config(data, root / "unused", **RUN).to_dict()
    del config["out"]
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return {"root": root, "data": data, "config": root / "config.yaml"}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}


def _torchrun(setup: dict, out: Path, *args: str, mode: str | None = None, strategy: str = "ddp",
              processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m dinokit train`` (or the misbehaving harness for ``mode``)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--rdzv-backend",
              "c10d", "--rdzv-endpoint", "localhost:0"]
    if mode:
        harness = setup["root"] / "harness.py"
        harness.write_text(HARNESS)
        launch += [str(harness), mode]
    else:
        launch += ["-m", "dinokit"]
    command = launch + ["train", "--config", str(setup["config"]), "--data", str(setup["data"]), "--out", str(out),
                        "--strategy", strategy, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_clean_env())


def _one_process(setup: dict, out: Path, **changes) -> None:
    values = {**yaml.safe_load(setup["config"].read_text()), "out": str(out), **changes}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each torchrun process; many threads crawl on a busy machine
    try:
        train(TrainConfig.build(values))
    finally:
        torch.set_num_threads(threads)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _assert_same_run(ours: Path, reference: Path, steps=range(STEPS), rtol: float = 1e-5) -> None:
    """Same loss at every step, same centre and teacher at the end, same k-NN scores.

    ``rtol``: relative tolerance of the losses and the teacher (absolute: a tenth of it).
    """
    ours_losses, reference_losses = _losses(ours), _losses(reference)
    assert [ours_losses[s] for s in steps] == pytest.approx([reference_losses[s] for s in steps], rel=rtol)
    a, b = (torch.load(run / "checkpoint.pth", weights_only=True, map_location="cpu") for run in (ours, reference))
    assert a["step"] == b["step"] == STEPS
    torch.testing.assert_close(a["dino_loss"]["center"], b["dino_loss"]["center"], rtol=0, atol=rtol / 10)
    assert a["teacher"].keys() == b["teacher"].keys()
    for key in a["teacher"]:
        torch.testing.assert_close(a["teacher"][key], b["teacher"][key], rtol=rtol, atol=rtol / 10, msg=key)
    assert json.loads((ours / "knn.json").read_text()) == json.loads((reference / "knn.json").read_text())


def _assert_no_worker_traceback(stderr: str) -> None:
    """Messages, not stack traces, from our processes (torchrun's own summary may hold one)."""
    frames = [line for line in stderr.splitlines() if line.strip().startswith("File") and "/dinokit/" in line]
    assert not frames, stderr[-3000:]


def _assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """One process, no launcher."""
    out = setup["root"] / "one"
    _one_process(setup, out)
    return out


@pytest.fixture(scope="module")
def fsdp_run(setup) -> Path:
    if torch.__version__ < FSDP_MIN_TORCH:
        pytest.skip(f"strategy=fsdp needs torch >= {FSDP_MIN_TORCH}")
    out = setup["root"] / "fsdp"
    _assert_ok(_torchrun(setup, out, "keep_checkpoints=2", strategy="fsdp"))
    return out


# --- the data order ---------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 4])
def test_each_image_seen_once_per_epoch_across_processes(world_size):
    n, batch, steps_per_epoch = 37, 8, 4
    seen = Counter()
    for rank in range(world_size):
        for epoch, index in TrainingSampler(n, batch, 2 * steps_per_epoch, 5, rank, world_size):
            seen[(epoch, index)] += 1
    assert set(seen.values()) == {1}
    assert Counter(epoch for epoch, _ in seen) == {0: steps_per_epoch * batch, 1: steps_per_epoch * batch}


def test_resume_on_another_process_count_continues_the_same_batches():
    one = list(TrainingSampler(40, 8, 10, seed=2))
    start = 6
    shares = [list(TrainingSampler(40, 8, 10, 2, rank, 4, start_step=start)) for rank in range(4)]
    for step in range(start, 10):
        joined = [item for share in shares for item in share[(step - start) * 2:(step - start + 1) * 2]]
        assert joined == one[step * 8:(step + 1) * 8]


# --- the launcher's environment ---------------------------------------------------------------

def test_launcher_environment(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert launcher_env() == DistEnv(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "0")  # inside an sbatch script but not under srun: one process
    assert launcher_env() == DistEnv(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launcher_env() == DistEnv(5, 8, 1)
    monkeypatch.setenv("RANK", "3")  # torchrun's variables win (torchrun started by srun)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launcher_env() == DistEnv(3, 4, 3)


def test_processes_on_this_node(monkeypatch):
    """torchrun's LOCAL_WORLD_SIZE, or this node's entry of srun's tasks per node (the loader
    workers each gets: tests/train/test_devices.py)."""
    for var in (*LAUNCHER_VARS, "LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID"):
        monkeypatch.delenv(var, raising=False)
    assert processes_on_this_node() == 1
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "10")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4(x2),2")
    monkeypatch.setenv("SLURM_NODEID", "2")
    assert processes_on_this_node() == 2
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert processes_on_this_node() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's variables win
    assert processes_on_this_node() == 8


@pytest.mark.parametrize("nodes, first", [("gpu[03-05,9],cpu1", "gpu03"), ("node7", "node7"), ("a1,b2", "a1"),
                                          ("dgx-a100-[12,14]", "dgx-a100-12")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert first_host(nodes) == first


def test_disagreement_names_the_process_and_the_difference():
    base = {"config": {"lr": 0.001, "epochs": 10}, "training images": "640 images, abc", "checkpoint found": "None"}
    assert describe_disagreement([base, dict(base), dict(base)]) is None
    other_data = {**base, "training images": "639 images, def"}
    assert describe_disagreement([base, dict(base), other_data]) == \
        "training images is '640 images, abc' on process 0 but '639 images, def' on process 2"
    other_lr = {**base, "config": {"lr": 0.002, "epochs": 10}}
    assert describe_disagreement([base, other_lr]) == "config differs (lr=0.001 on process 0 but 0.002 on process 1)"


# --- batch norm -------------------------------------------------------------------------------

def _norm_layers(model: torch.nn.Module) -> dict[str, str]:
    """Each batch norm layer's type, by name."""
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def test_sync_batch_norm_converts_each_batch_norm_of_a_convnet_keeping_its_values():
    from dinokit.models.backbones import build_backbone
    from dinokit.train.distributed import sync_batch_norm

    resnet = build_backbone("resnet18", img_size=32)
    with torch.no_grad():
        for m in resnet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)  # not the initial values, so a copy can be told from a fresh layer
    norms, state = _norm_layers(resnet), {k: v.clone() for k, v in resnet.state_dict().items()}
    assert len(norms) == 20 and set(norms.values()) == {"BatchNorm2d"}
    converted = sync_batch_norm(resnet, "resnet18")
    assert _norm_layers(converted) == dict.fromkeys(norms, "SyncBatchNorm")
    assert converted.state_dict().keys() == state.keys()
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in state.items())


def test_sync_batch_norm_keeps_the_activation_of_timms_fused_norm_layers():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    from dinokit.train.distributed import sync_batch_norm

    model = timm.create_model("lcnet_050", num_classes=0)
    acts = {name: type(m.act) for name, m in model.named_modules() if isinstance(m, BatchNormAct2d)}
    converted = sync_batch_norm(model, "timm:lcnet_050")
    fused = {name: m for name, m in converted.named_modules() if isinstance(m, SyncBatchNormAct)}
    assert fused.keys() == acts.keys() and len(acts) == 27
    assert {name: type(m.act) for name, m in fused.items()} == acts and set(acts.values()) != {torch.nn.Identity}


def test_a_vit_has_no_batch_norm_to_convert():
    from dinokit.models.backbones import build_backbone
    from dinokit.train.distributed import sync_batch_norm

    vit = build_backbone("vit_tiny", patch_size=8, img_size=32)
    layers = [(name, type(m)) for name, m in vit.named_modules()]
    assert _norm_layers(vit) == {}
    assert [(name, type(m)) for name, m in sync_batch_norm(vit, "vit_tiny").named_modules()] == layers


@pytest.mark.parametrize("device, in_a_group", [
    ("cpu", "BatchNorm2d"),
    pytest.param("cuda", "SyncBatchNorm",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_the_training_state_synchronises_batch_norm_in_a_process_group_on_a_gpu_only(tmp_path, device, in_a_group):
    """Without a process group nothing is converted; in one, on CPUs (gloo) each process
    normalises its own share, and on GPUs batch norm is computed over the global batch."""
    import torch.distributed as dist

    from dinokit.train.loop import build_state

    cfg = tiny_config(tmp_path, tmp_path / "run", arch="resnet18", device=device)
    alone = build_state(cfg, torch.device(device))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        grouped = build_state(cfg, torch.device(device))
    finally:
        dist.destroy_process_group()
    for state, norm in ((alone, "BatchNorm2d"), (grouped, in_a_group)):
        for model in (state.student, state.teacher):
            assert _norm_layers(model) == dict.fromkeys(_norm_layers(alone.student), norm)
            assert len(_norm_layers(model)) == 20


# --- whole runs -------------------------------------------------------------------------------

def test_ddp_two_processes_equal_one_process(setup, reference):
    out = setup["root"] / "ddp"
    result = _torchrun(setup, out)
    _assert_ok(result)
    assert result.stdout.count("dinokit: done") == 1  # only the main process reports
    _assert_same_run(out, reference)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_torchrun_with_one_process_equals_no_launcher(setup, reference, device):
    """One GPU (or CPU) under torchrun trains as without it; on CUDA to the rounding of the
    kernels that add with atomics (the position embeddings' bicubic backward)."""
    out = setup["root"] / f"torchrun-one-{device}"
    _assert_ok(_torchrun(setup, out, f"device={device}", processes=1))
    if device == "cpu":
        _assert_same_run(out, reference)
    else:
        no_launcher = setup["root"] / "one-cuda"
        _one_process(setup, no_launcher, device="cuda")
        _assert_same_run(out, no_launcher, rtol=1e-4)


def test_ddp_run_stopped_on_one_process_resumes_where_it_left_off(setup, reference):
    out = setup["root"] / "ddp-stopped"
    stopped = _torchrun(setup, out, mode="stop")  # process 1 alone gets Ctrl-C during step 1
    assert stopped.returncode != 0
    assert "stopped at step 2" in stopped.stderr
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2  # both stopped after step 1
    assert sorted(_losses(out)) == [0, 1]
    _assert_ok(_torchrun(setup, out))
    _assert_same_run(out, reference)


@pytest.mark.parametrize(("version", "refused"), [("2.8.0", True), ("2.9.1+cu128", True), ("2.10.0+cu126", False),
                                                 ("2.14.1", False)])
def test_fsdp_is_refused_on_a_torch_it_is_not_tested_on(monkeypatch, version, refused):
    from torch.torch_version import TorchVersion

    monkeypatch.setattr(torch, "__version__", TorchVersion(version))
    if refused:
        with pytest.raises(ConfigError, match=r"strategy=fsdp needs torch >= 2\.10 .*this is torch " + re.escape(version)):
            require_tested_torch()
    else:
        require_tested_torch()


def test_fsdp_two_processes_equal_one_process(fsdp_run, reference):
    assert (fsdp_run / "checkpoint.dcp" / ".metadata").exists()
    assert torch.load(fsdp_run / "checkpoint.pth", weights_only=True)["optimizer"] is None
    # The last epoch's kept folder links the latest one's files: one copy on disk.
    assert (fsdp_run / "checkpoint_epoch0002.dcp" / ".metadata").samefile(fsdp_run / "checkpoint.dcp" / ".metadata")
    assert not list(fsdp_run.glob(".*tmp*"))
    _assert_same_run(fsdp_run, reference)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grad_checkpointing_on_two_processes_equals_one_process(setup, reference, strategy):
    """Blocks recomputed in the backward: with DDP's gradient hooks, and inside FSDP's gather and
    free of each block."""
    if strategy == "fsdp" and torch.__version__ < FSDP_MIN_TORCH:
        pytest.skip(f"strategy=fsdp needs torch >= {FSDP_MIN_TORCH}")
    out = setup["root"] / f"{strategy}-recomputed"
    _assert_ok(_torchrun(setup, out, "grad_checkpointing=true", strategy=strategy))
    _assert_same_run(out, reference)


def test_fsdp_checkpoint_resumes_on_one_process(setup, fsdp_run):
    out = setup["root"] / "fsdp-resumed"
    shutil.copytree(fsdp_run / "checkpoint_epoch0001.dcp", out / "checkpoint.dcp")  # written by 2 processes
    knn = json.loads((fsdp_run / "knn.json").read_text())
    (out / "knn.json").write_text(json.dumps({k: v for k, v in knn.items() if k != "final"}))
    _one_process(setup, out, strategy="fsdp")
    assert torch.load(out / "checkpoint.pth", weights_only=True)["optimizer"] is None  # in checkpoint.dcp only
    assert sorted(_losses(out)) == [3, 4, 5]  # the second epoch only
    _assert_same_run(out, fsdp_run, steps=range(3, STEPS))


# --- evaluation under the launcher -------------------------------------------------------------

def _eval_command(launcher: list[str], setup: dict, out: Path, command: str) -> subprocess.CompletedProcess:
    source = ["--checkpoint", "random:vit_tiny/8", "--image-size", "32", "--batch-size", "4"]
    if command == "knn":
        args = ["knn", *source, "--train-data", str(setup["data"]), "--val-fraction", "0.25", "--k", "1", "3",
                "--out-dir", str(out)]
    else:
        args = ["embed", *source, "--data", str(setup["data"]), "--out", str(out / "features.npz")]
    return subprocess.run(launcher + args, capture_output=True, text=True, timeout=300, env=_clean_env())


def test_knn_and_embed_under_torchrun_equal_one_process(setup):
    """Each process extracts a share of the images; process 0 alone scores and writes."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "localhost:0", "-m", "dinokit"]
    one, two = setup["root"] / "eval-one", setup["root"] / "eval-two"
    for command in ("knn", "embed"):
        _assert_ok(_eval_command([sys.executable, "-m", "dinokit"], setup, one, command))
        result = _eval_command(torchrun, setup, two, command)
        _assert_ok(result)
        assert result.stdout.count("dinokit: wrote") == 1  # only process 0 reports
    scores = [json.loads((run / "eval_knn.json").read_text())["results"] for run in (one, two)]
    assert scores[0] == scores[1]  # the same features (to float rounding) give the same votes
    a, b = (np.load(run / "features.npz", allow_pickle=False) for run in (one, two))
    assert list(a["paths"]) == list(b["paths"]) and len(a["paths"]) == 32
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-4, atol=1e-5)


# --- clear messages ---------------------------------------------------------------------------

def test_processes_with_different_configs_are_refused(setup):
    result = _torchrun(setup, setup["root"] / "disagree", mode="disagree")
    assert result.returncode != 0
    assert "the 2 processes disagree: config differs (lr=0.0005 on process 0 but 0.002 on process 1)" in result.stderr
    _assert_no_worker_traceback(result.stderr)


def test_a_dead_process_is_reported_by_the_others(setup):
    result = _torchrun(setup, setup["root"] / "dead", mode="die")
    assert result.returncode != 0
    assert "process 0 of 2: lost contact with the other processes" in result.stderr
    assert "exitcode  : 7" in result.stderr  # torchrun's summary names the process that died
    _assert_no_worker_traceback(result.stderr)


def test_a_rendezvous_that_cannot_form_says_so(setup, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**_clean_env(), "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "DINOKIT_RENDEZVOUS_TIMEOUT": "2"}
    result = subprocess.run([sys.executable, "-m", "dinokit", "train", "--config", str(setup["config"]), "--data",
                             str(setup["data"]), "--out", str(tmp_path / "never")], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 1
    assert f"process 1 of 2: the 2 processes did not meet at 127.0.0.1:{port} within 2 s" in result.stderr
    assert "Traceback" not in result.stderr and "frame #" not in result.stderr  # no C++ stack from c10d either


def test_rank_and_world_size_set_by_hand_without_the_address_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from dinokit.cli import main

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(var, value)  # init_distributed writes them back: restored after the test
    monkeypatch.setenv("DINOKIT_RENDEZVOUS_TIMEOUT", "2")  # were the check gone: a failure in seconds, not 900 s
    result = CliRunner().invoke(main, ["train", "--config", "laptop", "--out", str(tmp_path / "run"),
                                       "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output == ("Error: process 0 of 2: RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT "
                             "not; set them to the address of process 0's node and a free port there (torchrun sets "
                             "them for you)\n")
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()


@pytest.mark.parametrize("given, missing", [({"MASTER_ADDR": "node01"}, "MASTER_PORT"),
                                            ({"MASTER_ADDR": "", "MASTER_PORT": "29500"}, "MASTER_ADDR")])
def test_the_address_message_names_what_is_missing(monkeypatch, given, missing):
    from dinokit.train.distributed import DistributedError, init_distributed

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", **given}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("DINOKIT_RENDEZVOUS_TIMEOUT", "2")
    with pytest.raises(DistributedError, match=f"^process 1 of 4: RANK and WORLD_SIZE are set but {missing} not; "):
        init_distributed(torch.device("cpu"))


def test_a_batch_that_does_not_split_over_the_processes_is_one_line(textures_dir, tmp_path, monkeypatch):
    """Process 0 of a run of 4 processes (pretended: no process group is made) refuses batch 10."""
    import contextlib

    from click.testing import CliRunner

    from dinokit.cli import main
    from dinokit.train import loop

    monkeypatch.setattr(loop, "init_distributed", lambda device: DistEnv(0, 4, 0))
    monkeypatch.setattr(loop, "leaders_first", lambda env: contextlib.nullcontext())  # no others to wait for
    tiny_config(textures_dir, tmp_path / "run", batch_size=10).to_yaml(tmp_path / "run.yaml")
    result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "run.yaml")])
    assert result.exit_code == 2
    assert result.output.endswith("Error: batch_size 10 (the global batch) does not split evenly over 4 processes; "
                                  "use a multiple of 4\n"), result.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_lost_contact_says_whether_there_is_a_checkpoint_to_resume_from(tmp_path):
    env = DistEnv(rank=0, world_size=2, local_rank=0)
    err = RuntimeError("Connection closed by peer")
    assert "No checkpoint was written" in str(lost_peer_error(err, env, str(tmp_path)))
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    assert "The last checkpoint in" in str(lost_peer_error(err, env, str(tmp_path)))
