"""dinokit bench: the phase hook of the training step, the FLOP count, results files and the report."""

import contextlib
import dataclasses
import json

import pytest
import torch

from dinokit.config import ConfigError, TrainConfig
from dinokit.data.folders import DataError
from dinokit.method.schedules import StepHyperparameters
from dinokit.train import bench
from dinokit.train.loop import build_state, train_step


def _cfg(**changes) -> TrainConfig:
    values = dict(arch="vit_tiny", patch_size=8, global_crops_size=16, local_crops_size=8, local_crops_number=2,
                  out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, batch_size=2, device="cpu",
                  drop_path_rate=0.0, num_workers=0)
    return TrainConfig.build({**values, **changes})


class RecordingTimer:
    def __init__(self):
        self.names = []

    def __call__(self, name):
        self.names.append(name)
        return contextlib.nullcontext()


def test_train_step_reports_its_phases_in_order_and_the_timer_changes_nothing():
    cfg = _cfg()
    views = bench.synthetic_views(cfg, torch.device("cpu"))
    hp = StepHyperparameters.mid_run(cfg)
    states = []
    timer = RecordingTimer()
    for t in (None, timer):
        torch.manual_seed(0)
        state = build_state(cfg, torch.device("cpu"))
        assert train_step(state, views, hp, cfg, state.student, contextlib.nullcontext(), timer=t)["finite"] == 1
        states.append(state)
    assert timer.names == ["teacher_forward", "student_forward", "loss", "backward", "optimizer", "ema", "centre"]
    assert set(timer.names) < set(bench.PHASES)
    for a, b in zip(states[0].teacher.state_dict().values(), states[1].teacher.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(states[0].loss.center, states[1].loss.center)


def _expected_flops(cfg: TrainConfig) -> int:
    """Matmul FLOPs of a ViT DINO step by hand: dense layers cost 2x their forward in the
    backward pass (input and weight gradients), the patch embedding 1x (the images need no
    gradient), the student's attention 2x too (on a CPU in float32 it is written out at these
    lengths: four matmuls in the backward; the fused kernel's would count 2.5x, the counter's
    convention for a backward that recomputes the scores); and two row dot products done as
    batched matmuls: the teacher's entropy (2B x K) and the head's weight normalisation in the
    backward (K x bottleneck)."""
    d, depth, p, b = 192, 12, cfg.patch_size, cfg.batch_size
    h, bottleneck, k = cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.out_dim

    def backbone(side: int, views: int) -> tuple[int, int, int]:  # (patch conv, dense, attention) forward
        n = (side // p) ** 2
        t = n + 1
        # the last block runs for [CLS] alone: keys and values of all t tokens, the rest for one
        dense = (depth - 1) * 24 * t * d * d + 4 * t * d * d + 20 * d * d
        attention = (depth - 1) * 4 * t * t * d + 4 * t * d
        return views * b * 2 * n * d * 3 * p * p, views * b * dense, views * b * attention

    head = 2 * (d * h + h * h + h * bottleneck + bottleneck * k)
    g_conv, g_dense, g_attn = backbone(cfg.global_crops_size, 2)
    l_conv, l_dense, l_attn = backbone(cfg.local_crops_size, cfg.local_crops_number)
    teacher = g_conv + g_dense + g_attn + 2 * b * head
    student_conv, student_dense = g_conv + l_conv, g_dense + l_dense + (2 + cfg.local_crops_number) * b * head
    student = 2 * student_conv + 3 * student_dense + 3 * (g_attn + l_attn)
    dots = 2 * (2 * b) * k + 2 * k * bottleneck
    return int(teacher + student + dots)


def test_run_bench_on_synthetic_views():
    cfg = _cfg()
    result = bench.run_bench(cfg, steps=1, warmup=1, data="synthetic", measure_data=False)
    assert result.steps == 1 and result.skipped_steps == 0
    assert set(result.phases_ms) == set(bench.PHASES)
    assert sum(result.phases_ms.values()) <= result.step_ms * 1.01  # phases are parts of the step
    assert result.images_per_s > 0 and result.peak_memory_mib > 100 and result.memory_kind == "peak_rss"
    assert result.flops_per_step == _expected_flops(cfg)  # FlopCounterMode, with the CPU attention kernel
    assert 0 < result.mfu and result.matmul_tflops > 0
    w = result.workload
    assert (w["views"], w["precision"], w["data"], w["workers"]) == ("2x16px + 2x8px", "fp32", "synthetic", 0)
    assert result.machine["cores"] >= 1 and result.machine["torch"] == torch.__version__
    assert result.bf16_matmul_speedup > 0  # measured on a CPU for an fp32 step: does bf16 pay here?
    assert result.gpu_busy is None
    text = bench.format_result(result)
    for phrase in ("images/s", "teacher_forward", "peak RSS", "MFU"):
        assert phrase in text
    busy = bench.format_result(dataclasses.replace(result, gpu_busy=0.8)).split("GPU busy")
    assert "GPU busy" not in text and len(busy) == 2 and busy[1].split()[:4] == ["80.0", "%", "of", "the"]
    faster = bench.format_result(dataclasses.replace(result, bf16_matmul_speedup=2.5))
    slower = bench.format_result(dataclasses.replace(result, bf16_matmul_speedup=0.5))
    assert "bf16 2.5x as fast as fp32" in faster and "bf16" not in slower.split("MFU")[1]


def test_the_report_suggests_overlapping_views_that_take_a_share_of_a_gpu_step():
    result = bench.run_bench(_cfg(), steps=1, warmup=1, data="synthetic", measure_data=False, count_flops=False)
    gpu = {**result.machine, "gpu": "NVIDIA H100 80GB HBM3"}
    piped = {**result.workload, "data": "/data/imagenet"}

    def report(views_ms: float, workload: dict, machine: dict = gpu) -> str:
        phases = {**result.phases_ms, "views": views_ms}
        return bench.format_result(dataclasses.replace(result, machine=machine, workload=workload, phases_ms=phases,
                                                       step_ms=100.0))

    assert "overlap_views=true" in report(10.0, piped) and "take 10% of the step" in report(10.0, piped)
    assert "overlap_views" not in report(1.0, piped)  # a small share
    assert "overlap_views=true" not in report(10.0, {**piped, "overlap_views": True})  # already on
    assert "overlap_views" not in report(10.0, result.workload)  # synthetic views: no pipeline
    assert "overlap_views" not in report(10.0, piped, result.machine)  # a CPU has no side stream


def test_busy_time_counts_overlapping_intervals_once():
    assert bench.busy_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]) == 4.0
    assert bench.busy_seconds([(3.0, 4.0), (0.0, 1.0)]) == 2.0 and bench.busy_seconds([]) == 0.0


