"""kmeans_assign and kmeans_update, the two halves of a Lloyd iteration (used by KMeans).

kmeans_assign is a Python custom op taking its backend as an argument: Triton on the GPU, the
C++ kernel on the CPU (blocks of rows in parallel; per block the scores from a register-tiled
loop up to k = 128, else one single-threaded GEMM, then the argmin), the chunked reference
elsewhere. kmeans_update's schema and kernels are compiled (csrc/ops.cpp) and
dispatched by device, the reference serving where `_C` lacks them. `kmeans_lloyd_step` composes
the two, fused into one pass over x where a kernel for that exists (the CPU).
"""

from __future__ import annotations

import torch

from coreset_ext import _backend, reference
from coreset_ext._validation import (POSITIVE_INT, Options, check, check_finite, check_same_device, check_tensor,
                                     describe)

__all__ = ["kmeans_assign", "kmeans_update", "kmeans_lloyd_step"]

KMEANS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
METRICS = Options("euclidean", "cosine")
# Rows per block of the reference assignment (no _C, or a GPU without Triton): bounds the
# block x k score matrix.
REFERENCE_ROWS = 4096


# ------------------------------------------------------------------------------ kmeans_assign


def kmeans_assign(
    x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "euclidean", backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of `x`: (labels int64 [n], distance float32 [n]).

    euclidean: distance = squared euclidean distance to the nearest centroid; cosine: the centroid
    of largest cosine similarity, distance = 1 - that cosine. Ties go to the lowest index. Never
    materialises the n x k matrix beyond one block. `x` [n, d] float32/float16/bfloat16 (float64 on
    the CPU), `centroids` [k, d] any float dtype on the same device. On the GPU a Triton kernel
    serves (fp32 accumulation; fp32 inputs use exact fp32 products unless
    `torch.backends.cuda.matmul.allow_tf32`); on the CPU a C++ kernel (blocks of rows in
    parallel, scores in registers up to k = 128 or one GEMM per block, then the argmin; fp16/bf16
    computed in float32).

    `validate=True` checks that x and the centroids are finite (one host sync on the GPU): a NaN
    row would otherwise get label 0 and distance NaN, silently. `validate=False` skips it, for
    callers that checked x once (KMeans checks x once per fit, not once per Lloyd iteration).

    Example:
        >>> import torch, coreset_ext as cx
        >>> x = torch.tensor([[0.0, 0.0], [4.0, 4.0], [1.0, 0.0]])
        >>> labels, dist = cx.ops.kmeans_assign(x, torch.tensor([[0.0, 0.0], [4.0, 3.0]]))
        >>> labels.tolist(), dist.tolist()
        ([0, 1, 0], [0.0, 1.0, 1.0])
    """
    check("metric", metric, METRICS)
    check_tensor("x", x, dim=2, dtypes=KMEANS_DTYPES, what="[n, d]")
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2 or not centroids.is_floating_point():
        raise ValueError(f"centroids must be a 2-D float tensor [k, d], got {describe(centroids)}")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids has {centroids.shape[1]} features but x has {x.shape[1]}")
    if centroids.shape[0] < 1:
        raise ValueError("centroids must hold at least one centroid")
    check_same_device(x=x, centroids=centroids)
    if validate:
        # distances are computed from squares: entries beyond float32's range for them would give
        # a silently wrong label (a NaN row: label 0 and distance NaN)
        check_finite("x", x, float32_squares=True)
        check_finite("centroids", centroids, float32_squares=x.dtype != torch.float64)
    chosen = _backend.resolve("kmeans_assign", x.device.type, backend or "")
    if chosen == "triton" and x.dtype == torch.float64:
        if backend is not None:
            raise ValueError("x is float64, which the Triton kernel does not take (use float32)")
        chosen = "reference"
    return torch.ops.coreset_ext.kmeans_assign(x, centroids, metric, chosen)


@torch.library.custom_op("coreset_ext::kmeans_assign", mutates_args=())
def _kmeans_assign_op(
    x: torch.Tensor, centroids: torch.Tensor, metric: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    # autocast would lower the reference's matmul to bf16 mid-formula: the op's precision is its own
    with torch.autocast(x.device.type, enabled=False):
        return _kmeans_assign_impl(x, centroids, metric, backend)


def _kmeans_assign_impl(x, centroids, metric, backend):
    if backend == "triton":
        from coreset_ext.triton_kernels import kmeans  # Triton is optional: imported when used

        return kmeans.kmeans_assign(x, centroids, metric == "cosine")
    # the CPU kernel and the reference compute fp16/bf16 in float32 (CPU matmuls in fp16 are slow)
    xw = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if backend == "cpp":
        return torch.ops.coreset_ext.kmeans_assign_cpu(xw, _prepared(centroids, xw.dtype, metric), metric == "cosine")
    c = centroids.to(xw.dtype)
    if metric == "euclidean":
        # about the centroids' mean, as the kernels (see _centroid_mean): one copy of x, fallback only
        mid = _centroid_mean(c)
        xw, c = xw - mid, c - mid
    labels, dist = reference.kmeans_assign(xw, c, metric=metric, chunk_size=REFERENCE_ROWS)
    return labels, dist.float()


def _centroid_mean(centroids: torch.Tensor) -> torch.Tensor:
    """The point every backend takes its euclidean products about: ||x - c||^2 = ||x'||^2 - 2 x'.c' +
    ||c'||^2 with x' = x - m, c' = c - m. Far from the origin (offset 1e4, spread 1) the unshifted
    terms are ~1e8 and their difference loses every float32 digit; about m they are of the spread's size."""
    return centroids.double().mean(dim=0).to(centroids.dtype)


@_kmeans_assign_op.register_fake
def _(x, centroids, metric, backend):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32)


