"""Official backbones by name: URLs, the download cache, weights=PATH; no network is used."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from dinokit.hub import names
from dinokit.hub.load import load_backbone, open_backbone
from dinokit.models.vit import vit
from dinokit.train.checkpoint import CheckpointError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hub"


@pytest.fixture(scope="module")
def vits8_file(tmp_path_factory):
    """A file shaped like the released dino_deitsmall8_pretrain.pth (random weights, 32 px grid)."""
    path = tmp_path_factory.mktemp("weights") / "dino_deitsmall8_pretrain.pth"
    torch.save(vit("vit_small", patch_size=8, img_size=32).state_dict(), path)
    return path


def test_the_official_list():
    assert set(names.OFFICIAL) == {"dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dino_resnet50"}
    assert names.OFFICIAL["dino_vits8"].url == \
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
    assert (names.OFFICIAL["dino_vitb16"].arch, names.OFFICIAL["dino_vitb16"].patch_size) == ("vit_base", 16)
    assert names.OFFICIAL["dino_resnet50"].arch == "resnet50"


def test_weights_path_is_used_instead_of_the_network(cache, vits8_file, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    loaded = open_backbone("dino_vits8", weights=vits8_file)
    assert (loaded.arch, loaded.patch_size, loaded.source) == ("vit_small", 8, str(vits8_file))
    with pytest.raises(CheckpointError, match="no such file"):
        load_backbone("dino_vits8", weights=vits8_file.with_name("absent.pth"))
    with pytest.raises(CheckpointError, match="weights= goes with an official name"):
        load_backbone(vits8_file, weights=vits8_file)


def test_weights_of_another_network_than_the_name_are_refused(cache, vits8_file, tmp_path):
    with pytest.raises(CheckpointError, match=r"holds a vit_small/8, but dino_vits16 is a vit_small/16"):
        open_backbone("dino_vits16", weights=vits8_file)
    torch.save(vit("vit_tiny", patch_size=8, img_size=32).state_dict(), tmp_path / "tiny8.pth")
    with pytest.raises(CheckpointError, match=r"holds a vit_tiny/8, but dino_vits8 is a vit_small/8"):
        open_backbone("dino_vits8", weights=tmp_path / "tiny8.pth")


def test_download_goes_to_the_cache_once(cache, vits8_file, monkeypatch):
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        with open(dst, "wb") as f:
            f.write(vits8_file.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    first = names.official_file("dino_vits8")
    second = names.official_file("dino_vits8")
    assert first == second == cache / "dino_deitsmall8_pretrain.pth"
    assert calls == [names.OFFICIAL["dino_vits8"].url]
    assert load_backbone("dino_vits8").patch_embed.patch_size == 8


def test_no_network_says_how_to_go_on(cache, monkeypatch):
    def offline(url, dst, progress=True):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError, match=r"could not download dino_vitb16 .*in place of the name "
                                              r"\(dinokit train --init PATH\).*weights=PATH"):
        load_backbone("dino_vitb16")
    assert not list(cache.glob("*"))
