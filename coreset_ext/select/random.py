"""`random`: a uniformly random subset (the baseline every evaluation shows)."""

from __future__ import annotations

import torch

from coreset_ext.select.registry import register_method


@register_method("random")
def random_subset(budget: int, *, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:budget]
