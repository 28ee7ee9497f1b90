"""dinokit export: safetensors bit-for-bit, ONNX and TorchScript against PyTorch, timm's own loader."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from dinokit.cli import main
from dinokit.hub.export import export_backbone
from dinokit.hub.load import load_backbone
from dinokit.models.vit import vit
from dinokit.train.checkpoint import CheckpointError
from tests.hub.test_load import randomised


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder of ours: teacher and student differ, the run normalised with its own mean/std."""
    teacher = randomised(vit("vit_tiny", patch_size=8, img_size=32), 10)
    student = randomised(vit("vit_tiny", patch_size=8, img_size=32), 11)
    run = tmp_path_factory.mktemp("run")
    torch.save({"student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                "args": {"arch": "vit_tiny", "patch_size": 8, "global_crops_size": 32,
                         "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}}, run / "checkpoint.pth")
    return run, teacher, student


def test_safetensors_loads_back_bit_for_bit(run_dir, tmp_path):
    from safetensors.torch import load_file

    run, teacher, _ = run_dir
    files = export_backbone(run, tmp_path, "safetensors")
    assert [f.name for f in files] == ["backbone.safetensors", "backbone.json"]
    stored = load_file(tmp_path / "backbone.safetensors")
    expected = teacher.state_dict()
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], expected[k]) and stored[k].dtype == expected[k].dtype for k in expected)
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert {k: meta[k] for k in ("arch", "patch_size", "img_size", "embed_dim", "mean", "std", "which")} == {
        "arch": "vit_tiny", "patch_size": 8, "img_size": 32, "embed_dim": 192, "mean": [0.5] * 3, "std": [0.2] * 3,
        "which": "teacher"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_backbone(tmp_path)(x), teacher(x))


def test_onnx_matches_pytorch_at_two_batch_sizes_and_two_image_sizes(run_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    run, teacher, _ = run_dir
    export_backbone(run, tmp_path, "onnx")
    session = ort.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 32, 32), (5, 3, 32, 32), (2, 3, 48, 64)]:
        x = torch.randn(shape, generator=g)
        (out,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            assert (torch.from_numpy(out) - teacher(x)).abs().max() < 1e-4, shape
    info = json.loads((tmp_path / "backbone.json").read_text())["formats"]["onnx"]
    assert info["dynamic_axes"]["images"] == ["batch", "height", "width"]


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torchscript_and_student_on_request(run_dir, tmp_path):
    run, _, student = run_dir
    export_backbone(run, tmp_path, "torchscript", which="student")
    scripted = torch.jit.load(str(tmp_path / "backbone.torchscript.pt"))
    for shape in [(3, 3, 32, 32), (1, 3, 40, 24)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert (scripted(x) - student(x)).abs().max() < 1e-5
    assert json.loads((tmp_path / "backbone.json").read_text())["which"] == "student"


def test_timm_export_loads_with_timm(run_dir, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    run, teacher, _ = run_dir
    export_backbone(run, tmp_path, "timm")
    export_backbone(run, tmp_path, "safetensors")  # a second format keeps the first's entry
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert set(meta["formats"]) == {"timm", "safetensors"}
    x = torch.randn(2, 3, 32, 32)
    by_name = timm.create_model(meta["formats"]["timm"]["timm_model"], **meta["formats"]["timm"]["timm_kwargs"])
    by_name.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    models = [by_name.eval()]
    if _timm_reads_local_dirs():  # timm 1.0.16 and later
        from_dir = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
        assert tuple(from_dir.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
        models.append(from_dir.eval())
    with torch.no_grad():
        for model in models:
            assert (model(x) - teacher(x)).abs().max() < 1e-5


def test_timm_export_is_checked_at_two_batch_sizes_and_writes_nothing_when_it_differs(run_dir, tmp_path,
                                                                                     monkeypatch):
    pytest.importorskip("timm")
    import dinokit.hub.export as export

    checked = []

    def differs(run, loaded, shapes=None):
        checked.extend(shapes)
        return 0.5

    monkeypatch.setattr(export, "max_difference", differs)
    with pytest.raises(CheckpointError, match=r"timm's vit_tiny_patch16_224 differs from the PyTorch model by "
                                              r"5.00e-01 .* not exported"):
        export_backbone(run_dir[0], tmp_path, "timm")
    assert checked == [(1, 3, 32, 32), (3, 3, 32, 32)]  # timm's ViT takes its own size only; one shape before
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "config.json").exists()


def _timm_reads_local_dirs() -> bool:
    """Whether this timm knows the ``local-dir:`` model source."""
    from timm.models._factory import parse_model_name

    try:
        return parse_model_name("local-dir:/x")[0] == "local-dir"
    except AssertionError:
        return False


def test_cli_export_and_its_errors(run_dir, tmp_path, monkeypatch):
    run, _, _ = run_dir
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "backbone.safetensors" in result.output and (tmp_path / "x" / "backbone.json").is_file()

    result = runner.invoke(main, ["export", str(tmp_path / "absent"), "--format", "onnx", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "absent: no such file or folder" in result.output
    assert "Traceback" not in result.output

    # an export holds one network: its "student" would be the teacher under another name
    result = runner.invoke(main, ["export", str(tmp_path / "x"), "--format", "safetensors", "--which", "student",
                                  "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "holds one network" in result.output and not (tmp_path / "s").exists()
    result = runner.invoke(main, ["export", "dino_vits16", "--weights", str(run / "checkpoint.pth"),
                                  "--format", "safetensors", "--out", str(tmp_path / "v")])
    assert result.exit_code == 2 and "holds a vit_tiny/8, but dino_vits16 is a vit_small/16" in result.output

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the 'export' extra were not installed
    result = runner.invoke(main, ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "pip install 'dinokit[export]'" in result.output


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("diff, shown", [(1.0, "1.00e+00"), (float("nan"), "nan")])
def test_a_traced_export_that_disagrees_with_pytorch_is_deleted_and_refused(run_dir, tmp_path, monkeypatch, diff,
                                                                             shown):
    from dinokit.hub import export

    monkeypatch.setattr(export, "max_difference", lambda *args: diff)  # as if the traced graph computed else
    result = CliRunner().invoke(main, ["export", str(run_dir[0]), "--format", "torchscript", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output == (f"Error: the export backbone.torchscript.pt differs from the PyTorch model by {shown} "
                             "(more than 0.001) on the check inputs; it was deleted\n")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a backbone.json that would announce it


def test_an_onnx_export_that_disagrees_with_pytorch_is_deleted_and_refused(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from dinokit.hub import export

    monkeypatch.setattr(export, "max_difference", lambda *args: 0.5)
    with pytest.raises(CheckpointError, match=r"^the export backbone\.onnx differs from the PyTorch model by "
                                              r"5\.00e-01 \(more than 0\.001\) on the check inputs; it was deleted$"):
        export_backbone(run_dir[0], tmp_path, "onnx")
    assert list(tmp_path.iterdir()) == []

