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
        lo, hi = torch.aminmax(labels)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels contains {bad}, out of range for k = {k}")
    return torch.ops.coreset_ext.kmeans_update(x, labels, k)
