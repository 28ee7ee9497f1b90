"""End-to-end runs on a tiny generated data set: outputs, official layout, exact resume."""

import json
import os
import shutil
import signal

import pytest
import torch

from dinokit.train import loop
from dinokit.train.checkpoint import load_checkpoint
from dinokit.config import TrainConfig
from dinokit.data.folders import ImageList, scan_folder, why_none_held_out
from dinokit.train.loop import train
from tests.conftest import tiny_config


def test_short_run_writes_everything(textures_dir, tmp_path):
    cfg = tiny_config(textures_dir, tmp_path / "run", val_fraction=0.25, knn_k=(1, 5), knn_every=1, report=True)
    result = train(cfg)
    out = tmp_path / "run"
    assert result.steps == 2 * (48 // 8) and not result.interrupted
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == list(range(12))
    for key in ("loss", "lr", "weight_decay", "momentum", "teacher_temp", "teacher_entropy", "teacher_batch_entropy", "kl"):
        assert all(isinstance(r[key], float) for r in steps)
    assert 0 < steps[0]["teacher_entropy"] <= torch.log(torch.tensor(64.0)).item() + 1e-4
    assert list((out / "tensorboard").iterdir())
    assert (out / "views.png").stat().st_size > 0 and "<img" in (out / "report.html").read_text()
    knn = json.loads((out / "knn.json").read_text())
    assert set(knn) == {"untrained", "raw pixels", "epoch 1", "final"}
    assert all(0 <= knn[n]["5"]["top1"] <= 100 for n in knn)
    assert result.knn["final"][5] == knn["final"]["5"]  # keyed by k as knn_classify's results

    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert {"student", "teacher", "optimizer", "dino_loss", "epoch", "step", "args", "fp16_scaler"} <= set(ckpt)
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in ckpt["student"])
    assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])
    assert "backbone.blocks.0.attn.qkv.weight" in ckpt["teacher"] and "head.last_layer.weight_v" in ckpt["teacher"]
    assert ckpt["dino_loss"]["center"].shape == (1, 64) and ckpt["dino_loss"]["center"].abs().sum() > 0
    assert ckpt["epoch"] == 2 and ckpt["args"]["arch"] == "vit_tiny"
    assert (out / "checkpoint_epoch0002.pth").exists() and not (out / "checkpoint_epoch0001.pth").exists()
    assert (out / "checkpoint_epoch0002.pth").samefile(out / "checkpoint.pth")  # the last epoch's: one copy on disk
    # The teacher moved towards the student but is not a copy of it.
    t, s = ckpt["teacher"]["backbone.norm.weight"], ckpt["student"]["module.backbone.norm.weight"]
    assert not torch.equal(t, s) and not torch.equal(t, torch.ones_like(t))


def test_first_epoch_keeps_last_layer_frozen(textures_dir, tmp_path):
    cfg = tiny_config(textures_dir, tmp_path / "run", epochs=1, freeze_last_layer=1, norm_last_layer=False)
    torch.manual_seed(cfg.seed)
    initial = loop.build_state(cfg, torch.device("cpu")).student.head.last_layer.weight_v.clone()
    train(cfg)
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["student"]["module.head.last_layer.weight_v"]
    assert torch.equal(initial, trained)


def test_training_decodes_images_at_the_size_its_views_need(textures_dir, tmp_path, monkeypatch):
    from dinokit.data import datasets
    from dinokit.data.transforms import MultiCropAugmentation

    asked = set()
    load_rgb = datasets.load_rgb
    monkeypatch.setattr(datasets, "load_rgb", lambda path, min_side=0: asked.add(min_side) or load_rgb(path, min_side))
    cfg = tiny_config(textures_dir, tmp_path / "run", epochs=1)
    train(cfg)
    assert asked == {MultiCropAugmentation(cfg).min_source_side} and 0 not in asked


@pytest.mark.parametrize(("amx", "precision", "hinted"), [(True, "auto", True), (True, "fp32", False),
                                                        (False, "auto", False)])
def test_a_cpu_with_amx_gets_a_hint_about_bf16(textures_dir, tmp_path, monkeypatch, capsys, amx, precision, hinted):
    """A CPU run in fp32 by default on a CPU with AMX says that bf16 may pay; not where fp32 was
    asked for, nor on other CPUs."""
    monkeypatch.setattr(loop, "cpu_has_amx", lambda: amx)
    train(tiny_config(textures_dir, tmp_path / "run", epochs=1, precision=precision))
    assert ("precision=bf16" in capsys.readouterr().out) == hinted


