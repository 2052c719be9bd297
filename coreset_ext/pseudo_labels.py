"""Pseudo-labels for ELFS (METHODS.md, method 3, step 2): k-means, or a small deep-clustering head.

- `kmeans_pseudo_labels`: k-means with the cosine metric on the embeddings (default).
- `deep_cluster_pseudo_labels`: a TEMI-like clustering head (Adaloglou et al. 2023), kept small:
  H linear heads (default 10; the paper uses 50) on the L2-normalised, frozen embeddings map each
  example to a distribution q over K clusters. Each step samples anchors i and, for each, one of
  its k nearest neighbours j (`ops.cosine_topk`, streamed, never N x N), and minimises per head
  the negative beta-weighted pointwise mutual information

      L = -log sum_c (q(c|x_i) q(c|x_j))^beta / pi_c,     beta = 0.6 as in the paper,

  where pi is an exponential moving average of the mean cluster probability (detached): the
  numerator pulls neighbours into the same cluster, dividing by pi keeps clusters from
  collapsing into one. Unlike TEMI there is no teacher network (the neighbour pairs are fixed,
  from frozen embeddings). After training, every head's loss over all (i, neighbour) pairs is
  measured with pi = the head's mean cluster probability over the pool; the lowest-loss head's
  argmax is the label.

Both are deterministic for a seed and return labels renumbered 0 .. C-1 (C <= K: clusters that
end up empty are dropped).

Example:
    >>> import torch
    >>> x = torch.cat([torch.randn(40, 4) + 5, torch.randn(40, 4) - 5])
    >>> y = deep_cluster_pseudo_labels(x, 2, seed=0, steps=100)
    >>> sorted(torch.bincount(y).tolist())
    [40, 40]
"""

from __future__ import annotations

import inspect
import math

import torch

from coreset_ext import ops, reference
from coreset_ext._validation import Interval, Options, check, check_finite, check_tensor, positive_int
from coreset_ext.cluster import KMeans
from coreset_ext.ops.similarity import EMBEDDING_DTYPES

__all__ = ["kmeans_pseudo_labels", "deep_cluster_pseudo_labels", "pseudo_labels"]

METHODS = Options("kmeans", "deep_cluster")


def _check(embeddings, n_clusters) -> torch.Tensor:
    check_tensor("embeddings", embeddings, dim=2, dtypes=EMBEDDING_DTYPES, what="[N, D]")
    # pseudo-labels need two classes, and no more than there are examples
    check("n_clusters", n_clusters, Interval(int, 2, embeddings.shape[0]))
    check_finite("embeddings", embeddings)
    return embeddings.float()


def _dense(labels: torch.Tensor) -> torch.Tensor:
    return torch.unique(labels.cpu(), return_inverse=True)[1].long()


def kmeans_pseudo_labels(embeddings: torch.Tensor, n_clusters: int, *, seed: int = 0) -> torch.Tensor:
    """k-means (cosine metric) cluster labels [N] int64 on the CPU, renumbered densely."""
    x = _check(embeddings, n_clusters)
    return _dense(torch.as_tensor(KMeans(n_clusters, metric="cosine", seed=seed).fit(x).labels_))


