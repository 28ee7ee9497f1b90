"""Embeddings drawn in 2-D: a t-SNE, UMAP or PCA projection of their rows, coloured by label
(``dinokit plot-embeddings``). t-SNE and PCA need scikit-learn, UMAP umap-learn (the ``embed``
extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dinokit.extras import require

if TYPE_CHECKING:
    from dinokit.eval.embed import Embeddings

MIN_ROWS = 4  # the fewest rows a 2-D projection is drawn of
METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}
METHODS = tuple(METHOD_NAMES)


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
