"""`balanced_random`: random examples spread evenly over classes (labels) or k-means clusters (embeddings).

Each group gets an equal share of the budget (`allocation="equal"`, the default; groups too small
to fill their share pass the rest on to the others) or a share proportional to its size
(`allocation="proportional"`, largest remainders); the members are drawn at random within groups.
"""

from __future__ import annotations

import torch

from coreset_ext._validation import Options, check
from coreset_ext.cluster import KMeans
from coreset_ext.select.registry import register_method, require_labels


def _allocate(sizes: torch.Tensor, budget: int, allocation: str) -> torch.Tensor:
    if allocation == "proportional":
        exact = sizes.double() * budget / sizes.sum()
        take = exact.floor().long()
        rest = budget - int(take.sum())
        order = torch.sort(exact - take, descending=True, stable=True).indices
        take[order[:rest]] += 1
        return take
    # Water-filling: the highest level L with sum(min(size, L)) <= budget; then one more each for
    # the groups still open (larger than L), lowest index first, until the budget is spent. Every
    # group that can gets L or L + 1.
    lo, hi = 0, int(sizes.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(sizes.clamp(max=mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    take = sizes.clamp(max=lo)
    open_ = (sizes > lo).nonzero().flatten()
    take[open_[: budget - int(take.sum())]] += 1
    return take


# by="class" needs the labels; by=None (the default) reads them only if the caller passes them
@register_method("balanced_random", supervised=lambda options: options.get("by") == "class")
def balanced_random(budget: int, *, n: int, labels=None, embeddings=None, seed: int = 0, by: str | None = None,
                    n_clusters: int = 10, allocation: str = "equal") -> torch.Tensor:
    check("allocation", allocation, Options("equal", "proportional"))
    by = check("by", by or ("class" if labels is not None else "cluster"), Options("class", "cluster"))
    if by == "class":
        groups = require_labels(labels, n, "balanced_random by='class'").long().cpu()
    else:
        if embeddings is None:
            raise ValueError("embeddings: balanced_random by='cluster' needs embeddings, got None")
        groups = torch.as_tensor(KMeans(n_clusters, seed=seed).fit(embeddings.float()).labels_).long().cpu()
    uniq, inv = torch.unique(groups, return_inverse=True)
    sizes = torch.bincount(inv, minlength=uniq.numel())
    take = _allocate(sizes, budget, allocation)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(uniq.numel()):
        members = (inv == c).nonzero().flatten()
        chosen.append(members[torch.randperm(members.numel(), generator=g)[: int(take[c])]])
    return torch.cat(chosen)