def test_the_data_hint_names_views_on_the_device_for_a_gpu_making_views_on_the_host(textures_dir, tmp_path):
    cfg = tiny_config(textures_dir, tmp_path / "run")
    assert "views_on=device" in loop._data_bound_hint(cfg, torch.device("cuda"), 8)
    assert "views_on=device" not in loop._data_bound_hint(cfg, torch.device("cpu"), 1)
    on_device = tiny_config(textures_dir, tmp_path / "run", views_on="device")
    assert "num_workers=8" in loop._data_bound_hint(on_device, torch.device("cuda"), 8)
    assert "views_on=device" not in loop._data_bound_hint(on_device, torch.device("cuda"), 8)


def _interrupt_at(monkeypatch, stop_step: int) -> None:
    """Deliver a real SIGTERM to this process right after training step ``stop_step``."""
    real_step = loop.train_step
    calls = {"n": 0}

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)


def test_the_loop_takes_its_views_from_ready_batches_and_closes_it(textures_dir, tmp_path, monkeypatch):
    """``overlap_views`` reaches ``ready_batches``, whose iterator (holding the loader's) is
    closed when the loop ends."""
    calls = []
    real = loop.ready_batches

    class Spy:
        def __init__(self, *args):
            self.batches = real(*args)
            calls.append(args[-1])

        def __iter__(self):
            return self.batches

        def close(self):
            calls.append("closed")
            self.batches.close()

    monkeypatch.setattr(loop, "ready_batches", Spy)
    assert train(tiny_config(textures_dir, tmp_path / "run", epochs=1, overlap_views=True)).steps == 64 // 8
    assert calls == [True, "closed"]


