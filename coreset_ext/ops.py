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
    scores: torch.Tensor, index: torch.Tensor, values: torch.Tensor, *, deterministic: bool | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Adds `values[i]` to `scores[index[i]]` for every i, in place, and returns `scores`.

    Duplicate indices are summed, never dropped. `scores` is a contiguous float32 1-D buffer;
    `index` int32 or int64; `values` float32, float16 or bfloat16 (accumulated in float32).
    On CUDA the default path uses atomics (duplicates summed in varying order); with
    `deterministic=True`, or when `torch.are_deterministic_algorithms_enabled()`, a sort-based
    segmented reduction gives bit-identical results run to run. The CPU kernel is always
    deterministic.

    `validate=True` checks the index range and that the values are finite here, and raises a
    ValueError naming the bad value; on the GPU that costs one host synchronisation (tens of
    microseconds, and a stall of the pipeline). `validate=False` skips it for hot loops whose indices come from your own data
    loader: the kernels still never write out of bounds (the CPU kernel raises IndexError, the
    CUDA kernel skips out-of-range entries).

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
    if scores.requires_grad:
        raise ValueError("scores must not require grad: it is a buffer updated in place")
    if not _is_compiling() and values.numel() and scores.numel() and \
            values.untyped_storage().data_ptr() == scores.untyped_storage().data_ptr():
        # the kernels read values while writing scores: an overlap would read partial sums
        raise ValueError("values must not share memory with scores (pass values.clone())")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    # Checked here (one host sync on the GPU) so the error names the value. The kernels check
    # again themselves (CPU: raises before the first write; CUDA: skips bad entries), which is
    # what protects calls made past this wrapper and compiled graphs, where this check is traced out.
    if validate and not _is_compiling() and index.numel():
        lo, hi = torch.aminmax(index)
        finite = torch.isfinite(values).all().to(lo.dtype)
        lo, hi, finite = torch.stack([lo, hi, finite]).tolist()  # one host sync for all three
        if lo < 0 or hi >= scores.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"index contains {bad}, out of range for scores of size {scores.shape[0]}")
        if not finite:  # a NaN would stay in the buffer for good
            raise ValueError("values contains NaN or Inf (from non-finite inputs?); validate=False adds them anyway")
    try:
        torch.ops.coreset_ext.score_scatter_add_(scores, index, values, bool(deterministic))
    except IndexError as exc:
        raise ValueError(str(exc).split("\n")[0]) from None
    return scores


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__


# --------------------------------------------------------------------------------------------
# cosine_rowsum / cosine_topk (similarity family: SAS row sums, ELFS k-NN pairs)
# --------------------------------------------------------------------------------------------
# Triton-only on the GPU, the chunked reference on the CPU: no C++ kernel, so the schemas are
# defined here with torch.library.custom_op rather than in csrc/ops.cpp. The chosen backend is
# an argument of the op, so that dispatch stays visible and torch.compile sees one opaque op.
# Neither op has a gradient (they feed selection, not training).

_SIM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOPK_TRITON_MAX_K = 128  # the kernel holds the running top-k in registers: up to 128 per row


def _sim_backend_impl(backend: str):
    if backend == "triton":
        from coreset_ext.triton_kernels import similarity

        return similarity
    return None


def _cosine_rowsum_impl(
    x: torch.Tensor, y: torch.Tensor | None, groups: torch.Tensor | None, y_groups: torch.Tensor | None,
    clamp_min: float, exclude_self: bool, backend: str,
) -> torch.Tensor:
    kern = _sim_backend_impl(backend)
    if kern is None:
        out = reference.cosine_rowsum(x, y, clamp_min=clamp_min, groups=groups, y_groups=y_groups,
                                      exclude_self=exclude_self)
        return out.clone() if out.dtype == torch.float64 else out.float()
    x = x.contiguous()
    yy = x if y is None else y.contiguous()
    inv_x = kern._inverse_norms(x, reference.EPS)
    inv_y = inv_x if y is None else kern._inverse_norms(yy, reference.EPS)
    return kern.cosine_rowsum(x, yy, inv_x, inv_y, groups, y_groups, clamp_min, exclude_self)


