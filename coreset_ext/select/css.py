"""`css`: the examples with the lowest contrastive similarity score (METHODS.md, method 1).

Scores are each example's mean positive-pair cosine over training (`ScoreTracker.mean()["css"]`);
low means the model found its two views hard to pull together (hard = low). The sampling step
is `pruning.sample_by_score`: `sampling="lowest"` (default, the paper's: the n lowest scores),
"highest" (the easiest, an ablation), "double_end" (drop the hardest floor(beta N) first),
"ccs" (`strata` equal-width score strata, seeded by `seed`) or "auto" (by budget fraction,
`pruning.AUTO_RULE`). `order="lowest" | "highest"` is the older name of the first two and stays
an alias (giving both with different meanings is an error). The Selection records the sampling
used (`options["sampling"]`, "auto" resolved). Indices come in the order picked (lowest score
first for "lowest" and the hardness samplings, highest first for "highest"); ties are broken by
index (stable sorts), so the result is deterministic.
"""

from __future__ import annotations

import torch

from coreset_ext.select import pruning
from coreset_ext.select.registry import register_method, require

ORDER_MEANS = {"lowest": "lowest", "highest": "highest"}


@register_method("css")
def css(budget: int, *, n: int, scores=None, order: str | None = None, sampling: str | None = None,
        beta: float = 0.0, strata: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    s = torch.as_tensor(require("scores", scores, "css"))
    s = s if s.dtype == torch.float64 else s.float()  # float64 scores sort as they are, not rounded
    asked = pruning.sampling_option(sampling, "lowest", "order", order, ORDER_MEANS)
    pruning.check_sampling(asked, beta=beta, strata=strata)
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        raise ValueError(f"scores: {int(bad.sum())} of {n} examples have no finite score (never seen in training?)")
    used = pruning.resolve_sampling(asked, budget, n)
    idx = pruning.sample_by_score(s, budget, used, hard="low", beta=beta, strata=strata, seed=seed, ranked=True)
    return idx, s, {"sampling": used}
