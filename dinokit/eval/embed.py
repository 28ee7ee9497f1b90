"""Embeddings of an image folder: one row per image, written as ``.npz``, ``.pt`` or ``.parquet``,
read back with numpy, torch or pandas, and drawn in 2-D (t-SNE, UMAP or PCA) coloured by label.

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

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dinokit.data.folders import ImageList, image_list
from dinokit.eval.features import Features, cached_features
from dinokit.extras import require

FORMATS = (".npz", ".pt", ".parquet")
MIN_ROWS = 4  # the fewest rows a 2-D projection is drawn of
METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}
METHODS = tuple(METHOD_NAMES)


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
        suffix = path.suffix.lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{suffix}")
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
        os.replace(tmp, path)
        return path

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


def project_2d(features: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """``N x D`` -> ``N x 2`` by t-SNE, UMAP or PCA, on L2-normalised features (cosine geometry).

    t-SNE first reduces to 50 dimensions by PCA; its perplexity is at most ``(N - 1) / 3``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown projection {method!r}; use one of {', '.join(METHODS)}")
    bad = int((~np.isfinite(features).all(axis=1)).sum())
    if bad:
        raise ValueError(f"{bad} of the {len(features)} rows hold NaN or infinite features (a diverged network?); "
                         f"they have no place in a projection")
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    if method == "umap":
        umap = require("umap", "umap-learn", "embed")
        return umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), metric="cosine",
                         random_state=seed, n_jobs=1).fit_transform(x)  # seeded: one thread (said, not warned)
    decomposition = require("sklearn.decomposition", "scikit-learn", "embed")
    if method == "pca":
        return decomposition.PCA(n_components=2, random_state=seed).fit_transform(x)
    manifold = require("sklearn.manifold", "scikit-learn", "embed")
    if x.shape[1] > 50 and len(x) > 50:
        x = decomposition.PCA(n_components=50, random_state=seed).fit_transform(x)
    return manifold.TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca",
                         random_state=seed, n_jobs=1).fit_transform(x)  # seeded: one thread (said, not warned)


def plot_embeddings(embeddings: Embeddings, out: str | Path, method: str = "tsne", max_points: int = 5000,
                    seed: int = 0, title: str | None = None) -> Path:
    """Draw a 2-D projection of (at most ``max_points`` randomly chosen) rows, coloured by label,
    into ``out``; a name without a suffix gets ``.png``. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(embeddings) < MIN_ROWS:
        raise ValueError(f"a 2-D projection needs at least {MIN_ROWS} rows, the file has {len(embeddings)}")
    if max_points < MIN_ROWS:
        raise ValueError(f"max_points must be at least {MIN_ROWS}, got {max_points}")
    rows = np.arange(len(embeddings))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
    xy = project_2d(embeddings.features[rows], method, seed)
    labels = None if embeddings.labels is None else np.array(embeddings.labels)[rows]

    fig, ax = plt.subplots(figsize=(7, 7), dpi=120)
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.7)
    else:
        classes = sorted(set(labels.tolist()))
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo")
        for i, name in enumerate(classes):
            mask = labels == name
            colour = cmap(i if len(classes) <= 20 else i / max(len(classes) - 1, 1))
            ax.scatter(xy[mask, 0], xy[mask, 1], s=4, alpha=0.7, color=colour, label=name)
        if len(classes) <= 20:
            ax.legend(markerscale=3, fontsize=8, loc="best", frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{METHOD_NAMES[method]} of {len(rows)} embeddings")
    out = Path(out)
    if not out.suffix:  # what matplotlib would write: say so
        out = out.with_name(f"{out.name}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def embed_images(backbone, images: ImageList | str | Path, crop_size: int = 224, mean=None, std=None, env=None,
                 **kwargs) -> Embeddings | None:
    """Embeddings of every readable image of ``images``, an ``ImageList`` or a folder's path
    (``kwargs`` go to ``extract_features``).

    Under a launcher pass ``env`` (the ``DistEnv``) on every process: each extracts its share and
    process 0 gets all rows; the other processes get ``None``."""
    images = image_list(images)
    features = cached_features(backbone, images, crop_size=crop_size, mean=mean, std=std, env=env, **kwargs)
    return None if features is None else Embeddings.from_features(features, images)
