"""k-means assignment in Triton: nearest centroid of every row without the N x K matrix.

Each program owns BLOCK_N points and streams the centroids in tiles of BLOCK_K, keeping a running
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

from .launch import block_d, cdiv, on_tensor_device

# Interpreter runs (CI) and the fallback when autotuning is off: small, valid for tl.dot (>= 16).
_FIXED = dict(BLOCK_N=32, BLOCK_K=32, num_warps=4)


# k and d are compile-time constants: loop bounds over runtime ints break Triton 3.6's interpreter
# under numpy >= 2.4 (int() of a 1-element array), and on the GPU each (k, d) is autotuned anyway.
@triton.jit
def _kmeans_assign_kernel(
    x_ptr, c_ptr, cnorm_ptr, labels_ptr, dist_ptr,
    n, stride_xn, stride_xd, stride_cn, stride_cd,
    K: tl.constexpr, D: tl.constexpr, COSINE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 row offsets: n * stride overflows int32 beyond ~16M rows of d = 128.
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    offs_d0 = tl.arange(0, BLOCK_D)

    # defined before the loops so it is loop-carried (Triton scoping), overwritten below
    x_sq = tl.zeros([BLOCK_N], tl.float32)
    if ONE_D_TILE:
        # d fits in one tile: load the points once and reuse them for every centroid tile.
        mask_d0 = offs_d0 < D
        x_tile = tl.load(x_ptr + offs_n[:, None] * stride_xn + offs_d0[None, :] * stride_xd,
                         mask=mask_n[:, None] & mask_d0[None, :], other=0.0)
        xf = x_tile.to(tl.float32)
        x_sq = tl.sum(xf * xf, axis=1)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if ONE_D_TILE:
            c_tile = tl.load(c_ptr + offs_k[None, :] * stride_cn + offs_d0[:, None] * stride_cd,
                             mask=mask_k[None, :] & mask_d0[:, None], other=0.0)
            acc = tl.dot(x_tile, c_tile, acc, input_precision=PRECISION)
        else:
            x_sq_acc = tl.zeros([BLOCK_N], tl.float32)  # recomputed per centroid tile: 1/BLOCK_K extra
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                mask_d = offs_d < D
                xt = tl.load(x_ptr + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                             mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                ct = tl.load(c_ptr + offs_k[None, :] * stride_cn + offs_d[:, None] * stride_cd,
                             mask=mask_k[None, :] & mask_d[:, None], other=0.0)
                xtf = xt.to(tl.float32)
                x_sq_acc += tl.sum(xtf * xtf, axis=1)
                acc = tl.dot(xt, ct, acc, input_precision=PRECISION)
            x_sq = x_sq_acc
        if COSINE:
            score = -acc
        else:
            c_sq = tl.load(cnorm_ptr + offs_k, mask=mask_k, other=0.0)
            score = c_sq[None, :] - 2.0 * acc
        score = tl.where(mask_k[None, :], score, float("inf"))
        tile_best = tl.min(score, axis=1)
        # lowest index attaining the tile minimum
        cand = tl.where(score == tile_best[:, None], offs_k[None, :].to(tl.int64), K + BLOCK_K)
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
    tl.store(labels_ptr + offs_n, best_idx, mask=mask_n)
    tl.store(dist_ptr + offs_n, dist, mask=mask_n)


def _configs():
    out = []
    # few configs: each is compiled once per (k, d, dtype, metric) when autotuning
    # the last two: fp32 without TF32 (FMA products) spills registers in the others on sm_90
    # (tools/triton_aot.py reports it); two stages leave room for the accumulators.
    for bn, bk, w, s in ((128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (256, 128, 8, 3),
                         (64, 64, 4, 2), (128, 64, 8, 2)):
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s))
    return out


# GPU launches are autotuned per (k, d, dtype); the raw kernel stays callable for the interpreter.
_kmeans_assign_tuned = triton.autotune(configs=_configs(), key=["K", "D", "COSINE", "PRECISION"])(_kmeans_assign_kernel)


def _interpreting(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"  # CPU tensors reach this module only under TRITON_INTERPRET=1


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
    cnorm = c.to(torch.float32).pow(2).sum(dim=1).contiguous()
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return labels, dist
    bd = block_d(d)
    one_tile = bd <= 128  # keeps the point tile in registers; wider d loops over 64-wide tiles
    if not one_tile:
        bd = 64
    # fp32: honour torch's TF32 switch (off by default) so fp32 labels match an fp32 matmul.
    precision = "tf32" if (x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32) else "ieee"
    args = (x, c, cnorm, labels, dist, n, x.stride(0), x.stride(1), c.stride(0), c.stride(1))
    if _interpreting(x):
        grid = (cdiv(n, _FIXED["BLOCK_N"]),)
        _kmeans_assign_kernel[grid](*args, K=k, D=d, COSINE=cosine, PRECISION=precision, BLOCK_D=bd,
                                    ONE_D_TILE=one_tile, **_FIXED)
    else:
        _kmeans_assign_tuned[lambda meta: (cdiv(n, meta["BLOCK_N"]),)](
            *args, K=k, D=d, COSINE=cosine, PRECISION=precision, BLOCK_D=bd, ONE_D_TILE=one_tile)
    return labels, dist
