"""What ``dinokit knn``, ``linear`` and ``embed`` evaluate: ``open_source(spec)`` turns what the user
named (a run folder, a checkpoint or export file, an official name, or a baseline: ``pixels``,
``random:<arch>``) into a ``FeatureSource``: the backbone, what identifies its weights (the
feature cache's key), its evaluation defaults and the folder its results go to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from dinokit.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError
from dinokit.eval.features import cache_key
from dinokit.hub.load import LATEST, open_backbone, open_untrained
from dinokit.models.backbones import is_vit


def file_fingerprint(path: str | Path) -> str:
    """A fingerprint of a file's identity and version: resolved path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return cache_key(str(path), stat.st_size, stat.st_mtime_ns)


@dataclass
class FeatureSource:
    """A backbone to evaluate, what identifies its weights, its evaluation defaults and its folder.

    ``image_size`` is the crop size (pixels) the backbone was trained for, 224 when unknown;
    ``mean``/``std`` the normalisation it was trained with. Results go to ``result_path(...)``
    and cached features to ``cache_dir``, both inside ``home``.
    """

    backbone: nn.Module = field(repr=False)
    name: str
    tag: str
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    home: Path = Path(".")
    prefix: str = ""
    which: str | None = None  # teacher | student; None for baselines

    @property
    def label(self) -> str:
        """What is evaluated, for people: ``pixels``, ``random:vit_tiny/4``, ``teacher of runs/x``."""
        return self.name if self.which is None else f"{self.which} of {self.name}"

    @property
    def cache_dir(self) -> Path:
        return self.home / "features"

    def result_path(self, what: str) -> Path:
        """``home/[<checkpoint stem>.]eval_<what>[_student].json``."""
        suffix = "_student" if self.which == "student" else ""
        return self.home / f"{self.prefix}eval_{what}{suffix}.json"

    def check_image_size(self, size: int) -> None:
        """A ``ConfigError`` when ``size`` is not a whole number of the ViT's patches."""
        patch = getattr(self.backbone, "patch_size", None)
        if is_vit(self.backbone) and size % patch:
            raise ConfigError(f"image size {size} px is not a multiple of the backbone's patch size {patch} "
                              f"({self.name}); pick e.g. --image-size {max(patch, size // patch * patch)}")


def open_source(spec: str | Path, which: str = "teacher", arch: str | None = None, patch_size: int | None = None,
                trust: bool = False, seed: int = 0, weights: str | Path | None = None) -> FeatureSource:
    """The backbone named by ``spec``, in eval mode:

    * anything ``dinokit.hub.load.open_backbone`` reads: a run folder, a checkpoint or export
      file, an official name (``dino_vits16``; ``weights`` for a local copy). Results go to the
      run folder (``eval_knn.json``), next to a file (``<stem>.eval_knn.json``), or for an
      official name to ``runs/<name>``;
    * ``pixels``: the normalised image itself, flattened (``3 * S * S`` features), a baseline;
    * ``random:<arch>[/<patch>]`` (e.g. ``random:vit_tiny/4``): untrained weights seeded by ``seed``;
      baselines' results go to ``runs/baseline-<name>``.

    Change ``home`` of the result to put results and the feature cache elsewhere.
    """
    spec = str(spec)
    if spec == "pixels":
        return FeatureSource(nn.Flatten(), spec, cache_key("pixels"), home=Path("runs") / "baseline-pixels")
    if spec.startswith("random:"):
        loaded = open_untrained(spec, seed, patch_size)
        slug = f"random-{loaded.arch.replace(':', '-')}" + (f"-p{loaded.patch_size}" if loaded.patch_size else "")
        return FeatureSource(loaded.model, spec, cache_key("random", loaded.arch, loaded.patch_size, seed),
                             home=Path("runs") / f"baseline-{slug}")

    loaded = open_backbone(spec, arch, patch_size, which, trust, weights)
    path = Path(spec).expanduser()
    if path.is_dir():
        home, prefix = path, ""
    elif path.exists():
        home, prefix = path.parent, "" if path.name == LATEST else f"{path.stem}."
    else:  # an official name
        home, prefix = Path("runs") / spec, ""
    return FeatureSource(loaded.model, spec, cache_key(file_fingerprint(loaded.source), which, arch, patch_size),
                         loaded.img_size, loaded.mean, loaded.std, home, prefix, which)