torch.library.custom_op("coreset_ext::cosine_rowsum", mutates_args=())(_cosine_rowsum_impl)


@torch.library.register_fake("coreset_ext::cosine_rowsum")
def _(x, y, groups, y_groups, clamp_min, exclude_self, backend):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[0], dtype=dtype)


def _cosine_topk_impl(
    x: torch.Tensor, y: torch.Tensor | None, k: int, exclude_self: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kern = _sim_backend_impl(backend)
    if kern is None:
        v, i = reference.cosine_topk(x, k, y=y, exclude_self=exclude_self)
        return (v.clone() if v.dtype == torch.float64 else v.float()), i
    x = x.contiguous()
    yy = x if y is None else y.contiguous()
    inv_x = kern._inverse_norms(x, reference.EPS)
    inv_y = inv_x if y is None else kern._inverse_norms(yy, reference.EPS)
    return kern.cosine_topk(x, yy, inv_x, inv_y, k, exclude_self and y is None)


torch.library.custom_op("coreset_ext::cosine_topk", mutates_args=())(_cosine_topk_impl)


@torch.library.register_fake("coreset_ext::cosine_topk")
def _(x, y, k, exclude_self, backend):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[0], k, dtype=dtype), x.new_empty(x.shape[0], k, dtype=torch.int64)


_backend.register_op("cosine_rowsum", gpu=("triton",), cpu=())
_backend.register_op("cosine_topk", gpu=("triton",), cpu=())


