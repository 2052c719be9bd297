"""Triton kernels for the fused contrastive losses: NT-Xent, MoCo InfoNCE against a queue, pair cosine.

NT-Xent and MoCo are one kernel family, InfoNCE over streamed column tiles: each program owns a
block of rows x_i (NT-Xent: x = [z1; z2]; MoCo: the queries q) and streams column tiles y_j (NT-Xent:
x itself; MoCo: the queue), and a combine kernel merges column splits. Compile-time flags:
- EXCLUDE_DIAG: the columns are the rows themselves (NT-Xent). The diagonal (each row's own
  similarity) is left out; row i's positive is row p(i) = (i + B) mod 2B, one of the columns; and in
  the backward, column j's own loss term depends on x_i too (p_ji). Otherwise (MoCo) the positive
  is row i of the keys, a logit of its own outside the columns.
- SPLIT: the columns are split across grid axis 1, for when the row blocks alone are too few to fill
  the GPU: the forward writes per-split (max, sum) partials, the backward per-split gradient sums,
  and the combine kernels merge them and finish.
- NORMALIZE (cosine logits), FIXED_BOUND (see below), PRECISION (tl.dot's input precision).

Conventions shared by every kernel here (the helpers live in _tiles.py):
- Inputs stay in their own dtype (fp32, fp16, bf16); products accumulate in fp32 (tl.dot) and all
  softmax arithmetic is fp32. The similarity matrix exists only one [BLOCK_M, BLOCK_N] tile at a
  time, in registers; backward passes recompute tiles from the saved per-row log-sum-exp.
- Normalisation is fused: `_row_rnorm_kernel` writes r_i = 1 / max(||x_i||, EPS) (O(N) floats),
  and logit tiles are scaled by r_i r_j after the dot product of the raw rows. Backward passes also
  take a normalised copy (O(N d), written by the same kernel) as the right operand of w @ yhat.
- Log-sum-exps run in base 2 (exp2/log2 are the fast units) and are stored in natural units.
  Each row keeps an online maximum, so temperatures down to 0.01 (logits up to 100) never overflow;
  for normalised rows and t >= FIXED_BOUND_MIN_T the bound |u| <= log2(e)/t makes every 2^u a
  normal fp32 as it stands, and no maximum is kept (FIXED_BOUND).
- Row offsets are computed in int64 so N * d beyond 2**31 elements cannot wrap.
Names follow the package's conventions (triton_kernels/__init__.py); the launch configuration
(`tiles`, `CONFIGS`, `column_splits`, `autotune`) is public, for tools.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import (
    LN2, LOG2E, compute_logits, feature_dims, load_logit_scale, load_rows, merge_lse, normalize_backward,
    own_rows, reciprocal_norms, row_ptrs, split_columns, store_rows, update_lse,
)
from .launch import (
    autotune_enabled, autotuned, block_d, cdiv, hopper, interpreting, num_sms, on_tensor_device, precision,
)

# Widest feature dimension the tiles below are sized for; coreset_ext.ops sends wider inputs to
# the reference unless Triton is requested explicitly.
MAX_D = 256

# Smallest temperature for FIXED_BOUND: every 2^u (|u| <= log2(e) / t), their row sums over up to
# 2^17 rows and the weights g 2^-lse must stay normal, finite fp32 with room for loss scaling.
FIXED_BOUND_MIN_T = 0.025


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


def tiles(d: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for row/column tiles of a [*, d] operand.

    Sized so that the pipelined column tiles (the raw rows and, in backward passes, their
    normalised copy) plus the row tile fit the shared memory of an A100 (163 KiB), and so that
    ptxas spills no registers: tools/triton_aot.py checks both for sm_80 and sm_90. e.g. bf16,
    d = 128: 3 x 2 x 64 x 128 x 2 B + 64 x 128 x 2 B = 112 KiB. Row tiles of 64 on the tensor
    cores: Hopper's warpgroup MMA (wgmma) takes 64 rows per warpgroup; with 32 Triton falls back
    to Ampere's mma.sync, Hopper's slower path (the tool's MMA column shows which one a launch got).
    fp32 without TF32 multiplies on the FMA units, whose accumulators need small tiles and no
    second pipeline stage."""
    if interpreting() or device.type != "cuda":
        return 32, 32, 4, 1  # small tiles: several tiles and ragged edges even at tiny test sizes
    bd = block_d(d)
    fma = precision(dtype) == "ieee"
    wide = dtype == torch.float32
    # Where 64 rows spill more than 32 (TF32, and bf16 at d = 256, on sm_80) and no wgmma is to
    # be had, the older GPUs keep 32-row tiles.
    is_hopper = hopper(device)
    if bd <= 128:
        if fma:
            return 32, 32, 8, 1
        if wide:
            return (64, 64, 8, 2) if is_hopper else (32, 64, 4, 2)
        return 64, 64, 8, 3
    if bd <= 256:
        if wide:  # TF32 at 64 rows spills hundreds of bytes in the backward, on either GPU
            return 32, 32, 8, 2
        return (64, 32, 8, 2) if is_hopper else (32, 64, 8, 2)
    return 16, 32, 4, 1


