"""potential_mining: contrastive learning with mined potential samples (METHODS.md section 4).

A weighted InfoNCE whose positives are each anchor's augmented view plus the top-k cosine
neighbours of that view among the candidates (the batch, or MoCo's queue), and whose negatives
are the candidates in a band of similarity to the anchor (see `reference.potential_mining_rows`,
the contract, and `reference.mine_potential_samples`, the selection). The op returns (per-row
losses, per-row log-sum-exp, positive cosines, and the selection: mined indices, their weights,
the band's per-row thresholds), with a backward op registered as its autograd formula; the
selection is a constant of the loss (no gradient flows through which samples are picked).

Backends: Triton on CUDA (and CPU tensors under TRITON_INTERPRET=1; triton_kernels/mining.py:
the mining through the streaming top-k kernel, the band's log-sum-exp and its backward in tiles,
never an n x n or n x K matrix); on the CPU the reference (chunked torch, analytic backward).
Outside torch.compile the public function runs one plain autograd.Function built from the same
implementation, setup and formula as the custom op (`ops.contrastive`'s eager path, whose
helpers it shares: one family, one set of argument checks).
"""

from __future__ import annotations

import torch

from coreset_ext import _backend, reference
from coreset_ext._validation import (
    MIN_TEMPERATURE,
    Interval,
    Options,
    check,
    check_same_device,
    finite_float,
    is_int,
    is_real,
)
from coreset_ext.ops.loss_family import (
    as_dtype, check_alike, check_loss_args, check_rows, choose_backend, eager_function, finish, run_loss, unaliased,
)
from coreset_ext.ops.similarity import TOPK_TRITON_MAX_K

__all__ = ["potential_mining"]

WEIGHTINGS = Options(*reference.MINING_WEIGHTINGS)
COSINE = Interval(float, -1, 1)
MAX_MINED_WEIGHT = 1e30


def potential_mining(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, temperature: float = 0.5, *,
    n_mined: int = reference.MINING_K, weighting: str = reference.MINING_WEIGHTING,
    weight_temperature: float = reference.MINING_WEIGHT_TEMPERATURE, threshold: float = reference.MINING_THRESHOLD,
    mined_weight: float = reference.MINING_MINED_WEIGHT, band: tuple[float, float] = reference.MINING_BAND,
    reduction: str = "mean", index: torch.Tensor | None = None, tracker=None, scores: torch.Tensor | None = None,
    return_cos: bool = False, validate: bool | str = "device", backend: str | None = None,
):
    """Contrastive loss with mined potential positives and a band of negatives, fused.

    SimCLR form (`queue` None): q and k are the two views z1, z2 [B, d] (B >= 2); the 2B rows
    [z1; z2] are the anchors, each one's candidates the other 2B - 2 rows; the loss averages 2B
    rows. MoCo form: q the queries [B, d] (the only input that learns), k their keys, `queue`
    [K, d] the candidates; B rows. For each anchor (rows normalised):

    - positives: its view (weight 1) and its `n_mined` (k, default 4) candidates most
      cosine-similar to its view, weighted by `weighting`: "soft" (default; softmax of their
      cosines / `weight_temperature`, default 0.1, at least 1e-4), "threshold" (equal weights for
      those with cosine >= `threshold`, default 0.9; none may pass) or "top1" (the nearest alone);
      the mined weights sum to `mined_weight` (default 1, at most 1e30) and all are normalised
      with the view's 1;
    - negatives: the candidates whose cosine s to the anchor lies in the band
      -1 + lower (1 + c) <= s <= -1 + upper (1 + c), c the anchor's cosine to its view,
      `band` = (lower, upper) in [0, 1] (default (0.25, 1.0): drop those more similar than the
      positive, likely false negatives, and the easiest tail);
    - loss: log(sum of exp(s/t) over the positives and kept negatives) - weighted mean of the
      positives' s/t. A row whose band keeps no negative is the same over its positives alone
      (finite; 0 when its view is its only positive).

    The selection carries no gradient. `reduction`, `index`/`tracker` (the positive cosines
    cos(q_i, k_i), the CSS scores), `scores`, `validate`, `return_cos` as in `ops.nt_xent`.
    `backend` None: Triton on a GPU (d <= 256, n_mined < 128), else the reference.

    Example:
        >>> import torch, coreset_ext as cx
        >>> z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
        >>> loss = cx.ops.potential_mining(z1, z2, n_mined=2)
        >>> loss.backward()
        >>> z1.grad.shape
        torch.Size([8, 16])
        >>> q, queue = torch.randn(4, 16, requires_grad=True), torch.randn(32, 16)
        >>> cx.ops.potential_mining(q, torch.randn(4, 16), queue, 0.2, weighting="top1").backward()
    """
    check_rows(q=q, k=k, **({} if queue is None else {"queue": queue}))
    check_alike("q", q, "k", k)
    if queue is None:
        if q.shape[0] < 2:
            raise ValueError(f"q must hold at least 2 rows (a batch of {q.shape[0]} has no candidates to mine or "
                             "to contrast with)")
        n_candidates, what = 2 * q.shape[0] - 2, "the other 2B - 2 rows of the batch"
    else:
        if queue.shape[1] != q.shape[1]:
            raise ValueError(f"queue must have q's dimension {q.shape[1]}, got shape {tuple(queue.shape)}")
        check_same_device(q=q, queue=queue)
        queue = as_dtype(queue, q.dtype)  # the queue is a buffer of the module's own dtype
        n_candidates, what = queue.shape[0], "the rows of the queue"
    if not is_int(n_mined) or not 1 <= n_mined <= n_candidates:
        raise ValueError(f"n_mined must be an int between 1 and {n_candidates} ({what}), got {n_mined!r}")
    options = check_options(weighting, weight_temperature, threshold, mined_weight, band)
    t = check_loss_args(q, temperature, reduction, index, tracker, scores)
    chosen = choose_backend("potential_mining", q, backend)
    if chosen == "triton" and n_mined + 1 > TOPK_TRITON_MAX_K:  # the SimCLR form mines one more (see kernels)
        if backend is not None:
            raise ValueError(f"n_mined={n_mined} is above {TOPK_TRITON_MAX_K - 1}, the most backend='triton' serves")
        chosen = "reference"
    args = (q, k, queue, t, int(n_mined), *options, chosen)
    loss, cos = run_loss(torch.ops.coreset_ext.potential_mining_rows, _PotentialMiningRows, args, reduction)
    return finish(loss, cos, index, tracker, scores, validate, return_cos)


