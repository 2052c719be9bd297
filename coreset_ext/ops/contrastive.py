"""Fused contrastive losses: nt_xent (SimCLR), info_nce_queue (MoCo), pair_cosine.

Each loss is a functional custom op returning (per-row losses, per-row log-sum-exp, positive
cosines), all float32 (float64 for float64 inputs), with a backward custom op registered as its
autograd formula; `lse` is saved so the backward recomputes tiles without a second forward.
Triton serves CUDA tensors (and CPU tensors under TRITON_INTERPRET=1); on the CPU the compiled
kernels of `_C` serve ("cpp", csrc/cpu/contrastive_cpu.cpp: one call per pass, loops at small
sizes, blocked matrix products beyond), and the reference where `_C` is not built (one dense
block at small batches, chunked beyond), with the same analytic backward passes.

Outside torch.compile the public functions skip the custom-op layers: they call a plain
`torch.autograd.Function` whose forward and backward are the same implementation functions the
custom ops run (`_<op>_fwd`, `_<op>_bwd`) and whose setup is the same `setup_context`, so a
training step pays for one autograd node and the kernels, not for the dispatcher (issue 14: the
host time of a step; `benchmarks/bench_host.py` measures it against the eager loss). Under
torch.compile (`torch.compiler.is_compiling()`) they
call the custom ops, which the compiler traces through their fake kernels.

Autocast: every implementation runs with autocast off (the kernels accumulate in float32
whatever the input dtype, and the reference's products must not drop to bf16 mid-formula); the
outputs are as documented (float32 losses and cosines, gradients in the inputs' dtypes).

Scores: given `index` and `tracker`, the positive-pair cosines go to `tracker.record(index,
css=cos)`, which adds them to the tracker's sums and counts without a host synchronisation
(`coreset_ext.ScoreTracker` implements it; any object with that method will do).
"""

from __future__ import annotations

import functools

import torch

from coreset_ext import _backend, reference
from coreset_ext._validation import MIN_TEMPERATURE, check_same_device  # noqa: F401  (MIN_TEMPERATURE: public here)
from coreset_ext.ops.loss_family import (
    as_dtype, check_alike, check_loss_args, check_rows, choose_backend, eager_function, finish, run_loss, unaliased,
)

__all__ = ["nt_xent", "info_nce_queue", "pair_cosine", "MIN_TEMPERATURE"]



# ------------------------------------------------------------------------------------ nt_xent


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *, normalize: bool = True,
    reduction: str = "mean", index: torch.Tensor | None = None, tracker=None, scores: torch.Tensor | None = None,
    return_cos: bool = False, validate: bool | str = "device", backend: str | None = None,
):
    """SimCLR NT-Xent over the 2B rows [z1; z2], fused: never holds the 2B x 2B matrix.

    Row i's positive is its other view ((i + B) mod 2B); its own similarity is excluded. With
    `normalize` the rows are divided by max(||z||, reference.EPS) inside the op and gradients flow
    through that. `reduction` "mean" or "sum" over the 2B rows, or "none" for the [2B] row losses.
    Losses are float32 for float32/float16/bfloat16 inputs (fp32 accumulation throughout, under
    torch.autocast too). Their domain is what float32 can square: entries below 1e17 in magnitude
    (checking would cost a host synchronisation per step; non-finite inputs give a non-finite
    loss, never a plausible one).

    The positive-pair cosines cos(z1_i, z2_i) [B] (float32, no gradient) are the CSS scores of
    METHODS.md: given `index` [B] (dataset indices) and `tracker` (a `coreset_ext.ScoreTracker`
    with a "css" metric), they are added to the tracker's sums and counts (duplicates summed)
    without a host synchronisation: an out-of-range index or a non-finite cosine is left out and
    reported by the tracker's next host-side call (`mean`, `check`, `state_dict`, `save`).
    `return_cos=True` returns `(loss, cos)`. Low level: `scores=` (a float32 buffer) instead of
    `tracker` adds the cosines to that buffer alone through `ops.score_scatter_add_(...,
    validate=validate)`, counting nothing.

    `backend` None picks the fused Triton kernels on a GPU for d <= 256 (projection heads) and
    the reference otherwise; "triton" or "reference" forces one ("triton" up to d = 512).

    Example:
        >>> import torch, coreset_ext as cx
        >>> z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        >>> tracker = cx.ScoreTracker(100)
        >>> loss = cx.ops.nt_xent(z1, z2, temperature=0.5, index=torch.arange(8), tracker=tracker)
        >>> loss.backward()
        >>> z1.grad.shape, int(tracker.counts["css"].sum())
        (torch.Size([8, 16]), 8)
    """
    check_rows(z1=z1, z2=z2)
    check_alike("z1", z1, "z2", z2)
    t = check_loss_args(z1, temperature, reduction, index, tracker, scores)
    args = (z1, z2, t, bool(normalize), choose_backend("nt_xent", z1, backend))
    loss, cos = run_loss(torch.ops.coreset_ext.nt_xent_rows, _NTXentRows, args, reduction)
    return finish(loss, cos, index, tracker, scores, validate, return_cos)


