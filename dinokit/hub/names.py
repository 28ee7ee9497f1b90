"""The official DINO backbones by name, downloaded once into the dinokit cache.

``official_file("dino_vits16")`` returns the path of the released teacher backbone
(``$DINOKIT_CACHE/hub/<file>``, default ``~/.cache/dinokit/hub``), downloading it on first use;
``weights=PATH`` uses a local copy instead (machines without internet).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch

from dinokit.files import cache_dir
from dinokit.train.checkpoint import CheckpointError

BASE_URL = "https://dl.fbaipublicfiles.com/dino"


@dataclass(frozen=True)
class OfficialWeights:
    """A released backbone-only file: the teacher of the paper's run."""

    url: str
    arch: str
    patch_size: int | None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _entry(stem: str, arch: str, patch_size: int | None) -> OfficialWeights:
    return OfficialWeights(f"{BASE_URL}/{stem}/{stem}.pth", arch, patch_size)


OFFICIAL: dict[str, OfficialWeights] = {
    "dino_vits16": _entry("dino_deitsmall16_pretrain", "vit_small", 16),
    "dino_vits8": _entry("dino_deitsmall8_pretrain", "vit_small", 8),
    "dino_vitb16": _entry("dino_vitbase16_pretrain", "vit_base", 16),
    "dino_vitb8": _entry("dino_vitbase8_pretrain", "vit_base", 8),
    "dino_resnet50": _entry("dino_resnet50_pretrain", "resnet50", None),
}


def hub_dir() -> Path:
    return cache_dir() / "hub"


def close_name(source: str) -> str | None:
    """The official name ``source`` is probably a typo of, if any."""
    found = difflib.get_close_matches(source, OFFICIAL, n=1, cutoff=0.8)
    return found[0] if found else None


def official_file(name: str, weights: str | Path | None = None, progress: bool = True) -> Path:
    """The local file holding the weights of the official backbone ``name``.

    ``weights`` (a path) is used as is; otherwise the cached download, fetched now if absent.
    """
    if name not in OFFICIAL:
        raise CheckpointError(f"unknown official backbone {name!r}; known: {', '.join(OFFICIAL)}")
    entry = OFFICIAL[name]
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CheckpointError(f"weights={str(weights)!r} for {name}: no such file")
        return path
    path = hub_dir() / entry.filename
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(entry.url, str(path), progress=progress)
    except Exception as err:  # no network, proxy, HTTP error: all end the same way for the user
        raise CheckpointError(
            f"could not download {name} from {entry.url} ({type(err).__name__}: {err}). Download the file "
            f"elsewhere and give its path in place of the name (dinokit train --init PATH), or with the name as "
            f"weights=PATH (--weights PATH in the other commands), or place it at {path}") from None
    return path