# On the CPU the C++ kernel; without _C, the chunked reference.
_backend.register_op("kmeans_assign", gpu=("triton",), cpu=("cpp",))


# ------------------------------------------------------------------------------ kmeans_update


def kmeans_update(
    x: torch.Tensor, labels: torch.Tensor, k: int, *, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts: (sums [k, d] float32 (float64 for float64 x), counts [k] int64).

    sums_c = sum of the rows x_i with labels_i = c, counts_c = how many. Deterministic (no float
    atomics): bit-identical run to run on CPU (C++, OpenMP, double accumulation) and CUDA
    (sort + segmented reduction). Centroids are `sums / counts`. `validate=True` checks the label
    range here (one host sync on the GPU); the kernels never write out of bounds either way.

    Example:
        >>> import torch, coreset_ext as cx
        >>> sums, counts = cx.ops.kmeans_update(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        ...                                     torch.tensor([1, 0, 1]), 2)
        >>> sums.tolist(), counts.tolist()
        ([[3.0, 4.0], [6.0, 8.0]], [1, 2])
    """
    check_tensor("x", x, dim=2, dtypes=KMEANS_DTYPES, what="[n, d]")
    check_tensor("labels", labels, dim=1, dtypes=(torch.int32, torch.int64))
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but x has {x.shape[0]} rows")
    k = check("k", k, POSITIVE_INT)
    check_same_device(x=x, labels=labels)
    labels = labels.long()
    if validate and not torch.compiler.is_compiling() and labels.numel():
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()  # one host sync for both ends
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels contains {bad}, out of range for k = {k}")
    return torch.ops.coreset_ext.kmeans_update(x, labels, k)


def _kmeans_update_reference(x, labels, k):
    # index_add_ and bincount check bounds themselves, so a call that bypasses the wrapper
    # cannot write out of bounds either.
    return reference.kmeans_update(x, labels, k)


_backend.define_fallback("kmeans_update(Tensor x, Tensor labels, int k) -> (Tensor, Tensor)",
                         _kmeans_update_reference)
_backend.register_op("kmeans_update", gpu=("cuda",), cpu=("cpp",))


@torch.library.register_fake("coreset_ext::kmeans_update")
def _(x, labels, k):
    acc = reference.accumulation_dtype(x)
    return x.new_empty(k, x.shape[1], dtype=acc), x.new_empty(k, dtype=torch.int64)


# -------------------------------------------------------------------------- kmeans_lloyd_step


def kmeans_lloyd_step(
    x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "euclidean", distance: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One Lloyd pass, unchecked: (labels, distance) of `kmeans_assign` and (sums, counts) of
    `kmeans_update` for those labels. `distance=False` leaves the distance out (None): a Lloyd
    iteration needs only labels, sums and counts, and the exact winner distance costs a pass over
    each row's features.

    For callers that validated x and the centroids themselves (KMeans, once per fit). On the CPU
    with `_C` and float32/float64 x, one C++ pass over the rows does both, with the labels of
    `kmeans_assign` and the sums accumulated in x's dtype per fixed range of rows, merged in
    float64 (deterministic whatever the thread count; within float32 rounding of `kmeans_update`'s);
    elsewhere the two ops run one after the other, without their host-side checks.

    Example:
        >>> import torch, coreset_ext as cx
        >>> x = torch.tensor([[0.0, 0.0], [4.0, 4.0], [1.0, 0.0]])
        >>> labels, dist, sums, counts = cx.ops.kmeans_lloyd_step(x, torch.tensor([[0.0, 0.0], [4.0, 3.0]]))
        >>> labels.tolist(), counts.tolist()
        ([0, 1, 0], [2, 1])
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and _backend.has_extension():
        labels, dist, sums, counts = torch.ops.coreset_ext.kmeans_lloyd_step_cpu(
            x, _prepared(centroids, x.dtype, metric), metric == "cosine", distance)
        return labels, dist if distance else None, sums, counts
    labels, dist = kmeans_assign(x, centroids, metric=metric, validate=False)
    sums, counts = kmeans_update(x, labels, centroids.shape[0], validate=False)
    return labels, dist if distance else None, sums, counts


def _prepared(centroids: torch.Tensor, dtype: torch.dtype, metric: str) -> torch.Tensor:
    """Centroids as the C++ kernels take them: x's dtype, normalised for cosine."""
    c = centroids.to(dtype)
    return reference.normalize(c) if metric == "cosine" else c
