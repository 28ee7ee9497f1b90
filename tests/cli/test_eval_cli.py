"""`dinokit knn | linear | embed | plot-embeddings` on a tiny generated folder and a tiny checkpoint."""

import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dinokit.cli import main
from dinokit.models.vit import vit
from tests.eval.test_knn import COLOURS, make_folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder whose checkpoint has the official layout: ViT-tiny/8 for 32 px views."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    teacher, student = (vit("vit_tiny", patch_size=8, img_size=32).state_dict() for _ in range(2))
    torch.save({
        "teacher": {f"backbone.{k}": v for k, v in teacher.items()},
        "student": {f"module.backbone.{k}": v for k, v in student.items()},
        "args": {"arch": "vit_tiny", "patch_size": 8, "global_crops_size": 32},
        "epoch": 1, "step": 8,
    }, run / "checkpoint.pth")
    return run


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_where_results_go(run_dir, tmp_path):
    import shutil

    from dinokit.eval.source import open_source

    folder = open_source(run_dir)
    assert folder.result_path("knn") == run_dir / "eval_knn.json" and folder.cache_dir == run_dir / "features"
    assert folder.image_size == 32 and folder.label == f"teacher of {run_dir}"
    assert open_source(run_dir / "checkpoint.pth").result_path("knn") == run_dir / "eval_knn.json"
    copy = tmp_path / "epoch3.pth"
    shutil.copy(run_dir / "checkpoint.pth", copy)
    student = open_source(copy, which="student")
    assert student.result_path("linear") == tmp_path / "epoch3.eval_linear_student.json"
    assert student.tag != open_source(copy).tag != folder.tag


def test_knn_writes_results_and_reuses_cached_features(run_dir, textures_dir):
    args = ("knn", "--checkpoint", run_dir, "--train-data", textures_dir, "--val-fraction", 0.25, "--k", 1, 3,
            "--device", "cpu", "--batch-size", 16)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "k-NN accuracy (%) - teacher of" in result.output and "48 train / 16 test images, 8 classes" in result.output
    saved = json.loads((run_dir / "eval_knn.json").read_text())
    assert saved["image_size"] == 32 and list(saved["results"]) == ["1", "3"] and saved["which"] == "teacher"
    assert f"{saved['results']['3']['top1']:8.2f}" in result.output
    cache = {p: p.stat().st_mtime_ns for p in (run_dir / "features").iterdir()}
    assert len(cache) == 2

    again = invoke(*args)
    assert again.exit_code == 0 and json.loads((run_dir / "eval_knn.json").read_text())["results"] == saved["results"]
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "features").iterdir()} == cache  # nothing recomputed

    beyond = invoke(*args[:8], 3, 100, 200, *args[10:])  # k above the 48 memory images: one column, k = 48
    assert beyond.exit_code == 0, beyond.output
    assert list(json.loads((run_dir / "eval_knn.json").read_text())["results"]) == ["3", "48"]
    assert "(k = 100, 200: more than the 48 memory images, scored as k = 48)" in beyond.output

    os.utime(run_dir / "checkpoint.pth", ns=(10**18, 10**18))  # a new version of the weights
    assert invoke(*args).exit_code == 0
    assert len(list((run_dir / "features").iterdir())) == 4


def test_linear_probe_of_the_student(run_dir, textures_dir):
    result = invoke("linear", "--checkpoint", run_dir, "--which", "student", "--train-data", textures_dir,
                    "--val-fraction", 0.25, "--epochs", 2, "--cached-features", "--device", "cpu", "--no-cache")
    assert result.exit_code == 0, result.output
    saved = json.loads((run_dir / "eval_linear_student.json").read_text())
    assert saved["feature_dim"] == 4 * 192 and len(saved["history"]) == 2 and not saved["augment"]
    assert saved["last_top1"] == saved["history"][-1]["top1"] and saved["best_top1"] >= saved["last_top1"]
    assert f"last top-1 {saved['last_top1']:8.2f}" in result.output



