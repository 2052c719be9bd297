"""Triton kernels for the fused contrastive losses: NT-Xent, MoCo InfoNCE against a queue, pair cosine.

NT-Xent has two kernel families:
- Symmetric (the default where it is exact): with normalised rows and the fixed bound (below) the
  exponentials are symmetric, e_ij = e_ji, so only the tiles on or above the diagonal are computed
  and each gives its rows' sums and its columns' sums (`_nt_xent_sym_*`, see their section).
- Row-streaming, InfoNCE over streamed column tiles, shared with MoCo: each program owns a block
  of rows x_i (NT-Xent: x = [z1; z2]; MoCo: the queries q) and streams column tiles y_j (NT-Xent:
  x itself; MoCo: the queue), and a combine kernel merges column splits. It serves raw rows,
  temperatures below FIXED_BOUND_MIN_T and deterministic algorithms. Compile-time flags:
  - EXCLUDE_DIAG: the columns are the rows themselves (NT-Xent). The diagonal (each row's own
    similarity) is left out; row i's positive is row p(i) = (i + B) mod 2B, one of the columns; and
    in the backward, column j's own loss term depends on x_i too (p_ji). Otherwise (MoCo) the
    positive is row i of the keys, a logit of its own outside the columns.
  - SPLIT: the columns are split across grid axis 1, for when the row blocks alone are too few to
    fill the GPU: the forward writes per-split (max, sum) partials, the backward per-split gradient
    sums, and the combine kernels merge them and finish.
  - NORMALIZE (cosine logits), FIXED_BOUND (see below), PRECISION (tl.dot's input precision).

Conventions shared by every kernel here (the helpers live in _tiles.py):
- z1 and z2 are never concatenated: NT-Xent's kernels take both row pointers and write both
  gradients (`load_pair_rows`, `store_pair_rows`). One prologue launch per pass reads each pair
  once: reciprocal norms r_i = 1 / max(||x_i||, EPS), the positive cosines and logits (forward), the
  normalised rows (backward: the right operand of w @ xhat), and zeroes the fp32 buffer that
  float atomics add into. Per fwd+bwd: 3 + 3 launches (symmetric), 2 + 2 (row-streaming, unsplit),
  3 + 3 (split).
- Inputs stay in their own dtype (fp32, fp16, bf16); products accumulate in fp32 (tl.dot) and all
  softmax arithmetic is fp32. fp32 multiplies in TF32 where torch would, else in 3xTF32 (fp32
  accuracy on the tensor cores; launch.precision). The similarity matrix exists only one tile at a
  time, in registers; backward passes recompute tiles from the saved per-row log-sum-exp. Logit
  tiles are scaled by r_i r_j after the dot product of the raw rows.
- Log-sum-exps run in base 2 (exp2/log2 are the fast units) and are stored in natural units.
  Each row keeps an online maximum, so temperatures down to 0.01 (logits up to 100) never overflow;
  for normalised rows and t >= FIXED_BOUND_MIN_T the bound |u| <= log2(e)/t makes every 2^u a
  normal fp32 as it stands, and no maximum is kept (FIXED_BOUND).
- Sizes (rows, pairs, columns, splits, tile runs) are runtime arguments that Triton does not
  specialise on (do_not_specialize): a new batch size compiles nothing; tiles are constexprs
  chosen from per-architecture tables (TILE_TABLE, SYMMETRIC_TABLE), and autotuning is an opt-in.
- Row offsets are computed in int64 so N * d beyond 2**31 elements cannot wrap.
Names follow the package's conventions (triton_kernels/__init__.py); the launch configuration
(`tiles`, `symmetric_tiles`, `symmetric`, `CONFIGS`, `column_splits`, `autotune`) is public, for tools.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._tiles import (
    LN2, LOG2E, compute_logits, feature_dims, load_logit_scale, load_rows, merge_lse, normalize_backward, own_rows,
    reciprocal_norms, row_ptrs, split_columns, store_rows, update_lse,
)
from .launch import (
    autotune_enabled, autotuned, block_d, capability, cdiv, interpreting, num_sms, on_tensor_device, precision,
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

# Fixed tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) by architecture, operand kind and feature
# width (block_d <= 128, <= 256, wider), so that the first call at a new shape compiles one kernel
# and times nothing (autotuning is an opt-in: launch.autotune_enabled). Each is sized so that the
# pipelined column tiles (the raw rows and, in backward passes, their normalised copy) plus the row
# tile fit the shared memory of its architecture, and so that ptxas spills nothing:
# tools/triton_aot.py checks both for sm_80 and sm_90. e.g. bf16, d = 128 on sm_80:
# 3 x 2 x 64 x 128 x 2 B + 64 x 128 x 2 B = 112 KiB of 163. Row tiles of 64 on Hopper: its
# warpgroup MMA (wgmma) takes 64 rows per warpgroup; with 32 Triton falls back to Ampere's
# mma.sync, Hopper's slower path (the tool's MMA column shows which one a launch got). "32bit" is
# fp32 in TF32 (d <= 128, d <= 256). Exact fp32 (`exact_precision`) has its own (forward,
# backward) pairs: "3xtf32" at d <= 128, whose three products per dot hold split copies of both
# operands in registers (only the wgmma forward affords 64 rows without spilling; on sm_80 the
# backward only 16), and "ieee" (FMA products) at d = 256, whose backward spills everything at 32
# rows. Other architectures take "default": two pipeline stages,
# within the 99 KiB of sm_86/sm_89/sm_120. The batch size needs no entry: small batches split the
# columns (column_splits) or take short tile runs (symmetric_run).
TILE_TABLE = {
    90: {"16bit": ((64, 64, 8, 3), (64, 32, 8, 2)), "32bit": ((64, 64, 8, 2), (32, 32, 8, 2)),
         "3xtf32": ((64, 32, 8, 2), (32, 32, 8, 1)), "ieee": ((32, 32, 8, 2), (16, 32, 8, 1))},
    80: {"16bit": ((64, 64, 8, 3), (32, 64, 8, 2)), "32bit": ((32, 64, 4, 2), (32, 32, 8, 2)),
         "3xtf32": ((32, 16, 8, 2), (16, 32, 8, 1)), "ieee": ((32, 32, 8, 2), (16, 32, 8, 1))},
    "default": {"16bit": ((64, 64, 8, 2), (32, 32, 4, 2)), "32bit": ((32, 32, 4, 2), (32, 32, 4, 1)),
                "3xtf32": ((32, 16, 8, 1), (16, 32, 8, 1)), "ieee": ((32, 32, 4, 1), (16, 32, 4, 1))},
}
WIDE_TILES = (16, 32, 4, 1)  # block_d > 256 (Triton requested explicitly): small enough for any d


def _arch(device: torch.device):
    """The TILE_TABLE entry of a GPU: 90 for compute capability 9 and later, 80 for sm_80."""
    cc = capability(device)
    return 90 if cc >= 90 else 80 if cc == 80 else "default"


def exact_precision(dtype: torch.dtype, d: int) -> str:
    """tl.dot's input precision: TF32 where torch's flag allows it; else, for fp32, 3xTF32 (fp32
    accuracy on the tensor cores) up to d = 128 and fp32 FMA products beyond, where 3xTF32's
    split operands spill registers on every tile shape tools/triton_aot.py tried."""
    return precision(dtype, "tf32x3" if block_d(d) <= 128 else "ieee")


def tiles(d: int, device: torch.device, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for row/column tiles of a [*, d] operand, from
    TILE_TABLE; `backward`: the backward pass's, where they differ (3xTF32)."""
    if interpreting() or device.type != "cuda":
        return 32, 32, 4, 1  # small tiles: several tiles and ragged edges even at tiny test sizes
    bd = block_d(d)
    if bd > 256:
        return WIDE_TILES
    table = TILE_TABLE[_arch(device)]
    exact = exact_precision(dtype, d)
    if exact != "tf32":
        return table["3xtf32" if exact == "tf32x3" else "ieee"][1 if backward else 0]
    return table["32bit" if dtype == torch.float32 else "16bit"][0 if bd <= 128 else 1]