def test_stopped_and_resumed_run_matches_uninterrupted_run(textures_dir, tmp_path, monkeypatch):
    reference = tiny_config(textures_dir, tmp_path / "straight")
    train(reference)

    resumed = tiny_config(textures_dir, tmp_path / "resumed")
    _interrupt_at(monkeypatch, 4)  # mid-epoch: steps 0-3 done
    first = train(resumed)
    assert first.interrupted and first.steps == 4
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")["step"] == 4
    monkeypatch.undo()
    assert train(resumed).steps == 16

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pth")
    for part in ("teacher", "student"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    losses = lambda run: [json.loads(l)["loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert losses("straight") == losses("resumed")


def test_the_resume_policy_names_only_real_settings():
    """A setting renamed in TrainConfig but not here would silently stop being checked on resume."""
    fields = set(TrainConfig.model_fields)
    assert set(loop.FIXED_SETTINGS) <= fields and set(loop.RUNTIME_SETTINGS) <= fields
    assert not set(loop.FIXED_SETTINGS) & set(loop.RUNTIME_SETTINGS)


def test_resume_refuses_a_different_model(textures_dir, tmp_path):
    train(tiny_config(textures_dir, tmp_path / "run", epochs=1))
    with pytest.raises(loop.TrainingError, match="patch_size"):
        train(tiny_config(textures_dir, tmp_path / "run", epochs=1, patch_size=4))


def test_a_checkpoint_that_is_not_a_training_one_is_refused_with_a_hint(textures_dir, tmp_path):
    (tmp_path / "run").mkdir()
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "run" / "checkpoint.pth")
    with pytest.raises(loop.TrainingError, match="is not a dinokit training checkpoint \\(it has no student, teacher, "
                                                 "optimizer, dino_loss, step\\); pick another --out, and add --init"):
        train(tiny_config(textures_dir, tmp_path / "run", epochs=1))


def test_resume_refuses_other_images_even_after_the_run_ended(textures_dir, tmp_path, capsys):
    """A finished run's folder given other data would otherwise report the old run as done."""
    train(tiny_config(textures_dir, tmp_path / "run", epochs=1))
    fewer = tmp_path / "fewer"
    shutil.copytree(textures_dir, fewer, ignore=lambda folder, names: [n for n in names if n == "0007.png"])
    with pytest.raises(loop.TrainingError, match=r"trained with training images \(64 images, .*but the data now gives"
                                                 r" \d+ images.*--init .*checkpoint.pth"):
        train(tiny_config(fewer, tmp_path / "run", epochs=1))
    with pytest.raises(loop.TrainingError, match="now gives 48 images"):  # the same folder, another split
        train(tiny_config(textures_dir, tmp_path / "run", epochs=1, val_fraction=0.25))
    moved = tmp_path / "moved"  # the same images elsewhere: the same run
    shutil.copytree(textures_dir, moved)
    assert train(tiny_config(moved, tmp_path / "run", epochs=1)).steps == 64 // 8
    assert "resuming" in capsys.readouterr().out


def test_resume_refuses_other_view_sizes_and_reports_other_changes(textures_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _interrupt_at(monkeypatch, 3)
    train(tiny_config(textures_dir, run, epochs=1))
    monkeypatch.undo()
    with pytest.raises(loop.TrainingError, match="global_crops_size=32, but this run asks for 48"):
        train(tiny_config(textures_dir, run, epochs=1, global_crops_size=48, local_crops_size=24))
    capsys.readouterr()
    train(tiny_config(textures_dir, run, epochs=1, lr=0.001, num_workers=1))
    said = capsys.readouterr().out
    assert f"resuming {run / 'checkpoint.pth'} at step 3; settings changed since: lr 0.0005 -> 0.001" in said
    assert "num_workers" not in said  # how a run is carried out is not a change of the run


def test_a_run_folder_inside_the_data_folder_is_not_training_data(textures_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(textures_dir, data)
    train(tiny_config(data, data / "run", epochs=1, report=True))  # writes views.png and report.html there
    assert train(tiny_config(data, data / "run", epochs=1)).steps == 64 // 8  # the same 64 images: resumed


def test_a_stop_says_what_it_does(textures_dir, tmp_path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 2)
    assert train(tiny_config(textures_dir, tmp_path / "run", epochs=1)).interrupted
    assert "SIGTERM: stopping after this step, with a checkpoint" in capsys.readouterr().err


def test_too_many_non_finite_steps_without_a_checkpoint_say_so(textures_dir, tmp_path):
    with pytest.raises(loop.TrainingError, match="non-finite loss or gradient; no checkpoint was written yet"):
        train(tiny_config(textures_dir, tmp_path / "run", epochs=1, lr=1e30, clip_grad=0, max_nonfinite_steps=2))


@pytest.mark.parametrize("changes, why", [
    ({}, "val_fraction=0"),
    ({"val_fraction": 0.25}, "16 held out for k-NN"),
])
def test_the_first_line_says_whether_and_why_not_k_nn_runs(textures_dir, tmp_path, capsys, changes, why):
    train(tiny_config(textures_dir, tmp_path / "run", epochs=1, **changes))
    assert why in capsys.readouterr().out


def test_loose_images_beside_class_folders_are_named_as_why_there_is_no_k_nn(textures_dir):
    images = scan_folder(textures_dir)
    loose = ImageList(images.root, images.paths)  # as scan_folder makes it when an image lies at the top
    assert "no labels: images lie directly in the folder" in why_none_held_out(loose, TrainConfig().val_fraction)


@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_resumed_optimizer_keeps_the_kernels_chosen_for_this_machine(tmp_path, saved_fused):
    """A checkpoint of a machine without fused AdamW (an older PyTorch on a CPU) resumed on one
    with it stayed unfused, with a host sync per step on a GPU; the reverse would fail to step."""
    from dinokit.train.optim import fused_adamw_available

    if not fused_adamw_available("cpu"):
        pytest.skip("this PyTorch has no fused AdamW on the CPU")
    cfg = tiny_config(tmp_path, tmp_path / "run")
    device = torch.device("cpu")
    saving = loop.build_state(cfg, device)
    for group in saving.optimizer.param_groups:
        group["fused"], group["foreach"] = (True, None) if saved_fused else (False, True)
    for p in saving.student.parameters():
        p.grad = torch.randn_like(p)
    saving.optimizer.step()
    resuming = loop.build_state(cfg, device)
    for group in resuming.optimizer.param_groups:  # this machine's choice: the other one
        group["fused"], group["foreach"] = (False, True) if saved_fused else (True, None)
    resuming.load_state_dict(saving.state_dict(cfg, 1, {}))
    assert all(g["fused"] is not saved_fused for g in resuming.optimizer.param_groups)
    for p in resuming.student.parameters():
        p.grad = torch.ones_like(p)
    resuming.optimizer.step()  # the loaded step counters suit this machine's kernels
    assert all(torch.isfinite(p).all() for p in resuming.student.parameters())


def test_num_workers_in_the_config_wins_over_the_default():
    """The default itself, per device: tests/train/test_devices.py."""
    from dinokit.train.devices import default_loader_workers

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert loop.training_loader_workers(TrainConfig.build({"num_workers": 3}), gpu) == 3
    assert loop.training_loader_workers(TrainConfig.build({"num_workers": 0}), cpu) == 0
    for device in (gpu, cpu):
        assert loop.training_loader_workers(TrainConfig(), device) == default_loader_workers(device, on_cpu="half")
