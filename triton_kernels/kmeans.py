"""k-means assignment in Triton: nearest centroid of every row without the N x K matrix.

Each program owns BLOCK_M points and streams the centroids in tiles of BLOCK_N, keeping a running
(best score, best index) per point in registers. Only labels [n] and distances [n] are written.

    euclidean: score_ic = ||c||^2 - 2 <x_i, c>   (argmin; + ||x_i||^2 gives the squared distance)
    cosine:    score_ic = -<x_i, c/|c|>           (argmin = argmax cosine; centroids normalised by
                                                    the wrapper, x's norm only scales a row)

Ties go to the lowest centroid index: within a tile the smallest index attaining the minimum,
across tiles only a strictly smaller score replaces the running best. Products accumulate in
float32 whatever the input dtype (fp32, fp16, bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import block_d, cdiv, interpreting, on_tensor_device, precision

# Interpreter runs (CI): small, valid for tl.dot (>= 16).
TILES = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4)

# GPU launches are autotuned per (k, d, dtype, metric); few configs, each compiled once per key.
# The last two: fp32 without TF32 (FMA products) spills registers in the others on sm_90
# (tools/triton_aot.py reports it); two stages leave room for the accumulators.
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (256, 128, 8, 3),
                         (64, 64, 4, 2), (128, 64, 8, 2))
]


def autotune(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and not interpreting()


@triton.jit
def load_points(x_ptr, rows, row_ok, dims, D: tl.constexpr, stride_x, stride_xd):
    """[rows, dims] block of x (any strides), zero outside."""
    return tl.load(x_ptr + rows[:, None] * stride_x + dims[None, :] * stride_xd,
                   mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def load_centroids_t(c_ptr, cols, col_ok, dims, D: tl.constexpr, stride_c, stride_cd):
    """[dims, cols] block of the centroids, transposed as tl.dot's right operand, zero outside."""
    return tl.load(c_ptr + cols[None, :] * stride_c + dims[:, None] * stride_cd,
                   mask=col_ok[None, :] & (dims < D)[:, None], other=0.0)


# k and d are compile-time constants: loop bounds over runtime ints break Triton 3.6's interpreter
# under numpy >= 2.4 (int() of a 1-element array), and on the GPU each (k, d) is autotuned anyway.
@triton.jit
def _kmeans_assign_kernel(
    x_ptr, c_ptr, c_sq_ptr, labels_ptr, dist_ptr,
    n_rows, stride_x, stride_xd, stride_c, stride_cd,
    K: tl.constexpr, D: tl.constexpr, COSINE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_TILE: tl.constexpr,
):
    # Rows are points, columns centroids. int64 row offsets: n * stride overflows int32 beyond
    # ~16M rows of d = 128.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    dims = tl.arange(0, BLOCK_D)

    # defined before the loops so it is loop-carried (Triton scoping), overwritten below
    x_sq = tl.zeros([BLOCK_M], tl.float32)
    if ONE_D_TILE:
        # d fits in one tile: load the points once and reuse them for every centroid tile.
        x_tile = load_points(x_ptr, rows, row_ok, dims, D, stride_x, stride_xd)
        xf = x_tile.to(tl.float32)
        x_sq = tl.sum(xf * xf, axis=1)

    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int64)
    for c0 in range(0, K, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < K
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if ONE_D_TILE:
            acc = tl.dot(x_tile, load_centroids_t(c_ptr, cols, col_ok, dims, D, stride_c, stride_cd), acc,
                         input_precision=PRECISION)
        else:
            x_sq_acc = tl.zeros([BLOCK_M], tl.float32)  # recomputed per centroid tile: 1/BLOCK_N extra
            for d0 in range(0, D, BLOCK_D):
                xt = load_points(x_ptr, rows, row_ok, d0 + dims, D, stride_x, stride_xd)
                ct = load_centroids_t(c_ptr, cols, col_ok, d0 + dims, D, stride_c, stride_cd)
                xtf = xt.to(tl.float32)
                x_sq_acc += tl.sum(xtf * xtf, axis=1)
                acc = tl.dot(xt, ct, acc, input_precision=PRECISION)
            x_sq = x_sq_acc
        if COSINE:
            score = -acc
        else:
            c_sq = tl.load(c_sq_ptr + cols, mask=col_ok, other=0.0)
            score = c_sq[None, :] - 2.0 * acc
        score = tl.where(col_ok[None, :], score, float("inf"))
        tile_best = tl.min(score, axis=1)
        # lowest index attaining the tile minimum
        cand = tl.where(score == tile_best[:, None], cols[None, :].to(tl.int64), K + BLOCK_N)
        tile_idx = tl.min(cand, axis=1)
        better = tile_best < best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)

    if COSINE:
        # best = -<x, c_hat>; cosine = that / max(|x|, eps)  (EPS as in coreset_ext.reference)
        x_norm = tl.maximum(tl.sqrt(x_sq), 1e-6)
        dist = 1.0 + best / x_norm
    else:
        dist = tl.maximum(best + x_sq, 0.0)
    tl.store(labels_ptr + rows, best_idx, mask=row_ok)
    tl.store(dist_ptr + rows, dist, mask=row_ok)


_kmeans_assign_tuned = triton.autotune(configs=CONFIGS, key=["K", "D", "COSINE", "PRECISION"])(_kmeans_assign_kernel)


@on_tensor_device
def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the kernel. `x` [n, d] (fp32/fp16/bf16, any strides), `centroids` [k, d] in any float
    dtype; returns (labels int64 [n], distance float32 [n]). Validation is the caller's job."""
    n, d = x.shape
    k = centroids.shape[0]
    c = centroids.to(torch.float32)
    if cosine:
        c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-6)
    c = c.to(x.dtype).contiguous()
    # ||c||^2 of the centroids as the kernel sees them (rounded to x's dtype), so the distance is
    # exactly that to the rounded centroid.
    c_sq = c.to(torch.float32).pow(2).sum(dim=1).contiguous()
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return labels, dist
    bd = block_d(d)
    one_tile = bd <= 128  # keeps the point tile in registers; wider d loops over 64-wide tiles
    if not one_tile:
        bd = 64
    args = (x, c, c_sq, labels, dist, n, x.stride(0), x.stride(1), c.stride(0), c.stride(1))
    # fp32: honour torch's TF32 switch (off by default) so fp32 labels match an fp32 matmul.
    const = dict(K=k, D=d, COSINE=cosine, PRECISION=precision(x.dtype), BLOCK_D=bd, ONE_D_TILE=one_tile)
    if autotune(x):
        _kmeans_assign_tuned[lambda meta: (cdiv(n, meta["BLOCK_M"]),)](*args, **const)
    else:
        _kmeans_assign_kernel[(cdiv(n, TILES["BLOCK_M"]),)](*args, **const, **TILES)
    return labels, dist
