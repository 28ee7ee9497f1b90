"""Public data sets, downloaded through torchvision and written out as image folders.

``--data cifar10`` (or ``cifar100``) downloads the set once (when the machine has internet),
writes its training images as PNG files in class folders under the cache, and from then on it
is an ordinary labelled folder.
"""

from __future__ import annotations

from pathlib import Path

from dinokit.data.builtin import builtin_textures
from dinokit.data.folders import DataError
from dinokit.files import COMPLETE, cache_dir, folder_made_once

PUBLIC_SETS = ("cifar10", "cifar100")


def public_folder(name: str, root: str | Path | None = None, download: bool = True) -> Path:
    """The image folder of public data set ``name`` (its training split), prepared on first use.

    The raw download goes to ``root/raw`` (default: the dinokit cache); the folder is
    ``root/<name>-train/<class>/<nnnnn>.png``.
    """
    from torchvision import datasets

    if name not in PUBLIC_SETS:
        raise DataError(f"unknown public data set {name!r}; known: {', '.join(PUBLIC_SETS)}")
    base = Path(root) if root else cache_dir()
    folder = base / f"{name}-train"
    if (folder / COMPLETE).exists():
        return folder
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        raw = cls(str(base / "raw"), train=True, download=download)
    except (RuntimeError, OSError) as err:
        raise DataError(f"could not get {name} into {base / 'raw'} ({err}); without internet, "
                        f"point --data at a folder of images instead") from None

    def write_images(staging: Path) -> None:
        for cls_name in raw.classes:
            (staging / cls_name).mkdir()
        for i, (image, label) in enumerate(raw):
            image.save(staging / raw.classes[label] / f"{i:05d}.png")

    try:
        return folder_made_once(folder, write_images)
    except OSError as err:
        raise DataError(f"cannot write {name}'s images into {base} ({err.strerror or err}); point DINOKIT_CACHE "
                        f"at a writable folder with room for them") from None


def resolve_data(spec: str | None) -> Path:
    """A data setting -> a folder: None is the built-in textures, a public set's name is prepared,
    anything else is a path (an existing path always wins over a name)."""
    if spec is None:
        return builtin_textures()
    path = Path(spec).expanduser()
    if not path.exists() and spec.lower() in PUBLIC_SETS:
        return public_folder(spec.lower())
    if not path.exists() and len(path.parts) == 1:  # a bare word: a folder here, or a misspelt name
        raise DataError(f"data folder {spec} does not exist here, and {spec!r} names no public data set "
                        f"(known: {', '.join(PUBLIC_SETS)})")
    return path
