"""`kcenter`: greedy k-center (Sener & Savarese's core-set): each pick is the example farthest from
all picks so far, so the subset covers the embedding space.

O(budget * N * D) work and O(N) memory: one distance vector, updated against each new centre in
row chunks; runs wherever the embeddings are (a GPU when given CUDA tensors). The first centre is
drawn at random from `seed`; with `already_selected` (an active learner's labelled set) those
examples are the centres already placed, and every pick is the example farthest from them and
from the picks so far.
"""

from __future__ import annotations

import torch

from coreset_ext import reference
from coreset_ext._validation import POSITIVE_INT, check, check_finite
from coreset_ext.select.registry import register_method, require


@register_method("kcenter")
def kcenter(budget: int, *, n: int, embeddings=None, seed: int = 0, already_selected=None, normalize: bool = True,
            chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    x = require("embeddings", embeddings, "kcenter").float()
    chunk_size = check("chunk_size", chunk_size, POSITIVE_INT)
    # NaN distances would make argmax pick centres twice; rows past 1e17 overflow their float32 norms
    check_finite("embeddings", x, float32_squares=True)
    if normalize:
        x = reference.normalize(x)
    mind = torch.full((n,), float("inf"), device=x.device)
    placed = [] if already_selected is None else already_selected.tolist()
    for c in placed:
        _add_center(x, c, mind, chunk_size)
    if placed:
        c = torch.argmax(mind)
    else:
        g = torch.Generator().manual_seed(seed)
        c = torch.tensor(int(torch.randint(0, n, (1,), generator=g)), device=x.device)
    chosen = torch.empty(budget, dtype=torch.long, device=x.device)
    for t in range(budget):
        chosen[t] = c
        _add_center(x, c, mind, chunk_size)
        c = torch.argmax(mind)
    mind = mind.clamp_min(0)
    return chosen.cpu(), mind.cpu()


def _add_center(x: torch.Tensor, c, mind: torch.Tensor, chunk_size: int) -> None:
    """Lowers `mind` (each example's squared distance to its nearest centre) with centre x[c]."""
    center = x[c]
    n = x.shape[0]
    for s in range(0, n, chunk_size):
        d = (x[s : s + chunk_size] - center).pow(2).sum(1)
        torch.minimum(mind[s : s + chunk_size], d, out=mind[s : s + chunk_size])
    mind[c] = -1.0  # never pick a centre twice (distance 0 could tie with duplicates)