@pytest.mark.parametrize("batch_size", [2, 7])
def test_recomputed_activations_are_not_counted_as_model_flops(batch_size):
    """With grad_checkpointing the count is the model's (beyond 4 images, extrapolated from
    steps on 2 and 4 images, which keep the peak memory low), and recomputing is on again after."""
    cfg = _cfg(grad_checkpointing=True, batch_size=batch_size)
    state = build_state(cfg, torch.device("cpu"))
    views = bench.synthetic_views(cfg, torch.device("cpu"))
    assert bench.count_step_flops(state, views, cfg, contextlib.nullcontext()) == _expected_flops(cfg)
    assert state.student.backbone.grad_checkpointing
    assert bench.describe_workload(cfg, "synthetic", torch.device("cpu"), 0)["grad_checkpointing"]  # results file


def test_run_bench_through_the_data_pipeline(textures_dir):
    cfg = _cfg(data=str(textures_dir), batch_size=4)
    result = bench.run_bench(cfg, steps=1, warmup=1, count_flops=False)
    assert result.workload["data"] == str(textures_dir) and result.workload["workers"] == 0
    assert result.phases_ms["data"] > 0 and result.data_images_per_s_per_core > 0
    batch = next(iter(bench.pipeline_loader(cfg, 0, torch.device("cpu"))))
    assert [tuple(v.shape) for v in batch.tensors] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    assert all(v.dtype == torch.uint8 for v in batch.tensors)  # normalised on the training device


def test_bad_settings_are_config_errors(textures_dir):
    with pytest.raises(ConfigError, match="data"):
        bench.run_bench(_cfg(), data="webdataset")
    with pytest.raises(ConfigError, match="steps"):
        bench.run_bench(_cfg(), steps=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            bench.run_bench(_cfg(device="cuda"))
    with pytest.raises(DataError, match="larger than"):
        bench.pipeline_loader(_cfg(data=str(textures_dir), batch_size=1000), 0, torch.device("cpu"))


def test_machine_names_and_results_files(tmp_path):
    cpu = {"cpu": "AMD EPYC 7B13 64-Core Processor", "cores": 2}
    gpu = {"cpu": "x", "cores": 16, "gpu": "NVIDIA H100 80GB HBM3"}
    assert bench.machine_slug(cpu) == "cpu-amd-epyc-7b13-64-core-processor-2c"
    assert bench.machine_slug(gpu) == "cuda-nvidia-h100-80gb-hbm3"
    assert bench.machine_slug({"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "cpu_amx": True}) == \
        "cpu-intel-r-xeon-r-processor-amx-2c"
    first = bench.save_result({"kind": "a", "machine": cpu}, tmp_path)
    second = bench.save_result({"kind": "b", "machine": cpu}, tmp_path)
    assert first == second and first.parent == tmp_path
    assert first.name.startswith("cpu-amd-epyc-7b13-64-core-processor-2c-20") and first.suffix == ".json"
    content = json.loads(first.read_text())
    assert content["machine"] == cpu and [r["kind"] for r in content["runs"]] == ["a", "b"]
    first.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        bench.save_result({"kind": "c", "machine": cpu}, tmp_path)


def test_results_under_a_relative_folder_are_named_by_their_absolute_path(tmp_path, monkeypatch):
    """``bench/results`` is under the working directory, wherever dinokit is installed: the path
    returned (and printed as "saved to") says where that was."""
    monkeypatch.chdir(tmp_path)
    path = bench.save_result({"kind": "a", "machine": {"cpu": "x", "cores": 2}}, "bench/results")
    assert path.is_absolute() and path.parent == tmp_path / "bench" / "results" and path.exists()


def test_the_pipeline_is_timed_over_enough_batches_to_start_its_workers():
    """With workers, one untimed batch per worker at least, and 4x the batches they make ahead
    timed (2 workers make 2 each ahead); without, the counts asked for."""
    assert bench.pipeline_batches(2, 1, workers=2) == (16, 2)
    assert bench.pipeline_batches(100, 3, workers=2) == (100, 3)
    assert bench.pipeline_batches(5, 2, workers=16) == (4 * 16 * 2, 16)
    assert bench.pipeline_batches(1, 1, workers=0) == (1, 1)
    for counts in ((0, 1), (1, 0)):
        with pytest.raises(ConfigError, match="at least 1"):
            bench.pipeline_batches(*counts, workers=0)


def test_describe_machine_on_the_cpu():
    info = bench.describe_machine(torch.device("cpu"))
    assert info["cpu"] and info["cores"] == bench.usable_cores() and "gpu" not in info
