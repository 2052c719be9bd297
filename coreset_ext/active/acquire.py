"""Acquisition methods: which unlabelled examples of a realistic pool to send to the annotator next.

Every method answers `acquire(method, budget, round_inputs)` with `budget` distinct indices none of
which was queried before. The feature-based ones read the round's contrastive features
(`features.ContrastiveFeatures`), the same for every method of a round.

- "contrastive" (METHODS.md, method 5; the open choices are ours, defaults below):
  1. k-means (`cx.KMeans`) on the features, K = min(|queried| + budget, N);
  2. each example's probability of being in-distribution, from what the annotator said so far: a
     kernel estimate over the queried examples, p_id(i) = (sum_j w_ij [j is ID] + a * prior) /
     (sum_j w_ij + a), w_ij = exp((cos(f_i, f_j) - 1) / `tau`), a = `prior_weight`, prior = the
     ID share of the queried examples with add-one smoothing ((ID + 1) / (queried + 2)). Near
     labelled ID examples it tends to 1, near examples marked OOD or ambiguous to 0, far from
     both to the prior;
  3. clusters are scored by their expected number of unlabelled ID examples, discounted by how
     many queried examples they hold already: sum_{i in c, unlabelled} p_id(i) / (1 + queried(c));
  4. greedily, `budget` times: the best cluster gives its most typical unlabelled member weighted
     by how in-distribution it looks, argmax typicality(i) * p_id(i) (typicality as TypiClust's:
     1 / mean squared distance to the k = min(`k_neighbors`, members // 2) nearest unlabelled
     members); the cluster's score is then lowered by that member's p_id and its count raised.
  OOD and ambiguous answers enter through p_id: the next round avoids their neighbourhoods.
- "contrastive-ood-unaware": the same with p_id = 1 everywhere (the annotator's OOD and ambiguous
  marks are not used): clusters by unlabelled size / (1 + queried), members by typicality.
- "random", "kcenter", "typiclust": `cx.select` with `already_selected` = every queried example.
- "entropy", "margin": a logistic-regression classifier of the labelled ID examples
  (`features.fit_classifier`) scores the unlabelled ones: highest predictive entropy, or smallest
  gap between the two most probable classes. Before two ID classes have labels there is nothing
  to be uncertain about: those rounds draw at random (as uncertainty sampling's usual random start).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coreset_ext._validation import Interval, Options, check
from coreset_ext.active.features import fit_classifier
from coreset_ext.active.pool import ID
from coreset_ext.cluster import KMeans
from coreset_ext.select import select
from coreset_ext.select.typiclust import typicality

METHODS = Options("contrastive", "contrastive-ood-unaware", "random", "entropy", "margin", "kcenter", "typiclust")
USES_FEATURES = ("contrastive", "contrastive-ood-unaware", "entropy", "margin", "kcenter", "typiclust")
_CHUNK = 4096


@dataclass
class RoundInputs:
    """What a method may read in a round: the pool's features (unit rows, or None for random), the
    examples queried so far, the annotator's answers for them (labels -1 where not ID; kind codes),
    the number of ID classes, and the round's seed."""

    n: int
    features: torch.Tensor | None
    queried: torch.Tensor
    labels: torch.Tensor
    kinds: torch.Tensor
    num_classes: int
    seed: int


def id_probability(features: torch.Tensor, queried: torch.Tensor, is_id: torch.Tensor, *, tau: float = 0.1,
                   prior_weight: float = 1.0) -> torch.Tensor:
    """p_id of every example (the module docstring, step 2): float64 [N], chunked (never N x N).

    Example:
        >>> f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
        >>> p = id_probability(f, torch.tensor([0, 2]), torch.tensor([True, False]))
        >>> [round(v, 2) for v in p.tolist()]
        [0.75, 0.74, 0.25, 0.26]
    """
    queried = queried.long()
    prior = (float(is_id.sum()) + 1) / (queried.numel() + 2)
    if queried.numel() == 0:
        return torch.full((features.shape[0],), prior, dtype=torch.float64)
    ref = features[queried].double()
    y = is_id.double()
    out = []
    for s in range(0, features.shape[0], _CHUNK):
        w = torch.exp((features[s:s + _CHUNK].double() @ ref.T - 1) / tau)
        out.append((w @ y + prior_weight * prior) / (w.sum(1) + prior_weight))
    return torch.cat(out)


