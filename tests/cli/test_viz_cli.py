"""``dinokit attention``, ``dinokit pca`` and ``dinokit report`` from the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dinokit.cli import main
from dinokit.models.backbones import build_backbone


@pytest.fixture(scope="module")
def official_weights(tmp_path_factory) -> Path:
    """A bare ViT-tiny/8 backbone state dict in the official DINO key layout (a released backbone file)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "dino_vittiny8_pretrain.pth"
    torch.save(build_backbone("vit_tiny", 8, 32).state_dict(), path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)).save(folder / "sub" / "tall.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_attention_on_a_folder_with_official_weights(official_weights, photos, tmp_path):
    out = tmp_path / "attn"
    result = run("attention", photos, "--checkpoint", official_weights, "--out", out, "--image-size", 0,
                 "--threshold", 0.5, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "broken.png" in result.output
    assert "attention maps of 2 image(s)" in result.output
    assert "(5x7 patches, 3 heads)" in result.output
    for name, size in (("wide", (56, 40)), (Path("sub") / "tall", (24, 48))):
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["image.png", "heads.png"] + [f"attn-head{k}.png" for k in range(3)] + [f"mask-head{k}.png" for k in range(3)])
        assert Image.open(folder / "mask-head0.png").size == size


def test_attention_resizes_the_shorter_side(official_weights, photos, tmp_path):
    result = run("attention", photos / "wide.png", "--checkpoint", official_weights, "--out", tmp_path / "a",
                 "--image-size", 32, "--fit", "pad")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "a" / "wide" / "image.png").size == (48, 32)  # 56x40 -> 44x32 -> padded 48x32


def test_a_large_photo_is_reduced_towards_the_image_size_as_it_loads(official_weights, tmp_path, monkeypatch):
    from dinokit.data import folders

    asked, load_rgb = [], folders.load_rgb
    monkeypatch.setattr(folders, "load_rgb", lambda path, min_side=0: asked.append(min_side) or load_rgb(path, min_side))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 560, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    result = run("attention", tmp_path / "big.jpg", "--checkpoint", official_weights, "--out", tmp_path / "a",
                 "--image-size", 32, "--fit", "pad")
    assert result.exit_code == 0, result.output
    assert asked == [32] and Image.open(tmp_path / "a" / "big" / "image.png").size == (48, 32)


def test_attention_of_an_untrained_network_for_comparison(photos, tmp_path):
    result = run("attention", photos / "wide.png", "--checkpoint", "random:vit_tiny/8", "--out", tmp_path / "a",
                 "--image-size", 32)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "wide" / "heads.png").exists()
    assert len(list((tmp_path / "a" / "wide").glob("attn-head*.png"))) == 3


def test_attention_needs_a_vit(tmp_path, photos):
    state = build_backbone("resnet18").state_dict()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}, "args": {"arch": "resnet18"}},
               tmp_path / "resnet.pth")
    result = run("attention", photos, "--checkpoint", tmp_path / "resnet.pth", "--out", tmp_path / "a")
    assert result.exit_code == 2
    assert "attention maps need a ViT backbone" in result.output
    assert "Traceback" not in result.output


def test_bad_input_gives_one_line(official_weights, photos, tmp_path):
    missing = run("attention", tmp_path / "nothing", "--checkpoint", official_weights, "--out", tmp_path / "a")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    no_ckpt = run("pca", photos, "--checkpoint", tmp_path / "none.pth", "--out", tmp_path / "p")
    assert no_ckpt.exit_code == 2 and "none.pth: no such file or folder" in no_ckpt.output
    bad_threshold = run("attention", tmp_path, "--checkpoint", official_weights, "--out", tmp_path / "a",
                        "--threshold", 0)
    assert bad_threshold.exit_code == 2
    assert "Traceback" not in missing.output + no_ckpt.output + bad_threshold.output


@pytest.mark.parametrize("command", ["attention", "pca"])
def test_bad_options_give_one_line(command, official_weights, photos, tmp_path):
    base = [command, photos, "--checkpoint", official_weights, "--out", tmp_path / "o"]
    cases = {
        "nope.jpg does not exist (give an image file or a folder": [command, tmp_path / "nope.jpg", *base[2:]],
        "Invalid value for '--image-size': -5 is not in the range x>=0": base + ["--image-size", -5],
        "smaller than one 8 px patch; enlarge it (a larger image size) or pad it (fit='pad', --fit pad":
            base + ["--image-size", 5],
        "holds one network": base + ["--which", "student"],
        "holds a vit_tiny/8, but dino_vits8 is a vit_small/8": [
            command, photos, "--checkpoint", "dino_vits8", "--weights", official_weights, "--out", tmp_path / "o"],
    }
    for message, args in cases.items():
        result = run(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output, result.output


def test_official_name_with_weights(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))  # nothing downloaded: --weights is used
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    torch.manual_seed(0)
    torch.save(build_backbone("vit_small", 16, 32).state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    for command in ("attention", "pca"):
        result = run(command, photos / "wide.png", "--checkpoint", "dino_vits16", "--weights",
                     tmp_path / "dino_deitsmall16_pretrain.pth", "--out", tmp_path / command, "--image-size", 32)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "attention" / "wide" / "heads.png").is_file() and (tmp_path / "pca" / "wide.png").is_file()


def test_images_that_differ_only_in_extension_get_their_own_pictures(official_weights, tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("x.jpg", "x.png", "y.png", "overview.jpg"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    result = run("attention", folder, "--checkpoint", official_weights, "--out", tmp_path / "a", "--image-size", 0)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["overview", "x.jpg", "x.png", "y"]
    result = run("pca", folder, "--checkpoint", official_weights, "--out", tmp_path / "p", "--image-size", 0)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "overview.jpg.png", "overview.png", "x.jpg.png", "x.png.png", "y.png"]


def test_pca_without_any_foreground(official_weights, tmp_path):
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "one-patch.png")
    args = ["pca", tmp_path / "one-patch.png", "--checkpoint", official_weights, "--out", tmp_path / "p",
            "--image-size", 0]
    assert run(*args).exit_code == 0  # one colour, nothing to separate
    result = run(*args, "--background-threshold", 0.5)
    assert result.exit_code == 2 and "no foreground patch" in result.output and "Traceback" not in result.output
    result = run(*args, "--background-threshold", 1.0)
    assert result.exit_code == 2 and "1.0 is not in the range 0<=x<1" in result.output


def test_pca_on_a_folder(official_weights, photos, tmp_path):
    out = tmp_path / "pca"
    result = run("pca", photos, "--checkpoint", official_weights, "--out", out, "--image-size", 0,
                 "--background-threshold", 0.5)
    assert result.exit_code == 0, result.output
    assert Image.open(out / "wide.png").size == (56, 40)
    assert Image.open(out / "sub" / "tall.png").size == (24, 48)
    assert (out / "overview.png").exists()


def test_report(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 4.0}\n')
    result = run("report", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.html").exists()
    assert str(tmp_path / "report.html") in result.output
    missing = run("report", tmp_path / "absent")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    a_file = run("report", tmp_path / "metrics.jsonl")
    assert a_file.exit_code == 2 and "metrics.jsonl is not a folder" in a_file.output
    (tmp_path / "empty").mkdir()
    empty = run("report", tmp_path / "empty")
    assert empty.exit_code == 2 and "not a run folder of dinokit train" in empty.output
    assert not (tmp_path / "empty" / "report.html").exists()
