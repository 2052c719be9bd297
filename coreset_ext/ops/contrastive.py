"""Fused contrastive losses: nt_xent (SimCLR), info_nce_queue (MoCo), pair_cosine.

Each loss is a functional custom op returning (per-row losses, per-row log-sum-exp, positive
cosines), all float32 (float64 for float64 inputs), with a backward custom op registered as its
autograd formula; `lse` is saved so the backward recomputes tiles without a second forward.
Triton serves CUDA tensors (and CPU tensors under TRITON_INTERPRET=1); elsewhere the chunked
reference serves, with analytic backward passes.
"""

from __future__ import annotations

import torch

from coreset_ext import _backend, reference
from coreset_ext._validation import (  # noqa: F401  (MIN_TEMPERATURE: public here, where it applies)
    MIN_TEMPERATURE, REDUCTIONS, check, check_per_row, check_same_device, check_tensor, check_temperature,
)
from coreset_ext.ops.scatter import INDEX_DTYPES, score_scatter_add_

__all__ = ["nt_xent", "info_nce_queue", "pair_cosine", "MIN_TEMPERATURE"]

LOSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_MAX_D = 256  # = triton_kernels.contrastive.MAX_D (not imported: Triton may be absent)
# Widest d the loss kernels take when Triton is requested by name: beyond it their tiles need more
# shared memory than a GPU has (fp32, d = 1024: 196,608 bytes; an A100 has 166,912) and spill
# kilobytes of registers per thread (tools/triton_aot.py).
TRITON_MAX_D_REQUESTED = 512


# ------------------------------------------------------------------------------------ nt_xent


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *, normalize: bool = True,
    reduction: str = "mean", index: torch.Tensor | None = None, scores: torch.Tensor | None = None,
    return_cos: bool = False, validate: bool = True, backend: str | None = None,
):
    """SimCLR NT-Xent over the 2B rows [z1; z2], fused: never holds the 2B x 2B matrix.

    Row i's positive is its other view ((i + B) mod 2B); its own similarity is excluded. With
    `normalize` the rows are divided by max(||z||, reference.EPS) inside the op and gradients flow
    through that. `reduction` "mean" or "sum" over the 2B rows, or "none" for the [2B] row losses.
    Losses are float32 for float32/float16/bfloat16 inputs (fp32 accumulation throughout). Their
    domain is what float32 can square: entries below 1e17 in magnitude (checking would cost a host
    synchronisation per step; non-finite inputs give a non-finite loss, never a plausible one).

    The positive-pair cosines cos(z1_i, z2_i) [B] (float32, no gradient) are the CSS scores of
    METHODS.md: given `index` [B] (dataset indices) and `scores` (a float32 buffer such as
    `tracker.sums["css"]`), they are scatter-added into `scores` (duplicates summed) by
    `score_scatter_add_`, whose index range check costs one host sync on the GPU unless
    `validate=False`; `return_cos=True` returns `(loss, cos)`.

    `backend` None picks the fused Triton kernels on a GPU for d <= 256 (projection heads) and
    the chunked reference otherwise; "triton" or "reference" forces one ("triton" up to d = 512).

    Example:
        >>> import torch, coreset_ext as cx
        >>> z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        >>> loss = cx.ops.nt_xent(z1, z2, temperature=0.5)
        >>> loss.backward()
        >>> z1.grad.shape
        torch.Size([8, 16])
    """
    _check_rows(z1=z1, z2=z2)
    _check_alike("z1", z1, "z2", z2)
    t = _check_loss_args(z1, temperature, reduction, index, scores)
    rows, _, cos = torch.ops.coreset_ext.nt_xent_rows(z1, z2, t, bool(normalize),
                                                      _choose_backend("nt_xent", z1, backend))
    return _finish(rows, cos, reduction, index, scores, validate, return_cos)


