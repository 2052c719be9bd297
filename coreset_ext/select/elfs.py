"""`elfs` (label-free, METHODS.md method 3) and the supervised dynamics baselines `aum`, `forgetting`,
`el2n`, `ccs`.

ELFS: pseudo-labels (k-means on the embeddings, cosine metric, `n_clusters` K; or
`pseudo_labels="deep_cluster"`, see `coreset_ext.pseudo_labels`) -> a proxy classifier trained on
them (`coreset_ext.proxy.train_proxy_classifier`: linear or MLP on the frozen embeddings) records
`TrainingDynamics` -> AUM (low = hard) -> double-end pruning (`sampling="double_end"`, default:
drop the hardest floor(beta N), keep the next n) or CCS (`sampling="ccs"`: drop the hardest
floor(beta N), spread n over `strata` equal-width AUM strata).

The supervised baselines read the same dynamics of a proxy trained on the ground-truth labels
(or a `dynamics` file the user trained, e.g. on images) and keep the n hardest:
- `aum`: lowest AUM first (ties: lower index);
- `forgetting`: most forgetting events first, never-learned examples counted as infinitely
  forgettable (Toneva et al.); ties, which are common (many examples are never forgotten), go to
  the lower AUM, then the lower index;
- `el2n`: highest mean EL2N over the first `el2n_epochs` epochs first (ties: lower index);
- `ccs`: CCS on the AUM, with the hard cutoff beta (given, or chosen as below).

Sampling. Every method here ends in the one sampling step `pruning.sample_by_score`, on its
score with its hard end: AUM (low = hard), forgetting events (high = hard; never learned: one
more than the most forgotten), EL2N (high = hard), chosen by `score` for elfs and ccs. Its
option `sampling` is one of "lowest", "highest" (score values), "double_end", "ccs" (hardest
first, dropping floor(beta N)) and "auto" (`pruning.AUTO_RULE`: "ccs" below half of the pool,
else "double_end"). The defaults (the papers') reproduce what these methods always did:

    elfs        "double_end", beta chosen by coverage      (`variant=` is its older alias)
    ccs         "ccs", beta chosen by coverage
    aum         "lowest"   (beta 0)
    forgetting  "highest"  (beta 0; ties by the lower AUM)
    el2n        "highest"  (beta 0)

beta = None (the default of elfs and ccs) chooses beta for "double_end" and "ccs" as below and
means 0 for "lowest"/"highest"; the baselines take beta = 0 unless given. The Selection records
the sampling used (`options["sampling"]`, "auto" resolved) and the scores it ranked by
(forgetting events and EL2N as they are: high = hard).

Choosing beta (`beta=None`, the default of `elfs` and `ccs`). For every beta on the grid
(0, 0.05, .., 0.5, or `beta_grid`; those with floor(beta N) + n > N are skipped) the candidate
subset S is built, and its coverage of the pool is measured:

    coverage(S) = mean over all N examples j of max_{i in S} cos(e_j, e_i)

(`ops.cosine_topk(e, 1, y=e[S])`: streamed, O(N |S| d), never N x N). The beta of largest
coverage wins (ties: the smaller beta). Why this criterion: double-end pruning exists because
keeping only the hardest examples leaves the dense, easy regions of the data uncovered (Zheng et
al.'s coverage argument behind CCS and ELFS), while keeping only the easiest leaves the boundaries
uncovered; coverage measures exactly that trade-off, needs no labels, does not depend on the
pseudo-labels being right (a pseudo-label agreement criterion would: k-means cells are linearly
separable, so it rewards keeping the boundary examples, i.e. beta = 0, whatever their real
labels), and costs one streamed nearest-neighbour pass per grid point. It is a proxy: it does not
know the downstream task, and its winner is not guaranteed to be the accuracy-best beta.
`choose_beta` returns the whole table so a user can see the trade-off.

Dynamics are computed inside the method from `embeddings` (+ `labels` for the supervised
baselines), and memoised in-process per (embeddings, targets, proxy options, seed) by
`coreset_ext.proxy`, so a sweep over fractions trains each proxy once. `dynamics="path.npz"` (a saved `TrainingDynamics`) uses
the user's dynamics instead (its number of examples must be N). `seed` seeds the pseudo-labels,
the proxy and CCS's sampling.

Example:
    >>> import torch, coreset_ext as cx
    >>> e = torch.cat([torch.randn(100, 8) + 3, torch.randn(100, 8) - 3])
    >>> len(cx.select("elfs", fraction=0.3, embeddings=e, n_clusters=2, beta=0.1, proxy_epochs=3))
    60
"""