def check_options(weighting, weight_temperature, threshold, mined_weight, band) -> tuple:
    """(weighting, weight_temperature, threshold, mined_weight, lower, upper), checked as
    `potential_mining` checks them (ValueError naming the argument); nn.PotentialMiningLoss checks
    its settings with it when built."""
    weighting = check("weighting", weighting, WEIGHTINGS)
    # the soft weights are softmax(cos / weight_temperature) in float32: a tiny weight_temperature
    # (1e-40) overflows it to Inf and makes every weight NaN; MIN_TEMPERATURE bounds it as for the loss's
    weight_temperature = finite_float("weight_temperature", weight_temperature)
    if weight_temperature < MIN_TEMPERATURE:
        raise ValueError(f"weight_temperature must be a real number >= {MIN_TEMPERATURE}, got {weight_temperature!r}")
    threshold = check("threshold", threshold, COSINE)
    # mined_weight scales float32 weights: past MAX_MINED_WEIGHT (below float32's 3.4e38) it is Inf
    # there and the loss NaN
    mined_weight = finite_float("mined_weight", mined_weight)
    if not 0 <= mined_weight <= MAX_MINED_WEIGHT:
        raise ValueError(f"mined_weight must be a real number in [0, {MAX_MINED_WEIGHT:g}], got {mined_weight!r}")
    if not (isinstance(band, (tuple, list)) and len(band) == 2 and all(is_real(e) for e in band)
            and all(0 <= e <= 1 for e in band)):
        raise ValueError(f"band must be two edges (lower, upper) in [0, 1], got {band!r}")
    if band[0] > band[1]:
        raise ValueError(f"band is inverted: lower {band[0]} > upper {band[1]}; give (lower, upper)")
    return weighting, weight_temperature, float(threshold), mined_weight, float(band[0]), float(band[1])


def _select(q, k, queue, n_mined, weighting, weight_temperature, threshold, mined_weight, lower, upper):
    return reference.mine_potential_samples(q, k, queue, n_mined=n_mined, weighting=weighting,
                                            weight_temperature=weight_temperature, threshold=threshold,
                                            mined_weight=mined_weight, band=(lower, upper))


