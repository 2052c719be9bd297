"""`sas`: subsets whose augmentations are most alike (Joshi & Mirzasoleiman 2023; METHODS.md, method 2).

Inputs: proxy embeddings [N, D] (`coreset_ext.train.embed.proxy_embeddings`, a run's frozen
features, or a user's file via `load_embeddings`). Latent classes: k-means on the embeddings
(`classes="kmeans"`, cosine metric, `n_clusters` K, default 10), or the labels
(`classes="labels"`, every label must be known, i.e. >= 0). Then `pruning.sas_indices`: per class
V_k, keep the examples with the largest r_i = sum_{j in V_k} max(cos(e_i, e_j), clamp_min)
(`objective="rowsum"`, default) or the greedy facility-location maximiser
(`objective="facility_location"`).

Budgets: the selection's budget n (from `select`'s fraction or budget) is split over classes by
`pruning.class_budgets(sizes, n / N)`: floor of each class's share, the remainder by largest
fractional part, so the total is exactly n. A class whose share is below one example may get none
(when n < K some classes must); the selection is never empty nor larger than n.

Example:
    >>> import torch, coreset_ext as cx
    >>> e = torch.randn(60, 8)
    >>> sel = cx.select("sas", fraction=0.5, embeddings=e, labels=torch.arange(60) % 3, classes="labels")
    >>> len(sel)
    30
"""

from __future__ import annotations

import torch

from coreset_ext._validation import Interval, Options, check, check_finite, check_tensor
from coreset_ext.cluster import KMeans
from coreset_ext.ops.similarity import EMBEDDING_DTYPES
from coreset_ext.select import pruning
from coreset_ext.select.registry import register_method, require, require_labels

CLASSES = Options("kmeans", "labels")


def latent_classes(embeddings: torch.Tensor, n_clusters: int, *, seed: int = 0) -> torch.Tensor:
    """k-means (cosine metric) cluster labels [N] int64 on the CPU: SAS's approximate latent classes."""
    check("n_clusters", n_clusters, Interval(int, 1, embeddings.shape[0]))  # at most the data set size
    km = KMeans(n_clusters, metric="cosine", seed=seed).fit(embeddings.float())
    return torch.as_tensor(km.labels_).long().cpu()


@register_method("sas", supervised=lambda options: options.get("classes") == "labels")
def sas(budget: int, *, n: int, embeddings=None, labels=None, seed: int = 0, classes: str = "kmeans",
        n_clusters: int = 10, objective: str = "rowsum", clamp_min: float = 0.0) -> tuple[torch.Tensor, None]:
    e = require("embeddings", embeddings, "sas")
    check_tensor("embeddings", e, dim=2, dtypes=EMBEDDING_DTYPES)
    check_finite("embeddings", e)
    check("classes", classes, CLASSES)
    if classes == "labels":
        groups = require_labels(labels, n, "sas with classes='labels'",
                                "use classes='kmeans' for a partly labelled pool").long().to(e.device)
    else:
        groups = latent_classes(e, n_clusters, seed=seed).to(e.device)
    # budget / n reproduces the budget exactly: budget_size(budget / n, n) = floor(budget + 1/2).
    idx = pruning.sas_indices(e, groups, budget / n, clamp_min=clamp_min, objective=objective)
    return idx.cpu(), None