def symmetric(normalize: bool, temperature: float, d: int, dtype: torch.dtype) -> bool:
    """Whether NT-Xent takes the symmetric kernels: with normalised rows and the fixed bound
    (t >= FIXED_BOUND_MIN_T) the exponentials are symmetric; their sums meet in float atomics, so
    not under deterministic algorithms; d <= MAX_D (SYMMETRIC_TABLE's widths); and on a GPU not
    for exact fp32 (3xTF32 or FMA products), whose tiles spill registers in the symmetric backward
    (the interpreter, which has no registers, runs fp32 through them: the tests' exact check)."""
    return (normalize and temperature >= FIXED_BOUND_MIN_T and block_d(d) <= MAX_D
            and (exact_precision(dtype, d) == "tf32" or interpreting())
            and not torch.are_deterministic_algorithms_enabled())


# The symmetric kernels' square tiles (BLOCK, num_warps, num_stages), by the same keys as
# TILE_TABLE. Their backward keeps a [BLOCK, d] gradient tile and the row block's normalised copy
# besides the pipelined column tiles (raw and normalised): bf16, d = 128, 64 rows take 178 KiB of
# shared memory with three stages, which only Hopper has (sm_80: two stages, 146 KiB).
SYMMETRIC_TABLE = {
    90: {"16bit": ((64, 8, 3), (32, 8, 2)), "32bit": ((64, 8, 2), (32, 8, 1))},
    80: {"16bit": ((64, 8, 2), (32, 8, 2)), "32bit": ((32, 4, 2), (32, 8, 1))},
    "default": {"16bit": ((32, 4, 2), (32, 4, 1)), "32bit": ((32, 4, 1), (16, 4, 1))},
}