def check_acquire_options(method: str, options: dict) -> None:
    """`options` of `method` as `acquire` takes them (the contrastive methods': tau, prior_weight,
    k_neighbors; the others' none), checked before any round trains: a ValueError naming the option."""
    if options and not method.startswith("contrastive"):
        raise ValueError(f"options: method {method!r} takes none, got {sorted(options)}")
    unknown = sorted(set(options) - {"tau", "prior_weight", "k_neighbors"})
    if unknown:
        raise ValueError(f"options: {unknown} unknown; method {method!r} takes tau, prior_weight, k_neighbors")
    for name, rule in (("tau", Interval(float, 0, None, closed="neither")),
                       ("prior_weight", Interval(float, 0, None, closed="neither")),
                       ("k_neighbors", Interval(int, 1, None))):
        if name in options:
            check(name, options[name], rule)


def contrastive_acquire(budget: int, inputs: RoundInputs, *, ood_aware: bool = True, tau: float = 0.1,
                        prior_weight: float = 1.0, k_neighbors: int = 20) -> torch.Tensor:
    """The contrastive method's picks (the module docstring); `ood_aware=False` is its ablation."""
    check_acquire_options("contrastive", {"tau": tau, "prior_weight": prior_weight, "k_neighbors": k_neighbors})
    f, n = inputs.features, inputs.n
    queried = inputs.queried
    p = (id_probability(f, queried, inputs.kinds == ID, tau=tau, prior_weight=prior_weight) if ood_aware
         else torch.ones(n, dtype=torch.float64))
    k = min(queried.numel() + budget, n)
    labels = torch.as_tensor(KMeans(k, seed=inputs.seed).fit(f).labels_).long().cpu()
    free = torch.ones(n, dtype=torch.bool)
    free[queried] = False
    mass = torch.zeros(k, dtype=torch.float64).index_add_(0, labels[free], p[free])
    members_left = torch.bincount(labels[free], minlength=k)
    covered = torch.bincount(labels[queried], minlength=k).double()
    picks = []
    for _ in range(budget):
        gain = torch.where(members_left > 0, mass / (1 + covered), torch.tensor(-float("inf"), dtype=torch.float64))
        c = int(torch.argmax(gain))
        members = torch.nonzero((labels == c) & free).flatten()
        t = typicality(f[members], max(1, min(k_neighbors, members.numel() // 2)), normalized=True)
        pick = int(members[torch.argmax(t.double() * p[members])])
        picks.append(pick)
        free[pick] = False
        mass[c] -= p[pick]
        covered[c] += 1
        members_left[c] -= 1
    return torch.tensor(picks, dtype=torch.long)


def uncertainty_acquire(budget: int, inputs: RoundInputs, *, measure: str) -> torch.Tensor:
    """The `budget` unlabelled examples the classifier of the labelled ID examples is least sure of:
    highest entropy or smallest top-two margin (ties by index); random before two classes have labels."""
    is_id = inputs.kinds == ID
    seen = torch.unique(inputs.labels[is_id])
    if seen.numel() < 2:
        return _select("random", budget, inputs)
    proba = fit_classifier(inputs.features[inputs.queried[is_id]], inputs.labels[is_id], inputs.num_classes,
                           seed=inputs.seed)
    free = torch.ones(inputs.n, dtype=torch.bool)
    free[inputs.queried] = False
    candidates = torch.nonzero(free).flatten()
    p = proba(inputs.features[candidates])
    if measure == "entropy":
        need = (p * torch.log(p.clamp_min(1e-12))).sum(1)  # minus the entropy: lowest first
    else:
        top = p.topk(2, dim=1).values
        need = top[:, 0] - top[:, 1]
    return candidates[torch.sort(need, stable=True).indices[:budget]]


def _select(method: str, budget: int, inputs: RoundInputs) -> torch.Tensor:
    emb = inputs.features if method != "random" else None
    return select(method, budget=budget, embeddings=emb, dataset_size=inputs.n, seed=inputs.seed,
                  already_selected=inputs.queried).indices


def acquire(method: str, budget: int, inputs: RoundInputs, **options) -> torch.Tensor:
    """`budget` new indices chosen by `method` (METHODS) from `inputs`; `options` go to the
    contrastive methods (tau, prior_weight, k_neighbors)."""
    check("method", method, METHODS)
    check_acquire_options(method, options)
    if method.startswith("contrastive"):
        return contrastive_acquire(budget, inputs, ood_aware=method == "contrastive", **options)
    if method in ("entropy", "margin"):
        return uncertainty_acquire(budget, inputs, measure=method)
    return _select(method, budget, inputs)
