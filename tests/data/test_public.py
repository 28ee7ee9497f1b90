"""``--data cifar10`` / ``cifar100``: a name, a cached copy or a download; a path always wins. No download here."""

import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

import pytest
import torchvision
from click.testing import CliRunner
from PIL import Image

from dinokit.cli import main
from dinokit.data import public
from dinokit.data.folders import DataError, scan_folder
from dinokit.data.public import public_folder, resolve_data

OFFLINE = "<urlopen error [Errno -3] Temporary failure in name resolution>"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty ``DINOKIT_CACHE``, and the working directory elsewhere (with no data set folders)."""
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "cache"


@pytest.fixture
def offline(monkeypatch) -> None:
    """Every download fails as urllib fails without a network."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def _cached_copy(cache: Path, name: str) -> Path:
    """A prepared copy of ``name`` in the cache, as ``public_folder`` leaves it: class folders and ``.complete``."""
    folder = cache / f"{name}-train"
    (folder / "cat").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(folder / "cat" / "00000.png")
    (folder / ".complete").touch()
    return folder


class FakeCIFAR:
    """What torchvision's CIFAR classes give: ``classes`` and (PIL image, label) pairs; counts its downloads."""

    made: ClassVar[list[tuple[str, bool, bool]]] = []
    classes = ("apple", "bear")

    def __init__(self, root, train=True, download=False):
        FakeCIFAR.made.append((root, train, download))

    def __iter__(self):
        for i in range(3):
            yield Image.new("RGB", (32, 32), (80 * i, 0, 0)), i % 2


def test_a_name_is_downloaded_once_and_written_as_a_class_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(FakeCIFAR, "made", [])
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR)
    folder = public_folder("cifar100", root=tmp_path)
    assert folder == tmp_path / "cifar100-train" and FakeCIFAR.made == [(str(tmp_path / "raw"), True, True)]
    images = scan_folder(folder)
    assert images.classes == ["apple", "bear"] and [p.name for p in images.paths] == ["00000.png", "00002.png",
                                                                                       "00001.png"]
    assert Image.open(folder / "apple" / "00002.png").getpixel((0, 0)) == (160, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar100-train"]  # no staging folder left
    assert public_folder("cifar100", root=tmp_path) == folder and len(FakeCIFAR.made) == 1  # not again


def test_a_name_with_a_copy_in_the_cache_uses_it_without_downloading(cache, offline):
    folder = _cached_copy(cache, "cifar10")
    assert resolve_data("cifar10") == folder
    assert resolve_data("CIFAR10") == folder  # names in any case


def test_an_existing_path_wins_over_a_name(cache, offline, monkeypatch):
    _cached_copy(cache, "cifar10")
    Path("cifar10").mkdir()  # a folder of that name in the working directory
    monkeypatch.setattr(public, "public_folder", lambda *args, **kwargs: pytest.fail("looked up as a name"))
    assert resolve_data("cifar10") == Path("cifar10")
    assert resolve_data(str(cache / "cifar10-train")) == cache / "cifar10-train"  # any path is taken as it is


def test_an_unknown_name_is_refused_and_a_missing_bare_word_names_the_known_sets(cache, offline, monkeypatch,
                                                                                 tmp_path):
    with pytest.raises(DataError, match=r"^unknown public data set 'mnist'; known: cifar10, cifar100$"):
        public_folder("mnist")
    monkeypatch.setattr(public, "public_folder", lambda *args, **kwargs: pytest.fail("looked up as a name"))
    with pytest.raises(DataError, match=r"^data folder mnist does not exist here, and 'mnist' names no public data "
                                        r"set \(known: cifar10, cifar100\)$"):  # "data folder mnist does not exist"
        resolve_data("mnist")
    assert resolve_data(str(tmp_path / "missing")) == tmp_path / "missing"  # a path: scan_folder says it is missing


def test_a_download_that_cannot_happen_is_one_clear_error(cache, offline):
    (cache / "cifar10-train").mkdir(parents=True)  # half written by an earlier attempt (no .complete): not used
    message = (f"could not get cifar10 into {cache / 'raw'} ({OFFLINE}); without internet, point --data at a folder "
               "of images instead")
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        resolve_data("cifar10")
    assert not (cache / "cifar10-train" / ".complete").exists()

    result = CliRunner().invoke(main, ["train", "--config", "laptop", "--data", "cifar10", "--out", "run",
                                       "--device", "cpu"])
    assert result.exit_code == 2 and result.output.endswith(f"Error: {message}\n"), result.output
    assert "Traceback" not in result.output and not Path("run").exists()
