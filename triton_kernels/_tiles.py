"""@triton.jit pieces shared by the kernels: constants, row-block loads and stores, the logit tile,
the online log-sum-exp update and merge, and the backward of row normalisation.

Every helper works on one program's block: `rows` / `cols` index a block of rows / columns (int32,
with `row_ok` / `col_ok` masks), `dims` the feature columns (with `dim_ok`). Row offsets are
computed in int64 so that N * d beyond 2**31 elements cannot wrap. Log-sum-exps run in base 2
(exp2/log2 are the fast units): a running maximum `m` and sum `l` of 2^(u - m) per row.
"""

from __future__ import annotations

import triton
import triton.language as tl

# jit functions may only read constexpr globals
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def own_rows(n, BLOCK_M: tl.constexpr):
    """(rows, row_ok) of this program's block along grid axis 0."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < n


@triton.jit
def feature_dims(d, BLOCK_D: tl.constexpr):
    """(dims, dim_ok): every feature column in one block."""
    dims = tl.arange(0, BLOCK_D)
    return dims, dims < d


@triton.jit
def row_ptrs(ptr, rows, dims, stride):
    """Pointers to a [rows, dims] block of a row-major matrix (int64 row offsets)."""
    return ptr + rows.to(tl.int64)[:, None] * stride + dims[None, :]


@triton.jit
def load_rows(ptr, rows, row_ok, dims, dim_ok, stride):
    """[rows, dims] block of a row-major matrix in its own dtype, zero outside the masks."""
    return tl.load(row_ptrs(ptr, rows, dims, stride), mask=row_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def store_rows(ptr, rows, row_ok, dims, dim_ok, stride, value):
    tl.store(row_ptrs(ptr, rows, dims, stride), value.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def reciprocal_norms(x, eps):
    """1 / max(||x_i||, eps) of each row of an fp32 block."""
    return 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)


@triton.jit
def split_columns(n_cols, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the columns this program streams: all of them, or its share along grid axis 1
    (whole column tiles; the last shares may be empty)."""
    if SPLIT:
        per = tl.cdiv(tl.cdiv(n_cols, tl.num_programs(1)), BLOCK_N) * BLOCK_N
        lo = tl.program_id(1) * per
        hi = tl.minimum(lo + per, n_cols)
    else:
        lo = 0
        hi = n_cols
    return lo, hi


@triton.jit
def load_logit_scale(rnorm_ptr, rows, row_ok, inv_t, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr):
    # Row scale folding 1/t and log2(e): u_ij = s_ij * LOG2E / t in base-2 units.
    if NORMALIZE:
        return tl.load(rnorm_ptr + rows, mask=row_ok, other=0.0) * (inv_t * LOG2E)
    else:
        return tl.zeros([BLOCK_M], dtype=tl.float32) + inv_t * LOG2E


@triton.jit
def compute_logits(xr, xc, scale_r, rnorm_c_ptr, cols, col_ok, NORMALIZE: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Base-2 logits u_ij = <x_i, c_j> r_j * scale_i of a [rows, cols] tile: the dot product of the
    raw rows (fp32 accumulation), scaled after it, so no normalised copy is needed."""
    s = tl.dot(xr, tl.trans(xc), input_precision=PRECISION)
    if NORMALIZE:
        s = s * tl.load(rnorm_c_ptr + cols, mask=col_ok, other=0.0)[None, :]
    return s * scale_r[:, None]


@triton.jit
def update_lse(m, l, u, FIXED_BOUND: tl.constexpr):
    """Adds a tile of base-2 logits u (-inf where masked) to each row's running (m, l)."""
    if FIXED_BOUND:
        # |cosine| <= 1, so |u| <= log2(e) / t <= 58 for t >= FIXED_BOUND_MIN_T: 2^u is a
        # normal fp32 as it stands, no running max and no rescaling
        l += tl.sum(tl.exp2(u), axis=1)
    else:
        m_new = tl.maximum(m, tl.max(u, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid seen yet
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(u - m_safe[:, None]), axis=1)
        m = m_new
    return m, l


@triton.jit
def merge_lse(m, l, m_other, l_other, FIXED_BOUND: tl.constexpr):
    """Merges another (m, l) of the same rows, e.g. another column split's, into (m, l)."""
    if FIXED_BOUND:
        l += l_other
    else:
        m_new = tl.maximum(m, m_other)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # neither saw a valid column
        l = l * tl.exp2(m - m_safe) + l_other * tl.exp2(m_other - m_safe)
        m = m_new
    return m, l


@triton.jit
def normalize_backward(x, r, gz, eps):
    # zhat = x * r, r = 1 / max(||x||, eps). Above eps: (gz - zhat <gz, zhat>) * r; at or below
    # eps the clamp is constant, so the gradient passes through divided by eps (r = 1/eps there).
    nrm = tl.sqrt(tl.sum(x * x, axis=1))
    zh = x * r[:, None]
    proj = tl.sum(gz * zh, axis=1)
    return tl.where((nrm > eps)[:, None], (gz - zh * proj[:, None]) * r[:, None], gz * r[:, None])