def test_linear_trains_on_cached_features_by_default_on_a_cpu(run_dir, textures_dir):
    result = invoke("linear", "--checkpoint", run_dir, "--train-data", textures_dir, "--val-fraction", 0.25,
                    "--epochs", 2, "--device", "cpu", "--no-cache")
    assert result.exit_code == 0, result.output
    assert f"  {4 * 192} features, 2 epochs on cached features\n" in result.output
    assert json.loads((run_dir / "eval_linear.json").read_text())["augment"] is False


@pytest.mark.parametrize("device, flag, augment", [
    ("cuda", None, True), ("cuda", "--cached-features", False), ("cpu", None, False), ("cpu", "--augment", True),
])
def test_linear_defaults_to_augmented_views_on_a_gpu_and_cached_features_on_a_cpu(run_dir, textures_dir, monkeypatch,
                                                                                  device, flag, augment):
    """The choice alone: the device is pretended (no GPU needed) and the probe is not trained."""
    import inspect

    from dinokit.eval import linear
    from dinokit.train import devices

    asked, signature = [], inspect.signature(linear.linear_probe)

    def probe(*args, **kwargs):
        asked.append(signature.bind(*args, **kwargs).arguments["augment"])
        return linear.ProbeResult(50.0, 1, 50.0, 90.0, 768, asked[-1])

    monkeypatch.setattr(devices, "resolve_device", lambda spec, local_rank=0: torch.device(device))
    monkeypatch.setattr(linear, "linear_probe", probe)
    result = invoke("linear", "--checkpoint", run_dir, "--train-data", textures_dir, "--val-fraction", 0.25,
                    "--epochs", 1, "--device", device, "--no-cache", *([flag] if flag else []))
    assert result.exit_code == 0, result.output
    assert asked == [augment]
    assert f"768 features, 1 epochs on {'augmented views' if augment else 'cached features'}" in result.output

def test_baseline_results_go_to_the_out_dir(tmp_path):
    data = make_folder(tmp_path / "colours", COLOURS, per_class=5)
    result = invoke("knn", "--checkpoint", "pixels", "--image-size", 16, "--train-data", data, "--k", 3,
                    "--out-dir", tmp_path / "baseline", "--device", "cpu")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "baseline" / "eval_knn.json").read_text())
    assert saved["checkpoint"] == "pixels" and saved["which"] is None and saved["val_fraction"] == 0.2
    assert saved["test_images"] == 3 and saved["results"]["3"]["top1"] == 100.0  # one colour per class


def test_embed_then_plot(run_dir, textures_dir, tmp_path):
    out = tmp_path / "emb.npz"
    result = invoke("embed", "--checkpoint", run_dir, "--data", textures_dir, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "wrote 64 embeddings of 192 dimensions with labels" in result.output
    with np.load(out) as data:
        assert data["features"].shape == (64, 192) and len(set(data["labels"].tolist())) == 8
    result = invoke("plot-embeddings", out, "--out", tmp_path / "pca.png", "--method", "pca")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "pca.png").size[0] > 100