from __future__ import annotations

import torch

from coreset_ext import ops
from coreset_ext._validation import Options, check, check_finite
from coreset_ext.proxy import dynamics_for, pseudo_labels_for
from coreset_ext.scores import TrainingDynamics
from coreset_ext.select import pruning
from coreset_ext.select.registry import register_method, require, require_labels

__all__ = ["choose_beta", "coverage", "dynamics_score", "hardness"]

BETA_GRID = tuple(round(0.05 * i, 2) for i in range(11))  # 0.0 .. 0.5
VARIANT_MEANS = {"double_end": "double_end", "ccs": "ccs"}  # elfs' `variant`: an alias of `sampling`
SCORES = ("aum", "forgetting", "el2n")
HARD = {"aum": "low", "forgetting": "high", "el2n": "high"}  # which end of each score is hard
DEFAULT_SAMPLING = {"elfs": "double_end", "ccs": "ccs", "aum": "lowest", "forgetting": "highest", "el2n": "highest"}


# ---------------------------------------------------------------------------------- dynamics
def _load_dynamics(path, n: int) -> TrainingDynamics:
    if not isinstance(path, str):
        raise ValueError(f"dynamics must be the path of a saved TrainingDynamics (.npz), got {type(path).__name__}")
    dyn = TrainingDynamics.load(path)
    if dyn.num_samples != n:
        raise ValueError(f"dynamics: {path} holds dynamics of {dyn.num_samples} examples, but the data set has {n}")
    return dyn


def dynamics_score(dyn: TrainingDynamics, score: str = "aum") -> torch.Tensor:
    """Per-example scores [N] float64 on the CPU, finite, as `sample_by_score` reads them with
    `HARD[score]`: AUM (low = hard); forgetting events (high = hard; never-learned examples: one
    more than the most forgotten); EL2N (high = hard). Raises ValueError for examples the
    dynamics never saw."""
    check("score", score, Options(*SCORES))
    if score == "aum":
        s = dyn.aum().double()
    elif score == "el2n":
        s = dyn.el2n().double()
    else:
        ev = dyn.forgetting(never_learned=None).double()
        s = torch.where(dyn.never_learned(), torch.nan_to_num(ev, nan=0.0).max() + 1, ev)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"dynamics: {int((~torch.isfinite(s)).sum())} examples have no {score} "
                         "(never seen in the proxy training, or EL2N epochs never reached)")
    return s.cpu()


def hardness(dyn: TrainingDynamics, score: str = "aum") -> torch.Tensor:
    """Per-example scores [N] float64, ascending = hardest first, finite (as the pruning functions need):
    AUM; minus the forgetting events (never-learned examples: one more than the most forgotten);
    minus EL2N. Raises ValueError for examples the dynamics never saw."""
    s = dynamics_score(dyn, score)
    return -s if HARD[score] == "high" else s


# ---------------------------------------------------------------------------------- beta
def coverage(embeddings: torch.Tensor, index: torch.Tensor) -> float:
    """mean_j max_{i in index} cos(e_j, e_i) over all rows j of `embeddings` (streamed)."""
    x = embeddings.float()
    values, _ = ops.cosine_topk(x, 1, y=x[index.to(x.device)])
    return float(values.double().mean())