def symmetric_tiles(d: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK, num_warps, num_stages) of the symmetric kernels, from SYMMETRIC_TABLE (d <= 256)."""
    if interpreting() or device.type != "cuda":
        return 32, 4, 1
    by_width = SYMMETRIC_TABLE[_arch(device)]["32bit" if dtype == torch.float32 else "16bit"]
    return by_width[0 if block_d(d) <= 128 else 1]


def symmetric_run(n_blocks: int, device: torch.device) -> int:
    """Tiles per program of the symmetric kernels: about eight programs per SM, at most 32 tiles
    (a program's row block is loaded once per run, and its row sums leave in one atomic add)."""
    n_tiles = n_blocks * (n_blocks + 1) // 2
    return max(1, min(32, n_tiles // (8 * num_sms(device))))


@functools.lru_cache(maxsize=32)
def _tile_table(n_blocks: int, run: int, device: torch.device) -> torch.Tensor:
    """int32 [programs, 2]: (row block I, first column block J0) of each run of tiles on or above
    the diagonal, longest rows first; cached per size class, so a launch builds nothing."""
    starts = [(i, j) for i in range(n_blocks) for j in range(i, n_blocks, run)]
    return torch.tensor(starts, dtype=torch.int32).to(device)


# With CORESET_EXT_AUTOTUNE=1 on the GPU, for d <= 128, the non-symmetric NT-Xent kernels pick
# their tiles by autotuning (once per N, d and dtype, the winners kept on disk; configs that exceed
# shared memory are skipped by the autotuner).
CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
    for m, n, w, st in ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 2),
                        (64, 64, 8, 3), (32, 64, 4, 3),  # more programs for small N
                        (64, 64, 8, 2),  # TF32: the one 64-row (wgmma) tile whose backward fits and does not spill
                        (32, 32, 4, 2))  # 32-row tiles for fp32 on sm_80
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


@triton.jit(do_not_specialize=["n_rows"])
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
# InfoNCE over streamed column tiles: NT-Xent (x = [z1; z2] against itself) and MoCo (q against a
# queue)
#
# NT-Xent's rows x = [z1; z2] are never concatenated: row i < B is read from z1 and row i >= B from
# z2 (`load_pair_rows`), and gradients are written straight into g1 and g2 (`store_pair_rows`).
# Each kernel's arguments: first what every launch reads (the rows x, x2, outputs, sizes), then the
# columns y and positives p when they are not x itself: MoCo's queue and keys. With EXCLUDE_DIAG
# the kernels read those from x's own arguments and ignore the trailing ones.
# --------------------------------------------------------------------------------------------


@triton.jit
def pair_row_ptrs(x_ptr, x2_ptr, rows, dims, n_first, stride_x, stride_x2):
    """Pointers to a [rows, dims] block of [x; x2] (rows below n_first in x, the others in x2):
    each row's base pointer is chosen, then one load or store serves the block, vectorised as a
    block of x alone would be (choosing between two loaded blocks instead costs both in registers)."""
    r = rows.to(tl.int64)
    base = tl.where(rows < n_first, x_ptr + r * stride_x, x2_ptr + (r - n_first) * stride_x2)
    return base[:, None] + dims[None, :]


@triton.jit
def load_pair_rows(x_ptr, x2_ptr, rows, row_ok, dims, dim_ok, n_first, stride_x, stride_x2, PAIRED: tl.constexpr):
    """[rows, dims] block of [x; x2] without the concatenated copy, zero outside the masks; of x
    alone when not PAIRED."""
    if PAIRED:
        return tl.load(pair_row_ptrs(x_ptr, x2_ptr, rows, dims, n_first, stride_x, stride_x2),
                       mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    else:
        return load_rows(x_ptr, rows, row_ok, dims, dim_ok, stride_x)


@triton.jit
def store_pair_rows(g_ptr, g2_ptr, rows, row_ok, dims, dim_ok, n_first, stride_g, stride_g2, value,
                    PAIRED: tl.constexpr):
    """Stores a [rows, dims] block into [g; g2] (rows below n_first into g), or into g alone."""
    if PAIRED:
        tl.store(pair_row_ptrs(g_ptr, g2_ptr, rows, dims, n_first, stride_g, stride_g2),
                 value.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        store_rows(g_ptr, rows, row_ok, dims, dim_ok, stride_g, value)


@triton.jit(do_not_specialize=["n_pairs"])
def _info_nce_prologue_kernel(
    z1_ptr, z2_ptr, inv_ptr, cos_ptr, pos_ptr, xh_ptr, zero_ptr, n_pairs, d, stride_1, stride_2, inv_t, eps,
    NORMALIZE: tl.constexpr, FORWARD: tl.constexpr, WRITE_XHAT: tl.constexpr, ZERO_SUMS: tl.constexpr,
    ZERO_ROWS: tl.constexpr, BOTH_VIEWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One pass over each pair (NT-Xent: z1_i, z2_i; MoCo: q_i, k_i), before the tile kernels: the
    # reciprocal norms r of the 2B rows; in the forward the positive cosine and logit (stored into
    # the rows' loss slots, which the forward's epilogue turns into lse - pos); in the backward the
    # normalised rows xhat (NT-Xent: the right operand of the gradient products); and zeroes the
    # fp32 buffer that float atomics add into (row sums, ZERO_SUMS, or gradient rows [*, d],
    # ZERO_ROWS). BOTH_VIEWS (NT-Xent): losses and sums have 2B rows, one per view; MoCo's B.
    rows, row_ok = own_rows(n_pairs, BLOCK_M)
    dims, dim_ok = feature_dims(d, BLOCK_D)
    a = load_rows(z1_ptr, rows, row_ok, dims, dim_ok, stride_1).to(tl.float32)
    b = load_rows(z2_ptr, rows, row_ok, dims, dim_ok, stride_2).to(tl.float32)
    inv_a = reciprocal_norms(a, eps)
    inv_b = reciprocal_norms(b, eps)
    tl.store(inv_ptr + rows, inv_a, mask=row_ok)
    tl.store(inv_ptr + n_pairs + rows, inv_b, mask=row_ok)
    if FORWARD:
        dot = tl.sum(a * b, axis=1)
        cos = dot * inv_a * inv_b
        tl.store(cos_ptr + rows, cos, mask=row_ok)
        if NORMALIZE:
            pos = cos * inv_t
        else:
            pos = dot * inv_t
        tl.store(pos_ptr + rows, pos, mask=row_ok)
        if BOTH_VIEWS:
            tl.store(pos_ptr + n_pairs + rows, pos, mask=row_ok)
    if WRITE_XHAT:
        store_rows(xh_ptr, rows, row_ok, dims, dim_ok, d, a * inv_a[:, None])
        store_rows(xh_ptr, n_pairs + rows, row_ok, dims, dim_ok, d, b * inv_b[:, None])
    if ZERO_SUMS:
        tl.store(zero_ptr + rows, tl.zeros([BLOCK_M], dtype=tl.float32), mask=row_ok)
        if BOTH_VIEWS:
            tl.store(zero_ptr + n_pairs + rows, tl.zeros([BLOCK_M], dtype=tl.float32), mask=row_ok)
    if ZERO_ROWS:
        zero = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        store_rows(zero_ptr, rows, row_ok, dims, dim_ok, d, zero)
        if BOTH_VIEWS:
            store_rows(zero_ptr, n_pairs + rows, row_ok, dims, dim_ok, d, zero)


@triton.jit
def finish_lse(m_i, l_i, FIXED_BOUND: tl.constexpr):
    """The natural-unit log-sum-exp of a row's base-2 (m, l)."""
    if FIXED_BOUND:
        return tl.log2(l_i) * LN2
    else:
        return (m_i + tl.log2(l_i)) * LN2


@triton.jit(do_not_specialize=["n_rows", "n_pairs", "n_cols"])
def _info_nce_fwd_kernel(
    x_ptr, x2_ptr, inv_x_ptr, loss_ptr, lse_ptr, m_part_ptr, l_part_ptr, n_rows, n_pairs, d, stride_x, stride_x2,
    inv_t, y_ptr, inv_y_ptr, n_cols, stride_y,
    EXCLUDE_DIAG: tl.constexpr, NORMALIZE: tl.constexpr, FIXED_BOUND: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    if EXCLUDE_DIAG:  # the columns are the rows [z1; z2]
        y_ptr, y2_ptr, inv_y_ptr, n_cols, stride_y, stride_y2 = x_ptr, x2_ptr, inv_x_ptr, n_rows, stride_x, stride_x2
    else:
        y2_ptr, stride_y2 = y_ptr, stride_y
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    dims, dim_ok = feature_dims(d, BLOCK_D)
    xr = load_pair_rows(x_ptr, x2_ptr, rows, row_ok, dims, dim_ok, n_pairs, stride_x, stride_x2, EXCLUDE_DIAG)
    scale_r = load_logit_scale(inv_x_ptr, rows, row_ok, inv_t, NORMALIZE, BLOCK_M)
    lo, hi = split_columns(n_cols, SPLIT, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        yc = load_pair_rows(y_ptr, y2_ptr, cols, col_ok, dims, dim_ok, n_pairs, stride_y, stride_y2, EXCLUDE_DIAG)
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
        pos = tl.load(loss_ptr + rows, mask=row_ok, other=0.0)  # the prologue's positive logit
        tl.store(loss_ptr + rows, lse - pos, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "n_split"])
def _info_nce_fwd_combine_kernel(
    loss_ptr, lse_ptr, m_part_ptr, l_part_ptr, n_rows, n_split,
    EXCLUDE_DIAG: tl.constexpr, FIXED_BOUND: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    # Merges the splits' partials (SPLIT_CHUNK splits per load, in a fixed order: deterministic),
    # then the forward's epilogue loss = lse - pos, with the prologue's positive logit in loss_ptr.
    # NT-Xent's positive is one of the columns; MoCo's positive key is none: its logit starts the sum.
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    pos = tl.load(loss_ptr + rows, mask=row_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if not EXCLUDE_DIAG:
        if FIXED_BOUND:
            l_i += tl.exp2(pos * LOG2E)
        else:
            m_i = pos * LOG2E
            l_i += 1.0
    for s0 in range(0, n_split, SPLIT_CHUNK):
        split = s0 + tl.arange(0, SPLIT_CHUNK)
        part = split[:, None] * n_rows + rows[None, :]
        ok = (split < n_split)[:, None] & row_ok[None, :]
        l_s = tl.load(l_part_ptr + part, mask=ok, other=0.0)
        if FIXED_BOUND:
            l_i += tl.sum(l_s, axis=0)
        else:
            m_s = tl.load(m_part_ptr + part, mask=ok, other=float("-inf"))
            m_c = tl.max(m_s, axis=0)
            m_safe = tl.where(m_c == float("-inf"), 0.0, m_c)  # no split saw a valid column
            m_i, l_i = merge_lse(m_i, l_i, m_c, tl.sum(l_s * tl.exp2(m_s - m_safe[None, :]), axis=0), False)
    lse = finish_lse(m_i, l_i, FIXED_BOUND)
    tl.store(loss_ptr + rows, lse - pos, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def finish_backward(acc, xr, rows, row_ok, dims, dim_ok, inv_x_ptr, lse_ptr, g_ptr, gx_ptr, gx2_ptr, p_ptr, p2_ptr,
                    inv_p_ptr, n_rows, n_pairs, stride_p, stride_p2, stride_gx, stride_gx2, inv_t, eps,
                    EXCLUDE_DIAG: tl.constexpr, NORMALIZE: tl.constexpr):
    # the positive pair's term (see _info_nce_bwd_kernel), then the normalisation's backward
    if EXCLUDE_DIAG:
        prow = (rows + n_pairs) % n_rows  # the other view of the same example
    else:
        prow = rows  # the key of the same example
    lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_r = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    xp = load_pair_rows(p_ptr, p2_ptr, prow, row_ok, dims, dim_ok, n_pairs, stride_p, stride_p2,
                        EXCLUDE_DIAG).to(tl.float32)
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
    store_pair_rows(gx_ptr, gx2_ptr, rows, row_ok, dims, dim_ok, n_pairs, stride_gx, stride_gx2, gz, EXCLUDE_DIAG)


@triton.jit(do_not_specialize=["n_rows", "n_pairs", "n_cols"])
def _info_nce_bwd_kernel(
    x_ptr, x2_ptr, yh_ptr, inv_x_ptr, lse_ptr, g_ptr, gx_ptr, gx2_ptr, acc_ptr, n_rows, n_pairs, d, stride_x,
    stride_x2, stride_yh, stride_gx, stride_gx2, inv_t, eps, y_ptr, inv_y_ptr, p_ptr, inv_p_ptr, n_cols, stride_y,
    stride_p,
    EXCLUDE_DIAG: tl.constexpr, NORMALIZE: tl.constexpr, FIXED_BOUND: tl.constexpr, SPLIT: tl.constexpr,
    SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
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
    # with NORMALIZE the product w @ yhat reads yh (one [n_cols, d] buffer), normalised once before
    # the launch: normalising each column tile here costs a [BLOCK_N, BLOCK_D] fp32 tile of
    # registers and a trip back to shared memory; without, it reuses the raw column tile.
    # FIXED_BOUND (normalised rows, t >= 0.025): p_ij = e_ij c_i / g_i with e_ij = 2^u_ij and
    # c_i = g_i 2^-lse_i, so one exponential per logit serves both p_ij and p_ji. With |u| <= 58,
    # e and 2^-lse stay within 2^+-75 for 2B <= 2^17 rows: c overflows only for weights g > 2^70.
    # SPLIT: this program's columns only; its sum goes to acc_ptr (fp32) for the combine kernel:
    # added into one [n_rows, d] buffer with float atomics, in no fixed order, or with SLOTS
    # (deterministic algorithms) stored in a [n_rows, d] slot per split, summed in split order.
    if EXCLUDE_DIAG:  # the columns and the positives are the rows [z1; z2]
        y_ptr, y2_ptr, inv_y_ptr, n_cols, stride_y, stride_y2 = x_ptr, x2_ptr, inv_x_ptr, n_rows, stride_x, stride_x2
        p_ptr, p2_ptr, inv_p_ptr, stride_p, stride_p2 = x_ptr, x2_ptr, inv_x_ptr, stride_x, stride_x2
    else:
        y2_ptr, stride_y2, p2_ptr, stride_p2 = y_ptr, stride_y, p_ptr, stride_p
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    dims, dim_ok = feature_dims(d, BLOCK_D)
    xr = load_pair_rows(x_ptr, x2_ptr, rows, row_ok, dims, dim_ok, n_pairs, stride_x, stride_x2, EXCLUDE_DIAG)
    lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    g_r = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    scale_r = load_logit_scale(inv_x_ptr, rows, row_ok, inv_t, NORMALIZE, BLOCK_M)
    if EXCLUDE_DIAG:
        prow = (rows + n_pairs) % n_rows
    if FIXED_BOUND:
        c_r = g_r * tl.exp2(-lse_r)
    lo, hi = split_columns(n_cols, SPLIT, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        yc = load_pair_rows(y_ptr, y2_ptr, cols, col_ok, dims, dim_ok, n_pairs, stride_y, stride_y2, EXCLUDE_DIAG)
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
        acc += tl.dot(w.to(x_ptr.dtype.element_ty), yc, input_precision=PRECISION)
    if SPLIT:
        if SLOTS:
            store_rows(acc_ptr, tl.program_id(1) * n_rows + rows, row_ok, dims, dim_ok, d, acc)
        else:
            tl.atomic_add(row_ptrs(acc_ptr, rows, dims, d), acc, mask=row_ok[:, None] & dim_ok[None, :],
                          sem="relaxed")
    else:
        finish_backward(acc, xr, rows, row_ok, dims, dim_ok, inv_x_ptr, lse_ptr, g_ptr, gx_ptr, gx2_ptr, p_ptr, p2_ptr,
                        inv_p_ptr, n_rows, n_pairs, stride_p, stride_p2, stride_gx, stride_gx2, inv_t, eps,
                        EXCLUDE_DIAG, NORMALIZE)


@triton.jit(do_not_specialize=["n_rows", "n_pairs", "n_split"])
def _info_nce_bwd_combine_kernel(
    x_ptr, x2_ptr, inv_x_ptr, lse_ptr, g_ptr, gx_ptr, gx2_ptr, acc_ptr, n_rows, n_pairs, d, stride_x, stride_x2,
    stride_gx, stride_gx2, n_split, inv_t, eps, p_ptr, inv_p_ptr, stride_p,
    EXCLUDE_DIAG: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Sums the splits' gradient slots in split order, then the backward's epilogue.
    if EXCLUDE_DIAG:
        p_ptr, p2_ptr, inv_p_ptr, stride_p, stride_p2 = x_ptr, x2_ptr, inv_x_ptr, stride_x, stride_x2
    else:
        p2_ptr, stride_p2 = p_ptr, stride_p
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    dims, dim_ok = feature_dims(d, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_split):
        acc += load_rows(acc_ptr, s * n_rows + rows, row_ok, dims, dim_ok, d)
    xr = load_pair_rows(x_ptr, x2_ptr, rows, row_ok, dims, dim_ok, n_pairs, stride_x, stride_x2, EXCLUDE_DIAG)
    finish_backward(acc, xr, rows, row_ok, dims, dim_ok, inv_x_ptr, lse_ptr, g_ptr, gx_ptr, gx2_ptr, p_ptr, p2_ptr,
                    inv_p_ptr, n_rows, n_pairs, stride_p, stride_p2, stride_gx, stride_gx2, inv_t, eps,
                    EXCLUDE_DIAG, NORMALIZE)


# --------------------------------------------------------------------------------------------
# NT-Xent's symmetric kernels: with normalised rows and the fixed bound, e_ij = 2^u_ij with
# u_ij = s_ij log2(e) / t is symmetric (s_ij = s_ji and no per-row maximum), so a tile of block
# rows I against block columns J gives both the row sums of I and the column sums of J, and in
# the backward w_ij = e_ij (c_i + c_j) is symmetric too: W_IJ yhat_J goes to rows I and
# W_IJ^T xhat_I to rows J. Only tiles with J >= I are computed: half the exponentials and half
# the logit products of the kernels above (the backward's two gradient products per tile make it
# 3 products per computed tile against 4 per pair of tiles). Each program takes a run of tiles
# (I, J0 .. J0 + run - 1) from a table; its row sums (or gradient rows) stay in registers across
# the run, and every sum leaves the program through float atomics into an fp32 buffer that the
# prologue zeroed (so the wrappers take these kernels only where deterministic algorithms are
# off). A diagonal tile is square and symmetric: its row sums are its column sums, counted once.
# --------------------------------------------------------------------------------------------


@triton.jit
def tile_run(tile_ptr, n_blocks, run):
    """(row block I, first and last+1 column block) of this program's run of tiles."""
    bi = tl.load(tile_ptr + 2 * tl.program_id(0))
    bj0 = tl.load(tile_ptr + 2 * tl.program_id(0) + 1)
    return bi, bj0, tl.minimum(bj0 + run, n_blocks)


@triton.jit(do_not_specialize=["n_rows", "n_pairs", "n_blocks", "run"])
def _nt_xent_sym_fwd_kernel(
    x_ptr, x2_ptr, inv_x_ptr, l_ptr, tile_ptr, n_rows, n_pairs, d, stride_x, stride_x2, inv_t, n_blocks, run,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    bi, bj0, bj1 = tile_run(tile_ptr, n_blocks, run)
    rows = bi * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    dims, dim_ok = feature_dims(d, BLOCK_D)
    xr = load_pair_rows(x_ptr, x2_ptr, rows, row_ok, dims, dim_ok, n_pairs, stride_x, stride_x2, True)
    scale_r = load_logit_scale(inv_x_ptr, rows, row_ok, inv_t, True, BLOCK)
    l_r = tl.zeros([BLOCK], dtype=tl.float32)
    for bj in range(bj0, bj1):
        cols = bj * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < n_rows
        yc = load_pair_rows(x_ptr, x2_ptr, cols, col_ok, dims, dim_ok, n_pairs, stride_x, stride_x2, True)
        u = compute_logits(xr, yc, scale_r, inv_x_ptr, cols, col_ok, True, PRECISION)
        valid = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != rows[:, None])
        e = tl.exp2(tl.where(valid, u, float("-inf")))  # |u| <= 58: no maximum needed (FIXED_BOUND)
        l_r += tl.sum(e, axis=1)
        tl.atomic_add(l_ptr + cols, tl.sum(e, axis=0), mask=col_ok & (bj != bi), sem="relaxed")
    tl.atomic_add(l_ptr + rows, l_r, mask=row_ok, sem="relaxed")


@triton.jit(do_not_specialize=["n_rows", "n_pairs", "n_blocks", "run"])
def _nt_xent_sym_bwd_kernel(
    x_ptr, x2_ptr, xh_ptr, inv_x_ptr, lse_ptr, g_ptr, acc_ptr, tile_ptr, n_rows, n_pairs, d, stride_x, stride_x2,
    inv_t, n_blocks, run,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # w_ij = g_i p_ij + g_j p_ji = e_ij (c_i + c_j), c_i = g_i 2^-lse_i, with the diagonal and the
    # positive pair left out (the positive is added in fp32 by the finishing kernel, as in
    # _info_nce_bwd_kernel): acc_I += W_IJ xhat_J and acc_J += W_IJ^T xhat_I.
    bi, bj0, bj1 = tile_run(tile_ptr, n_blocks, run)
    rows = bi * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    prow = (rows + n_pairs) % n_rows
    dims, dim_ok = feature_dims(d, BLOCK_D)
    xr = load_pair_rows(x_ptr, x2_ptr, rows, row_ok, dims, dim_ok, n_pairs, stride_x, stride_x2, True)
    xhr = load_rows(xh_ptr, rows, row_ok, dims, dim_ok, d)
    scale_r = load_logit_scale(inv_x_ptr, rows, row_ok, inv_t, True, BLOCK)
    c_r = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * tl.exp2(
        -tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    for bj in range(bj0, bj1):
        cols = bj * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < n_rows
        yc = load_pair_rows(x_ptr, x2_ptr, cols, col_ok, dims, dim_ok, n_pairs, stride_x, stride_x2, True)
        c_c = tl.load(g_ptr + cols, mask=col_ok, other=0.0) * tl.exp2(
            -tl.load(lse_ptr + cols, mask=col_ok, other=0.0) * LOG2E)
        u = compute_logits(xr, yc, scale_r, inv_x_ptr, cols, col_ok, True, PRECISION)
        valid = (row_ok[:, None] & col_ok[None, :] & (cols[None, :] != rows[:, None])
                 & (cols[None, :] != prow[:, None]))
        w = (tl.exp2(tl.where(valid, u, float("-inf"))) * (c_r[:, None] + c_c[None, :])).to(x_ptr.dtype.element_ty)
        acc += tl.dot(w, load_rows(xh_ptr, cols, col_ok, dims, dim_ok, d), input_precision=PRECISION)
        acc_c = tl.dot(tl.trans(w), xhr, input_precision=PRECISION)
        tl.atomic_add(row_ptrs(acc_ptr, cols, dims, d), acc_c, mask=(col_ok & (bj != bi))[:, None] & dim_ok[None, :],
                      sem="relaxed")
    tl.atomic_add(row_ptrs(acc_ptr, rows, dims, d), acc, mask=row_ok[:, None] & dim_ok[None, :], sem="relaxed")


# --------------------------------------------------------------------------------------------
# launch wrappers
# --------------------------------------------------------------------------------------------

# rows per program of the forward's finishing launch (elementwise: it reads no feature rows)
_FINISH_ROWS = 128

_TUNING_KEY = ["n_rows", "n_cols", "d", "EXCLUDE_DIAG", "NORMALIZE", "FIXED_BOUND", "SPLIT", "PRECISION"]
# the unsplit forward turns the prologue's positive logits in loss_ptr into losses: every trial
# launch must start from them
_info_nce_fwd_tuned = autotuned(CONFIGS, _TUNING_KEY, restore_value=["loss_ptr"])(_info_nce_fwd_kernel)
# the split backward accumulates into acc_ptr: the autotuner zeroes it before every trial launch
_info_nce_bwd_tuned = autotuned(CONFIGS, _TUNING_KEY, reset_to_zero=["acc_ptr"])(_info_nce_bwd_kernel)


def _launch_columns(kernel, tuned, n: int, d: int, x: torch.Tensor, args: tuple, const: dict, splits,
                    fixed=None) -> int:
    """Launches kernel over n rows with the fixed tiles (`fixed`, else `tiles`) or, where there is a
    tuned version and `autotune` says so, that, over (row tiles, splits(BLOCK_M)). Returns how many
    splits ran: the tile choice decides, and the combine kernel must read those alone (an
    autotuner's trial configs leave partials in the splits beyond)."""
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


def _rows(z: torch.Tensor) -> torch.Tensor:
    """z with unit column stride, the only layout the kernels read (rows may have any stride)."""
    return z if z.stride(1) == 1 or z.shape[1] == 1 else z.contiguous()


def _prologue(z1, z2, inv, eps, inv_t=1.0, normalize=True, cos=None, pos=None, xh=None, zero=None,
              both_views=True):
    """One launch of _info_nce_prologue_kernel: r of z1's and z2's rows into inv [2B]; with cos and
    pos, the positives; with xh, the normalised rows; with zero, an fp32 buffer of sums or of
    [*, d] gradient rows zeroed (2B rows with both_views, NT-Xent; else B, MoCo)."""
    b, d = z1.shape
    bm = _rowwise_rows(d)
    _info_nce_prologue_kernel[(cdiv(b, bm),)](
        z1, z2, inv, inv if cos is None else cos, inv if pos is None else pos, z1 if xh is None else xh,
        inv if zero is None else zero, b, d, z1.stride(0), z2.stride(0), inv_t, eps,
        NORMALIZE=normalize, FORWARD=cos is not None, WRITE_XHAT=xh is not None,
        ZERO_SUMS=zero is not None and zero.dim() == 1, ZERO_ROWS=zero is not None and zero.dim() == 2,
        BOTH_VIEWS=both_views, BLOCK_M=bm, BLOCK_D=block_d(d))


def _finish_forward(loss, lse, m_part, l_part, n_split: int, exclude_diag: bool, fixed_bound: bool):
    """The forward's last launch: merges n_split partials per row, loss = lse - pos."""
    n = loss.shape[0]
    _info_nce_fwd_combine_kernel[(cdiv(n, _FINISH_ROWS),)](
        loss, lse, m_part, l_part, n, n_split, EXCLUDE_DIAG=exclude_diag, FIXED_BOUND=fixed_bound,
        BLOCK_M=_FINISH_ROWS, SPLIT_CHUNK=16, num_warps=4)


def _symmetric_launch(kernel, z1: torch.Tensor, z2: torch.Tensor, buffers: tuple, inv_t: float):
    """Launches a symmetric kernel over its table of tile runs: (z1, z2, *buffers, table, sizes)."""
    half, d = z1.shape
    n = 2 * half
    block, nw, ns = symmetric_tiles(d, z1.device, z1.dtype)
    n_blocks = cdiv(n, block)
    run = symmetric_run(n_blocks, z1.device)
    table = _tile_table(n_blocks, run, z1.device)
    kernel[(table.shape[0],)](z1, z2, *buffers, table, n, half, d, z1.stride(0), z2.stride(0), inv_t, n_blocks, run,
                              BLOCK=block, BLOCK_D=block_d(d), PRECISION=exact_precision(z1.dtype, d),
                              num_warps=nw, num_stages=ns)


@on_tensor_device
def nt_xent_fwd(z1: torch.Tensor, z2: torch.Tensor, temperature: float, normalize: bool, eps: float):
    """z1, z2 [B, d], one dtype. Returns (loss_rows [2B], lse [2B], cos [B]), fp32."""
    z1, z2 = _rows(z1), _rows(z2)
    half, d = z1.shape
    n = 2 * half
    device = z1.device
    inv_t = 1.0 / temperature
    inv = torch.empty(n, device=device, dtype=torch.float32)
    loss, lse, cos = _forward_outputs(n, half, device)  # loss holds the positive logits until the end
    sym = symmetric(normalize, temperature, d, z1.dtype)
    fixed = normalize and temperature >= FIXED_BOUND_MIN_T
    sums = torch.empty(n, device=device, dtype=torch.float32) if sym else None
    _prologue(z1, z2, inv, eps, inv_t, normalize, cos=cos, pos=loss, zero=sums)
    if sym:
        _symmetric_launch(_nt_xent_sym_fwd_kernel, z1, z2, (inv, sums), inv_t)
        _finish_forward(loss, lse, sums, sums, 1, True, True)
        return loss, lse, cos
    parts = _max_column_splits(n, device)
    split = parts > 1
    if split:  # every launched split writes its (max, sum) for all its rows
        m_part = torch.empty((parts, n), device=device, dtype=torch.float32)
        l_part = torch.empty((parts, n), device=device, dtype=torch.float32)
    else:
        m_part = l_part = loss  # not read by the unsplit kernel
    launched = _launch_columns(
        _info_nce_fwd_kernel, _info_nce_fwd_tuned, n, d, z1,
        (z1, z2, inv, loss, lse, m_part, l_part, n, half, d, z1.stride(0), z2.stride(0), inv_t, z1, inv, n,
         z1.stride(0)),  # the columns: the rows themselves
        dict(EXCLUDE_DIAG=True, NORMALIZE=normalize, FIXED_BOUND=fixed, BLOCK_D=block_d(d), SPLIT=split,
             PRECISION=exact_precision(z1.dtype, d)),
        lambda bm: min(parts, column_splits(n, bm, device)) if split else 1)
    if split:
        _finish_forward(loss, lse, m_part, l_part, launched, True, fixed)
    return loss, lse, cos


@on_tensor_device
def nt_xent_bwd(grad_rows: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, lse: torch.Tensor,
                temperature: float, normalize: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_rows_i * loss_i with respect to z1 and z2 (two separate tensors,
    dtype of z1)."""
    z1, z2 = _rows(z1), _rows(z2)
    half, d = z1.shape
    n = 2 * half
    device = z1.device
    inv_t = 1.0 / temperature
    g = grad_rows.to(torch.float32).contiguous()
    g1, g2 = torch.empty_like(z1), torch.empty_like(z2)
    sym = symmetric(normalize, temperature, d, z1.dtype)
    # Splitting the columns sums each row's gradient with float atomics, in no fixed order.
    parts = 1 if sym or torch.are_deterministic_algorithms_enabled() else _max_column_splits(n, device)
    split = parts > 1
    acc = torch.empty(n, d, device=device, dtype=torch.float32) if split or sym else None
    xh = torch.empty((n, d), device=device, dtype=z1.dtype) if normalize else None
    if normalize or acc is not None:
        inv = torch.empty(n, device=device, dtype=torch.float32)
        _prologue(z1, z2, inv, eps, xh=xh, zero=acc)
    else:
        inv = lse  # without normalisation no kernel reads the norms: lse stands in for them
    const = dict(EXCLUDE_DIAG=True, NORMALIZE=normalize, BLOCK_D=block_d(d))
    if sym:
        _symmetric_launch(_nt_xent_sym_bwd_kernel, z1, z2, (xh, inv, lse, g, acc), inv_t)
    else:
        yh = z1 if xh is None else xh  # not read without normalisation
        _launch_columns(
            _info_nce_bwd_kernel, _info_nce_bwd_tuned, n, d, z1,
            (z1, z2, yh, inv, lse, g, g1, g2, g1 if acc is None else acc, n, half, d, z1.stride(0), z2.stride(0),
             yh.stride(0), g1.stride(0), g2.stride(0), inv_t, eps, z1, inv, z1, inv, n, z1.stride(0), z1.stride(0)),
            dict(const, FIXED_BOUND=normalize and temperature >= FIXED_BOUND_MIN_T, SPLIT=split, SLOTS=False,
                 PRECISION=exact_precision(z1.dtype, d)),
            lambda bm: min(parts, column_splits(n, bm, device)) if split else 1, tiles(d, device, z1.dtype, True))
    if acc is not None:  # the atomics summed every split (or tile) into one slot per row
        _info_nce_bwd_combine_kernel[(cdiv(n, _combine_rows(d)),)](
            z1, z2, inv, lse, g, g1, g2, acc, n, half, d, z1.stride(0), z2.stride(0), g1.stride(0), g2.stride(0),
            1, inv_t, eps, z1, inv, z1.stride(0), BLOCK_M=_combine_rows(d), num_warps=4, **const)
    return g1, g2


def _queue_fixed_bound(normalize: bool, temperature: float, k: int) -> bool:
    """MoCo's sums skip the running maximum where the bound holds: the positive and K queue terms
    stay within the 2^17 the bound is sized for."""
    return normalize and temperature >= FIXED_BOUND_MIN_T and k < 2 ** 17


@on_tensor_device
def info_nce_queue_fwd(q, k, queue, temperature: float, normalize: bool, eps: float,
                       queue_rnorm: torch.Tensor | None = None):
    """q, k [B, d], queue [K, d], contiguous, one dtype. Returns (loss [B], lse [B], cos [B]), fp32.
    `queue_rnorm` [K] fp32: the queue's `row_rnorm(queue, eps)`, for a caller that keeps it across
    steps (the queue changes by B rows a step); computed here when None."""
    b, d = q.shape
    kq = queue.shape[0]
    device = q.device
    inv_t = 1.0 / temperature
    inv = torch.empty(2 * b, device=device, dtype=torch.float32)  # [r_q; r_k]
    loss, lse, cos = _forward_outputs(b, b, device)  # loss holds the positive logits until the end
    _prologue(q, k, inv, eps, inv_t, normalize, cos=cos, pos=loss, both_views=False)
    if not normalize:
        rqu = inv  # not read without normalisation
    else:
        rqu = row_rnorm(queue, eps) if queue_rnorm is None else queue_rnorm
    fixed_bound = _queue_fixed_bound(normalize, temperature, kq)
    fixed = tiles(d, device, q.dtype)
    n_split = _queue_splits(b, kq, fixed[0], fixed[1], device)
    m_part = torch.empty(n_split, b, device=device, dtype=torch.float32)
    l_part = torch.empty(n_split, b, device=device, dtype=torch.float32)
    _launch_columns(
        _info_nce_fwd_kernel, None, b, d, q,
        (q, q, inv, loss, lse, m_part, l_part, b, b, d, q.stride(0), q.stride(0), inv_t, queue, rqu, kq,
         queue.stride(0)),
        dict(EXCLUDE_DIAG=False, NORMALIZE=normalize, FIXED_BOUND=fixed_bound, BLOCK_D=block_d(d), SPLIT=True,
             PRECISION=exact_precision(q.dtype, d)),
        lambda bm: n_split, fixed)
    _finish_forward(loss, lse, m_part, l_part, n_split, False, fixed_bound)
    return loss, lse, cos


@on_tensor_device
def info_nce_queue_bwd(grad_rows, q, k, queue, lse, temperature: float, normalize: bool, eps: float):
    """Gradient of sum_i grad_rows_i * loss_i with respect to q; dtype of q."""
    b, d = q.shape
    kq = queue.shape[0]
    device = q.device
    # without normalisation the kernel reads no queue norms: lse stands in for them
    rqu, quh = row_normalize(queue, eps) if normalize else (lse, queue)
    fixed = tiles(d, device, q.dtype, backward=True)
    n_split = _queue_splits(b, kq, fixed[0], fixed[1], device)
    # the splits' gradient sums: float atomics into one buffer the prologue zeroes, or under
    # deterministic algorithms one slot per split, summed in order
    slots = torch.are_deterministic_algorithms_enabled()
    acc = torch.empty((n_split, b, d) if slots else (b, d), device=device, dtype=torch.float32)
    inv = torch.empty(2 * b, device=device, dtype=torch.float32)  # [r_q; r_k]
    _prologue(q, k, inv, eps, zero=None if slots else acc, both_views=False)
    rk = inv[b:]
    g = grad_rows.to(torch.float32).contiguous()
    gq = torch.empty_like(q)
    inv_t = 1.0 / temperature
    const = dict(EXCLUDE_DIAG=False, NORMALIZE=normalize, BLOCK_D=block_d(d))
    _launch_columns(
        _info_nce_bwd_kernel, None, b, d, q,
        (q, q, quh, inv, lse, g, gq, gq, acc, b, b, d, q.stride(0), q.stride(0), quh.stride(0), gq.stride(0),
         gq.stride(0), inv_t, eps, queue, rqu, k, rk, kq, queue.stride(0), k.stride(0)),
        dict(const, FIXED_BOUND=False, SPLIT=True, SLOTS=slots, PRECISION=exact_precision(q.dtype, d)),
        lambda bm: n_split, fixed)
    _info_nce_bwd_combine_kernel[(cdiv(b, _combine_rows(d)),)](
        q, q, inv, lse, g, gq, gq, acc, b, b, d, q.stride(0), q.stride(0), gq.stride(0), gq.stride(0),
        n_split if slots else 1, inv_t, eps, k, rk, k.stride(0), BLOCK_M=_combine_rows(d), num_warps=4, **const)
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


@triton.jit(do_not_specialize=["n_rows"])
def _pair_cosine_fwd_kernel(a_ptr, b_ptr, cos_ptr, n_rows, d, stride_a, stride_b, eps,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_ok, _, _, a, b, inv_a, inv_b = load_pair(a_ptr, b_ptr, n_rows, d, stride_a, stride_b, eps,
                                                       BLOCK_M, BLOCK_D)
    tl.store(cos_ptr + rows, tl.sum(a * b, axis=1) * inv_a * inv_b, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows"])
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