def _bad_inputs(tmp_path, run_dir, textures_dir):
    unlabelled = tmp_path / "flat"
    unlabelled.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(unlabelled / f"{i}.png")
    other = make_folder(tmp_path / "other", ["red"], per_class=2)
    not_ckpt = tmp_path / "notes.pth"
    not_ckpt.write_text("hello")
    backbone_only = tmp_path / "backbone.pth"
    torch.save(vit("vit_tiny", patch_size=8, img_size=32).state_dict(), backbone_only)
    knn = ["knn", "--checkpoint", run_dir, "--train-data", textures_dir, "--device", "cpu"]
    embed = ["embed", "--checkpoint", run_dir, "--data", textures_dir, "--out", tmp_path / "e.npz"]
    return {
        "--image-size must be positive, got 0": knn + ["--image-size", 0],
        "--image-size must be positive, got -8": embed + ["--image-size", -8],
        "Invalid value for '--batch-size': 0 is not in the range x>=1": knn + ["--batch-size", 0],
        "Invalid value for '--num-workers': -1 is not in the range x>=0": embed + ["--num-workers", -1],
        "Invalid value for '--max-points': 0 is not in the range x>=4": [
            "plot-embeddings", tmp_path / "e.npz", "--out", tmp_path / "p.png", "--max-points", 0],
        "holds one network": ["knn", "--checkpoint", backbone_only, "--which", "student",
                              "--train-data", textures_dir],
        "needs labels": ["knn", "--checkpoint", run_dir, "--train-data", unlabelled],
        "has classes ['red'] that the training data": knn + ["--test-data", other],
        "is not a PyTorch checkpoint": ["knn", "--checkpoint", not_ckpt, "--train-data", textures_dir],
        "patch_size=16 was asked for": knn + ["--patch-size", 16],
        "not a multiple of the backbone's patch size 8": knn + ["--image-size", 30],
        "either --test-data or --val-fraction": knn + ["--test-data", textures_dir, "--val-fraction", 0.1],
        "must end in .npz, .pt, .parquet": ["embed", "--checkpoint", "pixels", "--data", textures_dir,
                                            "--out", tmp_path / "x.csv"],
        "not an embeddings file": ["plot-embeddings", not_ckpt.with_suffix(".npz"), "--out", tmp_path / "p.png"],
        "Error: device 'gpu': expected auto, cpu": knn + ["--device", "gpu"],  # "--device gpu: device 'gpu'" before
    }


def test_bad_input_gives_one_clear_line(tmp_path, run_dir, textures_dir):
    for message, args in _bad_inputs(tmp_path, run_dir, textures_dir).items():
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (message, result.output)
    assert not (tmp_path / "e.npz").exists()


def test_embed_checks_the_parquet_extra_before_any_work(tmp_path, textures_dir, monkeypatch):
    import sys

    from dinokit.eval import embed

    monkeypatch.setitem(sys.modules, "pandas", None)  # as if the 'embed' extra were not installed
    monkeypatch.setattr(embed, "embed_images", lambda *a, **k: pytest.fail("embeddings computed"))
    result = invoke("embed", "--checkpoint", "pixels", "--image-size", 8, "--data", textures_dir,
                    "--out", tmp_path / "x.parquet")
    assert result.exit_code == 2 and "pip install 'dinokit[embed]'" in result.output


def test_embed_counts_unreadable_files_in_one_bracket(tmp_path):
    data = make_folder(tmp_path / "colours", COLOURS, per_class=2)
    (data / "red" / "broken.png").write_bytes(b"not an image")
    result = invoke("embed", "--checkpoint", "pixels", "--image-size", 8, "--data", data, "--out", tmp_path / "e.pt",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert re.search(r"to \S+e\.pt \(\d+ s; 1 unreadable file\(s\) skipped\)$", result.output, re.M), result.output
    assert "warning: 1 of 7 images could not be read and are left out" in result.output  # which one, named


def test_plot_embeddings_says_what_it_wrote_and_refuses_nan(tmp_path):
    from dinokit.eval.embed import Embeddings

    features = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    Embeddings(features, [f"{i}.png" for i in range(10)]).save(tmp_path / "ok.npz")
    result = invoke("plot-embeddings", tmp_path / "ok.npz", "--out", tmp_path / "noext", "--method", "pca")
    assert result.exit_code == 0 and f"wrote {tmp_path / 'noext.png'} " in result.output
    assert (tmp_path / "noext.png").is_file()
    features[3] = np.nan
    Embeddings(features, [f"{i}.png" for i in range(10)]).save(tmp_path / "nan.npz")
    result = invoke("plot-embeddings", tmp_path / "nan.npz", "--out", tmp_path / "p.png", "--method", "pca")
    assert result.exit_code == 2 and "1 of the 10 rows hold NaN" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_num_workers_wins_over_the_default():
    """The default itself, per device: tests/train/test_devices.py."""
    from dinokit.cli.eval import _workers
    from dinokit.train.devices import default_loader_workers

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert _workers(2, gpu) == 2 and _workers(2, cpu) == 2
    assert _workers(None, cpu) == 0 and _workers(None, gpu) == default_loader_workers(gpu, on_cpu="none")