def _nt_xent_fwd(z1: torch.Tensor, z2: torch.Tensor, temperature: float, normalize: bool, backend: str):
    """(rows [2B], lse [2B], cos [B]): what the custom op and the eager path both run."""
    with _backend.no_autocast(z1):
        if backend == "triton":
            return _triton().nt_xent_fwd(z1, z2, temperature, normalize, reference.EPS)
        if backend == "cpp":
            return _cpp("nt_xent_cpu")(z1, z2, temperature, normalize, reference.EPS)
        acc = reference.accumulation_dtype(z1)
        return reference.nt_xent_forward(as_dtype(z1, acc), as_dtype(z2, acc), temperature, normalize_input=normalize)


def _nt_xent_bwd(grad_rows, z1, z2, lse, temperature: float, normalize: bool, backend: str):
    """(dL/dz1, dL/dz2); the reference's are views of one buffer (no copy on the eager path)."""
    with _backend.no_autocast(z1):
        if backend == "triton":
            return _triton().nt_xent_bwd(grad_rows, z1, z2, lse.contiguous(), temperature, normalize, reference.EPS)
        if backend == "cpp":  # two separate buffers
            return _cpp("nt_xent_backward_cpu")(grad_rows, z1, z2, lse, temperature, normalize, reference.EPS)
        acc = reference.accumulation_dtype(z1)
        g1, g2 = reference.nt_xent_rows_backward(as_dtype(grad_rows, acc), as_dtype(z1, acc), as_dtype(z2, acc), temperature,
                                                normalize_input=normalize, lse=as_dtype(lse, acc))
        return as_dtype(g1, z1.dtype), as_dtype(g2, z2.dtype)


