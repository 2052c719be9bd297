"""Pure selection algorithms behind the SAS, ELFS, CCS and score-based selectors: index in, index out.

Nothing here trains or knows the `Selection` type; the selectors wrap these. Every function
returns int64 example indices sorted ascending (`sample_by_score(..., ranked=True)`: in the order
picked), never an empty or oversized selection.

Budget rule, shared by all: a fraction f of N examples is the budget n = floor(f * N + 1/2)
(round half up), at least 1 (so a tiny fraction still selects one example) and at most N.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch

from coreset_ext import ops, reference
from coreset_ext._validation import (FRACTION, POSITIVE_INT, Interval, Options, check, check_finite,
                                     check_per_row, check_tensor, is_int)
from coreset_ext.ops.similarity import EMBEDDING_DTYPES, GROUP_DTYPES

__all__ = ["budget_size", "class_budgets", "sas_indices", "facility_location_greedy", "hard_cut",
           "double_end_indices", "ccs_indices", "sample_by_score", "auto_sampling", "resolve_sampling",
           "sampling_option", "check_sampling"]

# Added before flooring products such as 0.29 * 100 = 28.999999999999996, so that exact
# multiples are not lost to binary rounding.
_FLOOR_SLACK = 1e-9

BETA = Interval(float, 0, 1, closed="left")  # the share of the hardest examples dropped: [0, 1)
SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OBJECTIVES = Options("rowsum", "facility_location")


def budget_size(fraction: float, total: int) -> int:
    """n = floor(fraction * total + 1/2), clamped to [1, total] (`total` >= 1).

    Example:
        >>> budget_size(0.3, 10), budget_size(0.001, 10), budget_size(0.25, 10)
        (3, 1, 3)
    """
    fraction = check("fraction", fraction, FRACTION)
    total = check("total", total, POSITIVE_INT)
    return min(total, max(1, math.floor(fraction * total + 0.5 + _FLOOR_SLACK)))


def class_budgets(sizes: Sequence[int] | torch.Tensor, fraction: float) -> torch.Tensor:
    """Per-class budgets [K] int64 that add up to exactly n = `budget_size(fraction, sum(sizes))`.

    Class k first gets floor(fraction * |V_k|); the remainder n - sum of those goes one example
    at a time to the classes with the largest fractional parts fraction * |V_k| - floor(...)
    (ties: the lower class index), never above |V_k|. Empty classes get 0. A class whose share is
    below one example may get none; when fraction * N < 1 the whole budget is the one example
    given to the class with the largest share.

    Example:
        >>> class_budgets([10, 5, 3], 0.5).tolist()
        [5, 3, 1]
    """
    fraction = check("fraction", fraction, FRACTION)
    sizes = torch.as_tensor(sizes)
    if sizes.dim() != 1 or sizes.dtype.is_floating_point or sizes.dtype == torch.bool:
        raise ValueError(f"sizes must be a 1-D sequence of ints, got {sizes.dtype} of shape {tuple(sizes.shape)}")
    sizes = sizes.long().cpu()
    if bool((sizes < 0).any()):
        raise ValueError("sizes must be non-negative")
    total = int(sizes.sum())
    if total == 0:
        raise ValueError("sizes add up to 0: there is nothing to select from")
    n = budget_size(fraction, total)
    exact = sizes.double() * fraction
    base = torch.floor(exact + _FLOOR_SLACK).long().clamp(max=sizes)
    frac = torch.where(base < sizes, exact - base.double(), torch.full_like(exact, -1.0))
    # 0 <= remainder <= the number of classes with a positive fractional part: sum of floors
    # <= f*N + K*slack < n + 1/2 + K*slack, and n - sum of floors rounds the sum of the parts.
    remainder = n - int(base.sum())
    # Largest fractional part first, lower class index on ties (stable sort).
    order = torch.sort(frac, descending=True, stable=True).indices
    order = order[base[order] < sizes[order]][:remainder]
    base[order] += 1
    assert int(base.sum()) == n and bool((base <= sizes).all())
    return base


def _dense_groups(groups: torch.Tensor | None, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels renumbered 0..K-1 (K = the number of distinct labels) and the class sizes."""
    if groups is None:
        return torch.zeros(n, dtype=torch.int64, device=device), torch.tensor([n])
    uniq, dense = torch.unique(groups, return_inverse=True)
    return dense, torch.bincount(dense, minlength=uniq.numel()).cpu()


