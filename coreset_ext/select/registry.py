"""The registry of selection methods and `select`, the one entry point to all of them."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from coreset_ext.select.selection import Selection

# A method: fn(budget, *, n, scores, embeddings, labels, seed, **options) -> indices, or
# (indices, scores_used). Inputs arrive as tensors (or None), already checked to have n rows.
MethodFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]"]
_METHODS: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a selection method under `name`.

    Example:
        >>> import torch
        >>> from coreset_ext.select import register_method, select
        >>> @register_method("first_k")
        ... def first_k(budget, *, n, **_):
        ...     return torch.arange(budget)
        >>> select("first_k", budget=2, scores=torch.rand(5)).indices.tolist()
        [0, 1]
    """
    def deco(fn: MethodFn) -> MethodFn:
        _METHODS[name] = fn
        return fn

    return deco


def available_methods() -> list[str]:
    return sorted(_METHODS)


def _as_tensor(name: str, x, dim: int | None) -> torch.Tensor | None:
    if x is None:
        return None
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def select(method: str, *, fraction: float | None = None, budget: int | None = None, scores=None,
           embeddings=None, labels=None, seed: int = 0, dataset_size: int | None = None,
           fingerprint: str | None = None, **options) -> Selection:
    """Selects `budget` (or round(fraction * N), at least 1) examples of a pool of N with `method`.

    Args:
        method: a registered name (see `available_methods()`): random, balanced_random, css,
            prototypes, kcenter, or one you registered.
        fraction / budget: exactly one of them; fraction in (0, 1], budget in 1 .. N.
        scores: per-example scores [N] (css ranks by them).
        embeddings: per-example embeddings [N, D] (prototypes, kcenter, balanced_random by cluster).
        labels: per-example labels [N] (balanced_random by class).
        seed: seeds every random choice the method makes.
        dataset_size: N, when none of scores/embeddings/labels is given.
        fingerprint: data set identifier recorded in the Selection.
        **options: the method's own options (recorded in the Selection).

    Example:
        >>> import torch, coreset_ext as cx
        >>> sel = cx.select("css", fraction=0.2, scores=torch.rand(100))
        >>> len(sel)
        20
    """
    if method not in _METHODS:
        raise ValueError(f"method: unknown method {method!r}; known methods: {', '.join(available_methods())}")
    scores = _as_tensor("scores", scores, 1)
    embeddings = _as_tensor("embeddings", embeddings, 2)
    labels = _as_tensor("labels", labels, 1)
    sizes = {k: int(v.shape[0]) for k, v in (("scores", scores), ("embeddings", embeddings), ("labels", labels))
             if v is not None}
    sizes.update({"dataset_size": int(dataset_size)} if dataset_size is not None else {})
    if not sizes:
        raise ValueError("dataset_size: give scores, embeddings, labels or dataset_size so the pool size is known")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"pool size: the inputs disagree on the number of examples: {sizes}")
    n = next(iter(sizes.values()))
    if (fraction is None) == (budget is None):
        raise ValueError(f"fraction/budget: give exactly one of them, got fraction={fraction!r}, budget={budget!r}")
    if fraction is not None:
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        budget = max(1, int(math.floor(fraction * n + 0.5)))
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if budget > n:
        raise ValueError(f"budget: {budget} is larger than the data set size {n}")
    if labels is not None:
        labels = labels.long()
    out = _METHODS[method](int(budget), n=n, scores=scores, embeddings=embeddings, labels=labels, seed=seed,
                           **options)
    idx, used = out if isinstance(out, tuple) else (out, scores)
    idx = torch.as_tensor(idx).long().cpu()
    if idx.numel() != budget or torch.unique(idx).numel() != budget:
        raise RuntimeError(f"method {method!r} returned {idx.numel()} indices ({torch.unique(idx).numel()} distinct) "
                           f"for a budget of {budget}")
    return Selection(indices=idx, method=method, options=dict(options), dataset_size=n, seed=seed,
                     scores=used.detach().float().cpu() if used is not None else None, fingerprint=fingerprint)


def require(name: str, value, method: str):
    if value is None:
        raise ValueError(f"{name}: method {method!r} needs {name}, got None")
    return value
