"""The weighted k-NN against a direct computation, and the feature cache of ``knn_evaluate``."""

import math
import os

import pytest
import torch
from PIL import Image
from torch import nn

from dinokit.config import ConfigError
from dinokit.data.folders import DataError, scan_folder
from dinokit.eval.source import FeatureSource, file_fingerprint, open_source
from dinokit.eval.knn import knn_classify, knn_evaluate, top_k_neighbours


def direct_knn(memory, memory_labels, queries, query_labels, k, temperature, num_classes):
    """Weighted k-NN written out with Python loops: (top-1 %, top-5 %)."""
    top1 = top5 = 0
    mem = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in memory.tolist()]
    for q, label in zip(queries.tolist(), query_labels.tolist()):
        norm = math.sqrt(sum(v * v for v in q))
        sims = [sum(a * b / norm for a, b in zip(q, m)) for m in mem]
        nearest = sorted(range(len(mem)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        voted = set()
        for i in nearest:
            votes[memory_labels[i]] += math.exp(sims[i] / temperature)
            voted.add(int(memory_labels[i]))
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        top1 += ranking[0] == label
        top5 += label in ranking[:5] and label in voted
    n = len(query_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n


def test_matches_the_direct_computation_on_random_features():
    g = torch.Generator().manual_seed(0)
    memory, queries = torch.randn(40, 6, generator=g), torch.randn(15, 6, generator=g)
    memory_labels, query_labels = torch.randint(0, 7, (40,), generator=g), torch.randint(0, 7, (15,), generator=g)
    ks = (1, 3, 10, 40, 100)  # 100 > the 40 memory features
    results = knn_classify(memory, memory_labels, queries, query_labels, ks=ks, temperature=0.1, num_classes=7,
                           query_chunk=4)
    assert list(results) == [1, 3, 10, 40]  # k = 100 is the whole memory, scored once as k = 40
    for k in results:
        expected = direct_knn(memory, memory_labels, queries, query_labels, k, 0.1, 7)
        assert (results[k]["top1"], results[k]["top5"]) == pytest.approx(expected)


def test_hand_case_with_a_tie_a_single_query_and_k_beyond_the_memory():
    # Two memory features identical to the query, of classes 1 and 0: equal votes, the lower class wins.
    memory = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 2])
    query = torch.tensor([[3.0, 0.0]])
    assert knn_classify(memory, labels, query, torch.tensor([0]), ks=(2,))[2] == {"top1": 100.0, "top5": 100.0}
    assert knn_classify(memory, labels, query, torch.tensor([1]), ks=(2,))[2] == {"top1": 0.0, "top5": 100.0}
    # k = 50 > 3 memory features: the whole memory votes; class 2 gets exp(0) against 2 exp(1/T).
    assert knn_classify(memory, labels, query, torch.tensor([2]), ks=(50, 3)) == {3: {"top1": 0.0, "top5": 100.0}}


def test_one_k_and_labels_as_lists_work_and_bad_inputs_are_one_message():
    memory, queries = torch.eye(3), torch.eye(3)[:2]
    assert knn_classify(memory, [0, 1, 2], queries, [0, 1], ks=1) == {1: {"top1": 100.0, "top5": 100.0}}
    for args, message in [
        ((memory, [0, 1], queries, [0, 1]), r"train_labels must be 3 class indices .* shape \(2,\)"),
        ((memory, [0.0, 1.0, 2.0], queries, [0, 1]), "train_labels must be 3 class indices"),
        ((memory, [0, 1, 2], queries[0], [0]), r"test_features must be N x D .* shape \(3,\)"),
        ((memory, [0, 1, 2], torch.eye(2), [0, 1]), "differ in width: 3 and 2"),
        ((memory, [0, -1, 2], queries, [0, 1]), "class indices >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            knn_classify(*args)
    with pytest.raises(ValueError, match="every k must be at least 1"):
        knn_classify(memory, [0, 1, 2], queries, [0, 1], ks=(0, 5))
    with pytest.raises(ValueError, match="temperature must be positive"):
        knn_classify(memory, [0, 1, 2], queries, [0, 1], temperature=0)


def test_classes_absent_from_the_test_set_and_unvoted_classes():
    memory = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3])
    queries = torch.tensor([[1.0, 0.1, 0, 0], [0, 1.0, 0.1, 0]])
    result = knn_classify(memory, labels, queries, torch.tensor([0, 1]), ks=(1,), num_classes=10)
    assert result[1] == {"top1": 100.0, "top5": 100.0}
    # k=1 votes for one class only: a class without votes is no top-5 guess, whatever its index.
    result = knn_classify(memory, labels, queries[:1], torch.tensor([1]), ks=(1, 2), num_classes=10)
    assert result[1] == {"top1": 0.0, "top5": 0.0}
    assert result[2] == {"top1": 0.0, "top5": 100.0}


def test_small_temperatures_do_not_overflow():
    g = torch.Generator().manual_seed(1)
    memory, labels = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    queries, query_labels = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    cold = knn_classify(memory, labels, queries, query_labels, ks=(20,), temperature=1e-3)
    nearest = knn_classify(memory, labels, queries, query_labels, ks=(1,))
    assert cold[20]["top1"] == nearest[1]["top1"]


def test_chunked_neighbours_equal_one_big_topk():
    g = torch.Generator().manual_seed(2)
    memory = torch.nn.functional.normalize(torch.randn(103, 8, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(9, 8, generator=g), dim=1)
    sims, idx = top_k_neighbours(queries, memory, 7, query_chunk=2, memory_chunk=10)
    full_sims, full_idx = (queries @ memory.T).topk(7, dim=1)
    assert torch.allclose(sims, full_sims) and torch.equal(idx, full_idx)


# --- knn_evaluate on image folders ------------------------------------------------------------

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def make_folder(root, classes, per_class=4, size=16):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shade = tuple(min(255, v + 8 * i) for v in COLOURS[c])
            Image.new("RGB", (size, size), shade).save(root / c / f"{i}.png")
    return root


class CountingFlatten(nn.Module):
    """Raw pixels as features, counting the images it sees."""

    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return x.flatten(1)


def test_features_are_cached_and_reused(tmp_path):
    train = scan_folder(make_folder(tmp_path / "train", COLOURS))
    test = scan_folder(make_folder(tmp_path / "test", ["green", "red"], per_class=2))
    backbone, cache = CountingFlatten(), tmp_path / "cache"
    kwargs = dict(crop_size=16, ks=(1, 3), progress=False, cache_dir=cache, cache_tag="weights-v1")
    first = knn_evaluate(backbone, train, test, **kwargs)
    assert backbone.images == 12 + 4 and len(list(cache.glob("cls-*.pt"))) == 2
    assert first[1] == {"top1": 100.0, "top5": 100.0}  # test classes mapped onto the training ones
    assert knn_evaluate(backbone, train, test, **kwargs) == first
    assert backbone.images == 16  # nothing recomputed
    assert knn_evaluate(backbone, str(train.root), test.root, **kwargs) == first  # folders' paths: the same lists
    assert backbone.images == 16
    with pytest.raises(TypeError, match="an ImageList or a folder's path, got list"):
        knn_evaluate(backbone, train.paths, test, **kwargs)
    knn_evaluate(backbone, train, test, **{**kwargs, "cache_tag": "weights-v2"})
    assert backbone.images == 32  # other weights: other cache entries


def test_unreadable_images_are_named_and_left_out_of_the_counts(tmp_path, capsys):
    train_dir = make_folder(tmp_path / "train", COLOURS)
    (train_dir / "blue" / "broken.png").write_bytes(b"not a png")
    test = scan_folder(make_folder(tmp_path / "test", ["green", "red"], per_class=2))
    scores = knn_evaluate(CountingFlatten(), scan_folder(train_dir), test, crop_size=16, ks=(1, 100), progress=False)
    assert list(scores) == [1, 12] and (scores.memory, scores.queries) == (12, 4)
    assert "1 of 13 images could not be read and are left out" in capsys.readouterr().err


def test_an_image_replaced_in_place_is_not_served_from_the_cache(tmp_path):
    train = scan_folder(make_folder(tmp_path / "train", COLOURS))
    test = scan_folder(make_folder(tmp_path / "test", ["green", "red"], per_class=2))
    backbone = CountingFlatten()
    kwargs = dict(crop_size=16, ks=(1,), progress=False, cache_dir=tmp_path / "cache", cache_tag="weights")
    assert knn_evaluate(backbone, train, test, **kwargs)[1]["top1"] == 100.0
    for path in test.paths:  # same names, other pictures: the red test images are now blue
        if path.parent.name == "red":
            Image.new("RGB", (16, 16), COLOURS["blue"]).save(path)
            os.utime(path, ns=(10**18, 10**18))  # a new version even where the clock is coarse
    assert knn_evaluate(backbone, train, test, **kwargs)[1]["top1"] == 50.0
    assert backbone.images == 16 + 4  # the test features were computed again, the training ones not


def test_test_classes_must_occur_in_training(tmp_path):
    train = scan_folder(make_folder(tmp_path / "train", ["blue", "green"]))
    test = scan_folder(make_folder(tmp_path / "test", ["green", "red"]))
    with pytest.raises(DataError, match=r"classes \['red'\].*lacks"):
        knn_evaluate(nn.Flatten(), train, test, crop_size=16, progress=False)
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "loose.png")
    with pytest.raises(DataError, match="needs labels"):
        knn_evaluate(nn.Flatten(), scan_folder(tmp_path / "train"), test, crop_size=16, progress=False)


def test_checkpoint_fingerprint_follows_the_file_version(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"x")
    before = file_fingerprint(path)
    os.utime(path, ns=(10**18, 10**18))
    assert file_fingerprint(path) != before


def test_baseline_sources(tmp_path):
    pixels = open_source("pixels")
    assert isinstance(pixels, FeatureSource) and pixels.which is None
    assert pixels.backbone(torch.zeros(2, 3, 8, 8)).shape == (2, 192)
    a, b = open_source("random:vit_tiny/4"), open_source("random:vit_tiny/4")
    assert a.tag == b.tag and torch.equal(a.backbone.pos_embed, b.backbone.pos_embed)
    assert a.backbone.patch_size == 4 and a.result_path("knn").name == "eval_knn.json"
    with pytest.raises(ConfigError, match="multiple of the backbone's patch size 4"):
        a.check_image_size(30)