def choose_beta(embeddings: torch.Tensor, scores: torch.Tensor, keep: int, *, sampling: str | None = None,
                variant: str | None = None, hard: str = "low", grid=BETA_GRID, strata: int = 50, seed: int = 0,
                secondary: torch.Tensor | None = None) -> tuple[float, list[tuple[float, float]]]:
    """The beta on `grid` whose subset has the largest `coverage` (ties: smaller beta), and the
    table [(beta, coverage)] of every feasible grid point (module docstring). The subsets are
    `pruning.sample_by_score(scores, keep, sampling, hard=hard, ...)` with sampling "double_end"
    (default) or "ccs" (`variant`: its older alias); `scores` ascending = hardest first by default."""
    sampling = pruning.sampling_option(sampling, "double_end", "variant", variant, VARIANT_MEANS)
    if sampling not in VARIANT_MEANS:
        raise ValueError(f"sampling: choose_beta chooses the beta of 'double_end' or 'ccs', got {sampling!r}")
    n = scores.numel()
    table = []
    for i, beta in enumerate(grid):
        beta = check(f"beta_grid[{i}]", beta, pruning.BETA)
        if pruning.hard_cut(beta, n) + keep > n:
            continue
        subset = pruning.sample_by_score(scores, keep, sampling, hard=hard, beta=beta, strata=strata, seed=seed,
                                         secondary=secondary)
        table.append((beta, coverage(embeddings, subset)))
    if not table:
        raise ValueError(f"beta_grid: no beta on the grid leaves room for {keep} of {n} examples")
    best = max(table, key=lambda t: (t[1], -t[0]))
    return best[0], table


def _select(budget, n, scores, embeddings, *, hard, sampling, beta, strata, seed, beta_grid,
            secondary=None) -> tuple[torch.Tensor, dict]:
    """`sample_by_score` with `sampling` ("auto" resolved) and beta (None: chosen by coverage for
    "double_end" and "ccs", 0 for "lowest"/"highest"); returns the indices and the record."""
    used = pruning.resolve_sampling(sampling, budget, n)
    if beta is None and used in VARIANT_MEANS:
        if embeddings is None:
            raise ValueError("beta: choosing beta (beta=None) needs embeddings for the coverage criterion; "
                             "give embeddings or a beta")
        grid = BETA_GRID
        if beta_grid is not None:
            grid = () if isinstance(beta_grid, (str, bytes)) or not hasattr(beta_grid, "__iter__") else tuple(beta_grid)
            if not grid:
                raise ValueError(f"beta_grid must be a non-empty sequence of betas in [0, 1), got {beta_grid!r}")
        beta, _ = choose_beta(embeddings, scores, budget, sampling=used, hard=hard, grid=grid, strata=strata,
                              seed=seed, secondary=secondary)
    idx = pruning.sample_by_score(scores, budget, used, hard=hard, beta=0.0 if beta is None else beta,
                                  strata=strata, seed=seed, secondary=secondary)
    return idx, {"sampling": used}


def _check_embeddings(embeddings) -> None:
    if embeddings is not None:
        check_finite("embeddings", embeddings)


# ---------------------------------------------------------------------------------- methods
def _asked(method: str, sampling, beta, strata, variant=None) -> str:
    """The sampling asked of `method` (its default, or `variant` for elfs), checked before any work."""
    asked = pruning.sampling_option(sampling, DEFAULT_SAMPLING[method], "variant", variant, VARIANT_MEANS)
    pruning.check_sampling(asked, beta=beta, strata=strata)
    return asked


