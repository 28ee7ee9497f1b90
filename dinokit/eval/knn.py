"""Weighted k-NN classification on frozen features (the DINO protocol).

Features are L2-normalised; for each query the ``k`` most similar memory features (cosine)
vote for their class with weight ``exp(similarity / T)``; the class with the largest sum wins.
Similarities are computed in chunks of queries and of memory, so a bank of millions of
features needs memory ``O(query_chunk x (memory_chunk + k))`` only. This is the one k-NN of
dinokit: the training monitor and ``dinokit knn`` both call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinokit.data.folders import image_list
from dinokit.eval.features import cached_features, check_label_sets, relabel


class KnnScores(dict):
    """``knn_classify``'s results, ``{k: {"top1": %, "top5": %}}``, with the numbers of memory
    and query features they come from (``memory``, ``queries``: fewer than the images given when
    some could not be read)."""

    def __init__(self, scores: dict[int, dict[str, float]], memory: int, queries: int) -> None:
        super().__init__(scores)
        self.memory, self.queries = memory, queries


@torch.no_grad()
def top_k_neighbours(queries: torch.Tensor, memory: torch.Tensor, k: int, query_chunk: int = 1024,
                     memory_chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices of the ``min(k, M)`` nearest memory rows:
    ``Q x D`` and ``M x D`` (both L2-normalised) -> two ``Q x k'`` tensors, most similar first."""
    k = min(k, memory.shape[0])
    all_sims, all_idx = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0:q0 + query_chunk]
        best_sims = torch.empty(q.shape[0], 0, dtype=q.dtype, device=q.device)
        best_idx = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for m0 in range(0, memory.shape[0], memory_chunk):
            sims = q @ memory[m0:m0 + memory_chunk].T
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)
            best_sims, order = torch.cat([best_sims, s], 1).topk(min(k, best_sims.shape[1] + s.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, i + m0], 1).gather(1, order)
        all_sims.append(best_sims)
        all_idx.append(best_idx)
    return torch.cat(all_sims), torch.cat(all_idx)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: int | tuple[int, ...] | list[int] = (10, 20, 100, 200),
                 temperature: float = 0.07, num_classes: int | None = None, query_chunk: int = 1024
                 ) -> KnnScores:
    """Top-1 and top-5 accuracy (percent) of weighted k-NN for every ``k`` in ``ks``.

    ``train_features`` ``M x D``, ``test_features`` ``Q x D`` (normalised here), labels are
    ``M`` and ``Q`` class indices (tensors or lists); other shapes, ``k < 1`` or ``T <= 0`` are a
    ``ValueError``. A ``k`` larger than ``M`` is scored once, as ``k = M`` (the whole memory). Ties in
    the vote go to the lower class index (a stable sort); a class no neighbour voted for never counts as a top-5
    guess. Votes are computed as ``exp((s - s_max) / T)``, the same ranking as ``exp(s / T)``
    without overflow at small ``T``. Queries go in chunks of ``query_chunk``.
    Returns ``{k: {"top1": ..., "top5": ...}}`` (a ``KnnScores``, which also holds ``M`` and ``Q``).
    """
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    train_labels, test_labels = torch.as_tensor(train_labels), torch.as_tensor(test_labels)
    _check_inputs(train_features, train_labels, test_features, test_labels, ks)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    memory = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.long().to(memory.device)
    test_labels = test_labels.long().to(memory.device)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ks = list(dict.fromkeys(min(k, memory.shape[0]) for k in ks))
    hits = {k: torch.zeros(2, dtype=torch.long) for k in ks}  # top-1, top-5 counts
    for q0 in range(0, queries.shape[0], query_chunk):
        sims, idx = top_k_neighbours(queries[q0:q0 + query_chunk], memory, max(ks), query_chunk)
        labels = test_labels[q0:q0 + query_chunk, None]
        for k in ks:
            neighbour_classes = train_labels[idx[:, :k]]
            weights = ((sims[:, :k] - sims[:, :1]) / temperature).exp()
            votes = torch.zeros(sims.shape[0], num_classes, device=memory.device)
            votes.scatter_add_(1, neighbour_classes, weights)
            voted = torch.zeros_like(votes, dtype=torch.bool).scatter_(1, neighbour_classes, True)
            ranked = torch.sort(votes, dim=1, descending=True, stable=True).indices
            correct = (ranked == labels) & voted.gather(1, ranked)
            hits[k] += torch.stack([correct[:, 0].sum(), correct[:, :5].any(dim=1).sum()]).cpu()
    n = queries.shape[0]
    return KnnScores({k: {"top1": 100.0 * h[0].item() / n, "top5": 100.0 * h[1].item() / n} for k, h in hits.items()},
                     memory=memory.shape[0], queries=n)


def _check_inputs(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                  test_labels: torch.Tensor, ks: tuple[int, ...]) -> None:
    """``ValueError`` unless the features are ``N x D`` with one class index per row and every ``k >= 1``."""
    if not ks or min(ks) < 1:
        raise ValueError(f"every k must be at least 1, got {ks}")
    for name, features, labels in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"{name}_features must be N x D with N >= 1, got shape {tuple(features.shape)}")
        if labels.shape != features.shape[:1] or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"{name}_labels must be {features.shape[0]} class indices (integers), one per "
                             f"feature row, got {labels.dtype} of shape {tuple(labels.shape)}")
        if labels.min() < 0:
            raise ValueError(f"{name}_labels must be class indices >= 0, got {int(labels.min())}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_features.shape[1]} and "
                         f"{test_features.shape[1]}")


def knn_evaluate(backbone, train_images, test_images, crop_size: int = 224, ks=(10, 20, 100, 200),
                 temperature: float = 0.07, mean=None, std=None, batch_size: int = 256, device="cpu",
                 num_workers: int = 0, progress: bool = True, cache_dir=None, cache_tag: str | None = None,
                 env=None) -> KnnScores | None:
    """Extract features of two labelled ``ImageList``s (or folders' paths) with ``backbone`` and run
    ``knn_classify``.

    With ``cache_dir`` and ``cache_tag`` (a fingerprint of the weights) the features are cached
    per image set, so evaluating the same weights on the same data again reads them back. Test
    classes must all occur in the training data (``DataError`` otherwise); their labels are
    mapped onto the training classes. The neighbour search runs on ``device``.

    Under a launcher pass ``env`` (the ``DistEnv``) on every process: the features are extracted
    in shares and process 0 scores them; the other processes return ``None``.
    """
    train_images, test_images = image_list(train_images), image_list(test_images)
    check_label_sets(train_images, test_images, "k-NN evaluation")
    common = dict(cache_dir=cache_dir, cache_tag=cache_tag, kind="cls", crop_size=crop_size, mean=mean, std=std,
                  batch_size=batch_size, device=device, num_workers=num_workers, progress=progress, env=env)
    train = cached_features(backbone, train_images, desc="k-NN train features", **common)
    test = cached_features(backbone, test_images, desc="k-NN test features", **common)
    if train is None or test is None:  # not process 0
        return None
    test = relabel(test, test_images, train_images.classes)
    device = torch.device(device)  # the similarities run where the backbone ran (a GPU if there is one)
    return knn_classify(train.features.to(device), train.labels, test.features.to(device), test.labels, ks=ks,
                        temperature=temperature, num_classes=len(train_images.classes))
