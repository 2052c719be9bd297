"""`typiclust`: typical examples of k-means clusters (Hacohen, Dekel & Weinshall, "Active Learning on
a Budget", ICML 2022; the baseline METHODS.md lists for active learning at small budgets).

As the authors' code (avihu111/TypiClust, `pycls/al/typiclust.py`) does it:
1. k-means on the (L2-normalised, `normalize=True`) embeddings with K = min(|already_selected| +
   budget, `max_clusters`) clusters (`n_clusters` overrides K);
2. clusters of more than `min_cluster_size` members are ordered by how many already selected
   examples they hold (fewest first), then by size (largest first); ties by cluster id (the
   authors' pandas sort leaves them unordered);
3. the i-th pick comes from the (i mod #clusters)-th cluster of that order: the member of highest
   typicality among the cluster's members not yet selected, typicality = 1 / (mean squared
   Euclidean distance to its k nearest such members + 1e-5), k = min(`k_neighbors`,
   members // 2) (squared, as faiss' IndexFlatL2 returns them in the authors' code).

Choices where the authors' code fails or is silent: k is at least 1 (their k = 0 for a cluster of
one or two members raises), a cluster's lone member is its own pick, a cluster with no member left
is skipped (the next in the order serves); if no cluster is larger than `min_cluster_size` (tiny
pools) every cluster takes part.

`already_selected` (e.g. the labelled set in active learning): those examples count in step 2 and
are never picked. k-nearest-neighbour distances go through `ops.cosine_topk` on unit rows
(squared distance 2 - 2 cos), never an m x m matrix.

Example:
    >>> import torch, coreset_ext as cx
    >>> x = torch.cat([torch.randn(40, 4) + 6, torch.randn(25, 4) - 6])
    >>> sel = cx.select("typiclust", budget=2, embeddings=x, seed=0, n_clusters=2)
    >>> sorted(int(i) // 40 for i in sel.indices)  # one typical member of each blob
    [0, 1]
"""

from __future__ import annotations

import torch

from coreset_ext import ops, reference
from coreset_ext._validation import NONNEGATIVE_INT, POSITIVE_INT, Interval, check, check_finite
from coreset_ext.cluster import KMeans
from coreset_ext.select.registry import register_method, require

MAX_CLUSTERS = 500  # the authors' MAX_NUM_CLUSTERS
_EPS = 1e-5  # the authors' density offset


def typicality(x: torch.Tensor, k: int, *, normalized: bool) -> torch.Tensor:
    """1 / (mean squared Euclidean distance of each row of x to its k nearest other rows + 1e-5):
    float32 [m]. `normalized` rows (unit length) take the fused top-k cosine op, d^2 = 2 - 2 cos;
    others a chunked distance top-k. A single row gets 1 / 1e-5."""
    m = x.shape[0]
    k = min(k, m - 1)
    if k < 1:
        return torch.full((m,), 1 / _EPS)
    if normalized:
        cos, _ = ops.cosine_topk(x.float(), k)
        mean_sq = (2 - 2 * cos.double()).clamp_min(0).mean(1)
    else:
        mean_sq = torch.cat([torch.cdist(x[s:s + 1024].double(), x.double()).pow(2)
                             .topk(k + 1, dim=1, largest=False).values[:, 1:].mean(1)  # [:, 0]: the row itself
                             for s in range(0, m, 1024)])
    return (1 / (mean_sq + _EPS)).float()


def cluster_order(labels: torch.Tensor, selected: torch.Tensor, n_clusters: int, min_size: int,
                  free: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster ids by (already selected members ascending, size descending, id ascending), leaving
    out clusters of `min_size` members or fewer unless that would leave none, and, with `free`
    (a mask of the examples still available), clusters with no free member."""
    sizes = torch.bincount(labels, minlength=n_clusters)
    taken = torch.bincount(labels[selected], minlength=n_clusters)
    ids = torch.arange(n_clusters)
    if free is not None:
        ids = ids[torch.bincount(labels[free], minlength=n_clusters) > 0]
    keep = ids[sizes[ids] > min_size]
    if keep.numel() == 0:
        keep = ids[sizes[ids] > 0]
    key = taken[keep] * (labels.numel() + 1) - sizes[keep]  # lexicographic: taken, then -size
    return keep[torch.sort(key, stable=True).indices]


@register_method("typiclust")
def typiclust(budget: int, *, n: int, embeddings=None, seed: int = 0, already_selected=None,
              n_clusters: int | None = None, max_clusters: int = MAX_CLUSTERS, k_neighbors: int = 20,
              min_cluster_size: int = 5, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    x = require("embeddings", embeddings, "typiclust").float()
    check_finite("embeddings", x, float32_squares=True)  # rows past 1e17 overflow their float32 norms
    check("max_clusters", max_clusters, POSITIVE_INT)
    check("k_neighbors", k_neighbors, POSITIVE_INT)
    check("min_cluster_size", min_cluster_size, NONNEGATIVE_INT)
    check("normalize", normalize, bool)
    done = torch.zeros(0, dtype=torch.long) if already_selected is None else already_selected.cpu()
    if n_clusters is None:
        n_clusters = min(done.numel() + budget, max_clusters, n)
    check("n_clusters", n_clusters, Interval(int, 1, n))
    if normalize:
        x = reference.normalize(x)
    labels = torch.as_tensor(KMeans(n_clusters, seed=seed).fit(x).labels_).long().cpu()
    order = cluster_order(labels, done, n_clusters, min_cluster_size)
    free = torch.ones(n, dtype=torch.bool)
    free[done] = False
    score = torch.zeros(n)  # the typicality each pick had when it was made (0: never picked)
    picks: list[int] = []
    i = misses = 0
    while len(picks) < budget:
        if misses == order.numel():  # every cluster of the order is used up: the rest, same rule
            order, i, misses = cluster_order(labels, done, n_clusters, -1, free), 0, 0
        members = torch.nonzero((labels == order[i % order.numel()]) & free).flatten()
        i += 1
        if members.numel() == 0:
            misses += 1
            continue
        misses = 0
        t = typicality(x[members], max(1, min(k_neighbors, members.numel() // 2)), normalized=normalize)
        best = int(torch.argmax(t))
        pick = int(members[best])
        picks.append(pick)
        score[pick] = t[best]
        free[pick] = False
    return torch.tensor(picks, dtype=torch.long), score
