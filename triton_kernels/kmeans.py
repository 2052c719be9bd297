"""k-means assignment in Triton: nearest centroid of every row without the N x K matrix.

Each program owns BLOCK_M points and streams the centroids in tiles of BLOCK_N, keeping a running
(best score, best index) per point in registers. Only labels [n] and distances [n] are written.
fp32 euclidean products are taken about the centroids' mean m (x' = x - m as x is loaded, c' = c - m
by the wrapper): exact far from the origin. 16-bit inputs are not shifted: rounding x - m back to
16 bits would lose more than the cancellation it saves (their own rounding dominates far out).

    euclidean: score_ic = ||c'||^2 - 2 <x'_i, c'>   (argmin; + ||x'_i||^2 gives the squared distance)
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

from .launch import autotune_enabled, autotuned, block_d, capability, cdiv, interpreting, on_tensor_device, precision

# Interpreter runs (CI): small, valid for tl.dot (>= 16).
TILES = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)

# Fixed tiles per architecture, the default (no autotuning: a new k or d launches at once).
# Chosen among CONFIGS so that `tools/triton_aot.py --arch 90 --max-spill 64` and `--arch 80` pass
# (it compiles these fixed tiles): fp32 without TF32 (FMA products) spills 80+ bytes per thread in
# 64 x 64 / 4 warps at BLOCK_D = 128 on sm_90, 8 in 128 x 64 / 8 warps. GPU timing pending.
ARCH_TILES = {
    90: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    80: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
}
# fp32 without TF32 (exact products): every larger tile tried spills hundreds to thousands of bytes
# per thread at BLOCK_D = 128 in one of the kernel's variants on sm_80 or sm_90 (tools/triton_aot.py)
FP32_IEEE_TILES = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
# fp32 with TF32: operands of twice bf16's bytes; sm_90's bf16 tile needs 256 KiB of shared memory
# at BLOCK_D = 128 and sm_80's spills 168+ bytes on sm_90 (tools/triton_aot.py): a smaller one.
TF32_TILES = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)

# CORESET_EXT_AUTOTUNE=1 (launch.autotune_enabled) tunes among these, winners cached on disk.
# The last two: fp32 without TF32 spills registers in the others on sm_90.
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (256, 128, 8, 3),
                         (64, 64, 4, 2), (128, 64, 8, 2))
]


def autotune(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and autotune_enabled()


def tiles(device: torch.device, prec: str) -> dict:
    """The fixed launch configuration for this device: the interpreter's, or the architecture's."""
    if device.type != "cuda" or interpreting():
        return TILES
    if prec == "ieee":
        return FP32_IEEE_TILES
    if prec == "tf32":
        return TF32_TILES
    return ARCH_TILES[90] if _arch(device) >= 90 else ARCH_TILES[80]


def _arch(device: torch.device) -> int:
    """Compute capability (90, 80, ...): what tools/triton_aot.py answers for a target it compiles for."""
    return capability(device)


@triton.jit
def load_points(x_ptr, rows, row_ok, dims, D, stride_x, stride_xd):
    """[rows, dims] block of x (any strides), zero outside."""
    return tl.load(x_ptr + rows[:, None] * stride_x + dims[None, :] * stride_xd,
                   mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)


@triton.jit
def load_centroids_t(c_ptr, cols, col_ok, dims, D, stride_c, stride_cd):
    """[dims, cols] block of the centroids, transposed as tl.dot's right operand, zero outside."""
    return tl.load(c_ptr + cols[None, :] * stride_c + dims[:, None] * stride_cd,
                   mask=col_ok[None, :] & (dims < D)[:, None], other=0.0)


@triton.jit
def load_shifted(x_ptr, shift_ptr, rows, row_ok, dims, D, stride_x, stride_xd, SHIFT: tl.constexpr):
    """[rows, dims] block of x - shift (float32), zero outside; x itself when not SHIFT."""
    xt = load_points(x_ptr, rows, row_ok, dims, D, stride_x, stride_xd).to(tl.float32)
    if SHIFT:
        m = tl.load(shift_ptr + dims, mask=dims < D, other=0.0)
        xt = tl.where(row_ok[:, None], xt - m[None, :], 0.0)
    return xt


# K (centroids) and D (features) are runtime values, not specialised on (do_not_specialize): a new
# n_clusters or d reuses the compiled kernel of its BLOCK_D class. (Runtime loop bounds need
# numpy < 2.4 under Triton 3.6's interpreter, which the Makefile pins.)
@triton.jit(do_not_specialize=["n_rows", "K", "D"])
def _kmeans_assign_kernel(
    x_ptr, c_ptr, c_sq_ptr, shift_ptr, labels_ptr, dist_ptr,
    n_rows, stride_x, stride_xd, stride_c, stride_cd, K, D,
    COSINE: tl.constexpr, SHIFT: tl.constexpr, PRECISION: tl.constexpr,
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
        xf = load_shifted(x_ptr, shift_ptr, rows, row_ok, dims, D, stride_x, stride_xd, SHIFT)
        x_tile = xf.to(x_ptr.dtype.element_ty)
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
                xtf = load_shifted(x_ptr, shift_ptr, rows, row_ok, d0 + dims, D, stride_x, stride_xd, SHIFT)
                ct = load_centroids_t(c_ptr, cols, col_ok, d0 + dims, D, stride_c, stride_cd)
                x_sq_acc += tl.sum(xtf * xtf, axis=1)
                acc = tl.dot(xtf.to(x_ptr.dtype.element_ty), ct, acc, input_precision=PRECISION)
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


# tuned once per (d, metric, precision) and dtype, not per k: the winner serves every n_clusters
_kmeans_assign_tuned = autotuned(CONFIGS, key=["D", "COSINE", "PRECISION"])(_kmeans_assign_kernel)


@on_tensor_device
def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the kernel. `x` [n, d] (fp32/fp16/bf16, any strides), `centroids` [k, d] in any float
    dtype; returns (labels int64 [n], distance float32 [n]). Validation is the caller's job."""
    n, d = x.shape
    k = centroids.shape[0]
    c = centroids.to(torch.float32)
    shifted = not cosine and x.dtype == torch.float32  # cosine is about the origin
    if not shifted:
        shift = c.new_zeros(d)
        if cosine:
            c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-6)
    else:
        # products about the centroids' mean (ops.kmeans._centroid_mean): exact far from the origin
        shift = centroids.double().mean(dim=0).float()
        c = c - shift
    shift = shift.contiguous()
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
    args = (x, c, c_sq, shift, labels, dist, n, x.stride(0), x.stride(1), c.stride(0), c.stride(1), k, d)
    # fp32: honour torch's TF32 switch (off by default) so fp32 labels match an fp32 matmul.
    prec = precision(x.dtype)
    const = dict(COSINE=cosine, SHIFT=shifted, PRECISION=prec, BLOCK_D=bd, ONE_D_TILE=one_tile)
    if autotune(x):
        _kmeans_assign_tuned[lambda meta: (cdiv(n, meta["BLOCK_M"]),)](*args, **const)
    else:
        fixed = tiles(x.device, prec)
        _kmeans_assign_kernel[(cdiv(n, fixed["BLOCK_M"]),)](*args, **const, **fixed)
    return labels, dist
