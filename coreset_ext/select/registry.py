"""The registry of selection methods and `select`, the one entry point to all of them."""

from __future__ import annotations

import inspect
import json
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from coreset_ext._validation import FRACTION, POSITIVE_INT, SEED, check, check_indices
from coreset_ext.select.pruning import budget_size
from coreset_ext.select.selection import Selection

# A method: fn(budget, *, n, scores, embeddings, labels, seed, <its options>) -> indices, or
# (indices, scores_used), or (indices, scores_used, resolved), where `resolved` holds options the
# method settled itself (the score-based ones: the sampling used, "auto" resolved); they are
# recorded in the Selection over the options given. It declares (as keyword parameters) the
# inputs it reads and its options; `select` passes it only the inputs it declares (all of them to
# a `**kwargs` catch-all) and rejects any option it does not declare, so a misspelled option is an
# error, not a no-op.
# Inputs arrive as tensors (or None), already checked to have n rows.
MethodFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]"
                           " | tuple[torch.Tensor, torch.Tensor | None, dict]"]


@dataclass(frozen=True)
class _Method:
    fn: MethodFn
    # whether it reads the ground-truth labels: always (True), never (False), or as its options
    # say (a function of the options dict)
    supervised: bool | Callable[[dict], bool]


_METHODS: dict[str, _Method] = {}


def register_method(name: str, *, supervised: bool | Callable[[dict], bool] = False) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a selection method under `name`.

    `supervised` records whether the method reads the ground-truth labels: True for a method that
    always does (the dynamics baselines), or a function of the options that says whether those
    options make it read them (sas with classes="labels"). Callers ask `needs_labels`.

    Example:
        >>> import torch
        >>> from coreset_ext.select import register_method, select
        >>> @register_method("first_k")
        ... def first_k(budget, *, n):
        ...     return torch.arange(budget)
        >>> select("first_k", budget=2, scores=torch.rand(5)).indices.tolist()
        [0, 1]
    """
    def deco(fn: MethodFn) -> MethodFn:
        _METHODS[name] = _Method(fn, supervised)
        return fn

    return deco


def available_methods() -> list[str]:
    return sorted(_METHODS)


def supervised_methods() -> list[str]:
    """The registered methods that always read the ground-truth labels (registered with supervised=True)."""
    return sorted(name for name, m in _METHODS.items() if m.supervised is True)


def needs_labels(method: str, options: dict | None = None) -> bool:
    """Whether `method` with these `options` reads the ground-truth labels (False for unknown names:
    e.g. a results row labelled otherwise than by its method)."""
    m = _METHODS.get(method)
    if m is None:
        return False
    return m.supervised(options or {}) if callable(m.supervised) else m.supervised


_INPUTS = ("n", "scores", "embeddings", "labels", "seed", "already_selected")


def _method(name: str) -> _Method:
    if name not in _METHODS:
        raise ValueError(f"method: unknown method {name!r}; known methods: {', '.join(available_methods())}")
    return _METHODS[name]


def _keywords(fn: MethodFn) -> tuple[list[str], bool]:
    """The keyword parameters `fn` declares after `budget`, and whether it has a `**kwargs` catch-all."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    named = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def _option_parameters(method: str) -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(_method(method).fn).parameters.values())[1:]
    return {p.name: p for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _INPUTS}


def method_options(method: str) -> list[str]:
    """The options `method` takes (the keyword parameters its function declares, inputs aside)."""
    return list(_option_parameters(method))


_BOOLS = {"true": True, "True": True, "1": True, "false": False, "False": False, "0": False}