def _mining_fwd(q, k, queue, temperature: float, n_mined: int, weighting: str, weight_temperature: float,
                threshold: float, mined_weight: float, lower: float, upper: float, backend: str):
    """(rows [n], lse [n], cos [B], index [n, n_mined], alpha [n, n_mined], edges [n, 2])."""
    with _backend.no_autocast(q):
        if backend == "triton":
            from coreset_ext.triton_kernels import mining  # Triton is optional: imported when used

            return mining.potential_mining_fwd(q, k, queue, temperature, n_mined, weighting, weight_temperature,
                                               threshold, mined_weight, lower, upper, reference.EPS)
        acc = reference.accumulation_dtype(q)
        q, k = as_dtype(q, acc), as_dtype(k, acc)
        queue = None if queue is None else as_dtype(queue, acc)
        selection = _select(q, k, queue, n_mined, weighting, weight_temperature, threshold, mined_weight, lower,
                            upper)
        return (*reference.potential_mining_forward(q, k, queue, temperature, selection), *selection)


def _mining_bwd(grad_rows, q, k, queue, lse, index, alpha, edges, temperature: float, backend: str):
    """(dL/dq, dL/dk); dL/dk is empty for the MoCo form (only q learns)."""
    with _backend.no_autocast(q):
        if backend == "triton":
            from coreset_ext.triton_kernels import mining

            gq, gk = mining.potential_mining_bwd(grad_rows, q, k, queue, lse, index, alpha, edges, temperature,
                                                 reference.EPS)
        else:
            acc = reference.accumulation_dtype(q)
            queue_acc = None if queue is None else as_dtype(queue, acc)
            gq, gk = reference.potential_mining_rows_backward(
                as_dtype(grad_rows, acc), as_dtype(q, acc), as_dtype(k, acc), queue_acc, temperature,
                (index, as_dtype(alpha, acc), as_dtype(edges, acc)), as_dtype(lse, acc))
        gq = as_dtype(gq, q.dtype)
        return gq, (q.new_empty(0) if gk is None else as_dtype(gk, k.dtype))


@torch.library.custom_op("coreset_ext::potential_mining_rows", mutates_args=())
def _potential_mining_rows_op(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, temperature: float, n_mined: int, weighting: str,
    weight_temperature: float, threshold: float, mined_weight: float, lower: float, upper: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return unaliased(_mining_fwd(q, k, queue, temperature, n_mined, weighting, weight_temperature, threshold,
                                  mined_weight, lower, upper, backend))


@_potential_mining_rows_op.register_fake
def _(q, k, queue, temperature, n_mined, weighting, weight_temperature, threshold, mined_weight, lower, upper,
      backend):
    acc = reference.accumulation_dtype(q)
    b = q.shape[0]
    n = b if queue is not None else 2 * b
    return (q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc), q.new_empty(b, dtype=acc),
            q.new_empty(n, n_mined, dtype=torch.int64), q.new_empty(n, n_mined, dtype=acc), q.new_empty(n, 2, dtype=acc))


@torch.library.custom_op("coreset_ext::potential_mining_rows_backward", mutates_args=())
def _potential_mining_rows_backward_op(
    grad_rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, lse: torch.Tensor,
    index: torch.Tensor, alpha: torch.Tensor, edges: torch.Tensor, temperature: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return unaliased(_mining_bwd(grad_rows, q, k, queue, lse, index, alpha, edges, temperature, backend))


@_potential_mining_rows_backward_op.register_fake
def _(grad_rows, q, k, queue, lse, index, alpha, edges, temperature, backend):
    return torch.empty_like(q), (torch.empty_like(k) if queue is None else q.new_empty(0))


def _mining_setup(ctx, inputs, output):
    q, k, queue, temperature, *_, backend = inputs
    _, lse, cos, index, alpha, edges = output
    # the queue is saved, not copied (as in ops.info_nce_queue: a write into it before the
    # backward bumps its version, and autograd refuses the stale gradient)
    ctx.save_for_backward(q, k, queue, lse, index, alpha, edges)
    ctx.args = (temperature, backend)
    ctx.moco = queue is not None
    ctx.mark_non_differentiable(lse, cos, index, alpha, edges)
    ctx.set_materialize_grads(False)


def _mining_backward(ctx, grad_rows, *grads, bwd=_potential_mining_rows_backward_op):
    none = (None,) * 10
    if grad_rows is None:
        return (None, None, *none)
    gq, gk = bwd(grad_rows, *ctx.saved_tensors, *ctx.args)
    return (gq, None if ctx.moco else gk, *none)


_potential_mining_rows_op.register_autograd(_mining_backward, setup_context=_mining_setup)

_PotentialMiningRows = eager_function("_PotentialMiningRows", _mining_fwd, _mining_setup, _mining_backward,
                                       _mining_bwd, reduces=True)

_backend.register_op("potential_mining", gpu=("triton",), cpu=("reference",))