# On the GPU, for d <= 128, the NT-Xent kernels pick their tiles by autotuning (once per N, d and
# dtype; configs that exceed shared memory are skipped by the autotuner). The fixed `tiles` choice
# serves wider d, the interpreter, MoCo's queue, and CORESET_EXT_NO_AUTOTUNE=1.
CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
    for m, n, w, st in ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 2),
                        (64, 64, 8, 3), (32, 64, 4, 3),  # more programs for small N
                        (64, 64, 8, 2),  # TF32: the one 64-row (wgmma) tile whose backward fits and does not spill
                        (32, 32, 4, 2))  # fp32 without TF32 (FMA products): the larger tiles spill
]


def autotune(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and block_d(x.shape[1]) <= 128 and autotune_enabled()


def column_splits(n: int, block_m: int, device: torch.device) -> int:
    """NT-Xent's programs per row tile along the columns: 1 while the row tiles fill every SM; else
    enough to give each SM about two programs, each still streaming at least 8 column tiles of 64."""
    row_tiles = cdiv(n, block_m)
    sms = num_sms(device)
    if row_tiles >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, row_tiles), n // (8 * 64)))


def _max_column_splits(n: int, device: torch.device) -> int:
    """The most splits any tile choice launches (the tallest row tiles split most): buffers for
    the partials are sized by it, and 1 means no tile choice splits."""
    tallest = max(c.kwargs["BLOCK_M"] for c in CONFIGS)  # the fixed tiles are never taller
    return column_splits(n, tallest, device)


def _queue_splits(b: int, k: int, bm: int, bn: int, device: torch.device) -> int:
    """MoCo's queue splits: enough (row tile, split) programs to fill the device twice over, none
    empty. Each split's share of the queue is computed in the kernels by split_columns."""
    want = max(1, cdiv(2 * num_sms(device), cdiv(b, bm)))
    n_split = max(1, min(want, cdiv(k, bn)))
    return cdiv(k, cdiv(cdiv(k, n_split), bn) * bn)


def _combine_rows(d: int) -> int:
    """Rows per program of the combine kernels: they hold several [rows, d] fp32 tiles in
    registers, which spill beyond 32 x 128 (tools/triton_aot.py)."""
    return 32 if block_d(d) <= 128 else 16


