"""`css`: the examples with the lowest contrastive similarity score (METHODS.md, method 1).

Scores are each example's mean positive-pair cosine over training (`ScoreTracker.mean()["css"]`);
low means the model found its two views hard to pull together. `order="highest"` keeps the easiest
instead (an ablation). Ties are broken by index (a stable sort), so the result is deterministic.
"""

from __future__ import annotations

import torch

from coreset_ext._validation import Options, check
from coreset_ext.select.registry import register_method, require


@register_method("css")
def css(budget: int, *, n: int, scores=None, order: str = "lowest") -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(require("scores", scores, "css"))
    s = s if s.dtype == torch.float64 else s.float()  # float64 scores sort as they are, not rounded
    check("order", order, Options("lowest", "highest"))
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        raise ValueError(f"scores: {int(bad.sum())} of {n} examples have no finite score (never seen in training?)")
    idx = torch.sort(s, descending=(order == "highest"), stable=True).indices[:budget]
    return idx, s