@torch.library.custom_op("coreset_ext::nt_xent_rows", mutates_args=())
def _nt_xent_rows_op(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, normalize: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _nt_xent_fwd(z1, z2, temperature, normalize, backend)


@_nt_xent_rows_op.register_fake
def _(z1, z2, temperature, normalize, backend):
    acc = reference.accumulation_dtype(z1)
    n = z1.shape[0]
    return z1.new_empty(2 * n, dtype=acc), z1.new_empty(2 * n, dtype=acc), z1.new_empty(n, dtype=acc)


@torch.library.custom_op("coreset_ext::nt_xent_rows_backward", mutates_args=())
def _nt_xent_rows_backward_op(
    grad_rows: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, lse: torch.Tensor, temperature: float,
    normalize: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return unaliased(_nt_xent_bwd(grad_rows, z1, z2, lse, temperature, normalize, backend))


@_nt_xent_rows_backward_op.register_fake
def _(grad_rows, z1, z2, lse, temperature, normalize, backend):
    return torch.empty_like(z1), torch.empty_like(z2)


def _nt_xent_setup(ctx, inputs, output):
    z1, z2, temperature, normalize, backend = inputs
    ctx.save_for_backward(z1, z2, output[1])
    ctx.args = (temperature, normalize, backend)
    # lse and the positive cosines are outputs without a gradient: say so, so that autograd
    # refuses to backpropagate through them rather than silently returning zeros
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero tensors for the gradients of lse and cos


def _nt_xent_backward(ctx, grad_rows, grad_lse, grad_cos, bwd=_nt_xent_rows_backward_op):
    if grad_rows is None:
        return None, None, None, None, None
    z1, z2, lse = ctx.saved_tensors
    g1, g2 = bwd(grad_rows, z1, z2, lse, *ctx.args)
    return g1, g2, None, None, None


_nt_xent_rows_op.register_autograd(_nt_xent_backward, setup_context=_nt_xent_setup)


# The eager path: the custom op's implementation, setup and formula as one plain Function node.
_NTXentRows = eager_function("_NTXentRows", _nt_xent_fwd, _nt_xent_setup, _nt_xent_backward, _nt_xent_bwd,
                              reduces=True)


# ----------------------------------------------------------------------------- info_nce_queue


def info_nce_queue(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2, *,
    normalize: bool = True, reduction: str = "mean", index: torch.Tensor | None = None, tracker=None,
    scores: torch.Tensor | None = None, return_cos: bool = False, validate: bool | str = "device",
    backend: str | None = None,
):
    """MoCo InfoNCE of queries q [B, d] against their keys k [B, d] and a negative queue [K, d].

        loss_i = -<q_i, k_i>/t + log( exp(<q_i, k_i>/t) + sum_j exp(<q_i, queue_j>/t) )

    (rows normalised when `normalize`). Only q receives gradients; k and the queue are treated as
    constants (k and queue are cast to q's dtype if they differ). On the GPU the queue is split
    across programs, so a small batch against a 65,536-entry queue still fills the device. Scores
    (cos(q_i, k_i)), `index`, `tracker`, `scores`, `validate`, `return_cos` and `reduction` are as
    in `nt_xent`.

    Example:
        >>> import torch, coreset_ext as cx
        >>> q = torch.randn(4, 8, requires_grad=True)
        >>> loss = cx.ops.info_nce_queue(q, torch.randn(4, 8), torch.randn(32, 8))
        >>> loss.backward()
        >>> q.grad.shape
        torch.Size([4, 8])
    """
    check_rows(q=q, k=k, queue=queue)
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must have q's dimension {q.shape[1]}, got shape {tuple(queue.shape)}")
    check_same_device(q=q, k=k, queue=queue)
    t = check_loss_args(q, temperature, reduction, index, tracker, scores)
    args = (q, k, queue, t, bool(normalize), choose_backend("info_nce_queue", q, backend))
    loss, cos = run_loss(torch.ops.coreset_ext.info_nce_queue_rows, _InfoNCEQueueRows, args, reduction)
    return finish(loss, cos, index, tracker, scores, validate, return_cos)


def _info_nce_fwd(q, k, queue, temperature: float, normalize: bool, backend: str):
    """(rows [B], lse [B], cos [B]): what the custom op and the eager path both run."""
    with _backend.no_autocast(q):
        if backend == "triton":
            qc, kc, quc = (t.to(q.dtype).contiguous() for t in (q, k, queue))
            return _triton().info_nce_queue_fwd(qc, kc, quc, temperature, normalize, reference.EPS)
        if backend == "cpp":
            return _cpp("info_nce_queue_cpu")(q, k, queue, temperature, normalize, reference.EPS)
        acc = reference.accumulation_dtype(q)
        return reference.info_nce_queue_forward(as_dtype(q, acc), as_dtype(k, acc), as_dtype(queue, acc), temperature,
                                                normalize_input=normalize)


def _info_nce_bwd(grad_rows, q, k, queue, lse, temperature: float, normalize: bool, backend: str):
    """dL/dq."""
    with _backend.no_autocast(q):
        if backend == "triton":
            qc, kc, quc = (t.to(q.dtype).contiguous() for t in (q, k, queue))
            return _triton().info_nce_queue_bwd(grad_rows, qc, kc, quc, lse.contiguous(), temperature, normalize,
                                                reference.EPS)
        if backend == "cpp":
            return _cpp("info_nce_queue_backward_cpu")(grad_rows, q, k, queue, lse, temperature, normalize,
                                                       reference.EPS)
        acc = reference.accumulation_dtype(q)
        gq = reference.info_nce_queue_rows_backward(as_dtype(grad_rows, acc), as_dtype(q, acc), as_dtype(k, acc), as_dtype(queue, acc),
                                                    temperature, normalize_input=normalize, lse=as_dtype(lse, acc))
        return as_dtype(gq, q.dtype)


@torch.library.custom_op("coreset_ext::info_nce_queue_rows", mutates_args=())
def _info_nce_queue_rows_op(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, normalize: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _info_nce_fwd(q, k, queue, temperature, normalize, backend)


@_info_nce_queue_rows_op.register_fake
def _(q, k, queue, temperature, normalize, backend):
    acc = reference.accumulation_dtype(q)
    n = q.shape[0]
    return q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc)


@torch.library.custom_op("coreset_ext::info_nce_queue_rows_backward", mutates_args=())
def _info_nce_queue_rows_backward_op(
    grad_rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, lse: torch.Tensor,
    temperature: float, normalize: bool, backend: str,
) -> torch.Tensor:
    return unaliased((_info_nce_bwd(grad_rows, q, k, queue, lse, temperature, normalize, backend),))[0]


@_info_nce_queue_rows_backward_op.register_fake
def _(grad_rows, q, k, queue, lse, temperature, normalize, backend):
    return torch.empty_like(q)


def _info_nce_setup(ctx, inputs, output):
    q, k, queue, temperature, normalize, backend = inputs
    # the queue is saved, not copied: an in-place write to it before the backward (MoCoLoss's
    # enqueue done too early) bumps its version and autograd refuses the stale gradient
    ctx.save_for_backward(q, k, queue, output[1])
    ctx.args = (temperature, normalize, backend)
    ctx.mark_non_differentiable(output[1], output[2])  # as in _nt_xent_setup
    ctx.set_materialize_grads(False)


def _info_nce_backward(ctx, grad_rows, grad_lse, grad_cos, bwd=_info_nce_queue_rows_backward_op):
    # Only q learns: k comes from the momentum encoder and the queue holds past keys.
    if grad_rows is None:
        return None, None, None, None, None, None
    q, k, queue, lse = ctx.saved_tensors
    return bwd(grad_rows, q, k, queue, lse, *ctx.args), None, None, None, None, None


_info_nce_queue_rows_op.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)


_InfoNCEQueueRows = eager_function("_InfoNCEQueueRows", _info_nce_fwd, _info_nce_setup, _info_nce_backward,
                                    _info_nce_bwd, reduces=True)


# -------------------------------------------------------------------------------- pair_cosine


def pair_cosine(a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Row-wise cosine <a_i, b_i> / (max(||a_i||, EPS) max(||b_i||, EPS)) [B], fused, with gradients
    for a and b. float32 for float32/float16/bfloat16 inputs (under torch.autocast too).

    Example:
        >>> import torch, coreset_ext as cx
        >>> a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> cx.ops.pair_cosine(a, torch.tensor([[1.0, 1.0], [0.0, -1.0]]))
        tensor([ 0.7071, -1.0000])
    """
    check_rows(a=a, b=b)
    check_alike("a", a, "b", b)
    args = (a, b, choose_backend("pair_cosine", a, backend))
    if torch.compiler.is_compiling():
        return torch.ops.coreset_ext.pair_cosine(*args)
    return _PairCosine.apply(*args)


def _pair_cosine_fwd(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    with _backend.no_autocast(a):
        if backend == "triton":
            return _triton().pair_cosine_fwd(a.contiguous(), b.contiguous(), reference.EPS)
        if backend == "cpp":
            return _cpp("pair_cosine_cpu")(a, b, reference.EPS)
        acc = reference.accumulation_dtype(a)
        return reference.pair_cosine(as_dtype(a, acc), as_dtype(b, acc))


def _pair_cosine_bwd(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend: str):
    with _backend.no_autocast(a):
        if backend == "triton":
            return _triton().pair_cosine_bwd(grad, a.contiguous(), b.contiguous(), reference.EPS)
        if backend == "cpp":
            return _cpp("pair_cosine_backward_cpu")(grad, a, b, reference.EPS)
        acc = reference.accumulation_dtype(a)
        ga, gb = reference.pair_cosine_backward(as_dtype(grad, acc), as_dtype(a, acc), as_dtype(b, acc))
        return as_dtype(ga, a.dtype), as_dtype(gb, b.dtype)


@torch.library.custom_op("coreset_ext::pair_cosine", mutates_args=())
def _pair_cosine_op(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    return _pair_cosine_fwd(a, b, backend)


@_pair_cosine_op.register_fake
def _(a, b, backend):
    return a.new_empty(a.shape[0], dtype=reference.accumulation_dtype(a))


@torch.library.custom_op("coreset_ext::pair_cosine_backward", mutates_args=())
def _pair_cosine_backward_op(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return unaliased(_pair_cosine_bwd(grad, a, b, backend))


@_pair_cosine_backward_op.register_fake
def _(grad, a, b, backend):
    return torch.empty_like(a), torch.empty_like(b)


def _pair_cosine_setup(ctx, inputs, output):
    a, b, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = backend


def _pair_cosine_backward(ctx, grad, bwd=_pair_cosine_backward_op):
    a, b = ctx.saved_tensors
    ga, gb = bwd(grad, a, b, ctx.backend)
    return ga, gb, None


_pair_cosine_op.register_autograd(_pair_cosine_backward, setup_context=_pair_cosine_setup)


_PairCosine = eager_function("_PairCosine", _pair_cosine_fwd, _pair_cosine_setup, _pair_cosine_backward,
                              _pair_cosine_bwd, reduces=False)

for _op in ("nt_xent", "info_nce_queue", "pair_cosine"):
    _backend.register_op(_op, gpu=("triton",), cpu=("cpp", "reference"))


# ------------------------------------------------------------------------ shared by the family


@functools.cache
def _cpp(name: str):
    """The compiled CPU kernel `name` of csrc/ops.cpp as its overload (one lookup per process: the
    overload is the cheapest way in, measured about 5 us less per call than torch.ops' packet)."""
    return getattr(torch.ops.coreset_ext, name).default


def _triton():
    from coreset_ext.triton_kernels import contrastive  # Triton is optional: imported when used

    return contrastive
