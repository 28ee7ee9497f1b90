"""`dinokit bench` on tiny workloads; bad input gives one line. (The scripts of bench/: tests/bench/.)"""

import json

import pytest
import torch
from click.testing import CliRunner

from dinokit.cli import main

TINY = ["--arch", "vit_tiny", "--patch-size", "8", "--global-size", "16", "--local-size", "8", "--local-crops", "2",
        "--batch-size", "2", "--out-dim", "64", "--device", "cpu", "head_hidden_dim=32", "head_bottleneck_dim=16"]


def invoke(*args):
    result = CliRunner().invoke(main, ["bench", *[str(a) for a in args]])
    assert "Traceback" not in result.output, result.output
    return result


def test_bench_prints_and_saves_the_step(tmp_path, monkeypatch):
    """The results folder is relative to the working directory; "saved to" gives its absolute path."""
    monkeypatch.chdir(tmp_path)
    result = invoke("--synthetic", "--steps", "1", "--warmup", "1", "--results", "results", *TINY)
    assert result.exit_code == 0, result.output
    for phrase in ("vit_tiny/8, batch 2, views 2x16px + 2x8px, K=64, fp32", "images/s", "backward", "peak RSS",
                   "MFU", f"saved to {tmp_path / 'results'}"):
        assert phrase in result.output
    files = list((tmp_path / "results").glob("cpu-*.json"))
    assert len(files) == 1
    run = json.loads(files[0].read_text())["runs"][0]
    assert run["kind"] == "train_step" and run["workload"]["data"] == "synthetic" and run["images_per_s"] > 0


def test_data_only_measures_the_pipeline_per_core(textures_dir, tmp_path):
    result = invoke("--data-only", "--data", textures_dir, "--workers", "0", "--steps", "4", "--json", "--no-save",
                    *TINY)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["kind"] == "data_pipeline" and record["images_per_s_per_core"] > 0
    assert record["workload"]["data"] == str(textures_dir) and not list(tmp_path.iterdir())
    assert record["workload"]["views"] == "2x16px + 2x8px" and record["workload"]["views_on"] == "host"
    assert not {"arch", "precision", "compile", "out_dim"} & set(record["workload"])  # no model runs


def test_data_only_times_enough_batches_for_the_workers_to_start(textures_dir):
    """A few batches would time the workers' start, or the batches they made ahead of the clock."""
    result = invoke("--data-only", "--data", textures_dir, "--workers", "1", "--steps", "4", "--json", "--no-save",
                    *TINY)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["worker_batches"] == 16 and record["images_per_s"] > 0  # 4x the 4 batches one worker makes ahead
    assert record["workload"]["workers"] == 1


@pytest.mark.parametrize("views_on, work", [("host", "(decode + 4 views)"),
                                            ("device", "(decode + canvas + 4 views' parameters)")])
def test_data_only_says_what_a_worker_does(textures_dir, views_on, work):
    result = invoke("--data-only", "--data", textures_dir, "--workers", "0", "--steps", "4", "--no-save", *TINY,
                    f"views_on={views_on}")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("data pipeline: ") and work in result.output


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps"),
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--arch", "vit_huge"], "vit_huge"),
    (["--patch-size", "5"], "patch_size"),
    (["--compile", "loss", "compile=all"], "compile: given both as an option (--compile) and as key=value"),
    (["compile=loss", "--compile"], "give it once"),
    (["--batch-size", "4", "batch_size=8"], "batch_size: given both"),
    (["--data-only", "--synthetic"], "choose one"),
    (["--data-only", "--compile"], "leave out --compile"),
    (["--data-only", "--precision", "bf16"], "leave out --precision"),
    (["--data-only", "--steps", "0"], "--steps and --warmup must be at least 1"),
    (["--data-only", "--warmup", "0"], "--steps and --warmup must be at least 1"),
    (["--synthetic", "--data", "/tmp"], "--synthetic reads no images: leave out --data"),
    (["--synthetic", "--workers", "2"], "leave out --workers"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    result = invoke("--no-save", *TINY, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


class Ran(Exception):
    pass


@pytest.mark.parametrize("args, compile_", [
    ([], "off"),
    (["--compile"], "all"),  # alone, as before: everything
    (["--compile", "--steps", "1"], "all"),
    (["--compile", "loss"], "loss"),
    (["--compile=off"], "off"),
    (["compile=loss"], "loss"),
])
def test_compile_takes_the_values_of_train(args, compile_, monkeypatch):
    from dinokit.train import bench as lib

    def run_bench(cfg, **kwargs):
        raise Ran(cfg.compile)

    monkeypatch.setattr(lib, "run_bench", run_bench)
    result = invoke("--no-save", "--synthetic", *TINY, *args)
    assert isinstance(result.exception, Ran) and result.exception.args == (compile_,), result.output


def test_compile_with_an_override_after_it_is_refused():
    """``--compile`` takes the next word as its value when it is not an option: never silently."""
    result = invoke("--no-save", "--synthetic", *TINY, "--compile", "compile=loss")
    assert result.exit_code == 2 and "'compile=loss' is not one of 'off', 'loss', 'all'" in result.output


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "1"},
                                 {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4"}])
def test_bench_under_a_launcher_is_refused(env, monkeypatch, tmp_path):
    """Each process would time its own step and append to the same results file."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = invoke("--results", tmp_path, "--synthetic", *TINY)
    assert result.exit_code == 2 and "dinokit bench measures one process" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_is_one_line():
    result = invoke("--no-save", *TINY[:-4], "--device", "cuda")
    assert result.exit_code == 2 and "CUDA" in result.output
