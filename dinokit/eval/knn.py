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
                 test_labels: torch.Tensor, ks: tuple[int, ...] | list[int] = (10, 20, 100, 200),
                 temperature: float = 0.07, num_classes: int | None = None) -> dict[int, dict[str, float]]:
    """Top-1 and top-5 accuracy (percent) of weighted k-NN for every ``k`` in ``ks``.

    ``train_features`` ``M x D``, ``test_features`` ``Q x D`` (normalised here), labels are
    class indices. ``k`` larger than ``M`` uses the whole memory. Ties in the vote go to the
    lower class index. Returns ``{k: {"top1": ..., "top5": ...}}``.
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one memory and one query feature")
    memory = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.long().to(memory.device)
    test_labels = test_labels.long().to(memory.device)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    sims, idx = top_k_neighbours(queries, memory, max(ks))
    results = {}
    for k in ks:
        kk = min(k, sims.shape[1])
        weights = (sims[:, :kk] / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, device=memory.device)
        votes.scatter_add_(1, train_labels[idx[:, :kk]], weights)
        ranked = _rank_classes(votes)
        correct = ranked == test_labels[:, None]
        results[k] = {
            "top1": 100.0 * correct[:, 0].float().mean().item(),
            "top5": 100.0 * correct[:, :5].any(dim=1).float().mean().item(),
        }
    return results


def _rank_classes(votes: torch.Tensor) -> torch.Tensor:
    """Classes by decreasing vote; equal votes rank the lower class index first (stable sort)."""
    return torch.sort(votes, dim=1, descending=True, stable=True).indices


def knn_evaluate(backbone, train_images, test_images, crop_size: int = 224, ks=(10, 20, 100, 200),
                 temperature: float = 0.07, mean=None, std=None, batch_size: int = 256, device="cpu",
                 num_workers: int = 0, progress: bool = True, cache_dir=None, cache_tag: str | None = None
                 ) -> dict[int, dict[str, float]]:
    """Extract features of two labelled ``ImageList``s with ``backbone`` and run ``knn_classify``.

    With ``cache_dir`` and ``cache_tag`` (a fingerprint of the weights) the features are cached
    per image set, so evaluating the same weights on the same data again reads them back.
    """
    from pathlib import Path

    from dinokit.eval.features import extract_features, fingerprint

    train_images.require_labels("k-NN evaluation")
    test_images.require_labels("k-NN evaluation")
    if train_images.classes != test_images.classes:
        missing = sorted(set(test_images.classes) - set(train_images.classes))
        if missing:
            raise ValueError(f"test classes {missing} do not occur in the training data")
    common = dict(crop_size=crop_size, mean=mean, std=std, batch_size=batch_size, device=device,
                  num_workers=num_workers, progress=progress)
    feats = {}
    for name, images in (("train", train_images), ("test", test_images)):
        cache = None
        if cache_dir is not None and cache_tag is not None:
            key = fingerprint(cache_tag, crop_size, mean, std, [str(p) for p in images.paths])
            cache = Path(cache_dir) / f"features-{name}-{key}.pt"
        feats[name] = extract_features(backbone, images, cache=cache, desc=f"k-NN {name} features", **common)
    test_labels = feats["test"].labels
    if train_images.classes != test_images.classes:  # map test class indices onto the training ones
        index = {c: i for i, c in enumerate(train_images.classes)}
        test_labels = torch.tensor([index[test_images.classes[i]] for i in test_labels.tolist()])
    return knn_classify(feats["train"].features, feats["train"].labels, feats["test"].features, test_labels,
                        ks=ks, temperature=temperature, num_classes=len(train_images.classes))
