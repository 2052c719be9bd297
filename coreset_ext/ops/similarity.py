"""cosine_rowsum and cosine_topk: the similarity family (SAS row sums, ELFS k-NN pairs).

Triton on the GPU, the chunked reference on the CPU: no C++ kernel, so the schemas are defined
here with torch.library.custom_op. The chosen backend is an argument of the op, so that dispatch
stays visible and torch.compile sees one opaque op. Neither op has a gradient (they feed
selection, not training). Under torch.autocast they compute as without it (autocast is off
inside: float32 products and results).
"""

from __future__ import annotations

import torch

from coreset_ext import _backend, reference
from coreset_ext._validation import check_finite, check_per_row, check_same_device, check_tensor, finite_float, is_int

__all__ = ["cosine_rowsum", "cosine_topk", "TOPK_TRITON_MAX_K"]

EMBEDDING_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GROUP_DTYPES = (torch.int32, torch.int64)
TOPK_TRITON_MAX_K = 128  # the kernel holds the running top-k in registers: up to 128 per row


# ------------------------------------------------------------------------------ cosine_rowsum


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
    clamp_min = finite_float("clamp_min", clamp_min)
    if groups is not None:
        groups = check_per_row("groups", groups, "x", x, dtypes=GROUP_DTYPES, entries="labels").long()
        if y is not None:
            if y_groups is None:
                raise ValueError("y_groups is required with groups when y is given (a label per row of y)")
            y_groups = check_per_row("y_groups", y_groups, "y", y, dtypes=GROUP_DTYPES, entries="labels").long()
        elif y_groups is not None:
            raise ValueError("y_groups is only for a separate y; with y = x, groups labels both")
    elif y_groups is not None:
        raise ValueError("y_groups was given without groups")
    if exclude_self and y is not None:
        raise ValueError("exclude_self applies only when y is x (leave y out)")
    chosen = _choose_backend("cosine_rowsum", x, x.shape[0] if y is None else y.shape[0], backend)
    return torch.ops.coreset_ext.cosine_rowsum(x, y, groups, y_groups, clamp_min, bool(exclude_self), chosen)


@torch.library.custom_op("coreset_ext::cosine_rowsum", mutates_args=())
def _cosine_rowsum_op(
    x: torch.Tensor, y: torch.Tensor | None, groups: torch.Tensor | None, y_groups: torch.Tensor | None,
    clamp_min: float, exclude_self: bool, backend: str,
) -> torch.Tensor:
    with _backend.no_autocast(x):
        if backend == "triton":
            kernels, x, yy, inv_x, inv_y = _triton_inputs(x, y)
            return kernels.cosine_rowsum(x, yy, inv_x, inv_y, groups, y_groups, clamp_min, exclude_self)
        out = reference.cosine_rowsum(x, y, clamp_min=clamp_min, groups=groups, y_groups=y_groups,
                                      exclude_self=exclude_self)
        return _result_dtype(out)


@_cosine_rowsum_op.register_fake
def _(x, y, groups, y_groups, clamp_min, exclude_self, backend):
    return x.new_empty(x.shape[0], dtype=reference.accumulation_dtype(x))


# -------------------------------------------------------------------------------- cosine_topk


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
    if not is_int(k) or not 1 <= k <= available:
        raise ValueError(
            f"k must be an int between 1 and {available} (the rows of y"
            + (" other than the row itself" if exclude_self and y is None else "") + f"), got {k!r}"
        )
    chosen = _choose_backend("cosine_topk", x, m, backend)
    if chosen == "triton" and k > TOPK_TRITON_MAX_K:
        if backend is not None:
            raise ValueError(f"k={k} is above {TOPK_TRITON_MAX_K}, the most backend='triton' serves")
        chosen = "reference"
    return torch.ops.coreset_ext.cosine_topk(x, y, int(k), bool(exclude_self and y is None), chosen)


@torch.library.custom_op("coreset_ext::cosine_topk", mutates_args=())
def _cosine_topk_op(
    x: torch.Tensor, y: torch.Tensor | None, k: int, exclude_self: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    with _backend.no_autocast(x):
        if backend == "triton":
            kernels, x, yy, inv_x, inv_y = _triton_inputs(x, y)
            return kernels.cosine_topk(x, yy, inv_x, inv_y, k, exclude_self and y is None)
        values, indices = reference.cosine_topk(x, k, y=y, exclude_self=exclude_self)
        return _result_dtype(values), indices


@_cosine_topk_op.register_fake
def _(x, y, k, exclude_self, backend):
    return x.new_empty(x.shape[0], k, dtype=reference.accumulation_dtype(x)), x.new_empty(x.shape[0], k, dtype=torch.int64)


_backend.register_op("cosine_rowsum", gpu=("triton",), cpu=())
_backend.register_op("cosine_topk", gpu=("triton",), cpu=())


# ------------------------------------------------------------------------ shared by the family


def _check_embeddings(name: str, t) -> None:
    check_tensor(name, t, dim=2, dtypes=EMBEDDING_DTYPES)
    if t.shape[1] == 0:
        raise ValueError(f"{name} has 0 columns: embeddings need at least one dimension")
    check_finite(name, t, float32_squares=True)  # cosines need the norms


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
        check_same_device(x=x, y=y)
    return y


def _choose_backend(op: str, x: torch.Tensor, m: int, backend: str | None) -> str:
    chosen = _backend.resolve(op, x.device.type, backend or "")
    if chosen == "triton" and max(x.shape[0], m) >= 2**31 - 1:
        raise ValueError("x and y may have at most 2**31 - 2 rows for the Triton kernels (int32 indices)")
    if chosen == "triton" and x.dtype == torch.float64:
        if backend is not None:
            raise ValueError(f"x is float64, which backend='triton' does not serve for {op}; use float32")
        return "reference"  # float64 is a reference-precision request: serve it exactly
    return chosen


def _triton_inputs(x: torch.Tensor, y: torch.Tensor | None):
    """The Triton module, contiguous x and y (y = x when absent) and their inverse row norms."""
    from coreset_ext.triton_kernels import similarity  # Triton is optional: imported when used

    x = x.contiguous()
    yy = x if y is None else y.contiguous()
    inv_x = similarity.inverse_norms(x, reference.EPS)
    inv_y = inv_x if y is None else similarity.inverse_norms(yy, reference.EPS)
    return similarity, x, yy, inv_x, inv_y


def _result_dtype(out: torch.Tensor) -> torch.Tensor:
    # a custom op's output must not alias its input: the float64 reference may return a view
    return out.clone() if out.dtype == torch.float64 else out.float()
