"""`random`: a uniformly random subset (the baseline every evaluation shows); with
`already_selected`, uniformly random among the examples not already selected."""

from __future__ import annotations

import torch

from coreset_ext.select.registry import register_method


@register_method("random")
def random_subset(budget: int, *, n: int, seed: int = 0, already_selected=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    if already_selected is not None:
        perm = perm[~torch.isin(perm, already_selected)]
    return perm[:budget]
