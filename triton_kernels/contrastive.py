"""Triton kernels for the fused contrastive losses (NT-Xent, MoCo InfoNCE, pair cosine).

Conventions shared by every kernel here:
- Inputs stay in their own dtype (fp32, fp16, bf16); products accumulate in fp32 (tl.dot) and all
  softmax arithmetic is fp32. The similarity matrix exists only one [BLOCK_M, BLOCK_N] tile at a
  time, in registers; backward passes recompute tiles from the saved per-row log-sum-exp.
- Normalisation is fused: `_row_rnorm_kernel` writes r_i = 1 / max(||x_i||, EPS) (O(N) floats),
  and logit tiles are scaled by r_i r_j after the dot product of the raw rows. Backward passes also
  take a normalised copy (O(N d), written by the same kernel) as the right operand of w @ zhat.
- Log-sum-exps run in base 2 (exp2/log2 are the fast units) and are stored in natural units.
  Each row keeps an online maximum, so temperatures down to 0.01 (logits up to 100) never overflow;
  for normalised rows and t >= FIXED_BOUND_MIN_T the bound |u| <= log2(e)/t makes every 2^u a
  normal fp32 as it stands, and no maximum is kept (FIXED_BOUND).
- Row offsets are computed in int64 so N * d beyond 2**31 elements cannot wrap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import block_d, cdiv, on_tensor_device

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting: IEEE unless the user allowed TF32.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# Widest feature dimension the tiles below are sized for; ops.py sends wider inputs to the
# reference unless Triton is requested explicitly.
MAX_D = 256


def _hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tiles(d: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for row/column tiles of a [*, d] operand.

    Sized so that the pipelined column tiles (the raw rows and, in backward passes, their
    normalised copy) plus the row tile fit the shared memory of an A100 (163 KiB), and so that
    ptxas spills no registers: tools/triton_aot.py checks both for sm_80 and sm_90. e.g. bf16,
    d = 128: 3 x 2 x 64 x 128 x 2 B + 64 x 128 x 2 B = 112 KiB. Row tiles of 64 on the tensor
    cores: Hopper's warpgroup MMA (wgmma) takes 64 rows per warpgroup; with 32 Triton falls back
    to Ampere's mma.sync, Hopper's slower path (the tool's MMA column shows which one a launch got).
    fp32 without TF32 multiplies on the FMA units, whose accumulators need small tiles and no
    second pipeline stage."""
    if _interpreting() or device.type != "cuda":
        return 32, 32, 4, 1  # small tiles: several tiles and ragged edges even at tiny test sizes
    bd = block_d(d)
    fma = _precision(dtype) == "ieee"
    wide = dtype == torch.float32
    # Where 64 rows spill more than 32 (TF32, and bf16 at d = 256, on sm_80) and no wgmma is to
    # be had, the older GPUs keep 32-row tiles.
    hopper = _hopper(device)
    if bd <= 128:
        if fma:
            return 32, 32, 8, 1
        if wide:
            return (64, 64, 8, 2) if hopper else (32, 64, 4, 2)
        return 64, 64, 8, 3
    if bd <= 256:
        if wide:  # TF32 at 64 rows spills hundreds of bytes in the backward, on either GPU
            return 32, 32, 8, 2
        return (64, 32, 8, 2) if hopper else (32, 64, 8, 2)
    return 16, 32, 4, 1


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still exercises several queue splits