@torch.library.custom_op("coreset_ext::nt_xent_rows", mutates_args=())
def _nt_xent_rows_op(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, normalize: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _triton().nt_xent_fwd(z1, z2, temperature, normalize, reference.EPS)
    acc = reference.accumulation_dtype(z1)
    a, b = z1.to(acc), z2.to(acc)
    rows, cos = reference.nt_xent_rows(a, b, temperature, normalize_input=normalize)
    lse = reference.nt_xent_lse(a, b, rows, temperature, normalize_input=normalize)
    return rows, lse, cos


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
    if backend == "triton":
        return _triton().nt_xent_bwd(grad_rows, z1, z2, lse.contiguous(), temperature, normalize, reference.EPS)
    acc = reference.accumulation_dtype(z1)
    g1, g2 = reference.nt_xent_rows_backward(grad_rows.to(acc), z1.to(acc), z2.to(acc), temperature,
                                            normalize_input=normalize, lse=lse.to(acc))
    # g1 and g2 are views of one buffer; a custom op's outputs must not alias each other.
    return g1.to(z1.dtype, copy=True), g2.to(z2.dtype, copy=True)


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


def _nt_xent_backward(ctx, grad_rows, grad_lse, grad_cos):
    z1, z2, lse = ctx.saved_tensors
    g1, g2 = _nt_xent_rows_backward_op(grad_rows, z1, z2, lse, *ctx.args)
    return g1, g2, None, None, None


_nt_xent_rows_op.register_autograd(_nt_xent_backward, setup_context=_nt_xent_setup)


# ----------------------------------------------------------------------------- info_nce_queue


def info_nce_queue(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2, *,
    normalize: bool = True, reduction: str = "mean", index: torch.Tensor | None = None,
    scores: torch.Tensor | None = None, return_cos: bool = False, validate: bool = True,
    backend: str | None = None,
):
    """MoCo InfoNCE of queries q [B, d] against their keys k [B, d] and a negative queue [K, d].

        loss_i = -<q_i, k_i>/t + log( exp(<q_i, k_i>/t) + sum_j exp(<q_i, queue_j>/t) )

    (rows normalised when `normalize`). Only q receives gradients; k and the queue are treated as
    constants (k and queue are cast to q's dtype if they differ). On the GPU the queue is split
    across programs, so a small batch against a 65,536-entry queue still fills the device. Scores
    (cos(q_i, k_i)), `index`, `scores`, `validate`, `return_cos` and `reduction` are as in `nt_xent`.

    Example:
        >>> import torch, coreset_ext as cx
        >>> q = torch.randn(4, 8, requires_grad=True)
        >>> loss = cx.ops.info_nce_queue(q, torch.randn(4, 8), torch.randn(32, 8))
        >>> loss.backward()
        >>> q.grad.shape
        torch.Size([4, 8])
    """
    _check_rows(q=q, k=k, queue=queue)
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must have q's dimension {q.shape[1]}, got shape {tuple(queue.shape)}")
    check_same_device(q=q, k=k, queue=queue)
    t = _check_loss_args(q, temperature, reduction, index, scores)
    rows, _, cos = torch.ops.coreset_ext.info_nce_queue_rows(q, k, queue, t, bool(normalize),
                                                             _choose_backend("info_nce_queue", q, backend))
    return _finish(rows, cos, reduction, index, scores, validate, return_cos)


@torch.library.custom_op("coreset_ext::info_nce_queue_rows", mutates_args=())
def _info_nce_queue_rows_op(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, normalize: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        qc, kc, quc = (t.to(q.dtype).contiguous() for t in (q, k, queue))
        return _triton().info_nce_queue_fwd(qc, kc, quc, temperature, normalize, reference.EPS)
    acc = reference.accumulation_dtype(q)
    a, b, c = q.to(acc), k.to(acc), queue.to(acc)
    rows, cos = reference.info_nce_queue_rows(a, b, c, temperature, normalize_input=normalize)
    lse = reference.info_nce_queue_lse(a, b, rows, temperature, normalize_input=normalize)
    return rows, lse, cos


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
    if backend == "triton":
        qc, kc, quc = (t.to(q.dtype).contiguous() for t in (q, k, queue))
        return _triton().info_nce_queue_bwd(grad_rows, qc, kc, quc, lse.contiguous(), temperature, normalize,
                                            reference.EPS)
    acc = reference.accumulation_dtype(q)
    gq = reference.info_nce_queue_rows_backward(grad_rows.to(acc), q.to(acc), k.to(acc), queue.to(acc),
                                                temperature, normalize_input=normalize, lse=lse.to(acc))
    return gq.to(q.dtype)


@_info_nce_queue_rows_backward_op.register_fake
def _(grad_rows, q, k, queue, lse, temperature, normalize, backend):
    return torch.empty_like(q)


def _info_nce_setup(ctx, inputs, output):
    q, k, queue, temperature, normalize, backend = inputs
    ctx.save_for_backward(q, k, queue, output[1])
    ctx.args = (temperature, normalize, backend)
    ctx.mark_non_differentiable(output[1], output[2])  # as in _nt_xent_setup


def _info_nce_backward(ctx, grad_rows, grad_lse, grad_cos):
    # Only q learns: k comes from the momentum encoder and the queue holds past keys.
    q, k, queue, lse = ctx.saved_tensors
    gq = _info_nce_queue_rows_backward_op(grad_rows, q, k, queue, lse, *ctx.args)
    return gq, None, None, None, None, None


_info_nce_queue_rows_op.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)


# -------------------------------------------------------------------------------- pair_cosine


def pair_cosine(a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Row-wise cosine <a_i, b_i> / (max(||a_i||, EPS) max(||b_i||, EPS)) [B], fused, with gradients
    for a and b. float32 for float32/float16/bfloat16 inputs.

    Example:
        >>> import torch, coreset_ext as cx
        >>> a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> cx.ops.pair_cosine(a, torch.tensor([[1.0, 1.0], [0.0, -1.0]]))
        tensor([ 0.7071, -1.0000])
    """
    _check_rows(a=a, b=b)
    _check_alike("a", a, "b", b)
    return torch.ops.coreset_ext.pair_cosine(a, b, _choose_backend("pair_cosine", a, backend))


@torch.library.custom_op("coreset_ext::pair_cosine", mutates_args=())
def _pair_cosine_op(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _triton().pair_cosine_fwd(a.contiguous(), b.contiguous(), reference.EPS)
    acc = reference.accumulation_dtype(a)
    return reference.pair_cosine(a.to(acc), b.to(acc))


@_pair_cosine_op.register_fake
def _(a, b, backend):
    return a.new_empty(a.shape[0], dtype=reference.accumulation_dtype(a))


@torch.library.custom_op("coreset_ext::pair_cosine_backward", mutates_args=())
def _pair_cosine_backward_op(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _triton().pair_cosine_bwd(grad, a.contiguous(), b.contiguous(), reference.EPS)
    acc = reference.accumulation_dtype(a)
    ga, gb = reference.pair_cosine_backward(grad.to(acc), a.to(acc), b.to(acc))
    return ga.to(a.dtype), gb.to(b.dtype)


@_pair_cosine_backward_op.register_fake
def _(grad, a, b, backend):
    return torch.empty_like(a), torch.empty_like(b)


def _pair_cosine_setup(ctx, inputs, output):
    a, b, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = backend


def _pair_cosine_backward(ctx, grad):
    a, b = ctx.saved_tensors
    ga, gb = _pair_cosine_backward_op(grad, a, b, ctx.backend)
    return ga, gb, None


_pair_cosine_op.register_autograd(_pair_cosine_backward, setup_context=_pair_cosine_setup)

for _op in ("nt_xent", "info_nce_queue", "pair_cosine"):
    _backend.register_op(_op, gpu=("triton",), cpu=("reference",))


# ------------------------------------------------------------------------ shared by the family


def _check_rows(**inputs) -> None:
    """Each input a non-empty [batch, dim] tensor of a loss dtype."""
    for name, x in inputs.items():
        check_tensor(name, x, dim=2, dtypes=LOSS_DTYPES, what="[batch, dim]")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")


def _check_alike(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """The two views of one batch: same shape, dtype and device."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} and {name_b} must share a dtype, got {a.dtype} and {b.dtype}")
    check_same_device(**{name_a: a, name_b: b})


def _check_loss_args(x: torch.Tensor, temperature, reduction, index, scores) -> float:
    """The arguments every loss takes beside its inputs; returns the temperature as a float."""
    t = check_temperature(temperature)
    check("reduction", reduction, REDUCTIONS)
    if (index is None) != (scores is None):
        raise ValueError("index and scores must be given together (index: dataset indices of the batch, "
                         "scores: the float32 buffer to add the positive cosines into)")
    if index is not None:
        check_per_row("index", index, "the batch", x, dtypes=INDEX_DTYPES)
    return t


def _choose_backend(op: str, x: torch.Tensor, requested: str | None) -> str:
    """The backend that runs: Triton has no float64 path, so float64 goes to the reference, and
    its tiles are sized for d <= 256 (projection heads), so wider inputs do too unless Triton was
    requested by name."""
    d = x.shape[-1]
    if requested == "triton" and op != "pair_cosine" and d > TRITON_MAX_D_REQUESTED:
        raise ValueError(f"backend='triton' takes feature dimensions up to {TRITON_MAX_D_REQUESTED} for "
                         f"{op}, got d = {d}; leave backend=None to use the reference")
    chosen = _backend.resolve(op, x.device.type, requested or "")
    if chosen == "triton" and x.dtype == torch.float64:
        if requested:
            raise ValueError("backend='triton' has no float64 path; use float32/float16/bfloat16")
        return "reference"
    if chosen == "triton" and not requested and d > TRITON_MAX_D:
        return "reference"
    return chosen


def _finish(rows, cos, reduction: str, index, scores, validate: bool, return_cos: bool):
    """The loss as asked for, after adding the positive cosines into `scores` at `index`."""
    if index is not None:
        score_scatter_add_(scores, index, cos, validate=validate)
    loss = reference.reduce_loss(rows, reduction)
    return (loss, cos) if return_cos else loss


def _triton():
    from coreset_ext.triton_kernels import contrastive  # Triton is optional: imported when used

    return contrastive
