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
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    # Checked here (one host sync on the GPU) so the error names the value. The kernels check
    # again themselves (CPU: raises before the first write; CUDA: skips bad entries), which is
    # what protects calls made past this wrapper and compiled graphs, where this check is traced out.
    if not _is_compiling() and index.numel():
        lo, hi = int(index.min()), int(index.max())
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