def parse_option(method: str, key: str, text: str):
    """The value of `method`'s option `key` given as text (the command line's KEY=VALUE), read as
    the type its parameter declares (annotation, else default): a bool strictly (true/True/1 or
    false/False/0), an int, a finite real number, a string; None/none/null where it admits None;
    JSON for anything else (lists, dicts). Anything that does not parse is a ValueError naming `key`.

    Example:
        >>> parse_option("kcenter", "normalize", "False"), parse_option("prototypes", "n_clusters", "20")
        (False, 20)
    """
    params = _option_parameters(method)
    if key not in params:
        known = ", ".join(params) if params else "none"
        raise ValueError(f"{key}: unknown option for method {method!r}; its options are: {known}")
    p = params[key]
    # the annotation is a string under `from __future__ import annotations`, a type otherwise
    kinds = set(re.findall(r"[A-Za-z_]\w*", str(p.annotation))) if p.annotation is not p.empty else set()
    if not kinds and p.default not in (None, p.empty):
        kinds = {type(p.default).__name__}
    if "None" in kinds and text in ("None", "none", "null"):
        return None
    if "bool" in kinds:
        if text not in _BOOLS:
            raise ValueError(f"{key} must be a bool (true/True/1 or false/False/0), got {text!r}")
        return _BOOLS[text]
    if "int" in kinds and "float" not in kinds:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key} must be an int, got {text!r}") from None
    if "float" in kinds:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{key} must be a finite real number, got {text!r}")
        return value
    if "str" in kinds:
        return text
    try:  # lists, dicts (beta_grid, deep_cluster)
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _json_options(method: str, accepted: list[str], options: dict) -> dict:
    """`options` checked against the method's `accepted` names, numpy scalars made Python, JSON-checked."""
    out = {}
    for k, v in options.items():
        if k not in accepted:
            known = ", ".join(accepted) if accepted else "none"
            raise ValueError(f"{k}: unknown option for method {method!r}; its options are: {known}")
        v = v.item() if isinstance(v, np.generic) else v
        try:  # the options are saved with the Selection: fail now, not at save time
            json.dumps(v)
        except (TypeError, ValueError):
            raise ValueError(f"{k}: option values must be JSON-serialisable (they are saved with the "
                             f"Selection), got {type(v).__name__}") from None
        out[k] = v
    return out


