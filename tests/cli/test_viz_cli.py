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
    assert no_ckpt.exit_code == 2 and "no checkpoint" in no_ckpt.output
    bad_threshold = run("attention", tmp_path, "--checkpoint", official_weights, "--out", tmp_path / "a",
                        "--threshold", 0)
    assert bad_threshold.exit_code == 2
    assert "Traceback" not in missing.output + no_ckpt.output + bad_threshold.output


def test_pca_on_a_folder(official_weights, photos, tmp_path):
    out = tmp_path / "pca"
    result = run("pca", photos, "--checkpoint", official_weights, "--out", out, "--image-size", 0,
                 "--background-threshold", 0.5)
    assert result.exit_code == 0, result.output
    assert Image.open(out / "wide.png").size == (56, 40)
    assert Image.open(out / "sub" / "tall.png").size == (24, 48)
    assert (out / "overview.png").exists()


def test_report(tmp_path):
    result = run("report", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.html").exists()
    assert str(tmp_path / "report.html") in result.output
    missing = run("report", tmp_path / "absent")
    assert missing.exit_code == 2 and "does not exist" in missing.output