def _rowwise_rows(d: int) -> int:
    """Rows per program of the row-wise kernels (row norms, pair cosine): about 4096 elements."""
    return max(1, min(64, 4096 // block_d(d)))


# --------------------------------------------------------------------------------------------
# row norms
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_rnorm_kernel(x_ptr, inv_x_ptr, xh_ptr, n_rows, d, stride_x, stride_xh, eps, WRITE_XHAT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    dims, dim_ok = feature_dims(d, BLOCK_D)
    x = load_rows(x_ptr, rows, row_ok, dims, dim_ok, stride_x).to(tl.float32)
    inv_x = reciprocal_norms(x, eps)
    tl.store(inv_x_ptr + rows, inv_x, mask=row_ok)
    if WRITE_XHAT:
        store_rows(xh_ptr, rows, row_ok, dims, dim_ok, stride_xh, x * inv_x[:, None])


def _launch_rnorm(x: torch.Tensor, eps: float, xh: torch.Tensor | None) -> torch.Tensor:
    n, d = x.shape
    inv_x = torch.empty(n, device=x.device, dtype=torch.float32)
    bm = _rowwise_rows(d)
    _row_rnorm_kernel[(cdiv(n, bm),)](
        x, inv_x, inv_x if xh is None else xh, n, d, x.stride(0), 0 if xh is None else xh.stride(0), eps,
        WRITE_XHAT=xh is not None, BLOCK_M=bm, BLOCK_D=block_d(d))
    return inv_x


def row_rnorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """r_i = 1 / max(||x_i||, eps) in float32, shape [n]; x contiguous [n, d]."""
    return _launch_rnorm(x, eps, None)


def row_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [n] float32, xhat = x * r in x's dtype [n, d]) in one pass; x contiguous [n, d]."""
    xh = torch.empty_like(x)
    return _launch_rnorm(x, eps, xh), xh


# --------------------------------------------------------------------------------------------
# InfoNCE over streamed column tiles: NT-Xent (x against itself) and MoCo (q against a queue)
#
# Each kernel's arguments: first what every launch reads (the rows x, outputs, sizes), then the
# columns y and positives p when they are not x itself: MoCo's queue and keys. With EXCLUDE_DIAG
# the kernels read those from x's own arguments and ignore the trailing ones (a layout that also
# leaves ptxas' register allocation for NT-Xent as it was before MoCo shared the kernels).
# --------------------------------------------------------------------------------------------


@triton.jit
def positive_rows(rows, n_rows, n_pairs, EXCLUDE_DIAG: tl.constexpr):
    if EXCLUDE_DIAG:
        return (rows + n_pairs) % n_rows  # the other view of the same example
    else:
        return rows  # the key of the same example


@triton.jit
def load_positive(xr, rows, row_ok, dims, dim_ok, inv_x_ptr, p_ptr, inv_p_ptr, n_rows, n_pairs, stride_p, inv_t,
                  EXCLUDE_DIAG: tl.constexpr, NORMALIZE: tl.constexpr):
    """(positive logit, cosine) of each row's pair: one row-wise dot in fp32, not a tile entry."""
    prow = positive_rows(rows, n_rows, n_pairs, EXCLUDE_DIAG)
    xp = load_rows(p_ptr, prow, row_ok, dims, dim_ok, stride_p)
    inv_xr = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)
    inv_xp = tl.load(inv_p_ptr + prow, mask=row_ok, other=0.0)
    pdot = tl.sum(xr.to(tl.float32) * xp.to(tl.float32), axis=1)
    cos = pdot * inv_xr * inv_xp
    if NORMALIZE:
        return cos * inv_t, cos
    else:
        return pdot * inv_t, cos


@triton.jit
def finish_lse(m_i, l_i, FIXED_BOUND: tl.constexpr):
    """The natural-unit log-sum-exp of a row's base-2 (m, l)."""
    if FIXED_BOUND:
        return tl.log2(l_i) * LN2
    else:
        return (m_i + tl.log2(l_i)) * LN2


@triton.jit
def store_forward(lse, pos, cos, rows, row_ok, loss_ptr, lse_ptr, cos_ptr, n_pairs):
    tl.store(loss_ptr + rows, lse - pos, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(cos_ptr + rows, cos, mask=rows < n_pairs)  # NT-Xent meets each pair twice: B cosines


@triton.jit
def _info_nce_fwd_kernel(
    x_ptr, inv_x_ptr, loss_ptr, lse_ptr, cos_ptr, m_part_ptr, l_part_ptr, n_rows, n_pairs, d, stride_x, inv_t,
    y_ptr, inv_y_ptr, p_ptr, inv_p_ptr, n_cols, stride_y, stride_p,
    EXCLUDE_DIAG: tl.constexpr, NORMALIZE: tl.constexpr, FIXED_BOUND: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    if EXCLUDE_DIAG:
        y_ptr, inv_y_ptr, p_ptr, inv_p_ptr, n_cols, stride_y, stride_p = (x_ptr, inv_x_ptr, x_ptr, inv_x_ptr,
                                                                          n_rows, stride_x, stride_x)
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    dims, dim_ok = feature_dims(d, BLOCK_D)
    xr = load_rows(x_ptr, rows, row_ok, dims, dim_ok, stride_x)
    scale_r = load_logit_scale(inv_x_ptr, rows, row_ok, inv_t, NORMALIZE, BLOCK_M)
    lo, hi = split_columns(n_cols, SPLIT, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        yc = load_rows(y_ptr, cols, col_ok, dims, dim_ok, stride_y)
        u = compute_logits(xr, yc, scale_r, inv_y_ptr, cols, col_ok, NORMALIZE, PRECISION)
        valid = col_ok[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (cols[None, :] != rows[:, None])  # own similarity excluded
        m_i, l_i = update_lse(m_i, l_i, tl.where(valid, u, float("-inf")), FIXED_BOUND)
    if SPLIT:
        part = tl.program_id(1) * n_rows + rows
        tl.store(m_part_ptr + part, m_i, mask=row_ok)
        tl.store(l_part_ptr + part, l_i, mask=row_ok)
    else:
        tl.static_assert(EXCLUDE_DIAG, "a queue's positive starts the sum in the combine kernel")
        lse = finish_lse(m_i, l_i, FIXED_BOUND)
        pos, cos = load_positive(xr, rows, row_ok, dims, dim_ok, inv_x_ptr, p_ptr, inv_p_ptr, n_rows, n_pairs,
                                 stride_p, inv_t, EXCLUDE_DIAG, NORMALIZE)
        store_forward(lse, pos, cos, rows, row_ok, loss_ptr, lse_ptr, cos_ptr, n_pairs)


@triton.jit
def _info_nce_fwd_combine_kernel(
    x_ptr, inv_x_ptr, loss_ptr, lse_ptr, cos_ptr, m_part_ptr, l_part_ptr, n_rows, n_pairs, d, stride_x, n_split,
    inv_t, p_ptr, inv_p_ptr, stride_p,
    EXCLUDE_DIAG: tl.constexpr, NORMALIZE: tl.constexpr, FIXED_BOUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Merges the splits' partials in split order (deterministic), then the forward's epilogue.
    if EXCLUDE_DIAG:
        p_ptr, inv_p_ptr, stride_p = x_ptr, inv_x_ptr, stride_x
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    dims, dim_ok = feature_dims(d, BLOCK_D)
    xr = load_rows(x_ptr, rows, row_ok, dims, dim_ok, stride_x)
    pos, cos = load_positive(xr, rows, row_ok, dims, dim_ok, inv_x_ptr, p_ptr, inv_p_ptr, n_rows, n_pairs,
                             stride_p, inv_t, EXCLUDE_DIAG, NORMALIZE)
    if EXCLUDE_DIAG:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:  # the positive key is no column: its logit (finite) starts the sum
        m_i = pos * LOG2E
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    for s in range(0, n_split):
        m_s = tl.load(m_part_ptr + s * n_rows + rows, mask=row_ok, other=float("-inf"))
        l_s = tl.load(l_part_ptr + s * n_rows + rows, mask=row_ok, other=0.0)
        m_i, l_i = merge_lse(m_i, l_i, m_s, l_s, FIXED_BOUND)
    store_forward(finish_lse(m_i, l_i, FIXED_BOUND), pos, cos, rows, row_ok, loss_ptr, lse_ptr, cos_ptr, n_pairs)


@triton.jit
def finish_backward(acc, xr, rows, row_ok, dims, dim_ok, inv_x_ptr, lse_ptr, g_ptr, gx_ptr, p_ptr, inv_p_ptr,
                    n_rows, n_pairs, stride_p, stride_gx, inv_t, eps,
                    EXCLUDE_DIAG: tl.constexpr, NORMALIZE: tl.constexpr):
    # the positive pair's term (see _info_nce_bwd_kernel), then the normalisation's backward
    prow = positive_rows(rows, n_rows, n_pairs, EXCLUDE_DIAG)
    lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_r = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    xp = load_rows(p_ptr, prow, row_ok, dims, dim_ok, stride_p).to(tl.float32)
    if EXCLUDE_DIAG:
        g_p = tl.load(g_ptr + prow, mask=row_ok, other=0.0)
        lse_p = tl.load(lse_ptr + prow, mask=row_ok, other=0.0)
    if NORMALIZE:  # the reciprocal norms are read only then (without, they may be a stand-in)
        inv_xr = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)
        inv_xp = tl.load(inv_p_ptr + prow, mask=row_ok, other=0.0)
        # Near p = 1 the positive's term is a difference of nearly equal numbers and the rounding
        # of the logit shows: each family keeps the order it was tested with (at t = 0.01 MoCo's
        # gradient misses the tests' 1e-4 with NT-Xent's order).
        if EXCLUDE_DIAG:
            xp = xp * inv_xp[:, None]
            pos = tl.sum(xr.to(tl.float32) * inv_xr[:, None] * xp, axis=1) * inv_t
        else:  # as in the forward
            pos = tl.sum(xr.to(tl.float32) * xp, axis=1) * inv_xr * inv_xp * inv_t
            xp = xp * inv_xp[:, None]
    else:
        pos = tl.sum(xr.to(tl.float32) * xp, axis=1) * inv_t
    if EXCLUDE_DIAG:
        coef = g_r * (tl.exp(pos - lse_r) - 1.0) + g_p * (tl.exp(pos - lse_p) - 1.0)
        gz = (acc + coef[:, None] * xp) * inv_t
    else:
        gz = (acc + (tl.exp(pos - lse_r) - 1.0)[:, None] * xp) * (g_r * inv_t)[:, None]
    if NORMALIZE:
        gz = normalize_backward(xr.to(tl.float32), inv_xr, gz, eps)
    store_rows(gx_ptr, rows, row_ok, dims, dim_ok, stride_gx, gz)


@triton.jit
def _info_nce_bwd_kernel(
    x_ptr, yh_ptr, inv_x_ptr, lse_ptr, g_ptr, gx_ptr, acc_ptr, n_rows, n_pairs, d, stride_x, stride_yh, stride_gx,
    inv_t, eps, y_ptr, inv_y_ptr, p_ptr, inv_p_ptr, n_cols, stride_y, stride_p,
    EXCLUDE_DIAG: tl.constexpr, NORMALIZE: tl.constexpr, FIXED_BOUND: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # dL/dxhat_i = (1/t) [ sum_j w_ij yhat_j + (the positive's term) ], p_ij = exp(s_ij/t - lse_i).
    # MoCo: w_ij = p_ij; the weight g_i, the positive's (p_i,pos - 1) khat_i and 1/t come at the end.
    # NT-Xent (EXCLUDE_DIAG): w_ij = g_i p_ij + g_j p_ji, positive term -(g_i + g_p(i)) zhat_p(i).
    # s is symmetric, so p_ji = exp(s_ij/t - lse_j) comes from the same tile with the column's
    # lse: each program owns its rows' gradient (no atomics unless SPLIT).
    # The positive column j = p(i) is left out of the tiles and added in fp32 at the end as
    # (g_i (p_i,p(i) - 1) + g_p(i) (p_p(i),i - 1)) zhat_p(i): when the positive dominates (p -> 1,
    # low temperatures, late training) the two terms nearly cancel, and rounding the weight and
    # zhat_p(i) to bf16 inside the tile product would leave an error of the size of the terms.
    # Logits come from the raw rows scaled by r_i r_j (as in the forward, so p matches its lse);
    # the product w @ yhat reads yh, normalised once before the launch: normalising each column
    # tile here costs a [BLOCK_N, BLOCK_D] fp32 tile of registers and a trip back to shared memory.
    # FIXED_BOUND (normalised rows, t >= 0.025): p_ij = e_ij c_i / g_i with e_ij = 2^u_ij and
    # c_i = g_i 2^-lse_i, so one exponential per logit serves both p_ij and p_ji. With |u| <= 58,
    # e and 2^-lse stay within 2^+-75 for 2B <= 2^17 rows: c overflows only for weights g > 2^70.
    # SPLIT: this program's columns only; its sum goes to acc_ptr (fp32) for the combine kernel.
    if EXCLUDE_DIAG:
        y_ptr, inv_y_ptr, p_ptr, inv_p_ptr, n_cols, stride_y, stride_p = (x_ptr, inv_x_ptr, x_ptr, inv_x_ptr,
                                                                          n_rows, stride_x, stride_x)
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    prow = positive_rows(rows, n_rows, n_pairs, EXCLUDE_DIAG)  # a column for NT-Xent only
    dims, dim_ok = feature_dims(d, BLOCK_D)
    xr = load_rows(x_ptr, rows, row_ok, dims, dim_ok, stride_x)
    lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    g_r = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    scale_r = load_logit_scale(inv_x_ptr, rows, row_ok, inv_t, NORMALIZE, BLOCK_M)
    if FIXED_BOUND:
        c_r = g_r * tl.exp2(-lse_r)
    lo, hi = split_columns(n_cols, SPLIT, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        yc = load_rows(y_ptr, cols, col_ok, dims, dim_ok, stride_y)
        if EXCLUDE_DIAG:
            lse_c = tl.load(lse_ptr + cols, mask=col_ok, other=0.0) * LOG2E
            g_c = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
        u = compute_logits(xr, yc, scale_r, inv_y_ptr, cols, col_ok, NORMALIZE, PRECISION)
        if EXCLUDE_DIAG:
            valid = col_ok[None, :] & (cols[None, :] != rows[:, None]) & (cols[None, :] != prow[:, None])
            u = tl.where(valid, u, float("-inf"))  # exp2 -> 0 there, and no overflow on the diagonal
            if FIXED_BOUND:
                c_c = g_c * tl.exp2(-lse_c)
                w = tl.exp2(u) * (c_r[:, None] + c_c[None, :])
            else:
                w = g_r[:, None] * tl.exp2(u - lse_r[:, None]) + g_c[None, :] * tl.exp2(u - lse_c[None, :])
        else:
            w = tl.exp2(tl.where(col_ok[None, :], u, float("-inf")) - lse_r[:, None])
        if NORMALIZE:
            # The normalised tile (|yhat| <= 1 fits any dtype); folding r_j into w instead
            # overflows fp16/bf16 for near-zero rows (r_j = 1/EPS) and gives inf * 0.
            yc = load_rows(yh_ptr, cols, col_ok, dims, dim_ok, stride_yh)
        acc += tl.dot(w.to(y_ptr.dtype.element_ty), yc, input_precision=PRECISION)
    if SPLIT:
        if EXCLUDE_DIAG:
            # 2B rows: one [2B, d] buffer that every split adds into with float atomics, in no
            # fixed order (the wrapper does not split under deterministic algorithms)
            tl.atomic_add(row_ptrs(acc_ptr, rows, dims, d), acc, mask=row_ok[:, None] & dim_ok[None, :],
                          sem="relaxed")
        else:  # a queue's B rows are few: a [B, d] slot per split, summed in order by the combine
            store_rows(acc_ptr, tl.program_id(1) * n_rows + rows, row_ok, dims, dim_ok, d, acc)
    else:
        finish_backward(acc, xr, rows, row_ok, dims, dim_ok, inv_x_ptr, lse_ptr, g_ptr, gx_ptr, p_ptr, inv_p_ptr,
                        n_rows, n_pairs, stride_p, stride_gx, inv_t, eps, EXCLUDE_DIAG, NORMALIZE)


@triton.jit
def _info_nce_bwd_combine_kernel(
    x_ptr, inv_x_ptr, lse_ptr, g_ptr, gx_ptr, acc_ptr, n_rows, n_pairs, d, stride_x, stride_gx, n_split, inv_t, eps,
    p_ptr, inv_p_ptr, stride_p,
    EXCLUDE_DIAG: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Sums the splits' gradient slots in split order, then the backward's epilogue.
    if EXCLUDE_DIAG:
        p_ptr, inv_p_ptr, stride_p = x_ptr, inv_x_ptr, stride_x
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    dims, dim_ok = feature_dims(d, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_split):
        acc += load_rows(acc_ptr, s * n_rows + rows, row_ok, dims, dim_ok, d)
    xr = load_rows(x_ptr, rows, row_ok, dims, dim_ok, stride_x)
    finish_backward(acc, xr, rows, row_ok, dims, dim_ok, inv_x_ptr, lse_ptr, g_ptr, gx_ptr, p_ptr, inv_p_ptr,
                    n_rows, n_pairs, stride_p, stride_gx, inv_t, eps, EXCLUDE_DIAG, NORMALIZE)


_TUNING_KEY = ["n_rows", "n_cols", "d", "EXCLUDE_DIAG", "NORMALIZE", "FIXED_BOUND", "SPLIT", "PRECISION"]
_info_nce_fwd_tuned = autotuned(CONFIGS, _TUNING_KEY)(_info_nce_fwd_kernel)
# the split backward accumulates into acc_ptr: the autotuner zeroes it before every trial launch
_info_nce_bwd_tuned = autotuned(CONFIGS, _TUNING_KEY, reset_to_zero=["acc_ptr"])(
    _info_nce_bwd_kernel)


def _launch_columns(kernel, tuned, x: torch.Tensor, args: tuple, const: dict, splits, fixed=None) -> int:
    """Launches kernel with the fixed tiles (`fixed`, else `tiles`) or, where there is a tuned
    version and `autotune` says so, that, over (row tiles, splits(BLOCK_M)). Returns how many
    splits ran: the tile choice decides, and the combine kernel must read those alone (an
    autotuner's trial configs leave partials in the splits beyond)."""
    n, d = x.shape
    if tuned is not None and autotune(x):
        tuned[lambda meta: (cdiv(n, meta["BLOCK_M"]), splits(meta["BLOCK_M"]))](*args, **const)
        return splits(tuned.best_config.kwargs["BLOCK_M"])
    bm, bn, nw, ns = fixed or tiles(d, x.device, x.dtype)
    kernel[(cdiv(n, bm), splits(bm))](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, **const)
    return splits(bm)


def _forward_outputs(n: int, n_pairs: int, device: torch.device):
    """(loss [n], lse [n], cos [n_pairs]), fp32."""
    return (torch.empty(n, device=device, dtype=torch.float32), torch.empty(n, device=device, dtype=torch.float32),
            torch.empty(n_pairs, device=device, dtype=torch.float32))


@on_tensor_device
def nt_xent_fwd(z1: torch.Tensor, z2: torch.Tensor, temperature: float, normalize: bool, eps: float):
    """z1, z2 [B, d], one dtype. Returns (loss_rows [2B], lse [2B], cos [B]), fp32."""
    x = torch.cat([z1, z2], dim=0).contiguous()
    n, d = x.shape
    half = n // 2
    r = row_rnorm(x, eps)
    loss, lse, cos = _forward_outputs(n, half, x.device)
    fixed = normalize and temperature >= FIXED_BOUND_MIN_T
    parts = _max_column_splits(n, x.device)
    split = parts > 1
    if split:  # every launched split writes its (max, sum) for all its rows
        m_part = torch.empty((parts, n), device=x.device, dtype=torch.float32)
        l_part = torch.empty((parts, n), device=x.device, dtype=torch.float32)
    else:
        m_part = l_part = loss  # not read by the unsplit kernel
    head = (x, r, loss, lse, cos, m_part, l_part, n, half, d, x.stride(0))
    const = dict(EXCLUDE_DIAG=True, NORMALIZE=normalize, FIXED_BOUND=fixed, BLOCK_D=block_d(d))
    launched = _launch_columns(
        _info_nce_fwd_kernel, _info_nce_fwd_tuned, x,
        head + (1.0 / temperature,) + (x, r, x, r, n, x.stride(0), x.stride(0)),  # the columns: x itself
        dict(const, SPLIT=split, PRECISION=precision(x.dtype)),
        lambda bm: min(parts, column_splits(n, bm, x.device)) if split else 1)
    if split:
        _info_nce_fwd_combine_kernel[(cdiv(n, _combine_rows(d)),)](
            *head, launched, 1.0 / temperature, x, r, x.stride(0), BLOCK_M=_combine_rows(d), num_warps=4, **const)
    return loss, lse, cos


@on_tensor_device
def nt_xent_bwd(grad_rows: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, lse: torch.Tensor,
                temperature: float, normalize: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_rows_i * loss_i with respect to z1 and z2 (two separate tensors,
    dtype of z1)."""
    x = torch.cat([z1, z2], dim=0).contiguous()
    n, d = x.shape
    half = n // 2
    # without normalisation no kernel reads the norms: lse stands in for them
    r, xh = row_normalize(x, eps) if normalize else (lse, x)
    g = grad_rows.to(torch.float32).contiguous()
    gx = torch.empty_like(x)
    # Splitting the columns sums each row's gradient with float atomics, in no fixed order.
    parts = 1 if torch.are_deterministic_algorithms_enabled() else _max_column_splits(n, x.device)
    split = parts > 1
    acc = torch.zeros(n, d, device=x.device, dtype=torch.float32) if split else gx
    inv_t = 1.0 / temperature
    const = dict(EXCLUDE_DIAG=True, NORMALIZE=normalize, BLOCK_D=block_d(d))
    _launch_columns(
        _info_nce_bwd_kernel, _info_nce_bwd_tuned, x,
        (x, xh, r, lse, g, gx, acc, n, half, d, x.stride(0), xh.stride(0), gx.stride(0), inv_t, eps,
         x, r, x, r, n, x.stride(0), x.stride(0)),  # the columns: x itself
        dict(const, FIXED_BOUND=normalize and temperature >= FIXED_BOUND_MIN_T, SPLIT=split,
             PRECISION=precision(x.dtype)),
        lambda bm: min(parts, column_splits(n, bm, x.device)) if split else 1)
    if split:  # the atomics summed every split into one slot
        _info_nce_bwd_combine_kernel[(cdiv(n, _combine_rows(d)),)](
            x, r, lse, g, gx, acc, n, half, d, x.stride(0), gx.stride(0), 1, inv_t, eps, x, r, x.stride(0),
            BLOCK_M=_combine_rows(d), num_warps=4, **const)
    return gx[:half].clone(), gx[half:].clone()


@on_tensor_device
def info_nce_queue_fwd(q, k, queue, temperature: float, normalize: bool, eps: float):
    """q, k [B, d], queue [K, d], contiguous, one dtype. Returns (loss [B], lse [B], cos [B]), fp32."""
    b, d = q.shape
    kq = queue.shape[0]
    rq, rk, rqu = row_rnorm(q, eps), row_rnorm(k, eps), row_rnorm(queue, eps)
    fixed = tiles(d, q.device, q.dtype)
    n_split = _queue_splits(b, kq, fixed[0], fixed[1], q.device)
    m_part = torch.empty(n_split, b, device=q.device, dtype=torch.float32)
    l_part = torch.empty(n_split, b, device=q.device, dtype=torch.float32)
    loss, lse, cos = _forward_outputs(b, b, q.device)
    head = (q, rq, loss, lse, cos, m_part, l_part, b, b, d, q.stride(0))
    const = dict(EXCLUDE_DIAG=False, NORMALIZE=normalize, FIXED_BOUND=False, BLOCK_D=block_d(d))
    _launch_columns(
        _info_nce_fwd_kernel, None, q,
        head + (1.0 / temperature, queue, rqu, k, rk, kq, queue.stride(0), k.stride(0)),
        dict(const, SPLIT=True, PRECISION=precision(q.dtype)), lambda bm: n_split, fixed)
    _info_nce_fwd_combine_kernel[(cdiv(b, _combine_rows(d)),)](
        *head, n_split, 1.0 / temperature, k, rk, k.stride(0), BLOCK_M=_combine_rows(d), num_warps=4, **const)
    return loss, lse, cos


@on_tensor_device
def info_nce_queue_bwd(grad_rows, q, k, queue, lse, temperature: float, normalize: bool, eps: float):
    """Gradient of sum_i grad_rows_i * loss_i with respect to q; dtype of q."""
    b, d = q.shape
    kq = queue.shape[0]
    rq, rk = row_rnorm(q, eps), row_rnorm(k, eps)
    # without normalisation the kernel reads no queue norms: lse stands in for them
    rqu, quh = row_normalize(queue, eps) if normalize else (lse, queue)
    fixed = tiles(d, q.device, q.dtype)
    n_split = _queue_splits(b, kq, fixed[0], fixed[1], q.device)
    part = torch.empty(n_split, b, d, device=q.device, dtype=torch.float32)
    g = grad_rows.to(torch.float32).contiguous()
    gq = torch.empty_like(q)
    inv_t = 1.0 / temperature
    const = dict(EXCLUDE_DIAG=False, NORMALIZE=normalize, BLOCK_D=block_d(d))
    _launch_columns(
        _info_nce_bwd_kernel, None, q,
        (q, quh, rq, lse, g, gq, part, b, b, d, q.stride(0), quh.stride(0), gq.stride(0), inv_t, eps,
         queue, rqu, k, rk, kq, queue.stride(0), k.stride(0)),
        dict(const, FIXED_BOUND=False, SPLIT=True, PRECISION=precision(q.dtype)), lambda bm: n_split, fixed)
    _info_nce_bwd_combine_kernel[(cdiv(b, _combine_rows(d)),)](
        q, rq, lse, g, gq, part, b, b, d, q.stride(0), gq.stride(0), n_split, inv_t, eps, k, rk, k.stride(0),
        BLOCK_M=_combine_rows(d), num_warps=4, **const)
    return gq


# --------------------------------------------------------------------------------------------
# pair cosine: c_i = <a_i, b_i> r_a,i r_b,i
# --------------------------------------------------------------------------------------------


@triton.jit
def load_pair(a_ptr, b_ptr, n_rows, d, stride_a, stride_b, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows of a and b in fp32, their masks and reciprocal norms."""
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    dims, dim_ok = feature_dims(d, BLOCK_D)
    a = load_rows(a_ptr, rows, row_ok, dims, dim_ok, stride_a).to(tl.float32)
    b = load_rows(b_ptr, rows, row_ok, dims, dim_ok, stride_b).to(tl.float32)
    return rows, row_ok, dims, dim_ok, a, b, reciprocal_norms(a, eps), reciprocal_norms(b, eps)


@triton.jit
def _pair_cosine_fwd_kernel(a_ptr, b_ptr, cos_ptr, n_rows, d, stride_a, stride_b, eps,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_ok, _, _, a, b, inv_a, inv_b = load_pair(a_ptr, b_ptr, n_rows, d, stride_a, stride_b, eps,
                                                       BLOCK_M, BLOCK_D)
    tl.store(cos_ptr + rows, tl.sum(a * b, axis=1) * inv_a * inv_b, mask=row_ok)


@triton.jit
def _pair_cosine_bwd_kernel(a_ptr, b_ptr, g_ptr, ga_ptr, gb_ptr, n_rows, d, stride_a, stride_b, stride_ga,
                            stride_gb, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_ok, dims, dim_ok, a, b, inv_a, inv_b = load_pair(a_ptr, b_ptr, n_rows, d, stride_a, stride_b, eps,
                                                               BLOCK_M, BLOCK_D)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    ga = normalize_backward(a, inv_a, b * (inv_b * g)[:, None], eps)  # dc/dahat = bhat
    gb = normalize_backward(b, inv_b, a * (inv_a * g)[:, None], eps)
    store_rows(ga_ptr, rows, row_ok, dims, dim_ok, stride_ga, ga)
    store_rows(gb_ptr, rows, row_ok, dims, dim_ok, stride_gb, gb)


@on_tensor_device
def pair_cosine_fwd(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    n, d = a.shape
    c = torch.empty(n, device=a.device, dtype=torch.float32)
    bm = _rowwise_rows(d)
    _pair_cosine_fwd_kernel[(cdiv(n, bm),)](
        a, b, c, n, d, a.stride(0), b.stride(0), eps, BLOCK_M=bm, BLOCK_D=block_d(d))
    return c


@on_tensor_device
def pair_cosine_bwd(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float):
    n, d = a.shape
    g = grad.to(torch.float32).contiguous()
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    bm = _rowwise_rows(d)
    _pair_cosine_bwd_kernel[(cdiv(n, bm),)](
        a, b, g, ga, gb, n, d, a.stride(0), b.stride(0), ga.stride(0), gb.stride(0), eps,
        BLOCK_M=bm, BLOCK_D=block_d(d))
    return ga, gb