def _as_tensor(name: str, x, dim: int | None) -> torch.Tensor | None:
    if x is None:
        return None
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def select(method: str, *, fraction: float | None = None, budget: int | None = None, scores=None,
           embeddings=None, labels=None, seed: int = 0, dataset_size: int | None = None,
           fingerprint: str | None = None, already_selected=None, **options) -> Selection:
    """Selects `budget` (or round(fraction * N), at least 1) examples of a pool of N with `method`.

    Args:
        method: a registered name (see `available_methods()`): random, balanced_random, css,
            prototypes, kcenter, sas, elfs, aum, forgetting, el2n, ccs, or one you registered.
        fraction / budget: exactly one of them; fraction a real number in (0, 1], budget an
            integer in 1 .. N (numpy scalars are fine; bools are not).
        scores: per-example scores [N] (css ranks by them).
        embeddings: per-example embeddings [N, D] (prototypes, kcenter, sas, elfs, the supervised
            baselines, balanced_random by cluster).
        labels: per-example integer labels [N] (balanced_random by class, sas with
            classes="labels", aum, forgetting, el2n, ccs); a method that reads them needs
            every label >= 0. Float labels are an error, never truncated.
        seed: an integer; seeds every random choice the method makes.
        dataset_size: N, when none of scores/embeddings/labels is given.
        fingerprint: data set identifier recorded in the Selection.
        already_selected: indices of examples already chosen (an active learner's labelled set):
            the method chooses `budget` new ones, disjoint from them, given them (kcenter measures
            distances to them, typiclust counts them in their clusters, random draws from the
            rest). Methods that declare an `already_selected` parameter honour it; giving a
            non-empty one to any other method is a ValueError (`honours_already_selected`).
        **options: the method's own options, exactly the keyword parameters its function declares
            (an unknown or misspelled one is a ValueError listing the accepted ones). They are
            recorded in the Selection, so they must be JSON-serialisable (numpy scalars are
            converted to Python numbers), together with what the method resolved itself (the
            score-based methods record the sampling they used, "auto" resolved).

    Raises:
        ValueError: bad input, naming the argument or option.
        RuntimeError: the method returned indices that are not `budget` distinct ones in [0, N).

    Example:
        >>> import torch, coreset_ext as cx
        >>> sel = cx.select("css", fraction=0.2, scores=torch.rand(100), order="lowest")
        >>> len(sel), sel.options
        (20, {'order': 'lowest', 'sampling': 'lowest'})
    """
    fn = _method(method).fn
    named, takes_any = _keywords(fn)
    options = _json_options(method, [k for k in named if k not in _INPUTS], options)
    seed = check("seed", seed, SEED)
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
        if not FRACTION.accepts(fraction):  # worded as users of the command line have seen it
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        budget = budget_size(float(fraction), n)  # the library's one rounding rule
    budget = check("budget", budget, POSITIVE_INT)
    if budget > n:
        raise ValueError(f"budget: {budget} is larger than the data set size {n}")
    already_selected = _already_selected(method, already_selected, n, budget)
    if labels is not None:
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
        labels = labels.long()
    inputs = {"n": n, "scores": scores, "embeddings": embeddings, "labels": labels, "seed": seed,
              "already_selected": already_selected}
    out = fn(budget, **{k: v for k, v in inputs.items() if takes_any or k in named}, **options)
    idx, used, *resolved = out if isinstance(out, tuple) else (out, scores)
    options = {**options, **(resolved[0] if resolved else {})}
    idx = torch.as_tensor(idx).long().cpu()
    if idx.numel() != budget:
        raise RuntimeError(f"method {method!r} returned {idx.numel()} indices for a budget of {budget}")
    if already_selected is not None and bool(torch.isin(idx, already_selected).any()):
        raise RuntimeError(f"method {method!r} returned indices that are in already_selected")
    try:  # Selection checks its indices
        return Selection(indices=idx, method=method, options=options, dataset_size=n, seed=seed,
                         scores=used.detach().float().cpu() if used is not None else None, fingerprint=fingerprint)
    except ValueError as e:
        raise RuntimeError(f"method {method!r} returned bad indices: {e}") from None


def honours_already_selected(method: str) -> bool:
    """Whether `method` chooses given examples already selected (declares `already_selected`)."""
    return "already_selected" in _keywords(_method(method).fn)[0]


def _already_selected(method: str, value, n: int, budget: int) -> torch.Tensor | None:
    """`already_selected` as distinct int64 indices in [0, n) on the CPU (None when not given),
    checked against the method and the budget."""
    if value is None:
        return None
    t = check_indices("already_selected", value)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"already_selected must hold indices in [0, {n}) (the pool size), got "
                         f"{int(t.min())}..{int(t.max())}")
    if torch.unique(t).numel() != t.numel():
        raise ValueError("already_selected must hold distinct indices; it has repeats")
    if t.numel() and not honours_already_selected(method):
        takers = ", ".join(m for m in available_methods() if honours_already_selected(m))
        raise ValueError(f"already_selected: method {method!r} cannot honour it (it ranks or samples the whole "
                         f"pool without regard to a chosen set); methods that can: {takers}")
    if budget > n - t.numel():
        raise ValueError(f"budget: {budget} is larger than the {n - t.numel()} examples not already selected "
                         f"(pool {n}, already_selected {t.numel()})")
    return t


def require(name: str, value, method: str):
    if value is None:
        raise ValueError(f"{name}: method {method!r} needs {name}, got None")
    return value


def require_labels(labels, n: int, method: str, hint: str = "") -> torch.Tensor:
    """`labels` for a method that reads them: present, and every one >= 0 (the one rule for all
    methods; -1 marks an unknown label, and other negatives are no class either)."""
    y = require("labels", labels, method)
    if bool((y < 0).any()):
        raise ValueError(f"labels must be >= 0 for {method}: {int((y < 0).sum())} of {n} examples "
                         f"have no label (-1){'; ' + hint if hint else ''}")
    return y
