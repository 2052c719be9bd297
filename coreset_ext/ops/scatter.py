"""score_scatter_add_: per-example score accumulation (the op behind ScoreTracker).

The schema and its kernels are compiled (csrc/ops.cpp, csrc/cpu, csrc/cuda) and dispatched by
device; where `_C` lacks them, the reference serves under the same name (`define_fallback`).
"""

from __future__ import annotations

import torch

from coreset_ext import _backend, reference
from coreset_ext._validation import check_same_device, check_tensor

__all__ = ["score_scatter_add_", "INDEX_DTYPES", "SCATTER_VALUE_DTYPES"]

SCATTER_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


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
    check_tensor("scores", scores, dim=1, dtypes=(torch.float32,))
    if not scores.is_contiguous():
        raise ValueError("scores must be contiguous (it is updated in place)")
    check_tensor("index", index, dim=1, dtypes=INDEX_DTYPES)
    check_tensor("values", values, dim=1, dtypes=SCATTER_VALUE_DTYPES)
    if index.shape[0] != values.shape[0]:
        raise ValueError(f"index has {index.shape[0]} entries but values has {values.shape[0]}")
    check_same_device(scores=scores, index=index, values=values)
    if scores.requires_grad:
        raise ValueError("scores must not require grad: it is a buffer updated in place")
    compiling = torch.compiler.is_compiling()
    if not compiling and values.numel() and scores.numel() and \
            values.untyped_storage().data_ptr() == scores.untyped_storage().data_ptr():
        # the kernels read values while writing scores: an overlap would read partial sums
        raise ValueError("values must not share memory with scores (pass values.clone())")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    # Checked here (one host sync on the GPU) so the error names the value. The kernels check
    # again themselves (CPU: raises before the first write; CUDA: skips bad entries), which is
    # what protects calls made past this wrapper and compiled graphs, where this check is traced out.
    if validate and not compiling and index.numel():
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


def _scatter_reference(scores, index, values, deterministic):
    # index_add_ checks bounds itself, so even a call that bypasses the wrapper cannot write
    # outside the buffer.
    reference.score_scatter_add_(scores, index, values)


_backend.define_fallback(
    "score_scatter_add_(Tensor(a!) scores, Tensor index, Tensor values, bool deterministic) -> ()",
    _scatter_reference,
)
_backend.register_op("score_scatter_add_", gpu=("cuda",), cpu=("cpp",))


@torch.library.register_fake("coreset_ext::score_scatter_add_")
def _(scores, index, values, deterministic):
    return None
