"""The scripts of bench/ (peers.py, compile_ab.py, loss_ab.py, decode_ab.py, pipeline_peers.py,
step_profile.py, device_views_cost.py, gpu_profile.py) on tiny workloads; bad input gives one line."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PEERS = Path(__file__).resolve().parents[2] / "bench" / "peers.py"


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


def _script_env() -> dict[str, str]:
    """The environment of a bench script run as a subprocess: this checkout first on its path, and
    the caller's PYTHONPATH kept after it (where bench/gpu_check.sh puts the wheels it installs)."""
    path = [str(PEERS.parents[1])] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def test_bench_scripts_run_with_the_callers_python_path(monkeypatch, tmp_path):
    """On the GPU machine pydantic comes from a folder on PYTHONPATH (gpu_check.sh's WHEELS): a
    script started without it could not import dinokit."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "wheels"), str(tmp_path / "more")]))
    assert _script_env()["PYTHONPATH"].split(os.pathsep) == [str(PEERS.parents[1]), str(tmp_path / "wheels"),
                                                             str(tmp_path / "more")]


def _peers(*args, tmp_path, script: Path = PEERS):
    tiny = ["--patch-size", "8", "--global-size", "16", "--local-size", "8", "--local-crops", "2", "--batch-size", "2",
            "--out-dim", "64", "--steps", "1", "--warmup", "1", "--threads", "1", "--results", str(tmp_path)]
    env = _script_env()
    return subprocess.run([sys.executable, str(script), *tiny, *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_peers_runs_dinokit_and_lightly_side_by_side(tmp_path):
    """lightly only where it is installed (it is not a dinokit dependency)."""
    with_lightly = importlib.util.find_spec("lightly") is not None
    proc = _peers("--only", "dinokit,lightly" if with_lightly else "dinokit", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "dinokit" in proc.stdout and "images/s" in proc.stdout
    assert ("dinokit / lightly" in proc.stdout) == with_lightly
    run = json.loads(next(tmp_path.glob("*.json")).read_text())["runs"][0]
    assert run["kind"] == "peers" and run["results"]["dinokit"]["images_per_s"] > 0
    assert ("lightly" in run["results"]) == with_lightly


def test_compile_ab_alternates_the_eager_and_the_compiled_step(tmp_path):
    proc = _peers("--steps", "2", tmp_path=tmp_path, script=PEERS.parent / "compile_ab.py")
    assert proc.returncode == 0, proc.stderr
    assert "compiled / eager" in proc.stdout
    run = json.loads(next(tmp_path.glob("*.json")).read_text())["runs"][0]
    assert run["kind"] == "compile_ab" and run["compile"] == "loss"
    assert [len(ts) for ts in run["step_s"].values()] == [2, 2] and set(run["step_s"]) == {"eager", "compile=loss"}


def test_peers_interleaved_take_turns_in_one_process(tmp_path):
    proc = _peers("--only", "dinokit,dinokit-bf16", "--interleave", "--steps", "2", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "taking turns in one process" in proc.stdout and "peak memory" not in proc.stdout
    run = json.loads(next(tmp_path.glob("*.json")).read_text())["runs"][0]
    assert run["interleaved"] and {name: len(r["all_step_s"]) for name, r in run["results"].items()} == {
        "dinokit": 2, "dinokit-bf16": 2}
    assert run["workload"]["keep_freed_memory"] == "all"  # one process: one memory setting for all


def test_peers_name_who_keeps_freed_memory(tmp_path):
    """By default dinokit keeps freed memory as dinokit train does and the peers run as they are;
    in one process (--interleave) the setting cannot be dinokit's alone."""
    proc = _peers("--only", "dinokit", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "freed memory kept by: dinokit" in proc.stdout
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["runs"][0]["workload"]["keep_freed_memory"] == "dinokit"
    proc = _peers("--only", "dinokit", "--interleave", "--keep-freed-memory", "dinokit", tmp_path=tmp_path)
    assert proc.returncode != 0 and "--keep-freed-memory all or none" in proc.stderr


def test_loss_ab_times_both_losses_on_the_same_logits(tmp_path):
    env = _script_env()
    proc = subprocess.run([sys.executable, str(PEERS.parent / "loss_ab.py"), "--batch-size", "2", "--views", "4",
                           "--out-dim", "32", "--steps", "2", "--threads", "1", "--results", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    losses = [line.split("loss")[-1].strip() for line in proc.stdout.splitlines() if "page faults" in line]
    assert len(losses) == 2 and losses[0] == losses[1]  # the same value, to the printed 6 decimals
    run = json.loads(next(tmp_path.glob("*.json")).read_text())["runs"][0]
    assert run["kind"] == "loss_ab" and {name: len(ts) for name, ts in run["step_s"].items()} == {
        "hand-written": 2, "autograd": 2}


def test_decode_ab_times_reduced_and_full_size_loading(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.effect_noise((1200, 1000), 40 + i).convert("RGB").save(photos / f"{i}.jpg")
    env = _script_env()
    proc = subprocess.run([sys.executable, str(PEERS.parent / "decode_ab.py"), str(photos), "--rounds", "1",
                           "--results", str(tmp_path / "results")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "min_side  496 px" in proc.stdout and "min_side  256 px" in proc.stdout
    run = json.loads(next((tmp_path / "results").glob("*.json")).read_text())["runs"][0]
    assert run["kind"] == "decode_ab" and run["images"] == 2
    assert set(run["images_per_s"]) == {"host views", "device canvas", "evaluation"}
    assert all(rates["full"] > 0 and rates["reduced"] > 0 for rates in run["images_per_s"].values())


def _pipeline_peers(*args, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for i in range(3):
        Image.effect_noise((500, 375), 40 + i).convert("RGB").save(photos / f"{i}.jpg")
    env = _script_env()
    return subprocess.run([sys.executable, str(PEERS.parent / "pipeline_peers.py"), str(photos), "--rounds", "1",
                           "--local-crops", "2", "--results", str(tmp_path / "results"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_pipeline_peers_times_dinokits_loader_work_and_the_peers(tmp_path):
    """The official code only with a clone (DINOKIT_OFFICIAL_DINO), lightly only where installed."""
    names = ["dinokit", "dinokit+normalise", "dinokit-device"]
    if importlib.util.find_spec("lightly") is not None:
        names.append("lightly")
    extra = []
    if os.environ.get("DINOKIT_OFFICIAL_DINO"):
        names.append("official")
        extra = ["--official-dino", os.environ["DINOKIT_OFFICIAL_DINO"]]
    proc = _pipeline_peers("--only", ",".join(names), "--images", 2, *extra, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2 images of ")  # of the 3
    assert "views 2 x 224 px + 2 x 96 px" in proc.stdout
    run = json.loads(next((tmp_path / "results").glob("*.json")).read_text())["runs"][0]
    assert run["kind"] == "pipeline_peers" and run["images"] == 2 and run["local_crops"] == [2, 96]
    assert set(run["images_per_s"]) == set(names) and all(rate > 0 for rate in run["images_per_s"].values())
    for peer in {"official", "lightly"} & set(names):
        assert f"dinokit / {peer}:" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--only", "official", "--official-dino", "/no/such/clone"], "--official-dino must point at a checkout"),
    (["--only", "dinokit,tensorflow"], "unknown tensorflow"),
    (["--only", "dinokit", "--rounds", "0"], "--rounds and --images must be at least 1"),
])
def test_pipeline_peers_bad_input_is_one_line(args, message, tmp_path):
    proc = _pipeline_peers(*args, tmp_path=tmp_path)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_step_profile_splits_the_step_into_matmuls_and_other_ops(tmp_path):
    proc = _peers(tmp_path=tmp_path, script=PEERS.parent / "step_profile.py")
    assert proc.returncode == 0, proc.stderr
    for phrase in ("matrix multiplies", "of the measured fp32 rate", "other ops", "outside the ops", "gelu"):
        assert phrase in proc.stdout
    run = json.loads(next(tmp_path.glob("*.json")).read_text())["runs"][0]
    assert run["kind"] == "step_profile" and run["matmul_flop"] > 0 and run["matmul_s"] > 0
    assert {"gelu", "native_layer_norm", "_fused_adamw_"} <= set(run["other_ops_s"])  # forward, backward, optimizer
    assert all(name.split()[0] in ("mm", "addmm", "bmm", "baddbmm") for name in run["matmul_by_shape_s"])


def test_step_profile_counts_the_flops_that_torch_counts():
    """The op timer's matmul FLOPs of a linear layer's forward and backward, and of a batched
    matmul, equal torch.utils.flop_counter's."""
    from torch.utils.flop_counter import FlopCounterMode

    step_profile = _bench_script("step_profile")
    layer, x = torch.nn.Linear(6, 5), torch.randn(7, 6, requires_grad=True)
    a, b = torch.randn(3, 4, 6), torch.randn(3, 6, 2)

    def work():
        layer(x).sum().backward()
        return torch.bmm(a, b)

    timer, counter = step_profile.OpTimer(), FlopCounterMode(display=False)
    with timer:
        work()
    with counter:
        work()
    assert sum(timer.flop.values()) == counter.get_total_flops() == 3 * 2 * 7 * 6 * 5 + 2 * 3 * 4 * 6 * 2
    assert timer.calls["addmm 7x6 @ 6x5"] == 1 and timer.calls["bmm 3 x 4x6 @ 6x2"] == 1


def _bench_script(name: str):
    spec = importlib.util.spec_from_file_location(name, PEERS.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_views_cost_counts_kernels_that_do_not_grow_with_the_batch_or_the_views(tmp_path, capsys):
    """``bench/device_views_cost.py``: the views of one size go through each kernel together, so
    with every operation drawn for some image (all probabilities 1) their count is the same for 32
    or 128 images and 2 or 6 local views, while the traffic grows; fewer images can leave an
    operation with none, and its kernels out."""
    cost = _bench_script("device_views_cost")
    always = ["flip_prob=1", "color_jitter_prob=1", "grayscale_prob=1", "blur_prob=[1,1,1]", "solarize_prob=[1,1,1]"]
    runs = {}
    for batch, local, probs in ((32, 2, always), (128, 2, always), (32, 6, always), (2, 2, [])):
        folder = tmp_path / f"{batch}-{local}-{len(probs)}"
        assert cost.main(["--config", "laptop", "--batch-size", str(batch), "--device", "cpu", "--steps", "1",
                          "--results", str(folder), f"local_crops_number={local}", *probs]) == 0
        runs[batch, local, bool(probs)] = json.loads(next(folder.glob("*.json")).read_text())["runs"][0]
    assert "kernels" in capsys.readouterr().out
    most = runs[32, 2, True]
    assert most["kind"] == "device_views_cost" and most["host_ops"] > 0
    more_images, more_views, fewer = runs[128, 2, True], runs[32, 6, True], runs[2, 2, False]
    assert most["kernels"] == more_images["kernels"] == more_views["kernels"] >= fewer["kernels"]
    assert most["traffic_bytes"] < min(more_images["traffic_bytes"], more_views["traffic_bytes"])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_peers_dinokit_step_stops_on_a_non_finite_loss(monkeypatch, device):
    """On a CPU at the step itself; on a GPU by the time ``log_every`` (10) steps have run, as
    ``dinokit train`` reads its flags (the step alone never waits for the GPU)."""
    peers = _bench_script("peers")
    w = peers.workload(peers.parse_args(["--patch-size", "8", "--global-size", "16", "--local-size", "8",
                                         "--local-crops", "2", "--batch-size", "2", "--out-dim", "64",
                                         "--device", device]))
    views_for = peers.views_for
    monkeypatch.setattr(peers, "views_for", lambda w: [v * float("inf") for v in views_for(w)])
    step = peers.build_dinokit(w, "auto", "off")
    with pytest.raises(RuntimeError, match="non-finite"):
        for _ in range(1 if device == "cpu" else 10):
            step()


def test_gpu_profile_sorts_kernels_by_kind_and_counts_overlapping_ones_once():
    gpu_profile = _bench_script("gpu_profile")
    kinds = {name: gpu_profile.kernel_kind(name) for name in (
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "ampere_bf16_s16816gemm_bf16_128x64",
        "cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", "pytorch_flash::flash_fwd_kernel<Flash_fwd>",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "Memcpy HtoD (Pinned -> Device)", "Memset (Device)",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>")}
    assert list(kinds.values()) == ["matmul"] * 3 + ["attention"] * 2 + ["copy"] * 3 + ["other"] * 2
    # recent cuBLAS names its Hopper GEMMs nvjet_* (no "gemm", no "sm90_" in most of them)
    for name in ("nvjet_tst_192x192_64x4_1x2_h_bz_coopB_NTT", "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNN",
                 "void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false, false>"):
        assert gpu_profile.kernel_kind(name) == "matmul", name
    summary = gpu_profile.summarise([("gemm_a", 0.0, 2.0), ("gelu", 1.0, 3.0), ("gemm_a", 4.0, 6.0)], steps=2, top=1)
    assert summary["busy_s"] == 2.5 and summary["kernels"] == 1.5
    assert summary["kinds_s"] == {"matmul": 2.0, "attention": 0.0, "copy": 0.0, "other": 1.0}
    assert summary["longest_s"] == {"gemm_a": 2.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_profile_without_a_gpu_is_one_line(tmp_path):
    proc = _peers("--only", "dinokit", tmp_path=tmp_path, script=PEERS.parent / "gpu_profile.py")
    assert proc.returncode != 0 and "profiles a CUDA GPU" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_profile_splits_a_cuda_step(tmp_path):
    proc = _peers("--only", "dinokit", "--device", "cuda", tmp_path=tmp_path, script=PEERS.parent / "gpu_profile.py")
    assert proc.returncode == 0, proc.stderr
    assert "GPU busy" in proc.stdout and "by kind: matmul" in proc.stdout
    result = json.loads(next(tmp_path.glob("*.json")).read_text())["runs"][0]["results"]["dinokit"]
    assert 0 < result["busy_s"] <= result["step_s"] * 1.1 and result["kernels"] > 100
    assert result["kinds_s"]["matmul"] > 0 and result["host_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--device", "mps"], "--device mps: choose cpu, cuda or cuda:N"),
    (["--device", "foo"], "--device foo: choose cpu, cuda or cuda:N"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--warmup", "0", "--rounds", "0"], "--warmup and --rounds must be at least 1"),
])
def test_peers_bad_input_is_one_line(args, message, tmp_path):
    proc = _peers("--only", "dinokit", *args, tmp_path=tmp_path)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_peers_help_shows_the_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = " ".join(_bench_script("peers").build_parser().format_help().split())
    for option, default in (("--arch", "vit_tiny"), ("--patch-size", 4), ("--global-size", 32), ("--local-size", 16),
                            ("--local-crops", 6), ("--batch-size", 64), ("--out-dim", 65536), ("--steps", 5),
                            ("--warmup", 2), ("--rounds", 1), ("--results", "bench/results")):
        assert re.search(rf"{option} \S+ (?:(?!--)[^\[])*\[default: {default}\]", text), option


def test_peers_needs_the_official_clone(tmp_path):
    proc = _peers("--only", "official", "--official-dino", tmp_path, tmp_path=tmp_path)
    assert proc.returncode != 0 and "facebookresearch/dino" in proc.stderr


@pytest.mark.skipif(not os.environ.get("DINOKIT_OFFICIAL_DINO"),
                    reason="set DINOKIT_OFFICIAL_DINO to a checkout of github.com/facebookresearch/dino")
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_peers_runs_the_official_code(tmp_path, device):
    proc = _peers("--only", "dinokit,official", "--official-dino", os.environ["DINOKIT_OFFICIAL_DINO"],
                  "--device", device, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "dinokit / official" in proc.stdout
    run = json.loads(next(tmp_path.glob("*.json")).read_text())["runs"][0]
    assert run["workload"]["device"] == device and run["machine"]["device"] == device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peers_on_cuda_report_the_allocator_peak(tmp_path):
    proc = _peers("--only", "dinokit", "--device", "cuda", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(next(tmp_path.glob("*.json")).read_text())["runs"][0]
    assert run["workload"]["memory"] == "torch.cuda.max_memory_allocated"
    assert 0 < run["results"]["dinokit"]["peak_memory_mib"] < 4096 and "gpu" in run["machine"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_peers_on_cuda_without_a_gpu_is_one_line(tmp_path):
    proc = _peers("--only", "dinokit", "--device", "cuda", tmp_path=tmp_path)
    assert proc.returncode != 0 and "no CUDA GPU" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