def _check_sas_inputs(embeddings, groups) -> None:
    check_tensor("embeddings", embeddings, dim=2, dtypes=EMBEDDING_DTYPES, what="[N, D]")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings has no rows: there is nothing to select from")
    if groups is not None:
        check_per_row("groups", groups, "embeddings", embeddings, dtypes=GROUP_DTYPES, entries="labels")


def _top_per_group(scores: torch.Tensor, groups: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Indices of the budgets[k] largest scores within each group k (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]  # by group, score desc within
    g = groups[order]
    starts = torch.searchsorted(g, g, right=False)  # first position of each row's group
    rank = torch.arange(g.numel(), device=g.device) - starts
    keep = rank < budgets.to(g.device)[g]
    return torch.sort(order[keep]).values


def sas_indices(
    embeddings: torch.Tensor, groups: torch.Tensor | None, fraction: float, *, clamp_min: float = 0.0,
    objective: str = "rowsum", backend: str | None = None,
) -> torch.Tensor:
    """SAS (Joshi & Mirzasoleiman, 2023): per latent class, the examples most similar to the rest.

    `groups` are the latent classes (k-means labels, or labels; None: one class). Budgets per
    class: `class_budgets(class sizes, fraction)`. Objectives:

    - "rowsum" (default): keep the examples with the largest r_i = sum over j in i's class of
      max(cos(e_i, e_j), clamp_min) (j = i included: it adds the same constant to every r_i);
      ties go to the lower index. One `ops.cosine_rowsum` call with groups.
    - "facility_location": per class, the greedy maximiser of F(S) = sum_j max_{i in S} s_ij with
      s_ij = max(cos, clamp_min) (`facility_location_greedy`, lazy, exact greedy). Needs
      clamp_min >= 0 so that F is monotone.

    Example:
        >>> import torch
        >>> e = torch.randn(100, 8)
        >>> sas_indices(e, torch.arange(100) % 4, 0.3).numel()
        30
    """
    _check_sas_inputs(embeddings, groups)
    check("objective", objective, OBJECTIVES)
    dense, sizes = _dense_groups(groups, embeddings.shape[0], embeddings.device)
    budgets = class_budgets(sizes, fraction)
    if objective == "rowsum":
        r = ops.cosine_rowsum(embeddings, clamp_min=clamp_min, groups=dense, backend=backend)
        return _top_per_group(r, dense, budgets)
    _check_facility_clamp(clamp_min)
    picked = []
    for k in range(sizes.numel()):
        if int(budgets[k]) == 0:
            continue
        members = (dense == k).nonzero()[:, 0]
        local = facility_location_greedy(embeddings[members], int(budgets[k]), clamp_min=clamp_min)
        picked.append(members[local])
    return torch.sort(torch.cat(picked)).values


def _check_facility_clamp(clamp_min) -> float:
    # F(S) = sum_j max_{i in S} s_ij is monotone (the greedy's guarantee) only for s_ij >= 0
    return check("clamp_min", clamp_min, Interval(float, 0, None))


def _facility_gains(
    xn: torch.Tensor, cand: torch.Tensor, cover: torch.Tensor, clamp_min: float, col_chunk: int,
) -> torch.Tensor:
    """gain_c = sum_j max(s_cj - cover_j, 0) for each candidate c, over column chunks."""
    gains = torch.zeros(cand.numel(), dtype=xn.dtype, device=xn.device)
    rows = xn[cand]
    for s in range(0, xn.shape[0], col_chunk):
        sim = (rows @ xn[s : s + col_chunk].T).clamp_min(clamp_min)  # [B, chunk]: one tile
        gains += (sim - cover[s : s + col_chunk]).clamp_min(0).sum(dim=1)
    return gains


def facility_location_greedy(
    embeddings: torch.Tensor, budget: int, *, clamp_min: float = 0.0, batch: int = 64, col_chunk: int = 16384,
) -> torch.Tensor:
    """Greedy maximisation of F(S) = sum_j max_{i in S} s_ij, s_ij = max(cos(e_i, e_j), clamp_min).

    Returns the chosen row indices in the order they were picked ([budget] int64). Each step
    picks the row with the largest marginal gain (the same picks as the naive greedy, which
    attains at least (1 - 1/e) of the optimum; ties go to the lowest index). Lazy evaluation on
    the device: stale gains are upper bounds (F is submodular), so a step only re-evaluates the
    `batch` stale rows with the largest bounds, in [batch, col_chunk] tiles, until the largest
    bound is an exact gain. Computed in float32 (float64 for float64 input).

    Example:
        >>> import torch
        >>> facility_location_greedy(torch.eye(3), 2).tolist()
        [0, 1]
    """
    clamp_min = _check_facility_clamp(clamp_min)
    n = embeddings.shape[0]
    budget = check("budget", budget, Interval(int, 1, n))
    acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    xn = reference.normalize(embeddings.to(acc))
    cover = torch.zeros(n, dtype=acc, device=xn.device)  # max_{i in S} s_ij per column j
    bound = torch.full((n,), float("inf"), dtype=acc, device=xn.device)  # gains or upper bounds
    fresh = torch.zeros(n, dtype=torch.bool, device=xn.device)  # bound is the exact gain now
    picks = []
    while len(picks) < budget:
        top = torch.argmax(bound)  # the first of the largest bounds: lowest index on ties
        if bool(fresh[top]):
            # An exact gain no other bound exceeds (bounds tied with it belong to higher
            # indices): the naive greedy's pick, with its lowest-index tie rule.
            picks.append(int(top))
            sim = torch.cat([(xn[top] @ xn[s : s + col_chunk].T).clamp_min(clamp_min)
                             for s in range(0, n, col_chunk)])
            torch.maximum(cover, sim, out=cover)
            bound[top] = float("-inf")
            fresh.zero_()
            continue
        # Refresh the top row and the next stale rows with the largest bounds, one tile.
        key = bound.masked_fill(fresh, float("-inf"))
        key[top] = float("-inf")
        others = torch.topk(key, min(batch - 1, n)).indices if batch > 1 else top.new_zeros(0)
        others = others[key[others] > float("-inf")]
        cand = torch.cat([top.view(1), others])
        bound[cand] = _facility_gains(xn, cand, cover, clamp_min, col_chunk)
        fresh[cand] = True
    return torch.tensor(picks, dtype=torch.int64, device=embeddings.device)


def _check_scores(name: str, scores) -> torch.Tensor:
    check_tensor(name, scores, dim=1, dtypes=SCORE_DTYPES)
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty: there is nothing to select from")
    check_finite(name, scores)  # e.g. examples the dynamics never saw
    return scores


def _check_secondary(secondary, n: int) -> torch.Tensor | None:
    """The tie-breaking scores, one per example, checked like the scores (None: no tie-break)."""
    if secondary is None:
        return None
    secondary = _check_scores("secondary", secondary)
    if secondary.numel() != n:
        raise ValueError(f"secondary must have one score per example ({n}), got {secondary.numel()}")
    return secondary


def hard_cut(beta: float, total: int) -> int:
    """How many of the hardest examples double-end pruning and CCS drop: floor(beta * total).

    Example:
        >>> hard_cut(0.1, 50), hard_cut(0.29, 100)
        (5, 29)
    """
    return math.floor(check("beta", beta, BETA) * total + _FLOOR_SLACK)


def _prune_split(scores, keep, beta, name: str = "keep") -> tuple[torch.Tensor, int, int]:
    """The checked scores, the count `keep` (an int count, or a float fraction of N as in
    `budget_size`; `name` in messages) and the number `hard_cut` drops, which must leave room
    for `keep`."""
    scores = _check_scores("scores", scores)
    n = scores.numel()
    keep = check(name, keep, Interval(int, 1, n), FRACTION)
    keep = keep if is_int(keep) else budget_size(keep, n)
    cut = hard_cut(beta, n)
    if cut + keep > n:
        raise ValueError(f"beta + {name} exceed the data: dropping floor(beta * N) = {cut} and keeping {keep} "
                         f"of N = {n}")
    return scores, keep, cut


def double_end_indices(scores: torch.Tensor, keep: int | float, beta: float,
                       secondary: torch.Tensor | None = None) -> torch.Tensor:
    """Double-end pruning (ELFS): sort ascending (hardest first; ties by smaller `secondary` when
    given, then lower index), drop the hardest floor(beta * N), keep the next `keep` (an int
    count, or a float fraction of N).

    Scores where larger means harder (forgetting, EL2N) should be negated first. A score with many
    ties (forgetting counts) needs `secondary`, or the ties go to the lowest indices wholesale.
    Raises ValueError when floor(beta * N) + keep > N.

    Example:
        >>> double_end_indices(torch.tensor([0.5, -1.0, 2.0, 0.1, 0.9]), 2, 0.2).tolist()
        [0, 3]
    """
    scores, keep, cut = _prune_split(scores, keep, beta)
    n = scores.numel()
    order = torch.arange(n)
    secondary = _check_secondary(secondary, n)
    if secondary is not None:
        order = torch.sort(secondary, stable=True).indices
    order = order[torch.sort(scores[order], stable=True).indices]
    return torch.sort(order[cut : cut + keep]).values


def ccs_indices(
    scores: torch.Tensor, keep: int | float, beta: float = 0.0, *, strata: int = 50, seed: int = 0,
) -> torch.Tensor:
    """Coverage-centric selection (CCS, Zheng et al. 2023) on ascending-hardness scores.

    Drop the hardest floor(beta * N) (lowest scores; ties by lower index). Split the remaining
    score range [min, max] into `strata` bins of equal width (bin b holds scores with
    floor((s - min) / (max - min) * strata) = b, the maximum in the last bin; one bin when all are
    equal). Then, smallest non-empty bin first (ties: lower bin), take
    min(|bin|, floor(budget left / bins left)) examples from it uniformly at random (a
    torch.Generator seeded with `seed`, so the result is reproducible), until the budget `keep`
    (an int count or a float fraction of N) is spent. This always spends it exactly.

    Example:
        >>> s = torch.tensor([0.0, 0.1, 0.2, 5.0, 9.0, 10.0])
        >>> ccs_indices(s, 3, strata=2, seed=0).numel()
        3
    """
    scores, keep, cut = _prune_split(scores, keep, beta)
    strata = check("strata", strata, POSITIVE_INT)
    order = torch.sort(scores, stable=True).indices
    pool = order[cut:].cpu()
    vals = scores.cpu().double()[pool]
    lo, hi = float(vals.min()), float(vals.max())
    if hi > lo:
        bins = torch.floor((vals - lo) / (hi - lo) * strata).long().clamp(max=strata - 1)
    else:
        bins = torch.zeros_like(pool)
    sizes = torch.bincount(bins, minlength=strata)
    nonempty = [b for b in torch.sort(sizes, stable=True).indices.tolist() if sizes[b] > 0]
    gen = torch.Generator().manual_seed(seed)
    picked = []
    left = keep
    for pos, b in enumerate(nonempty):
        members = pool[bins == b]
        take = min(members.numel(), left // (len(nonempty) - pos))
        picked.append(members[torch.randperm(members.numel(), generator=gen)[:take]])
        left -= take
    assert left == 0
    return torch.sort(torch.cat(picked)).values.to(scores.device)


# ---------------------------------------------------------------------------------- sampling
# One sampling step for every score-based selector (css, prototypes, elfs, aum, forgetting, el2n,
# ccs). A selector hands over its per-example scores and says which end is hard (`hard`: "low"
# for css and AUM, "high" for forgetting, EL2N and the prototype distance); the sampling then
# picks the budget:
#
#   "lowest"      the `budget` lowest scores (the hardest when hard="low")
#   "highest"     the `budget` highest scores (the hardest when hard="high")
#   "double_end"  hardest first: drop the hardest floor(beta N), keep the next `budget`
#                 (beta = 0: the `budget` hardest) -- ELFS's double-end pruning
#   "ccs"         drop the hardest floor(beta N), spread the budget over `strata` equal-width
#                 score strata -- coverage-centric selection (Zheng et al. 2023)
#   "auto"        "ccs" when the budget is below half of the pool, else "double_end" (AUTO_RULE)

SAMPLINGS = Options("lowest", "highest", "double_end", "ccs", "auto")
HARD_ENDS = Options("low", "high")

# `auto`: a budget below this share of the pool is "scarce" and gets CCS; from it up, hard-first.
AUTO_CCS_BELOW = Fraction(1, 2)

AUTO_RULE = """sampling="auto" picks by the budget fraction f = budget / N (compared exactly, as
fractions): f < 1/2 -> "ccs", f >= 1/2 -> "double_end", each with the method's beta (0 unless
given for css, prototypes, aum, forgetting and el2n: "double_end" is then the n hardest; chosen
by coverage for elfs and ccs). Keeping only the hardest examples collapses below random when
little is kept (Zheng et al. 2023: forgetting scores keep 95.4% CIFAR-10 accuracy at 30% pruning
but 34.0% at 90%, below random, while their stratified coverage stays above random and is
comparable at low pruning rates), as Sorscher et al. (2022) predict: when data is scarce the
easy examples must be kept too, and the hardest pay only when data is plentiful. So below half
of the pool auto keeps a coverage-preserving mix (CCS strata over the whole score range), and
from half up the hardest: 1/2 is the edge of the low pruning rates (30-50%) of the CCS and ELFS
tables, where hard-first pruning is not behind."""


def auto_sampling(budget: int, total: int) -> str:
    """The sampling `"auto"` resolves to for `budget` of `total` examples (the rule: `AUTO_RULE`):
    "ccs" when budget / total < 1/2, else "double_end". Exact integer arithmetic, no rounding.

    Example:
        >>> auto_sampling(49, 100), auto_sampling(50, 100), auto_sampling(1, 3), auto_sampling(2, 3)
        ('ccs', 'double_end', 'ccs', 'double_end')
    """
    total = check("total", total, POSITIVE_INT)
    budget = check("budget", budget, Interval(int, 1, total))
    return "ccs" if Fraction(budget, total) < AUTO_CCS_BELOW else "double_end"


def resolve_sampling(sampling: str, budget: int, total: int) -> str:
    """The concrete sampling a selection uses: `sampling` itself, or for "auto" `auto_sampling`'s choice."""
    check("sampling", sampling, SAMPLINGS)
    return auto_sampling(budget, total) if sampling == "auto" else sampling


def sampling_option(sampling: str | None, default: str, alias: str | None = None, value=None,
                    meaning: Mapping | None = None) -> str:
    """The sampling a selector was asked for (possibly "auto"): `sampling` when given, else what
    its older option `alias` = `value` means (`meaning` maps that option's values to samplings:
    css `order`, prototypes `keep`, elfs `variant`), else the method's `default`. Both given and
    meaning different samplings is a ValueError naming both options.

    Example:
        >>> sampling_option(None, "highest", "keep", "easiest", {"hardest": "highest", "easiest": "lowest"})
        'lowest'
        >>> sampling_option("ccs", "lowest", "order", "highest", {"lowest": "lowest", "highest": "highest"})
        Traceback (most recent call last):
        ...
        ValueError: sampling='ccs' contradicts order='highest' (which means sampling='highest'): give one of them
    """
    if sampling is not None:
        check("sampling", sampling, SAMPLINGS)
    if value is None:
        return default if sampling is None else sampling
    check(alias, value, Options(*meaning))
    implied = meaning[value]
    if sampling is not None and sampling != implied:
        raise ValueError(f"sampling={sampling!r} contradicts {alias}={value!r} (which means sampling={implied!r}): "
                         "give one of them")
    return implied


def check_sampling(sampling: str, *, beta=0.0, strata=50) -> None:
    """Refuses, before any work, what `sampling` cannot honour: an unknown sampling, beta outside
    [0, 1) (None is let through: a selector that chooses beta itself), strata < 1, and a nonzero
    beta with "lowest" or "highest" (they drop nothing; "double_end", "ccs" and "auto" do)."""
    check("sampling", sampling, SAMPLINGS)
    if beta is not None:
        beta = check("beta", beta, BETA)
    check("strata", strata, POSITIVE_INT)
    if sampling in ("lowest", "highest") and beta:
        raise ValueError(f"beta: sampling={sampling!r} keeps the {sampling} scores and drops none, got beta={beta!r}; "
                         "beta applies to sampling 'double_end', 'ccs' and 'auto'")


def _ranking(scores: torch.Tensor, secondary: torch.Tensor | None, descending: bool) -> torch.Tensor:
    """All indices by score (descending or not), ties by `secondary` in the same direction, then
    by lower index (stable sorts)."""
    if secondary is None:
        return torch.sort(scores, descending=descending, stable=True).indices
    order = torch.sort(secondary, descending=descending, stable=True).indices
    return order[torch.sort(scores[order], descending=descending, stable=True).indices]


def sample_by_score(scores: torch.Tensor, budget: int | float, sampling: str = "lowest", *, hard: str = "low",
                    beta: float = 0.0, strata: int = 50, seed: int = 0, secondary: torch.Tensor | None = None,
                    ranked: bool = False) -> torch.Tensor:
    """The one sampling step of the score-based selectors: `budget` (an int count, or a float
    fraction of N as in `budget_size`) examples picked from `scores` [N] (finite floats).

    `hard` says which end of the scores is hard ("low": css, AUM; "high": forgetting, EL2N,
    the prototype distance). Samplings ("lowest"/"highest" name score values, the others hardness):

    - "lowest" / "highest": the `budget` lowest / highest scores. beta must be 0.
    - "double_end": hardest first, drop the hardest floor(beta N), keep the next `budget`
      (ELFS); beta = 0 gives the `budget` hardest, the same set as "lowest" (hard="low") or
      "highest" (hard="high").
    - "ccs": `ccs_indices` on the hardness (the scores, negated when hard="high"): drop the
      hardest floor(beta N), spread the budget over `strata` equal-width strata, seeded by `seed`.
    - "auto": `auto_sampling(budget, N)` ("ccs" below half of the pool, else "double_end").

    Ties go to `secondary` [N] (optional; oriented like `scores`: the harder end at the `hard`
    side), then to the lower index: "lowest" orders by (score, secondary, index) ascending,
    "highest" by both descending and then the lower index. CCS's strata ignore `secondary`
    (ties share a stratum and are sampled at random there; its hard cut breaks ties by index).

    Returns int64 indices sorted ascending, or with `ranked=True` in the order picked: by score
    ascending for "lowest", descending for "highest", hardest first for "double_end" and "ccs".
    Raises ValueError naming the option for an unknown sampling or `hard`, beta outside [0, 1)
    or nonzero with "lowest"/"highest", strata < 1, or floor(beta N) + budget > N.

    Example:
        >>> s = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.9])
        >>> sample_by_score(s, 2, "lowest").tolist(), sample_by_score(s, 2, "highest", ranked=True).tolist()
        ([1, 3], [2, 4])
        >>> sample_by_score(s, 2, "double_end", hard="high", beta=0.2).tolist()  # drops 2 (2.0)
        [0, 4]
    """
    check("hard", hard, HARD_ENDS)
    check_sampling(sampling, beta=beta, strata=strata)
    scores, budget, cut = _prune_split(scores, budget, beta, "budget")
    n = scores.numel()
    secondary = _check_secondary(secondary, n)
    sampling = resolve_sampling(sampling, budget, n)
    # "lowest" and "highest" say the direction; "double_end" and "ccs" go hardest first
    descending = sampling == "highest" or (sampling in ("double_end", "ccs") and hard == "high")
    if sampling == "ccs":
        picked = ccs_indices(-scores if hard == "high" else scores, budget, beta, strata=strata, seed=seed)
        if not ranked:
            return picked
        order = _ranking(scores, secondary, descending)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=order.device)
        return picked[torch.sort(rank[picked]).indices]
    picked = _ranking(scores, secondary, descending)[cut : cut + budget]
    return picked if ranked else torch.sort(picked).values
