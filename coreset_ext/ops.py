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

    `validate=True` checks the index range here and raises a ValueError naming the bad value; on
    the GPU that costs one host synchronisation (tens of microseconds, and a stall of the
    pipeline). `validate=False` skips it for hot loops whose indices come from your own data
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
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    # Checked here (one host sync on the GPU) so the error names the value. The kernels check
    # again themselves (CPU: raises before the first write; CUDA: skips bad entries), which is
    # what protects calls made past this wrapper and compiled graphs, where this check is traced out.
    if validate and not _is_compiling() and index.numel():
        lo, hi = torch.stack(torch.aminmax(index)).tolist()  # one pass, one host sync for both ends
        if lo < 0 or hi >= scores.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"index contains {bad}, out of range for scores of size {scores.shape[0]}")
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
    _check_embeddings("x", x)
    if y is x:
        y = None
    if y is not None:
        _check_embeddings("y", y)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y has {y.shape[1]} columns but x has {x.shape[1]}: they must match")
        if y.dtype != x.dtype:
            raise ValueError(f"y is {y.dtype} but x is {x.dtype}: they must share a dtype")
        _check_same_device(x=x, y=y)
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
    _check_embeddings("x", x)
    if y is x:
        y = None
    if y is not None:
        _check_embeddings("y", y)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y has {y.shape[1]} columns but x has {x.shape[1]}: they must match")
        if y.dtype != x.dtype:
            raise ValueError(f"y is {y.dtype} but x is {x.dtype}: they must share a dtype")
        _check_same_device(x=x, y=y)
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