# --------------------------------------------------------------------------------------------
# row norms
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_rnorm_kernel(X, R, XH, n, d, stride, xh_stride, eps, WRITE_XHAT: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rm = rows < n
    m2 = rm[:, None] & (cols[None, :] < d)
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    r = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
    tl.store(R + rows, r, mask=rm)
    if WRITE_XHAT:
        tl.store(XH + rows.to(tl.int64)[:, None] * xh_stride + cols[None, :],
                 (x * r[:, None]).to(XH.dtype.element_ty), mask=m2)


def _launch_rnorm(x: torch.Tensor, eps: float, xh: torch.Tensor | None) -> torch.Tensor:
    n, d = x.shape
    r = torch.empty(n, device=x.device, dtype=torch.float32)
    bd = block_d(d)
    br = max(1, min(64, 4096 // bd))
    _row_rnorm_kernel[(cdiv(n, br),)](
        x, r, r if xh is None else xh, n, d, x.stride(0), 0 if xh is None else xh.stride(0), eps,
        WRITE_XHAT=xh is not None, BLOCK_R=br, BLOCK_D=bd)
    return r


def row_rnorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """r_i = 1 / max(||x_i||, eps) in float32, shape [n]; x contiguous [n, d]."""
    return _launch_rnorm(x, eps, None)


def row_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [n] float32, xhat = x * r in x's dtype [n, d]) in one pass; x contiguous [n, d]."""
    xh = torch.empty_like(x)
    return _launch_rnorm(x, eps, xh), xh


# --------------------------------------------------------------------------------------------
# NT-Xent over the 2B rows x = [z1; z2]
#
# Each program owns a tile of rows and streams column tiles. When the row tiles alone are too few
# to fill the GPU (2B below a few thousand rows per SM wave), the columns are split across a second
# grid axis as well: the forward writes per-split (max, sum) partials that a combine kernel
# merges in a fixed order, the backward adds per-split gradient sums into an fp32 buffer that a
# finishing kernel turns into the gradient (float atomics: not under deterministic algorithms).
# --------------------------------------------------------------------------------------------


@triton.jit
def _split_columns(N, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the columns this program streams: all of them, or its share along axis 1."""
    if SPLIT:
        per = tl.cdiv(tl.cdiv(N, tl.num_programs(1)), BLOCK_N) * BLOCK_N
        lo = tl.program_id(1) * per
        hi = tl.minimum(lo + per, N)
    else:
        lo = 0
        hi = N
    return lo, hi


@triton.jit
def _load_rows(X, rows, rmask, dc, dmask, stride):
    return tl.load(X + rows.to(tl.int64)[:, None] * stride + dc[None, :],
                   mask=rmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _logit_scale(R, rows, rmask, inv_t, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr):
    # Row scale folding 1/t and log2(e): u_ij = s_ij * LOG2E / t in base-2 units.
    if NORMALIZE:
        return tl.load(R + rows, mask=rmask, other=0.0) * (inv_t * 1.4426950408889634)
    else:
        return tl.zeros([BLOCK_M], dtype=tl.float32) + inv_t * 1.4426950408889634


@triton.jit
def _nt_xent_fwd_kernel(
    X, R, LOSS, LSE, COS, M_PART, L_PART, N, half, d, stride, inv_t,
    NORMALIZE: tl.constexpr, FIXED_BOUND: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dc = tl.arange(0, BLOCK_D)
    dmask = dc < d
    xr = _load_rows(X, rows, rmask, dc, dmask, stride)
    a_r = _logit_scale(R, rows, rmask, inv_t, NORMALIZE, BLOCK_M)
    lo, hi = _split_columns(N, SPLIT, BLOCK_N)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        xc = _load_rows(X, cols, cmask, dc, dmask, stride)
        s = tl.dot(xr, tl.trans(xc), input_precision=PRECISION)
        if NORMALIZE:
            rc = tl.load(R + cols, mask=cmask, other=0.0)
            s = s * rc[None, :]
        u = s * a_r[:, None]
        valid = cmask[None, :] & (cols[None, :] != rows[:, None])  # own similarity excluded
        u = tl.where(valid, u, float("-inf"))
        if FIXED_BOUND:
            # |cosine| <= 1, so |u| <= log2(e) / t <= 58 for t >= FIXED_BOUND_MIN_T: 2^u is a
            # normal fp32 as it stands, no running max and no rescaling
            l += tl.sum(tl.exp2(u), axis=1)
        else:
            m_new = tl.maximum(m, tl.max(u, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no valid column
            l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(u - m_safe[:, None]), axis=1)
            m = m_new
    if SPLIT:
        part = tl.program_id(1) * N + rows
        tl.store(M_PART + part, m, mask=rmask)
        tl.store(L_PART + part, l, mask=rmask)
    else:
        _nt_xent_fwd_finish(X, R, LOSS, LSE, COS, m, l, xr, rows, rmask, dc, dmask, N, half, stride,
                            inv_t, NORMALIZE, FIXED_BOUND, BLOCK_M)


@triton.jit
def _nt_xent_fwd_combine_kernel(
    X, R, LOSS, LSE, COS, M_PART, L_PART, N, half, d, stride, n_split, inv_t,
    NORMALIZE: tl.constexpr, FIXED_BOUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Merges the splits' partials in split order (deterministic), then the forward's epilogue.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dc = tl.arange(0, BLOCK_D)
    dmask = dc < d
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for sp in range(0, n_split):
        ms = tl.load(M_PART + sp * N + rows, mask=rmask, other=float("-inf"))
        ls = tl.load(L_PART + sp * N + rows, mask=rmask, other=0.0)
        if FIXED_BOUND:
            l += ls
        else:
            m_new = tl.maximum(m, ms)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # splits without a valid column
            l = l * tl.exp2(m - m_safe) + ls * tl.exp2(ms - m_safe)
            m = m_new
    xr = _load_rows(X, rows, rmask, dc, dmask, stride)
    _nt_xent_fwd_finish(X, R, LOSS, LSE, COS, m, l, xr, rows, rmask, dc, dmask, N, half, stride,
                        inv_t, NORMALIZE, FIXED_BOUND, BLOCK_M)


@triton.jit
def _nt_xent_fwd_finish(X, R, LOSS, LSE, COS, m, l, xr, rows, rmask, dc, dmask, N, half, stride, inv_t,
                        NORMALIZE: tl.constexpr, FIXED_BOUND: tl.constexpr, BLOCK_M: tl.constexpr):
    if FIXED_BOUND:
        m = tl.zeros([BLOCK_M], dtype=tl.float32)
    lse = (m + tl.log2(l)) * 0.6931471805599453
    # The positive column (i + B) mod 2B, read directly: one row-wise dot in fp32.
    prow = (rows + half) % N
    xp = _load_rows(X, prow, rmask, dc, dmask, stride)
    rr = tl.load(R + rows, mask=rmask, other=0.0)
    rp = tl.load(R + prow, mask=rmask, other=0.0)
    pdot = tl.sum(xr.to(tl.float32) * xp.to(tl.float32), axis=1)
    cos = pdot * rr * rp
    if NORMALIZE:
        pos = cos * inv_t
    else:
        pos = pdot * inv_t
    tl.store(LOSS + rows, lse - pos, mask=rmask)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(COS + rows, cos, mask=rows < half)


@triton.jit
def _nt_xent_bwd_kernel(
    X, XH, R, LSE, G, GX, ACC, N, half, d, stride, xh_stride, gx_stride, inv_t, eps,
    NORMALIZE: tl.constexpr, FIXED_BOUND: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # dL/dzhat_i = (1/t) [ sum_j (g_i p_ij + g_j p_ji) zhat_j - (g_i + g_p(i)) zhat_p(i) ],
    # p_ij = exp(s_ij/t - lse_i). s is symmetric, so p_ji = exp(s_ij/t - lse_j) comes from the same
    # tile with the column's lse: each program owns its rows' gradient (no atomics unless SPLIT).
    # The positive column j = p(i) is left out of the tiles and added in fp32 at the end as
    # (g_i (p_i,p(i) - 1) + g_p(i) (p_p(i),i - 1)) zhat_p(i): when the positive dominates (p -> 1,
    # low temperatures, late training) the two terms nearly cancel, and rounding the weight and
    # zhat_p(i) to bf16 inside the tile product would leave an error of the size of the terms.
    # Logits come from the raw rows scaled by r_i r_j (as in the forward, so p matches its lse);
    # the product w @ zhat reads XH, normalised once before the launch: normalising each column
    # tile here costs a [BLOCK_N, BLOCK_D] fp32 tile of registers and a trip back to shared memory.
    # FIXED_BOUND (normalised rows, t >= 0.025): p_ij = e_ij c_i / g_i with e_ij = 2^u_ij and
    # c_i = g_i 2^-lse_i, so one exponential per logit serves both p_ij and p_ji. With |u| <= 58,
    # e and 2^-lse stay within 2^+-75 for 2B <= 2^17 rows: c overflows only for weights g > 2^70.
    # SPLIT: this program's columns only; its sum goes to ACC (fp32 [N, d]) for the finish kernel.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    prow = (rows + half) % N
    dc = tl.arange(0, BLOCK_D)
    dmask = dc < d
    xr = _load_rows(X, rows, rmask, dc, dmask, stride)
    lse_r = tl.load(LSE + rows, mask=rmask, other=0.0) * 1.4426950408889634
    g_r = tl.load(G + rows, mask=rmask, other=0.0)
    a_r = _logit_scale(R, rows, rmask, inv_t, NORMALIZE, BLOCK_M)
    if FIXED_BOUND:
        c_r = g_r * tl.exp2(-lse_r)
    lo, hi = _split_columns(N, SPLIT, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        xc = _load_rows(X, cols, cmask, dc, dmask, stride)
        lse_c = tl.load(LSE + cols, mask=cmask, other=0.0) * 1.4426950408889634
        g_c = tl.load(G + cols, mask=cmask, other=0.0)
        s = tl.dot(xr, tl.trans(xc), input_precision=PRECISION)
        if NORMALIZE:
            rc = tl.load(R + cols, mask=cmask, other=0.0)
            s = s * rc[None, :]
        u = s * a_r[:, None]
        valid = cmask[None, :] & (cols[None, :] != rows[:, None]) & (cols[None, :] != prow[:, None])
        u = tl.where(valid, u, float("-inf"))  # exp2 -> 0 there, and no overflow on the diagonal
        if FIXED_BOUND:
            c_c = g_c * tl.exp2(-lse_c)
            w = tl.exp2(u) * (c_r[:, None] + c_c[None, :])
        else:
            w = g_r[:, None] * tl.exp2(u - lse_r[:, None]) + g_c[None, :] * tl.exp2(u - lse_c[None, :])
        if NORMALIZE:
            # The normalised tile (|zhat| <= 1 fits any dtype); folding r_j into w instead
            # overflows fp16/bf16 for near-zero rows (r_j = 1/EPS) and gives inf * 0.
            xc = _load_rows(XH, cols, cmask, dc, dmask, xh_stride)
        acc += tl.dot(w.to(X.dtype.element_ty), xc, input_precision=PRECISION)
    if SPLIT:
        tl.atomic_add(ACC + rows.to(tl.int64)[:, None] * d + dc[None, :], acc,
                      mask=rmask[:, None] & dmask[None, :], sem="relaxed")
    else:
        _nt_xent_bwd_finish(X, R, LSE, G, GX, acc, xr, rows, rmask, dc, dmask, N, half, stride,
                            gx_stride, inv_t, eps, NORMALIZE)


@triton.jit
def _nt_xent_bwd_finish_kernel(
    X, R, LSE, G, GX, ACC, N, half, d, stride, gx_stride, inv_t, eps,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dc = tl.arange(0, BLOCK_D)
    dmask = dc < d
    acc = tl.load(ACC + rows.to(tl.int64)[:, None] * d + dc[None, :], mask=rmask[:, None] & dmask[None, :],
                  other=0.0)
    xr = _load_rows(X, rows, rmask, dc, dmask, stride)
    _nt_xent_bwd_finish(X, R, LSE, G, GX, acc, xr, rows, rmask, dc, dmask, N, half, stride, gx_stride,
                        inv_t, eps, NORMALIZE)


@triton.jit
def _nt_xent_bwd_finish(X, R, LSE, G, GX, acc, xr, rows, rmask, dc, dmask, N, half, stride, gx_stride,
                        inv_t, eps, NORMALIZE: tl.constexpr):
    # the positive pair's term (see _nt_xent_bwd_kernel), then the normalisation's backward
    prow = (rows + half) % N
    lse_r = tl.load(LSE + rows, mask=rmask, other=0.0)
    g_r = tl.load(G + rows, mask=rmask, other=0.0)
    xp = _load_rows(X, prow, rmask, dc, dmask, stride).to(tl.float32)
    g_p = tl.load(G + prow, mask=rmask, other=0.0)
    lse_p = tl.load(LSE + prow, mask=rmask, other=0.0)
    if NORMALIZE:  # R holds the reciprocal norms only then
        rr = tl.load(R + rows, mask=rmask, other=0.0)
        rp = tl.load(R + prow, mask=rmask, other=0.0)
        xp = xp * rp[:, None]
        pos = tl.sum(xr.to(tl.float32) * rr[:, None] * xp, axis=1) * inv_t
    else:
        pos = tl.sum(xr.to(tl.float32) * xp, axis=1) * inv_t
    coef = g_r * (tl.exp(pos - lse_r) - 1.0) + g_p * (tl.exp(pos - lse_p) - 1.0)
    gz = (acc + coef[:, None] * xp) * inv_t
    if NORMALIZE:
        gz = _normalize_backward(xr.to(tl.float32), rr, gz, eps)
    tl.store(GX + rows.to(tl.int64)[:, None] * gx_stride + dc[None, :], gz.to(GX.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _normalize_backward(x, r, gz, eps):
    # zhat = x * r, r = 1 / max(||x||, eps). Above eps: (gz - zhat <gz, zhat>) * r; at or below
    # eps the clamp is constant, so the gradient passes through divided by eps (r = 1/eps there).
    nrm = tl.sqrt(tl.sum(x * x, axis=1))
    zh = x * r[:, None]
    proj = tl.sum(gz * zh, axis=1)
    return tl.where((nrm > eps)[:, None], (gz - zh * proj[:, None]) * r[:, None], gz * r[:, None])


# On the GPU, for d <= 128, the NT-Xent kernels pick their tiles by autotuning (once per N, d and
# dtype; configs that exceed shared memory are skipped by the autotuner). The fixed `_tiles` choice
# serves wider d, the interpreter, and CORESET_EXT_NO_AUTOTUNE=1.
_NT_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
    for m, n, w, st in ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 2),
                        (64, 64, 8, 3), (32, 64, 4, 3),  # more programs for small N
                        (64, 64, 8, 2),  # TF32: the one 64-row (wgmma) tile whose backward fits and does not spill
                        (32, 32, 4, 2))  # fp32 without TF32 (FMA products): the larger tiles spill
]
_NT_KEY = ["N", "d", "NORMALIZE", "FIXED_BOUND", "SPLIT", "PRECISION"]
_nt_xent_fwd_tuned = triton.autotune(configs=_NT_CONFIGS, key=_NT_KEY)(_nt_xent_fwd_kernel)
# the split backward accumulates into ACC: the autotuner zeroes it before every trial launch
_nt_xent_bwd_tuned = triton.autotune(configs=_NT_CONFIGS, key=_NT_KEY, reset_to_zero=["ACC"])(_nt_xent_bwd_kernel)

# Smallest temperature for FIXED_BOUND: every 2^u (|u| <= log2(e) / t), their row sums over up to
# 2^17 rows and the weights g 2^-lse must stay normal, finite fp32 with room for loss scaling.
FIXED_BOUND_MIN_T = 0.025


def _combine_rows(d: int) -> int:
    """Rows per program of the combine/finish kernels: they hold several [rows, d] fp32 tiles in
    registers, which spill beyond 32 x 128 (tools/triton_aot.py)."""
    return 32 if block_d(d) <= 128 else 16


def _autotune(x: torch.Tensor) -> bool:
    import os

    return (x.device.type == "cuda" and not _interpreting() and block_d(x.shape[1]) <= 128
            and os.environ.get("CORESET_EXT_NO_AUTOTUNE") != "1")


def _column_splits(n: int, block_m: int, device: torch.device) -> int:
    """Programs per row tile along the columns: 1 while the row tiles fill every SM; else enough
    to give each SM about two programs, each still streaming at least 8 column tiles of 64."""
    row_tiles = cdiv(n, block_m)
    sms = _num_sms(device)
    if row_tiles >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, row_tiles), n // (8 * 64)))


def _max_column_splits(n: int, device: torch.device) -> int:
    """The most splits any tile choice launches (the tallest row tiles split most): buffers for
    the partials are sized by it, and 1 means no tile choice splits."""
    tallest = max(c.kwargs["BLOCK_M"] for c in _NT_CONFIGS)  # _tiles' fixed tiles are never taller
    return _column_splits(n, tallest, device)


def _launch_nt_xent(kernel, tuned, x: torch.Tensor, args: tuple, const: dict, split: bool,
                    parts: int) -> int:
    """Launches kernel (fixed tiles) or tuned (autotuned) over (row tiles, splits), at most `parts`
    splits, and returns how many splits ran: the tile choice decides, and the combine kernel must
    read those alone (an autotuner's trial configs leave partials in the splits beyond)."""
    n = x.shape[0]

    def splits(bm: int) -> int:
        return min(parts, _column_splits(n, bm, x.device)) if split else 1

    if _autotune(x):
        tuned[lambda meta: (cdiv(n, meta["BLOCK_M"]), splits(meta["BLOCK_M"]))](*args, SPLIT=split, **const)
        return splits(tuned.best_config.kwargs["BLOCK_M"])
    bm, bn, nw, ns = _tiles(x.shape[1], x.device, x.dtype)
    kernel[(cdiv(n, bm), splits(bm))](*args, SPLIT=split, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
                                      num_stages=ns, **const)
    return splits(bm)


@on_tensor_device
def nt_xent_fwd(x: torch.Tensor, temperature: float, normalize: bool, eps: float):
    """x = [z1; z2] contiguous [2B, d]. Returns (loss_rows [2B], lse [2B], cos [B]), fp32."""
    n, d = x.shape
    half = n // 2
    r = row_rnorm(x, eps)
    loss = torch.empty(n, device=x.device, dtype=torch.float32)
    lse = torch.empty(n, device=x.device, dtype=torch.float32)
    cos = torch.empty(half, device=x.device, dtype=torch.float32)
    fixed = normalize and temperature >= FIXED_BOUND_MIN_T
    parts = _max_column_splits(n, x.device)
    split = parts > 1
    if split:  # every launched split writes its (max, sum) for all its rows
        m_part = torch.empty((parts, n), device=x.device, dtype=torch.float32)
        l_part = torch.empty((parts, n), device=x.device, dtype=torch.float32)
    else:
        m_part = l_part = loss  # not read by the unsplit kernel
    args = (x, r, loss, lse, cos, m_part, l_part, n, half, d, x.stride(0), 1.0 / temperature)
    const = dict(NORMALIZE=normalize, FIXED_BOUND=fixed, BLOCK_D=block_d(d), PRECISION=_precision(x.dtype))
    launched = _launch_nt_xent(_nt_xent_fwd_kernel, _nt_xent_fwd_tuned, x, args, const, split, parts)
    if split:
        _nt_xent_fwd_combine_kernel[(cdiv(n, _combine_rows(d)),)](
            x, r, loss, lse, cos, m_part, l_part, n, half, d, x.stride(0), launched, 1.0 / temperature,
            NORMALIZE=normalize, FIXED_BOUND=fixed, BLOCK_M=_combine_rows(d), BLOCK_D=block_d(d), num_warps=4)
    return loss, lse, cos


@on_tensor_device
def nt_xent_bwd(grad_rows: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, temperature: float,
                normalize: bool, eps: float) -> torch.Tensor:
    """Gradient of sum_i grad_rows_i * loss_i with respect to x = [z1; z2]; dtype of x."""
    n, d = x.shape
    # without normalisation no kernel reads the norms: lse stands in for them
    r, xh = row_normalize(x, eps) if normalize else (lse, x)
    g = grad_rows.to(torch.float32).contiguous()
    gx = torch.empty_like(x)
    # Splitting the columns sums each row's gradient with float atomics, in no fixed order.
    parts = 1 if torch.are_deterministic_algorithms_enabled() else _max_column_splits(n, x.device)
    split = parts > 1
    acc = torch.zeros(n, d, device=x.device, dtype=torch.float32) if split else gx
    args = (x, xh, r, lse, g, gx, acc, n, n // 2, d, x.stride(0), xh.stride(0), gx.stride(0),
            1.0 / temperature, eps)
    const = dict(NORMALIZE=normalize, FIXED_BOUND=normalize and temperature >= FIXED_BOUND_MIN_T,
                 BLOCK_D=block_d(d), PRECISION=_precision(x.dtype))
    _launch_nt_xent(_nt_xent_bwd_kernel, _nt_xent_bwd_tuned, x, args, const, split, parts)
    if split:
        _nt_xent_bwd_finish_kernel[(cdiv(n, _combine_rows(d)),)](
            x, r, lse, g, gx, acc, n, n // 2, d, x.stride(0), gx.stride(0), 1.0 / temperature, eps,
            NORMALIZE=normalize, BLOCK_M=_combine_rows(d), BLOCK_D=block_d(d), num_warps=4)
    return gx


# --------------------------------------------------------------------------------------------
# MoCo InfoNCE against a queue: the queue dimension is split across programs
# --------------------------------------------------------------------------------------------


@triton.jit
def _moco_fwd_partial_kernel(
    Q, RQ, QU, RQU, M_OUT, L_OUT, B, K, d, sq, squ, inv_t,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One (row tile, queue split) pair: partial base-2 (max, sum of exp) over its queue range.
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    dc = tl.arange(0, BLOCK_D)
    dmask = dc < d
    xq = _load_rows(Q, rows, rmask, dc, dmask, sq)
    a_r = _logit_scale(RQ, rows, rmask, inv_t, NORMALIZE, BLOCK_M)
    k_lo, k_hi = _split_columns(K, True, BLOCK_N)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(k_lo, k_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < k_hi
        xc = _load_rows(QU, cols, cmask, dc, dmask, squ)
        s = tl.dot(xq, tl.trans(xc), input_precision=PRECISION)
        if NORMALIZE:
            s = s * tl.load(RQU + cols, mask=cmask, other=0.0)[None, :]
        u = tl.where(cmask[None, :], s * a_r[:, None], float("-inf"))
        m_new = tl.maximum(m, tl.max(u, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(u - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(M_OUT + pid_s * B + rows, m, mask=rmask)
    tl.store(L_OUT + pid_s * B + rows, l, mask=rmask)


@triton.jit
def _moco_pos(Q, K_, RQ, RK, rows, rmask, dc, dmask, sq, sk, inv_t, NORMALIZE: tl.constexpr):
    """(q rows fp32, positive logit, cosine) for a row tile."""
    xq = _load_rows(Q, rows, rmask, dc, dmask, sq).to(tl.float32)
    xk = _load_rows(K_, rows, rmask, dc, dmask, sk).to(tl.float32)
    rq = tl.load(RQ + rows, mask=rmask, other=0.0)
    rk = tl.load(RK + rows, mask=rmask, other=0.0)
    pdot = tl.sum(xq * xk, axis=1)
    cos = pdot * rq * rk
    if NORMALIZE:
        pos = cos * inv_t
    else:
        pos = pdot * inv_t
    return xq, xk, rq, rk, pos, cos


@triton.jit
def _moco_fwd_combine_kernel(
    Q, K_, RQ, RK, M_IN, L_IN, LOSS, LSE, COS, B, d, sq, sk, n_split, inv_t,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    dc = tl.arange(0, BLOCK_D)
    dmask = dc < d
    xq, xk, rq, rk, pos, cos = _moco_pos(Q, K_, RQ, RK, rows, rmask, dc, dmask, sq, sk, inv_t, NORMALIZE)
    # Start from the positive logit (finite), then merge each split's (max, sum).
    m = pos * 1.4426950408889634
    l = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    for s in range(0, n_split):
        ms = tl.load(M_IN + s * B + rows, mask=rmask, other=float("-inf"))
        ls = tl.load(L_IN + s * B + rows, mask=rmask, other=0.0)
        m_new = tl.maximum(m, ms)
        l = l * tl.exp2(m - m_new) + ls * tl.exp2(ms - m_new)
        m = m_new
    lse = (m + tl.log2(l)) * 0.6931471805599453
    tl.store(LOSS + rows, lse - pos, mask=rmask)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(COS + rows, cos, mask=rmask)


@triton.jit
def _moco_bwd_partial_kernel(
    Q, RQ, QU, QUH, RQU, LSE, PART, B, K, d, sq, squ, squh, inv_t,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # PART[split, i, :] = sum_{j in split} p_ij * queuehat_j, p_ij = exp(<qhat_i, queuehat_j>/t - lse_i)
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    dc = tl.arange(0, BLOCK_D)
    dmask = dc < d
    xq = _load_rows(Q, rows, rmask, dc, dmask, sq)
    a_r = _logit_scale(RQ, rows, rmask, inv_t, NORMALIZE, BLOCK_M)
    lse_r = tl.load(LSE + rows, mask=rmask, other=0.0) * 1.4426950408889634
    k_lo, k_hi = _split_columns(K, True, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(k_lo, k_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < k_hi
        xc = _load_rows(QU, cols, cmask, dc, dmask, squ)
        s = tl.dot(xq, tl.trans(xc), input_precision=PRECISION)
        if NORMALIZE:
            rc = tl.load(RQU + cols, mask=cmask, other=0.0)
            s = s * rc[None, :]
        p = tl.exp2(tl.where(cmask[None, :], s * a_r[:, None], float("-inf")) - lse_r[:, None])
        if NORMALIZE:  # the normalised queue, not p * r_j: see _nt_xent_bwd_kernel
            xc = _load_rows(QUH, cols, cmask, dc, dmask, squh)
        acc += tl.dot(p.to(QU.dtype.element_ty), xc, input_precision=PRECISION)
    base = (pid_s * B + rows).to(tl.int64)[:, None] * d + dc[None, :]
    tl.store(PART + base, acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _moco_bwd_combine_kernel(
    Q, K_, RQ, RK, LSE, G, PART, GQ, B, d, sq, sk, sgq, n_split, inv_t, eps,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dL/dqhat_i = (g_i / t) [ sum_j p_ij queuehat_j + (p_pos,i - 1) khat_i ]
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    dc = tl.arange(0, BLOCK_D)
    dmask = dc < d
    m2 = rmask[:, None] & dmask[None, :]
    xq, xk, rq, rk, pos, cos = _moco_pos(Q, K_, RQ, RK, rows, rmask, dc, dmask, sq, sk, inv_t, NORMALIZE)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    g = tl.load(G + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_split):
        base = (s * B + rows).to(tl.int64)[:, None] * d + dc[None, :]
        acc += tl.load(PART + base, mask=m2, other=0.0)
    p_pos = tl.exp(pos - lse)
    if NORMALIZE:
        kh = xk * rk[:, None]
    else:
        kh = xk
    gz = (acc + (p_pos - 1.0)[:, None] * kh) * (g * inv_t)[:, None]
    if NORMALIZE:
        gz = _normalize_backward(xq, rq, gz, eps)
    tl.store(GQ + rows.to(tl.int64)[:, None] * sgq + dc[None, :], gz.to(GQ.dtype.element_ty), mask=m2)


def _moco_split(b: int, k: int, bm: int, bn: int, device: torch.device) -> int:
    """Queue splits: enough (row tile, split) programs to fill the device twice over, none empty.
    Each split's share of the queue is computed in the kernels by _split_columns."""
    row_tiles = cdiv(b, bm)
    want = max(1, cdiv(2 * _num_sms(device), row_tiles))
    n_split = max(1, min(want, cdiv(k, bn)))
    return cdiv(k, cdiv(cdiv(k, n_split), bn) * bn)


@on_tensor_device
def info_nce_queue_fwd(q, k, queue, temperature: float, normalize: bool, eps: float):
    """q, k [B, d], queue [K, d], contiguous, one dtype. Returns (loss [B], lse [B], cos [B]), fp32."""
    b, d = q.shape
    kq = queue.shape[0]
    rq, rk, rqu = row_rnorm(q, eps), row_rnorm(k, eps), row_rnorm(queue, eps)
    bm, bn, nw, ns = _tiles(d, q.device, q.dtype)
    n_split = _moco_split(b, kq, bm, bn, q.device)
    m_part = torch.empty(n_split, b, device=q.device, dtype=torch.float32)
    l_part = torch.empty(n_split, b, device=q.device, dtype=torch.float32)
    bd = block_d(d)
    _moco_fwd_partial_kernel[(cdiv(b, bm), n_split)](
        q, rq, queue, rqu, m_part, l_part, b, kq, d, q.stride(0), queue.stride(0), 1.0 / temperature,
        NORMALIZE=normalize, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        PRECISION=_precision(q.dtype), num_warps=nw, num_stages=ns,
    )
    loss = torch.empty(b, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, device=q.device, dtype=torch.float32)
    cos = torch.empty(b, device=q.device, dtype=torch.float32)
    _moco_fwd_combine_kernel[(cdiv(b, _combine_rows(d)),)](
        q, k, rq, rk, m_part, l_part, loss, lse, cos, b, d, q.stride(0), k.stride(0), n_split,
        1.0 / temperature, NORMALIZE=normalize, BLOCK_M=_combine_rows(d), BLOCK_D=bd, num_warps=4,
    )
    return loss, lse, cos


@on_tensor_device
def info_nce_queue_bwd(grad_rows, q, k, queue, lse, temperature: float, normalize: bool, eps: float):
    """Gradient of sum_i grad_rows_i * loss_i with respect to q; dtype of q."""
    b, d = q.shape
    kq = queue.shape[0]
    rq, rk = row_rnorm(q, eps), row_rnorm(k, eps)
    # without normalisation the partial kernel reads no queue norms: lse stands in for them
    rqu, quh = row_normalize(queue, eps) if normalize else (lse, queue)
    bm, bn, nw, ns = _tiles(d, q.device, q.dtype)
    n_split = _moco_split(b, kq, bm, bn, q.device)
    part = torch.empty(n_split, b, d, device=q.device, dtype=torch.float32)
    bd = block_d(d)
    _moco_bwd_partial_kernel[(cdiv(b, bm), n_split)](
        q, rq, queue, quh, rqu, lse, part, b, kq, d, q.stride(0), queue.stride(0), quh.stride(0),
        1.0 / temperature, NORMALIZE=normalize, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        PRECISION=_precision(q.dtype), num_warps=nw, num_stages=ns,
    )
    g = grad_rows.to(torch.float32).contiguous()
    gq = torch.empty_like(q)
    _moco_bwd_combine_kernel[(cdiv(b, _combine_rows(d)),)](
        q, k, rq, rk, lse, g, part, gq, b, d, q.stride(0), k.stride(0), gq.stride(0), n_split,
        1.0 / temperature, eps, NORMALIZE=normalize, BLOCK_M=_combine_rows(d), BLOCK_D=bd, num_warps=4,
    )
    return gq


# --------------------------------------------------------------------------------------------
# pair cosine: c_i = <a_i, b_i> r_a,i r_b,i
# --------------------------------------------------------------------------------------------


@triton.jit
def _pair_cosine_fwd_kernel(A, B_, C, n, d, sa, sb, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    dc = tl.arange(0, BLOCK_D)
    m2 = rmask[:, None] & (dc[None, :] < d)
    a = tl.load(A + rows.to(tl.int64)[:, None] * sa + dc[None, :], mask=m2, other=0.0).to(tl.float32)
    b = tl.load(B_ + rows.to(tl.int64)[:, None] * sb + dc[None, :], mask=m2, other=0.0).to(tl.float32)
    ra = 1.0 / tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), eps)
    rb = 1.0 / tl.maximum(tl.sqrt(tl.sum(b * b, axis=1)), eps)
    tl.store(C + rows, tl.sum(a * b, axis=1) * ra * rb, mask=rmask)


@triton.jit
def _pair_cosine_bwd_kernel(A, B_, G, GA, GB, n, d, sa, sb, sga, sgb, eps,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    dc = tl.arange(0, BLOCK_D)
    m2 = rmask[:, None] & (dc[None, :] < d)
    a = tl.load(A + rows.to(tl.int64)[:, None] * sa + dc[None, :], mask=m2, other=0.0).to(tl.float32)
    b = tl.load(B_ + rows.to(tl.int64)[:, None] * sb + dc[None, :], mask=m2, other=0.0).to(tl.float32)
    g = tl.load(G + rows, mask=rmask, other=0.0)
    ra = 1.0 / tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), eps)
    rb = 1.0 / tl.maximum(tl.sqrt(tl.sum(b * b, axis=1)), eps)
    ga = _normalize_backward(a, ra, b * (rb * g)[:, None], eps)  # dc/dahat = bhat
    gb = _normalize_backward(b, rb, a * (ra * g)[:, None], eps)
    tl.store(GA + rows.to(tl.int64)[:, None] * sga + dc[None, :], ga.to(GA.dtype.element_ty), mask=m2)
    tl.store(GB + rows.to(tl.int64)[:, None] * sgb + dc[None, :], gb.to(GB.dtype.element_ty), mask=m2)


def _pair_rows(d: int) -> int:
    return max(1, min(64, 4096 // block_d(d)))


@on_tensor_device
def pair_cosine_fwd(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    n, d = a.shape
    c = torch.empty(n, device=a.device, dtype=torch.float32)
    br = _pair_rows(d)
    _pair_cosine_fwd_kernel[(cdiv(n, br),)](
        a, b, c, n, d, a.stride(0), b.stride(0), eps, BLOCK_R=br, BLOCK_D=block_d(d))
    return c


@on_tensor_device
def pair_cosine_bwd(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float):
    n, d = a.shape
    g = grad.to(torch.float32).contiguous()
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    br = _pair_rows(d)
    _pair_cosine_bwd_kernel[(cdiv(n, br),)](
        a, b, g, ga, gb, n, d, a.stride(0), b.stride(0), ga.stride(0), gb.stride(0), eps,
        BLOCK_R=br, BLOCK_D=block_d(d))
    return ga, gb