def _pmi_loss(logp_i: torch.Tensor, logp_j: torch.Tensor, log_prior: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair -log sum_c exp(beta (log q_ic + log q_jc) - log pi_c), in log space (stable at q -> 0)."""
    return -torch.logsumexp(beta * (logp_i + logp_j) - log_prior, dim=-1)


def deep_cluster_pseudo_labels(
    embeddings: torch.Tensor, n_clusters: int, *, heads: int = 10, knn: int = 10, beta: float = 0.6,
    steps: int = 300, batch_size: int = 256, lr: float = 1e-2, prior_momentum: float = 0.5, seed: int = 0,
) -> torch.Tensor:
    """Labels [N] int64 (CPU) from the lowest-loss of `heads` TEMI-like clustering heads (module docstring)."""
    x = reference.normalize(_check(embeddings, n_clusters))
    n, d = x.shape
    heads, steps, batch_size = (positive_int(name, v) for name, v in
                                (("heads", heads), ("steps", steps), ("batch_size", batch_size)))
    knn = check("knn", knn, Interval(int, 1, n - 1))
    beta = check("beta", beta, Interval(float, 0, 1, closed="right"))
    lr = check("lr", lr, Interval(float, 0, math.inf, closed="neither"))
    prior_momentum = check("prior_momentum", prior_momentum, Interval(float, 0, 1))
    _, nbr = ops.cosine_topk(x, knn)  # [N, knn], self excluded
    x, nbr = x.cpu(), nbr.cpu()
    g = torch.Generator().manual_seed(seed)
    # Logits = x . w / 0.1 with unit-scale w: a temperature of 0.1 on cosine-like logits, as usual
    # for clustering heads, so that the heads can become confident.
    w = (torch.randn(heads, d, n_clusters, generator=g) / d ** 0.5).requires_grad_(True)
    b = torch.zeros(heads, 1, n_clusters, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    ema_prior = torch.full((heads, 1, n_clusters), 1.0 / n_clusters)

    def logp(rows: torch.Tensor) -> torch.Tensor:  # [H, B, K]
        return torch.log_softmax(torch.einsum("bd,hdk->hbk", rows, w) / 0.1 + b, dim=-1)

    for _ in range(steps):
        i = torch.randint(0, n, (min(batch_size, n),), generator=g)
        j = nbr[i, torch.randint(0, knn, (i.numel(),), generator=g)]
        lp_i, lp_j = logp(x[i]), logp(x[j])
        # pi: the moving average of past batches plus this batch's mean (with its gradient, so that
        # piling every example into one cluster raises pi there and is penalised at once).
        batch_prior = torch.cat([lp_i, lp_j], dim=1).exp().mean(dim=1, keepdim=True)
        prior = prior_momentum * ema_prior + (1 - prior_momentum) * batch_prior
        loss = _pmi_loss(lp_i, lp_j, prior.clamp_min(1e-12).log(), beta).mean(dim=1)  # [H]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # heads are independent: the sum trains each on its own loss
        opt.step()
        ema_prior = prior.detach()
    with torch.no_grad():
        head_loss, labels = _score_heads(x, nbr, logp, beta)
        return _dense(labels[int(torch.argmin(head_loss))])


def _score_heads(x: torch.Tensor, nbr: torch.Tensor, logp, beta: float, rows: int = 4096):
    """(loss [H] over all (i, neighbour) pairs with pi = each head's mean cluster probability over
    the pool, argmax labels [H, N]) for the heads of `logp` (rows [B, D] -> log q [H, B, K]).

    Two passes over row chunks, never [H, N, K]: the first sums the cluster probabilities (pi),
    the second the pair losses; the second recomputes each chunk's neighbours' log q (no N x K
    store to gather them from): knn + 2 forward passes in all.
    """
    n, knn = nbr.shape
    prior = 0.0
    for s in range(0, n, rows):
        prior = prior + logp(x[s : s + rows]).exp().sum(dim=1, keepdim=True, dtype=torch.float64)
    log_prior = (prior / n).to(x.dtype).clamp_min(1e-12).log()[:, :, None]  # [H, 1, 1, K]
    total, labels = 0.0, []
    step = max(1, rows // knn)  # [H, step * knn, K] neighbour block ~ [H, rows, K]
    for s in range(0, n, step):
        lp_i = logp(x[s : s + step])  # [H, B, K]
        nb = nbr[s : s + step]  # [B, knn]
        lp_j = logp(x[nb.reshape(-1)]).unflatten(1, tuple(nb.shape))  # [H, B, knn, K]
        total = total + _pmi_loss(lp_i[:, :, None], lp_j, log_prior, beta).sum(dim=(1, 2), dtype=torch.float64)
        labels.append(lp_i.argmax(dim=2))
    return (total / (n * knn)).to(x.dtype), torch.cat(labels, dim=1)


def pseudo_labels(embeddings: torch.Tensor, n_clusters: int, *, method: str = "kmeans", seed: int = 0,
                  **options) -> torch.Tensor:
    """`kmeans_pseudo_labels` (method="kmeans") or `deep_cluster_pseudo_labels` (method="deep_cluster")."""
    check("pseudo_labels", method, METHODS)  # named as ELFS's option, through which users choose it
    if method == "kmeans":
        if options:
            raise ValueError(f"pseudo-label options {sorted(options)} apply only to method='deep_cluster'")
        return kmeans_pseudo_labels(embeddings, n_clusters, seed=seed)
    known = set(inspect.signature(deep_cluster_pseudo_labels).parameters) - {"embeddings", "n_clusters", "seed"}
    if set(options) - known:
        raise ValueError(f"deep_cluster options {sorted(set(options) - known)} are unknown; known: {sorted(known)}")
    return deep_cluster_pseudo_labels(embeddings, n_clusters, seed=seed, **options)
