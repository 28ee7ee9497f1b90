"""Embeddings files (npz, pt, parquet)."""

import sys

import numpy as np
import pytest
import torch
from torch import nn

from dinokit.data.folders import scan_folder
from dinokit.eval.embed import Embeddings, check_writable, embed_images
from dinokit.extras import MissingExtraError
from tests.eval.test_knn import COLOURS, make_folder


def sample(labelled: bool = True, n: int = 12, dim: int = 5) -> Embeddings:
    features = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    labels = [f"class{i % 3}" for i in range(n)] if labelled else None
    return Embeddings(features, [f"/data/img{i}.jpg" for i in range(n)], labels)


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".parquet"])
@pytest.mark.parametrize("labelled", [True, False])
def test_round_trip(tmp_path, suffix, labelled):
    emb = sample(labelled)
    path = emb.save(tmp_path / f"features{suffix}")
    back = Embeddings.load(path)
    np.testing.assert_array_equal(back.features, emb.features)
    assert back.paths == emb.paths and back.labels == emb.labels
    assert [p.name for p in tmp_path.iterdir()] == [f"features{suffix}"]  # no temporary file left


def test_files_are_readable_with_numpy_torch_and_pandas(tmp_path):
    import pandas as pd

    emb = sample()
    with np.load(emb.save(tmp_path / "f.npz"), allow_pickle=False) as data:
        assert data["features"].shape == (12, 5) and data["labels"][4] == "class1"
        assert data["paths"][0] == "/data/img0.jpg"
    data = torch.load(emb.save(tmp_path / "f.pt"), weights_only=True)
    assert data["features"].shape == (12, 5) and data["labels"][4] == "class1"
    frame = pd.read_parquet(emb.save(tmp_path / "f.parquet"))
    assert list(frame.columns) == ["path", "label", "embedding"] and len(frame) == 12
    np.testing.assert_allclose(np.stack(frame.embedding), emb.features)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\.csv"):
        sample().save(tmp_path / "f.csv")


def test_embed_images_keeps_paths_and_class_names(tmp_path):
    root = make_folder(tmp_path / "data", COLOURS, per_class=2)
    (root / "red" / "broken.png").write_bytes(b"not an image")
    emb = embed_images(nn.Flatten(), scan_folder(root), crop_size=8, progress=False)
    assert emb.features.shape == (6, 3 * 8 * 8)
    assert emb.labels == ["blue", "blue", "green", "green", "red", "red"]
    assert all(p.startswith(str(root.resolve())) for p in emb.paths) and not any("broken" in p for p in emb.paths)


def test_the_output_format_is_checked_before_any_work(tmp_path, monkeypatch):
    check_writable(tmp_path / "f.npz")
    with pytest.raises(ValueError, match=r"must end in \.npz, \.pt, \.parquet"):
        check_writable(tmp_path / "f.csv")
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if the 'embed' extra were not installed
    with pytest.raises(MissingExtraError, match=r"dinokit\[embed\]"):
        check_writable(tmp_path / "f.parquet")