@register_method("elfs")  # label-free: it reads pseudo-labels of its own
def elfs(budget: int, *, n: int, embeddings=None, seed: int = 0, n_clusters: int = 10,
         pseudo_labels: str = "kmeans", deep_cluster: dict | None = None, score: str = "aum",
         variant: str | None = None, beta: float | None = None, beta_grid=None, strata: int = 50,
         dynamics: str | None = None, proxy_epochs: int = 20, proxy_hidden: int = 0, sampling: str | None = None):
    asked = _asked("elfs", sampling, beta, strata, variant)
    check("score", score, Options(*SCORES))
    _check_embeddings(embeddings)
    if dynamics is not None:
        dyn = _load_dynamics(dynamics, n)
    else:
        e = require("embeddings", embeddings, "elfs").float()
        targets = pseudo_labels_for(e, n_clusters, method=pseudo_labels, seed=seed, **dict(deep_cluster or {}))
        dyn = dynamics_for(e, targets, seed=seed, epochs=proxy_epochs, hidden=proxy_hidden)
    return _sample_dynamics(budget, n, dyn, score, embeddings, asked, beta, strata, seed, beta_grid)


def _supervised_dynamics(method, n, embeddings, labels, dynamics, seed, proxy_epochs, proxy_hidden):
    _check_embeddings(embeddings)
    if dynamics is not None:
        return _load_dynamics(dynamics, n)
    e = require("embeddings", embeddings, method).float()
    y = require_labels(labels, n, method, "the supervised baselines need every label (or a dynamics file)")
    return dynamics_for(e, y.long(), seed=seed, epochs=proxy_epochs, hidden=proxy_hidden)


def _sample_dynamics(budget, n, dyn, score, embeddings, sampling, beta, strata, seed, beta_grid):
    """The `score` of the dynamics, sampled as asked: (indices, scores, the sampling record)."""
    s = dynamics_score(dyn, score)
    idx, record = _select(budget, n, s, embeddings, hard=HARD[score], sampling=sampling, beta=beta, strata=strata,
                          seed=seed, beta_grid=beta_grid, secondary=_tie_break(dyn, score))
    return idx, s.float(), record


def _tie_break(dyn: TrainingDynamics, score: str) -> torch.Tensor | None:
    """Forgetting counts tie massively (a linear proxy rarely forgets): AUM orders within a count,
    the lower AUM (harder) first; negated to point like the events (high = hard)."""
    return -dynamics_score(dyn, "aum") if score == "forgetting" else None


def _dynamics_baseline(name: str):
    def method(budget: int, *, n: int, embeddings=None, labels=None, seed: int = 0, dynamics: str | None = None,
               proxy_epochs: int = 20, proxy_hidden: int = 0, sampling: str | None = None, beta: float = 0.0,
               strata: int = 50):
        asked = _asked(name, sampling, beta, strata)
        dyn = _supervised_dynamics(name, n, embeddings, labels, dynamics, seed, proxy_epochs, proxy_hidden)
        return _sample_dynamics(budget, n, dyn, name, embeddings, asked, beta, strata, seed, None)

    method.__name__ = name
    method.__doc__ = (f"Supervised baseline: by default the n hardest examples by {name} "
                      f"(sampling={DEFAULT_SAMPLING[name]!r}; module docstring).")
    return method


for _name in SCORES:
    register_method(_name, supervised=True)(_dynamics_baseline(_name))


@register_method("ccs", supervised=True)
def ccs(budget: int, *, n: int, embeddings=None, labels=None, seed: int = 0, score: str = "aum",
        beta: float | None = None, beta_grid=None, strata: int = 50, dynamics: str | None = None,
        proxy_epochs: int = 20, proxy_hidden: int = 0, sampling: str | None = None):
    asked = _asked("ccs", sampling, beta, strata)
    check("score", score, Options(*SCORES))
    dyn = _supervised_dynamics("ccs", n, embeddings, labels, dynamics, seed, proxy_epochs, proxy_hidden)
    s = dynamics_score(dyn, score)
    # (CCS's strata and hard cut ignore the tie-break; "double_end" etc. use it, as elfs does)
    idx, record = _select(budget, n, s, embeddings, hard=HARD[score], sampling=asked, beta=beta, strata=strata,
                          seed=seed, beta_grid=beta_grid, secondary=_tie_break(dyn, score))
    return idx, s.float(), record
