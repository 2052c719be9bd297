"""`kcenter`: greedy k-center (Sener & Savarese's core-set): each pick is the example farthest from
all picks so far, so the subset covers the embedding space.

O(budget * N * D) work and O(N) memory: one distance vector, updated against each new centre in
row chunks; runs wherever the embeddings are (a GPU when given CUDA tensors). The first centre is
drawn at random from `seed`.
"""

from __future__ import annotations

import torch

from coreset_ext import reference
from coreset_ext._validation import POSITIVE_INT, check, check_finite
from coreset_ext.select.registry import register_method, require


@register_method("kcenter")
def kcenter(budget: int, *, n: int, embeddings=None, seed: int = 0, normalize: bool = True,
            chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    x = require("embeddings", embeddings, "kcenter").float()
    chunk_size = check("chunk_size", chunk_size, POSITIVE_INT)
    check_finite("embeddings", x)  # NaN distances would make argmax pick centres twice
    if normalize:
        x = reference.normalize(x)
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(0, n, (1,), generator=g))
    mind = torch.full((n,), float("inf"), device=x.device)
    chosen = torch.empty(budget, dtype=torch.long, device=x.device)
    c = torch.tensor(first, device=x.device)
    for t in range(budget):
        chosen[t] = c
        center = x[c]
        for s in range(0, n, chunk_size):
            d = (x[s : s + chunk_size] - center).pow(2).sum(1)
            torch.minimum(mind[s : s + chunk_size], d, out=mind[s : s + chunk_size])
        mind[c] = -1.0  # never pick a centre twice (distance 0 could tie with duplicates)
        c = torch.argmax(mind)
    mind = mind.clamp_min(0)
    return chosen.cpu(), mind.cpu()
