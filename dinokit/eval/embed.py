"""Embeddings of an image folder: one row per image, written as ``.npz``, ``.pt`` or ``.parquet``,
read back with numpy, torch or pandas (``dinokit.viz.embeddings`` draws them in 2-D).

Every format holds the same three things:

    features   N x D float32, the backbone's feature of each image (the [CLS] token for a ViT)
    paths      N strings, the image files (absolute)
    labels     N class names (the image's first-level sub-folder); absent for unlabelled folders

``.npz``: arrays ``features``, ``paths``, ``labels`` (``np.load(f)`` without pickles).
``.pt``: a dict of a tensor and two lists (``torch.load(f, weights_only=True)``).
``.parquet``: columns ``path``, ``label``, ``embedding`` (a list of D floats per row;
``np.stack(pd.read_parquet(f).embedding)`` is the matrix); needs the ``embed`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dinokit.data.folders import ImageList, image_list
from dinokit.eval.features import Features, cached_features
from dinokit.extras import require
from dinokit.files import atomic_write

FORMATS = (".npz", ".pt", ".parquet")


def check_writable(path: str | Path) -> None:
    """Before computing anything: a ``ValueError`` when the name of ``path`` ends in none of
    ``FORMATS``, a ``MissingExtraError`` when its format needs packages that are not installed."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"the file name must end in {', '.join(FORMATS)}: {Path(path).name}")
    if suffix == ".parquet":
        require("pandas", "pandas", "embed")
        require("pyarrow", "pyarrow", "embed")


@dataclass
class Embeddings:
    """``features`` ``N x D`` float32, one path per row, and one class name per row (or ``None``)."""

    features: np.ndarray
    paths: list[str]
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        if self.features.ndim != 2 or len(self.paths) != self.features.shape[0]:
            raise ValueError(f"expected N x D features and N paths, got {self.features.shape} and {len(self.paths)}")
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} rows")

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_features(cls, features: Features, images: ImageList) -> "Embeddings":
        """Rows of ``extract_features`` output, labels named by ``images.classes``."""
        labels = [images.classes[i] for i in features.labels.tolist()] if images.labelled else None
        paths = [str(Path(p).resolve()) for p in features.paths]
        return cls(features.features.numpy(), paths, labels)

    def save(self, path: str | Path) -> Path:
        """Write in the format named by the suffix of ``path`` (see the module doc); atomic."""
        path = Path(path)
        check_writable(path)
        return atomic_write(path, self._write)

    def _write(self, tmp: Path) -> None:
        """Write in the format named by ``tmp``'s suffix (checked by ``check_writable``)."""
        suffix = tmp.suffix.lower()
        if suffix == ".npz":
            arrays = {"features": self.features, "paths": np.array(self.paths, dtype=str)}
            if self.labels is not None:
                arrays["labels"] = np.array(self.labels, dtype=str)
            np.savez(tmp, **arrays)
        elif suffix == ".pt":
            torch.save({"features": torch.from_numpy(self.features), "paths": self.paths, "labels": self.labels}, tmp)
        else:
            import pandas as pd  # there: check_writable

            columns = {"path": self.paths}
            if self.labels is not None:
                columns["label"] = self.labels
            columns["embedding"] = list(self.features)
            pd.DataFrame(columns).to_parquet(tmp, index=False)

    @classmethod
    def load(cls, path: str | Path) -> "Embeddings":
        """Read a file written by ``save``."""
        path = Path(path)
        suffix = path.suffix.lower()
        if not path.exists():
            raise FileNotFoundError(f"no embeddings file at {path}")
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                labels = data["labels"].tolist() if "labels" in data else None
                return cls(data["features"], data["paths"].tolist(), labels)
        if suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(data["features"].numpy(), list(data["paths"]), data.get("labels"))
        if suffix == ".parquet":
            pd = require("pandas", "pandas", "embed")
            frame = pd.read_parquet(path)
            labels = frame["label"].tolist() if "label" in frame else None
            return cls(np.stack(frame["embedding"].to_numpy()), frame["path"].tolist(), labels)
        raise ValueError(f"unknown embeddings format {path.suffix!r} of {path}; use one of {', '.join(FORMATS)}")


def embed_images(backbone, images: ImageList | str | Path, crop_size: int = 224, mean=None, std=None, env=None,
                 **kwargs) -> Embeddings | None:
    """Embeddings of every readable image of ``images``, an ``ImageList`` or a folder's path
    (``kwargs`` go to ``extract_features``).

    Under a launcher pass ``env`` (the ``DistEnv``) on every process: each extracts its share and
    process 0 gets all rows; the other processes get ``None``."""
    images = image_list(images)
    features = cached_features(backbone, images, crop_size=crop_size, mean=mean, std=std, env=env, **kwargs)
    return None if features is None else Embeddings.from_features(features, images)
