"""2-D projections of embeddings and their plots."""

import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from dinokit.extras import MissingExtraError
from dinokit.viz.embeddings import plot_embeddings, project_2d
from tests.eval.test_embed import sample


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_plot_writes_an_image(tmp_path, method):
    emb = sample(n=40, dim=8)
    out = plot_embeddings(emb, tmp_path / "plot.png", method=method, max_points=30)
    with Image.open(out) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    assert project_2d(emb.features, method).shape == (40, 2)


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    with pytest.raises(MissingExtraError, match=r"dinokit\[embed\].*umap-learn"):
        project_2d(sample().features, "umap")


def test_plot_names_the_file_it_writes_and_refuses_bad_input(tmp_path):
    out = plot_embeddings(sample(), tmp_path / "noext", method="pca")
    assert out == tmp_path / "noext.png" and out.is_file()
    with pytest.raises(ValueError, match="max_points must be at least 4"):
        plot_embeddings(sample(), tmp_path / "p.png", method="pca", max_points=0)
    broken = sample()
    broken.features[[2, 5]] = np.nan
    with pytest.raises(ValueError, match=r"^2 of the 12 rows hold NaN or infinite features[^\n]*$"):
        plot_embeddings(broken, tmp_path / "p.png", method="pca")


def test_umap_is_seeded_and_says_nothing_about_threads():
    pytest.importorskip("umap", reason="umap-learn (dinokit[embed]) is not installed")
    features = sample(n=40, dim=8).features
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = project_2d(features, "umap", seed=3)
    assert first.shape == (40, 2) and not [w for w in caught if "n_jobs" in str(w.message)]
    assert np.array_equal(project_2d(features, "umap", seed=3), first)