def _check_embeddings(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in _SIM_DTYPES:
        raise ValueError(f"{name} must be a 2-D float32, float16, bfloat16 or float64 tensor, got {_describe(t)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has 0 columns: embeddings need at least one dimension")
    if not _is_compiling() and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_x_y(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
    """Validates the embeddings of a similarity op; returns y, or None when y is x (or absent)."""
    _check_embeddings("x", x)
    if y is x:
        return None
    if y is not None:
        _check_embeddings("y", y)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y has {y.shape[1]} columns but x has {x.shape[1]}: they must match")
        if y.dtype != x.dtype:
            raise ValueError(f"y is {y.dtype} but x is {x.dtype}: they must share a dtype")
        _check_same_device(x=x, y=y)
    return y


def _check_groups(name: str, g, rows: int, of: str) -> None:
    if not isinstance(g, torch.Tensor) or g.dim() != 1 or g.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32 or int64 tensor (a label per row), got {_describe(g)}")
    if g.shape[0] != rows:
        raise ValueError(f"{name} has {g.shape[0]} labels but {of} has {rows} rows")


# The automatic choice per device, made once at import: torch.compile cannot trace the probing
# that select_backend does (module lookups, environment), but it can read this dict.
_SIM_AUTO_BACKEND = {
    (op, dev): _backend.select_backend(op, torch.device(dev))
    for op in ("cosine_rowsum", "cosine_topk") for dev in ("cpu", "cuda")
}


def _similarity_backend(op: str, x: torch.Tensor, m: int, backend: str | None) -> str:
    if backend is None:
        chosen = _SIM_AUTO_BACKEND.get((op, x.device.type), "reference")
    else:
        chosen = _backend.select_backend(op, x.device, backend)
    if chosen == "triton" and max(x.shape[0], m) >= 2**31 - 1:
        raise ValueError("x and y may have at most 2**31 - 2 rows for the Triton kernels (int32 indices)")
    if chosen == "triton" and x.dtype == torch.float64:
        if backend is not None:
            raise ValueError(f"x is float64, which backend='triton' does not serve for {op}; use float32")
        return "reference"  # float64 is a reference-precision request: serve it exactly
    return chosen


def cosine_rowsum(
    x: torch.Tensor, y: torch.Tensor | None = None, *, clamp_min: float = 0.0, groups: torch.Tensor | None = None,
    y_groups: torch.Tensor | None = None, exclude_self: bool = False, backend: str | None = None,
) -> torch.Tensor:
    """Clamped cosine row sums: r_i = sum over j of max(cos(x_i, y_j), clamp_min), shape [n].

    y defaults to x (and `y is x` counts as no y). With `groups` (an int label per row of x), only
    the j whose label equals i's count; when y is given it needs its own labels, `y_groups`.
    `exclude_self` leaves j == i out, and applies only when y is x. Norms are clamped below by
    `reference.EPS`, so all-zero rows have cosine 0. Never holds an n x m matrix: the Triton
    kernel (CUDA) reduces tiles in registers; the CPU path is the chunked reference. The result
    is float32 (float64 for float64 input, which is always served by the reference). On the GPU,
    float32 inputs are multiplied in TF32 (relative error near 1e-3 per cosine). No gradient.

    Example:
        >>> import torch, coreset_ext as cx
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
        >>> cx.ops.cosine_rowsum(x, exclude_self=True)
        tensor([0.7071, 1.4142, 0.7071])
        >>> cx.ops.cosine_rowsum(x, groups=torch.tensor([0, 0, 1]))
        tensor([1.7071, 1.7071, 1.0000])
    """
    y = _check_x_y(x, y)
    if not isinstance(clamp_min, (int, float)) or isinstance(clamp_min, bool) or not (
        float("-inf") < float(clamp_min) < float("inf")
    ):
        raise ValueError(f"clamp_min must be a finite number, got {clamp_min!r}")
    if groups is not None:
        _check_groups("groups", groups, x.shape[0], "x")
        _check_same_device(x=x, groups=groups)
        groups = groups.long()
        if y is not None:
            if y_groups is None:
                raise ValueError("y_groups is required with groups when y is given (a label per row of y)")
            _check_groups("y_groups", y_groups, y.shape[0], "y")
            _check_same_device(x=x, y_groups=y_groups)
            y_groups = y_groups.long()
        elif y_groups is not None:
            raise ValueError("y_groups is only for a separate y; with y = x, groups labels both")
    elif y_groups is not None:
        raise ValueError("y_groups was given without groups")
    if exclude_self and y is not None:
        raise ValueError("exclude_self applies only when y is x (leave y out)")
    chosen = _similarity_backend("cosine_rowsum", x, x.shape[0] if y is None else y.shape[0], backend)
    return torch.ops.coreset_ext.cosine_rowsum(x, y, groups, y_groups, float(clamp_min), bool(exclude_self), chosen)


def cosine_topk(
    x: torch.Tensor, k: int, *, y: torch.Tensor | None = None, exclude_self: bool = True, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of y (default x) most cosine-similar to each row of x, streamed over tiles.

    Returns (values [n, k], indices [n, k] int64). Each row is ordered by similarity descending,
    equal similarities by ascending index; when rows of y tie at the k-th value, the lowest
    indices are kept. `exclude_self` (default True) leaves j == i out; it applies only when y is
    x (y left out, or `y is x`) and is ignored for a separate y. k must be between 1 and the
    number of candidates (m, or m - 1 with self excluded). Values are float32 (float64 for float64
    input, served by the reference). On the GPU, the Triton kernel keeps a running top-k per row
    in registers (k up to 128; larger k falls back to the reference, chunked torch.topk) and
    multiplies float32 inputs in TF32. No gradient.

    Example:
        >>> import torch, coreset_ext as cx
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
        >>> values, indices = cx.ops.cosine_topk(x, 2)
        >>> indices
        tensor([[1, 2],
                [0, 2],
                [1, 0],
                [2, 1]])
    """
    y = _check_x_y(x, y)
    m = x.shape[0] if y is None else y.shape[0]
    available = m - 1 if (exclude_self and y is None) else m
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= available:
        raise ValueError(
            f"k must be an int between 1 and {available} (the rows of y"
            + (" other than the row itself" if exclude_self and y is None else "") + f"), got {k!r}"
        )
    chosen = _similarity_backend("cosine_topk", x, m, backend)
    if chosen == "triton" and k > TOPK_TRITON_MAX_K:
        if backend is not None:
            raise ValueError(f"k={k} is above {TOPK_TRITON_MAX_K}, the most backend='triton' serves")
        chosen = "reference"
    return torch.ops.coreset_ext.cosine_topk(x, y, k, bool(exclude_self and y is None), chosen)


__all__ += ["cosine_rowsum", "cosine_topk"]


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
# Widest d the loss kernels take when Triton is requested by name: beyond it their tiles need more
# shared memory than a GPU has (fp32, d = 1024: 196,608 bytes; an A100 has 166,912) and spill
# kilobytes of registers per thread (tools/triton_aot.py).
_TRITON_MAX_D_REQUESTED = 512


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
        loss, lse, cos = _tk().nt_xent_fwd(x, temperature, normalize, reference.EPS)
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
    # lse and the positive cosines are outputs without a gradient: say so, so that autograd
    # refuses to backpropagate through them rather than silently returning zeros
    ctx.mark_non_differentiable(output[1], output[2])


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
    ctx.mark_non_differentiable(output[1], output[2])  # as in _nt_xent_setup


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


def _check_row_pair(name_a: str, a, name_b: str, b) -> None:
    """Two [batch, dim] inputs of one op: valid each, same shape, dtype and device."""
    _check_rows(name_a, a)
    _check_rows(name_b, b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} and {name_b} must share a dtype, got {a.dtype} and {b.dtype}")
    _check_same_device(**{name_a: a, name_b: b})


# Below this, logits s / t of unit rows exceed what fp32 exponent arithmetic survives (t = 1e-30
# gives NaN gradients, 1e-40 a NaN loss); contrastive learning uses 0.01 .. 1.
MIN_TEMPERATURE = 1e-4


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive finite float, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be a finite float >= {MIN_TEMPERATURE}, got {temperature}")
    return t


def _check_reduction(reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_backend_request(op: str, x: torch.Tensor, backend: str | None) -> str:
    if backend is None:
        return ""
    if backend == "triton" and op != "pair_cosine" and x.shape[-1] > _TRITON_MAX_D_REQUESTED:
        raise ValueError(f"backend='triton' takes feature dimensions up to {_TRITON_MAX_D_REQUESTED} for "
                         f"{op}, got d = {x.shape[-1]}; leave backend=None to use the reference")
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
    return_cos: bool = False, validate: bool = True, backend: str | None = None,
):
    """SimCLR NT-Xent over the 2B rows [z1; z2], fused: never holds the 2B x 2B matrix.

    Row i's positive is its other view ((i + B) mod 2B); its own similarity is excluded. With
    `normalize` the rows are divided by max(||z||, reference.EPS) inside the op and gradients flow
    through that. `reduction` "mean" or "sum" over the 2B rows, or "none" for the [2B] row losses.
    Losses are float32 for float32/float16/bfloat16 inputs (fp32 accumulation throughout).

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
    _check_row_pair("z1", z1, "z2", z2)
    t = _check_temperature(temperature)
    _check_reduction(reduction)
    _check_scores(z1.shape[0], z1.device, index, scores)
    requested = _check_backend_request("nt_xent", z1, backend)
    rows, _, cos = _nt_xent_rows_op(z1, z2, t, bool(normalize), requested)
    if index is not None:
        score_scatter_add_(scores, index, cos, validate=validate)
    loss = _reduce_rows(rows, reduction)
    return (loss, cos) if return_cos else loss


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
        score_scatter_add_(scores, index, cos, validate=validate)
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
    _check_row_pair("a", a, "b", b)
    requested = _check_backend_request("pair_cosine", a, backend)
    return _pair_cosine_op(a, b, requested)


# --------------------------------------------------------------------------------------------
# kmeans_assign, kmeans_update (issue 4; used by coreset_ext.cluster.KMeans)
# --------------------------------------------------------------------------------------------

__all__ += ["kmeans_assign", "kmeans_update"]

_KMEANS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KMEANS_METRICS = ("euclidean", "cosine")
# Rows per block of the PyTorch assignment path (no _C, or a GPU without Triton): bounds the
# block x k score matrix.
_KMEANS_CPU_ROWS = 4096


def _kmeans_assign_torch(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked matmul + argmin in plain PyTorch: the path without _C (or on a GPU without Triton).

    Same formulas as `reference.kmeans_assign`, but one fused addmm per block
    (||c||^2 - 2 x.c) and ||x||^2 added only to the winning score, so a block costs one pass over
    its block x k scores. Half-precision inputs are computed in float32 (CPU matmuls in fp16 are slow).
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = centroids.to(work)
    if metric == "cosine":
        c = reference.normalize(c)
        c_sq = torch.zeros(c.shape[0], dtype=work, device=c.device)
    else:
        c_sq = (c * c).sum(dim=1)
    ct = c.T.contiguous()
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    for s in range(0, n, _KMEANS_CPU_ROWS):
        xc = x[s : s + _KMEANS_CPU_ROWS].to(work)
        scores = torch.addmm(c_sq, xc, ct, alpha=-2.0 if metric == "euclidean" else -1.0)
        best, idx = scores.min(dim=1)  # first minimum: lowest index wins ties
        x_sq = (xc * xc).sum(dim=1)
        if metric == "cosine":
            d = 1.0 + best / x_sq.sqrt().clamp_min(reference.EPS)
        else:
            d = (best + x_sq).clamp_min(0)
        labels[s : s + xc.shape[0]] = idx
        dist[s : s + xc.shape[0]] = d
    return labels, dist


@torch.library.custom_op("coreset_ext::kmeans_assign", mutates_args=())
def _kmeans_assign_op(
    x: torch.Tensor, centroids: torch.Tensor, metric: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from coreset_ext.triton_kernels import kmeans as tk

        return tk.kmeans_assign(x, centroids, metric == "cosine")
    if backend == "cpp":
        xw = x if x.dtype in (torch.float32, torch.float64) else x.float()
        c = centroids.to(xw.dtype)
        if metric == "cosine":
            c = reference.normalize(c)
        return torch.ops.coreset_ext.kmeans_assign_cpu(xw, c, metric == "cosine")
    return _kmeans_assign_torch(x, centroids, metric)


@_kmeans_assign_op.register_fake
def _(x, centroids, metric, backend):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32)


# CPU: C++ blocks of rows in parallel, one single-threaded GEMM each (kmeans_assign_cpu.cpp);
# without _C, the chunked PyTorch path above (reported as "reference": it is plain PyTorch).
_backend.register_op("kmeans_assign", gpu=("triton",), cpu=("cpp",))


@torch.compiler.assume_constant_result
def _kmeans_assign_backend(device_type: str, requested: str | None) -> str:
    # a constant for torch.compile: the registry's cached probes are not traced
    return _backend.select_backend("kmeans_assign", torch.device(device_type), requested)


def kmeans_assign(
    x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "euclidean", backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of `x`: (labels int64 [n], distance float32 [n]).

    euclidean: distance = squared euclidean distance to the nearest centroid; cosine: the centroid
    of largest cosine similarity, distance = 1 - that cosine. Ties go to the lowest index. Never
    materialises the n x k matrix beyond one block. `x` [n, d] float32/float16/bfloat16 (float64 on
    the CPU), `centroids` [k, d] any float dtype on the same device. On the GPU a Triton kernel
    serves (fp32 accumulation; fp32 inputs use exact fp32 products unless
    `torch.backends.cuda.matmul.allow_tf32`); on the CPU a C++ kernel (blocks of rows in
    parallel, one GEMM + argmin each; fp16/bf16 computed in float32).

    Example:
        >>> import torch, coreset_ext as cx
        >>> x = torch.tensor([[0.0, 0.0], [4.0, 4.0], [1.0, 0.0]])
        >>> labels, dist = cx.ops.kmeans_assign(x, torch.tensor([[0.0, 0.0], [4.0, 3.0]]))
        >>> labels.tolist(), dist.tolist()
        ([0, 1, 0], [0.0, 1.0, 1.0])
    """
    if metric not in _KMEANS_METRICS:
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _KMEANS_DTYPES:
        raise ValueError(f"x must be a 2-D float tensor [n, d], got {_describe(x)}")
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2 or not centroids.is_floating_point():
        raise ValueError(f"centroids must be a 2-D float tensor [k, d], got {_describe(centroids)}")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids has {centroids.shape[1]} features but x has {x.shape[1]}")
    if centroids.shape[0] < 1:
        raise ValueError("centroids must hold at least one centroid")
    _check_same_device(x=x, centroids=centroids)
    if not _is_compiling():
        # a NaN row would otherwise get label 0 and distance NaN, silently; one host sync for both
        bad_x, bad_c = torch.stack([~torch.isfinite(x).all(), ~torch.isfinite(centroids).all()]).tolist()
        if bad_x or bad_c:
            raise ValueError(f"{'x' if bad_x else 'centroids'} contains NaN or Inf")
    return _kmeans_assign_checked(x, centroids, metric, backend)


def _kmeans_assign_checked(x, centroids, metric: str, backend: str | None = None):
    """kmeans_assign past the wrapper's checks: for callers that validated x once themselves
    (KMeans checks x once per fit, not once per Lloyd iteration; its centroids are finite)."""
    chosen = _kmeans_assign_backend(x.device.type, backend)
    if chosen == "triton" and x.dtype == torch.float64:
        if backend is not None:
            raise ValueError("x is float64, which the Triton kernel does not take (use float32)")
        chosen = "reference"
    return _kmeans_assign_op(x, centroids, metric, chosen)


def _kmeans_lloyd_step_cpu(x: torch.Tensor, centroids: torch.Tensor, metric: str):
    """One fused assignment + update pass on the CPU (C++), or None where it does not apply
    (no _C, not a float32/float64 CPU tensor): callers then use kmeans_assign + kmeans_update,
    which give the same labels, distances and sums. Inputs are trusted (KMeans validated them)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not _backend.has_extension():
        return None
    c = centroids.to(x.dtype)
    if metric == "cosine":
        c = reference.normalize(c)
    return torch.ops.coreset_ext.kmeans_lloyd_step_cpu(x, c, metric == "cosine")


def _kmeans_update_reference_impl(x, labels, k):
    # index_add_ and bincount check bounds themselves, so a call that bypasses the wrapper
    # cannot write out of bounds either.
    return reference.kmeans_update(x, labels, k)


if not _backend.has_extension():
    _python_library().define("kmeans_update(Tensor x, Tensor labels, int k) -> (Tensor, Tensor)")
    _python_library().impl("kmeans_update", _kmeans_update_reference_impl, "CPU")
if not _backend.has_cuda_kernels():
    _python_library().impl("kmeans_update", _kmeans_update_reference_impl, "CUDA")


@torch.library.register_fake("coreset_ext::kmeans_update")
def _(x, labels, k):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(k, x.shape[1], dtype=acc), x.new_empty(k, dtype=torch.int64)


_backend.register_op("kmeans_update", gpu=("cuda",), cpu=("cpp",))


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts: (sums [k, d] float32 (float64 for float64 x), counts [k] int64).

    sums_c = sum of the rows x_i with labels_i = c, counts_c = how many. Deterministic (no float
    atomics): bit-identical run to run on CPU (C++, OpenMP, double accumulation) and CUDA
    (sort + segmented reduction). Centroids are `sums / counts`.

    Example:
        >>> import torch, coreset_ext as cx
        >>> sums, counts = cx.ops.kmeans_update(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        ...                                     torch.tensor([1, 0, 1]), 2)
        >>> sums.tolist(), counts.tolist()
        ([[3.0, 4.0], [6.0, 8.0]], [1, 2])
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _KMEANS_DTYPES:
        raise ValueError(f"x must be a 2-D float tensor [n, d], got {_describe(x)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be a 1-D int32 or int64 tensor, got {_describe(labels)}")
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but x has {x.shape[0]} rows")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    _check_same_device(x=x, labels=labels)
    labels = labels.long()
    if not _is_compiling() and labels.numel():
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()  # one host sync for both ends
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels contains {bad}, out of range for k = {k}")
    return torch.ops.coreset_ext.kmeans_update(x, labels, k)
