"""Every public kernel of coreset-ext as a torch.library custom op: validation, dispatch, fake kernels.

Each op validates its inputs here (errors name the argument), then calls `torch.ops.coreset_ext.*`,
which dispatches on the tensors' device to the fastest backend built (see `_backend.py` and
`python -m coreset_ext info`). When `coreset_ext._C` is missing, the same op names are defined
from Python on the reference backend, so user code and `torch.compile` see one op either way.
"""

from __future__ import annotations

import torch

from coreset_ext import _backend, reference

__all__ = ["score_scatter_add_"]

_LIB = None  # a torch.library.Library holding the ops _C did not define (kept alive here)


def _python_library() -> torch.library.Library:
    """Library for the schemas and kernels that `_C` would have provided but does not here."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("coreset_ext", "FRAGMENT")
    return _LIB


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_same_device(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}: they must share a device")


# --------------------------------------------------------------------------------------------
# score_scatter_add_
# --------------------------------------------------------------------------------------------

_SCATTER_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scatter_reference_impl(scores, index, values, deterministic):
    # index_add_ checks bounds itself, so even a call that bypasses the wrapper cannot write
    # outside the buffer.
    reference.score_scatter_add_(scores, index, values)


if not _backend.has_extension():
    _python_library().define(
        "score_scatter_add_(Tensor(a!) scores, Tensor index, Tensor values, bool deterministic) -> ()"
    )
    _python_library().impl("score_scatter_add_", _scatter_reference_impl, "CPU")
if not _backend.has_cuda_kernels():
    _python_library().impl("score_scatter_add_", _scatter_reference_impl, "CUDA")


@torch.library.register_fake("coreset_ext::score_scatter_add_")
def _(scores, index, values, deterministic):
    return None


_backend.register_op("score_scatter_add_", gpu=("cuda",), cpu=("cpp",))


def score_scatter_add_(
    scores: torch.Tensor, index: torch.Tensor, values: torch.Tensor, *, deterministic: bool | None = None
) -> torch.Tensor:
    """Adds `values[i]` to `scores[index[i]]` for every i, in place, and returns `scores`.

    Duplicate indices are summed, never dropped. `scores` is a contiguous float32 1-D buffer;
    `index` int32 or int64; `values` float32, float16 or bfloat16 (accumulated in float32).
    On CUDA the default path uses atomics (duplicates summed in varying order); with
    `deterministic=True`, or when `torch.are_deterministic_algorithms_enabled()`, a sort-based
    segmented reduction gives bit-identical results run to run. The CPU kernel is always
    deterministic.

    Example:
        >>> import torch, coreset_ext as cx
        >>> s = torch.zeros(4)
        >>> cx.ops.score_scatter_add_(s, torch.tensor([1, 1, 3]), torch.tensor([0.5, 0.25, 2.0]))
        tensor([0.0000, 0.7500, 0.0000, 2.0000])
    """
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D float32 tensor, got {_describe(scores)}")
    if not scores.is_contiguous():
        raise ValueError("scores must be contiguous (it is updated in place)")
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
        raise ValueError(f"index must be a 1-D int32 or int64 tensor, got {_describe(index)}")
    if not isinstance(values, torch.Tensor) or values.dtype not in _SCATTER_VALUE_DTYPES or values.dim() != 1:
        raise ValueError(f"values must be a 1-D float32, float16 or bfloat16 tensor, got {_describe(values)}")
    if index.shape[0] != values.shape[0]:
        raise ValueError(f"index has {index.shape[0]} entries but values has {values.shape[0]}")
    _check_same_device(scores=scores, index=index, values=values)
    if not _is_compiling() and index.numel():
        lo, hi = torch.aminmax(index)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= scores.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"index contains {bad}, out of range for scores of size {scores.shape[0]}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    torch.ops.coreset_ext.score_scatter_add_(scores, index, values, bool(deterministic))
    return scores


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__


# --------------------------------------------------------------------------------------------
# Fused contrastive losses: nt_xent, info_nce_queue, pair_cosine (issue 3)
#
# Each loss is a functional custom op returning (per-row losses, per-row log-sum-exp, positive
# cosines), all float32 (float64 for float64 inputs), with a backward custom op registered as its
# autograd formula; `lse` is saved so the backward recomputes tiles without a second forward.
# The op takes the requested backend as a string ("" = automatic) and resolves it inside, where
# torch.compile does not trace. Triton serves CUDA tensors (and CPU tensors under
# TRITON_INTERPRET=1); the CPU backend is the chunked reference with analytic backward passes.
# --------------------------------------------------------------------------------------------

import math  # noqa: E402

__all__ += ["nt_xent", "info_nce_queue", "pair_cosine"]

_backend.register_op("nt_xent", gpu=("triton",), cpu=("reference",))
_backend.register_op("info_nce_queue", gpu=("triton",), cpu=("reference",))
_backend.register_op("pair_cosine", gpu=("triton",), cpu=("reference",))

_LOSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_TRITON_MAX_D = 256  # = triton_kernels.contrastive.MAX_D (not imported: Triton may be absent)


def _loss_backend(op: str, x: torch.Tensor, requested: str) -> str:
    """The backend actually run: Triton has no float64 path, so float64 goes to the reference, and
    its tiles are sized for d <= 256 (projection heads), so wider inputs do too unless Triton was
    requested by name."""
    chosen = _backend.select_backend(op, x.device, requested or None)
    if chosen == "triton" and (x.dtype == torch.float64 or (not requested and x.shape[-1] > _TRITON_MAX_D)):
        return "reference"
    return chosen


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tk():
    from coreset_ext.triton_kernels import contrastive

    return contrastive


# ---- nt_xent ---------------------------------------------------------------------------------


@torch.library.custom_op("coreset_ext::nt_xent_rows", mutates_args=())
def _nt_xent_rows_op(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, normalize: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = _loss_backend("nt_xent", z1, backend)
    if chosen == "triton":
        x = torch.cat([z1, z2], dim=0).contiguous()
        loss, lse, cos, _ = _tk().nt_xent_fwd(x, temperature, normalize, reference.EPS)
        return loss, lse, cos
    acc = _acc_dtype(z1)
    a, b = z1.to(acc), z2.to(acc)
    rows, cos = reference.nt_xent_rows(a, b, temperature, normalize_input=normalize)
    lse = reference.nt_xent_lse(a, b, rows, temperature, normalize_input=normalize)
    return rows, lse, cos


@_nt_xent_rows_op.register_fake
def _(z1, z2, temperature, normalize, backend):
    acc = _acc_dtype(z1)
    n = z1.shape[0]
    return z1.new_empty(2 * n, dtype=acc), z1.new_empty(2 * n, dtype=acc), z1.new_empty(n, dtype=acc)


@torch.library.custom_op("coreset_ext::nt_xent_rows_backward", mutates_args=())
def _nt_xent_rows_backward_op(
    grad_rows: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, lse: torch.Tensor, temperature: float,
    normalize: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = _loss_backend("nt_xent", z1, backend)
    if chosen == "triton":
        x = torch.cat([z1, z2], dim=0).contiguous()
        gx = _tk().nt_xent_bwd(grad_rows, x, lse.contiguous(), temperature, normalize, reference.EPS)
        return gx[: z1.shape[0]].clone(), gx[z1.shape[0]:].clone()
    acc = _acc_dtype(z1)
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


def _nt_xent_backward(ctx, grad_rows, grad_lse, grad_cos):
    # lse and cos are auxiliary outputs and carry no gradient (cos is a score, not a loss term).
    z1, z2, lse = ctx.saved_tensors
    g1, g2 = _nt_xent_rows_backward_op(grad_rows, z1, z2, lse, *ctx.args)
    return g1, g2, None, None, None


_nt_xent_rows_op.register_autograd(_nt_xent_backward, setup_context=_nt_xent_setup)


# ---- info_nce_queue --------------------------------------------------------------------------


@torch.library.custom_op("coreset_ext::info_nce_queue_rows", mutates_args=())
def _info_nce_queue_rows_op(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, normalize: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = _loss_backend("info_nce_queue", q, backend)
    if chosen == "triton":
        qc, kc, quc = (t.to(q.dtype).contiguous() for t in (q, k, queue))
        return _tk().info_nce_queue_fwd(qc, kc, quc, temperature, normalize, reference.EPS)
    acc = _acc_dtype(q)
    a, b, c = q.to(acc), k.to(acc), queue.to(acc)
    rows, cos = reference.info_nce_queue_rows(a, b, c, temperature, normalize_input=normalize)
    lse = reference.info_nce_queue_lse(a, b, rows, temperature, normalize_input=normalize)
    return rows, lse, cos


@_info_nce_queue_rows_op.register_fake
def _(q, k, queue, temperature, normalize, backend):
    acc = _acc_dtype(q)
    n = q.shape[0]
    return q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc)


@torch.library.custom_op("coreset_ext::info_nce_queue_rows_backward", mutates_args=())
def _info_nce_queue_rows_backward_op(
    grad_rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, lse: torch.Tensor,
    temperature: float, normalize: bool, backend: str,
) -> torch.Tensor:
    chosen = _loss_backend("info_nce_queue", q, backend)
    if chosen == "triton":
        qc, kc, quc = (t.to(q.dtype).contiguous() for t in (q, k, queue))
        return _tk().info_nce_queue_bwd(grad_rows, qc, kc, quc, lse.contiguous(), temperature, normalize,
                                        reference.EPS)
    acc = _acc_dtype(q)
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


def _info_nce_backward(ctx, grad_rows, grad_lse, grad_cos):
    # Only q learns: k comes from the momentum encoder and the queue holds past keys.
    q, k, queue, lse = ctx.saved_tensors
    gq = _info_nce_queue_rows_backward_op(grad_rows, q, k, queue, lse, *ctx.args)
    return gq, None, None, None, None, None


_info_nce_queue_rows_op.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)


# ---- pair_cosine -----------------------------------------------------------------------------


@torch.library.custom_op("coreset_ext::pair_cosine", mutates_args=())
def _pair_cosine_op(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    if _loss_backend("pair_cosine", a, backend) == "triton":
        return _tk().pair_cosine_fwd(a.contiguous(), b.contiguous(), reference.EPS)
    acc = _acc_dtype(a)
    return reference.pair_cosine(a.to(acc), b.to(acc))


@_pair_cosine_op.register_fake
def _(a, b, backend):
    return a.new_empty(a.shape[0], dtype=_acc_dtype(a))


@torch.library.custom_op("coreset_ext::pair_cosine_backward", mutates_args=())
def _pair_cosine_backward_op(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if _loss_backend("pair_cosine", a, backend) == "triton":
        return _tk().pair_cosine_bwd(grad, a.contiguous(), b.contiguous(), reference.EPS)
    acc = _acc_dtype(a)
    ga, gb = reference.pair_cosine_backward(grad.to(acc), a.to(acc), b.to(acc))
    return ga.to(a.dtype), gb.to(b.dtype)


@_pair_cosine_backward_op.register_fake
def _(grad, a, b, backend):
    return torch.empty_like(a), torch.empty_like(b)


def _pair_cosine_setup(ctx, inputs, output):
    a, b, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = backend


def _pair_cosine_bwd(ctx, grad):
    a, b = ctx.saved_tensors
    ga, gb = _pair_cosine_backward_op(grad, a, b, ctx.backend)
    return ga, gb, None


_pair_cosine_op.register_autograd(_pair_cosine_bwd, setup_context=_pair_cosine_setup)


# ---- validation and the public functions -----------------------------------------------------


def _check_rows(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [batch, dim] tensor, got {_describe(x)}")
    if x.dtype not in _LOSS_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive finite float, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive finite float, got {temperature}")
    return t


def _check_reduction(reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_backend_request(op: str, x: torch.Tensor, backend: str | None) -> str:
    if backend is None:
        return ""
    if not _is_compiling():
        _backend.select_backend(op, x.device, backend)  # raises now, naming the problem
        if backend == "triton" and x.dtype == torch.float64:
            raise ValueError("backend='triton' has no float64 path; use float32/float16/bfloat16")
    return backend


def _check_scores(batch: int, device: torch.device, index, scores) -> None:
    if (index is None) != (scores is None):
        raise ValueError("index and scores must be given together (index: dataset indices of the batch, "
                         "scores: the float32 buffer to add the positive cosines into)")
    if index is None:
        return
    if not isinstance(index, torch.Tensor) or index.dim() != 1:
        raise ValueError(f"index must be a 1-D int32 or int64 tensor, got {_describe(index)}")
    if index.shape[0] != batch:
        raise ValueError(f"index has {index.shape[0]} entries but the batch has {batch} examples")
    if index.device != device:
        raise ValueError(f"index is on {index.device} but the embeddings are on {device}")


def _reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    return reference.reduce_loss(rows, reduction)


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *, normalize: bool = True,
    reduction: str = "mean", index: torch.Tensor | None = None, scores: torch.Tensor | None = None,
    return_cos: bool = False, backend: str | None = None,
):
    """SimCLR NT-Xent over the 2B rows [z1; z2], fused: never holds the 2B x 2B matrix.

    Row i's positive is its other view ((i + B) mod 2B); its own similarity is excluded. With
    `normalize` the rows are divided by max(||z||, reference.EPS) inside the op and gradients flow
    through that. `reduction` "mean" or "sum" over the 2B rows, or "none" for the [2B] row losses.
    Losses are float32 for float32/float16/bfloat16 inputs (fp32 accumulation throughout).

    The positive-pair cosines cos(z1_i, z2_i) [B] (float32, no gradient) are the CSS scores of
    METHODS.md: given `index` [B] (dataset indices) and `scores` (a float32 buffer such as
    `tracker.sums["css"]`), they are scatter-added into `scores` (duplicates summed);
    `return_cos=True` returns `(loss, cos)`.

    Example:
        >>> import torch, coreset_ext as cx
        >>> z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        >>> loss = cx.ops.nt_xent(z1, z2, temperature=0.5)
        >>> loss.backward()
        >>> z1.grad.shape
        torch.Size([8, 16])
    """
    _check_rows("z1", z1)
    _check_rows("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.dtype != z2.dtype:
        raise ValueError(f"z1 and z2 must share a dtype, got {z1.dtype} and {z2.dtype}")
    _check_same_device(z1=z1, z2=z2)
    t = _check_temperature(temperature)
    _check_reduction(reduction)
    _check_scores(z1.shape[0], z1.device, index, scores)
    requested = _check_backend_request("nt_xent", z1, backend)
    rows, _, cos = _nt_xent_rows_op(z1, z2, t, bool(normalize), requested)
    if index is not None:
        score_scatter_add_(scores, index, cos)
    loss = _reduce_rows(rows, reduction)
    return (loss, cos) if return_cos else loss


def info_nce_queue(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2, *,
    normalize: bool = True, reduction: str = "mean", index: torch.Tensor | None = None,
    scores: torch.Tensor | None = None, return_cos: bool = False, backend: str | None = None,
):
    """MoCo InfoNCE of queries q [B, d] against their keys k [B, d] and a negative queue [K, d].

        loss_i = -<q_i, k_i>/t + log( exp(<q_i, k_i>/t) + sum_j exp(<q_i, queue_j>/t) )

    (rows normalised when `normalize`). Only q receives gradients; k and the queue are treated as
    constants (k and queue are cast to q's dtype if they differ). On the GPU the queue is split
    across programs, so a small batch against a 65,536-entry queue still fills the device. Scores
    (cos(q_i, k_i)), `index`, `scores`, `return_cos` and `reduction` are as in `nt_xent`.

    Example:
        >>> import torch, coreset_ext as cx
        >>> q = torch.randn(4, 8, requires_grad=True)
        >>> loss = cx.ops.info_nce_queue(q, torch.randn(4, 8), torch.randn(32, 8))
        >>> loss.backward()
        >>> q.grad.shape
        torch.Size([4, 8])
    """
    _check_rows("q", q)
    _check_rows("k", k)
    _check_rows("queue", queue)
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must have q's dimension {q.shape[1]}, got shape {tuple(queue.shape)}")
    _check_same_device(q=q, k=k, queue=queue)
    t = _check_temperature(temperature)
    _check_reduction(reduction)
    _check_scores(q.shape[0], q.device, index, scores)
    requested = _check_backend_request("info_nce_queue", q, backend)
    rows, _, cos = _info_nce_queue_rows_op(q, k, queue, t, bool(normalize), requested)
    if index is not None:
        score_scatter_add_(scores, index, cos)
    loss = _reduce_rows(rows, reduction)
    return (loss, cos) if return_cos else loss


def pair_cosine(a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Row-wise cosine <a_i, b_i> / (max(||a_i||, EPS) max(||b_i||, EPS)) [B], fused, with gradients
    for a and b. float32 for float32/float16/bfloat16 inputs.

    Example:
        >>> import torch, coreset_ext as cx
        >>> a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> cx.ops.pair_cosine(a, torch.tensor([[1.0, 1.0], [0.0, -1.0]]))
        tensor([ 0.7071, -1.0000])
    """
    _check_rows("a", a)
    _check_rows("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    _check_same_device(a=a, b=b)
    requested = _check_backend_request("pair_cosine", a, backend)
    return _pair_cosine_op(a, b, requested)
