"""Tiled cosine-similarity kernels: clamped row sums (SAS) and streaming top-k neighbours (ELFS).

Both walk one block of rows of x against column tiles of y, computing each tile of cosines with
`tl.dot` (fp32 accumulation; TF32 for float32 inputs on the GPU) scaled by the rows' inverse
norms, and never write the tile out: the row sum adds it up, the top-k merges it into a running
list held in registers. Memory stays O((n + m) * d).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import load_rows, own_rows
from .launch import cdiv, next_power_of_2, on_tensor_device

# Placeholder index of an empty top-k slot: larger than any real column, so that among the
# (equal, -inf) empty slots the one with the largest placeholder is replaced first.
_EMPTY = tl.constexpr(2**31 - 1)  # jit functions may only read constexpr globals


def tiles(device: torch.device, d: int) -> dict:
    """Launch configuration of both kernels for a [*, d] operand on `device`."""
    # The interpreter runs a program per block in numpy: small blocks keep odd-size tests cheap
    # and still cover multi-tile paths. tl.dot needs every block dim >= 16.
    if device.type == "cpu":
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16)
    else:
        # 8 warps: with 4, ptxas (sm_90) spills registers for bf16 row sums and for the top-k.
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=3)
    cfg["NUM_D"] = cdiv(d, cfg["BLOCK_D"])
    return cfg


def inverse_norms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / max(||x_i||, eps) in float32, shape [n]: the kernels' inv_x and inv_y."""
    return 1.0 / x.float().norm(dim=1).clamp_min(eps)


@triton.jit
def load_block(inv_x_ptr, n_rows, BLOCK_M: tl.constexpr):
    """(rows, row_ok, inv_x) of this program's block of x."""
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    return rows, row_ok, tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)


@triton.jit
def compute_cosines(x_ptr, y_ptr, inv_x, inv_y_ptr, rows, cols, row_ok, col_ok, d, stride_x, stride_y,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr):
    """cos(x_i, y_j) for a [BLOCK_M, BLOCK_N] tile: <x_i, y_j> in fp32, scaled by both inverse norms."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dims = tl.arange(0, BLOCK_D)
    # A static (unrolled) loop: d is small (embeddings).
    for kk in tl.static_range(NUM_D):
        dk = kk * BLOCK_D + dims
        a = load_rows(x_ptr, rows, row_ok, dk, dk < d, stride_x)
        b = load_rows(y_ptr, cols, col_ok, dk, dk < d, stride_y)
        acc = tl.dot(a, tl.trans(b), acc)
    inv_y = tl.load(inv_y_ptr + cols, mask=col_ok, other=0.0)
    return acc * inv_x[:, None] * inv_y[None, :]


@triton.jit
def _cosine_rowsum_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, gx_ptr, gy_ptr, lo_ptr, hi_ptr, out_ptr,
    n_rows, d, stride_x, stride_y, clamp_min,
    HAS_GROUPS: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
):
    rows, row_ok, inv_x = load_block(inv_x_ptr, n_rows, BLOCK_M)
    if HAS_GROUPS:
        gx = tl.load(gx_ptr + rows, mask=row_ok, other=-1)
    # Columns this row block can match: all of y, or (groups sorted) the span of its groups.
    col_lo = tl.load(lo_ptr + tl.program_id(0))
    col_hi = tl.load(hi_ptr + tl.program_id(0))
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # While loops over the column tiles, in both kernels: a range() loop would be software-pipelined,
    # with up to 4x the shared memory of the code the tiles above were sized for (untimed), and
    # the interpreter's runtime range() bounds break under numpy >= 2.4.
    c0 = col_lo
    while c0 < col_hi:
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_hi
        sim = compute_cosines(x_ptr, y_ptr, inv_x, inv_y_ptr, rows, cols, row_ok, col_ok, d, stride_x, stride_y,
                              BLOCK_M, BLOCK_N, BLOCK_D, NUM_D)
        sim = tl.maximum(sim, clamp_min)
        keep = row_ok[:, None] & col_ok[None, :]
        if HAS_GROUPS:
            gy = tl.load(gy_ptr + cols, mask=col_ok, other=-2)
            keep = keep & (gx[:, None] == gy[None, :])
        if EXCLUDE_SELF:
            keep = keep & (rows[:, None] != cols[None, :])
        total += tl.sum(tl.where(keep, sim, 0.0), axis=1)
        c0 += BLOCK_N
    tl.store(out_ptr + rows, total, mask=row_ok)


@on_tensor_device
def cosine_rowsum(
    x: torch.Tensor, y: torch.Tensor, inv_x: torch.Tensor, inv_y: torch.Tensor,
    groups: torch.Tensor | None, y_groups: torch.Tensor | None, clamp_min: float, exclude_self: bool,
) -> torch.Tensor:
    """Launches the row-sum kernel; inputs validated by coreset_ext.ops (x, y contiguous rows,
    same dtype; y may be x). Returns [n] float32 in x's row order."""
    n, d = x.shape
    m = y.shape[0]
    cfg = tiles(x.device, d)
    bm = cfg["BLOCK_M"]
    nblocks = cdiv(n, bm)
    # Poisoned, so that an element the kernel failed to write shows as NaN (O(n): free).
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    perm = None
    if groups is not None:
        # Sort rows and columns by group so that each row block only visits the column span of
        # its own groups: with K groups the work drops from n*m to about n*m/K.
        gx_sorted, perm = torch.sort(groups, stable=True)
        if y_groups is None:  # y is x: the same permutation keeps i == j meaning "same row"
            gy_sorted, yperm = gx_sorted, perm
        else:
            gy_sorted, yperm = torch.sort(y_groups, stable=True)
        x = x[perm]
        inv_x = inv_x[perm]
        y = x if y_groups is None else y[yperm]
        inv_y = inv_x if y_groups is None else inv_y[yperm]
        starts = torch.arange(nblocks, device=x.device) * bm
        ends = torch.clamp(starts + bm, max=n) - 1
        lo = torch.searchsorted(gy_sorted, gx_sorted[starts], right=False).to(torch.int32)
        hi = torch.searchsorted(gy_sorted, gx_sorted[ends], right=True).to(torch.int32)
        gx_arg, gy_arg = gx_sorted, gy_sorted
    else:
        lo = torch.zeros(nblocks, dtype=torch.int32, device=x.device)
        hi = torch.full((nblocks,), m, dtype=torch.int32, device=x.device)
        gx_arg, gy_arg = inv_x, inv_y  # unused (HAS_GROUPS is False): any valid pointer
    _cosine_rowsum_kernel[(nblocks,)](
        x, y, inv_x, inv_y, gx_arg, gy_arg, lo, hi, out,
        n, d, x.stride(0), y.stride(0), float(clamp_min),
        HAS_GROUPS=groups is not None, EXCLUDE_SELF=bool(exclude_self), **cfg,
    )
    if perm is not None:
        out = out[torch.argsort(perm)]  # back to x's row order (a gather: deterministic)
    return out


@triton.jit
def _cosine_topk_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, val_ptr, idx_ptr,
    n_rows, n_cols, d, k, stride_x, stride_y,
    EXCLUDE_SELF: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
):
    rows, row_ok, inv_x = load_block(inv_x_ptr, n_rows, BLOCK_M)
    slots = tl.arange(0, KP)
    slot_ok = slots < k
    # Running top-k per row: values (slots past k hold +inf so they are never the minimum) and
    # indices (empty slots hold distinct placeholders above any real column).
    vals = tl.where(slot_ok[None, :], float("-inf"), float("inf")) + tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    idxs = tl.full((BLOCK_M, KP), _EMPTY, tl.int32) - slots[None, :]
    ncols = tl.arange(0, BLOCK_N)
    c0 = tl.program_id(0) * 0  # an int32 scalar; a while loop as in _cosine_rowsum_kernel
    while c0 < n_cols:
        cols = c0 + ncols
        col_ok = cols < n_cols
        sim = compute_cosines(x_ptr, y_ptr, inv_x, inv_y_ptr, rows, cols, row_ok, col_ok, d, stride_x, stride_y,
                              BLOCK_M, BLOCK_N, BLOCK_D, NUM_D)
        ok = col_ok[None, :] & row_ok[:, None]
        if EXCLUDE_SELF:
            ok = ok & (rows[:, None] != cols[None, :])
        sim = tl.where(ok, sim, float("-inf"))
        # Merge: while some row's best remaining tile value beats its current k-th value, move
        # that value in, replacing the k-th (the largest index among equal k-th values). Strict
        # ">" keeps earlier (lower-index) columns on ties. After the first tiles few values
        # qualify, so the loop usually runs zero or one time per tile.
        kth = tl.min(vals, axis=1)
        best = tl.max(sim, axis=1)
        go = best > kth
        while tl.max(go.to(tl.int32), axis=0) > 0:
            arg = tl.argmax(sim, axis=1, tie_break_left=True)
            is_kth = vals == kth[:, None]
            worst = tl.max(tl.where(is_kth, idxs, -1), axis=1)
            put = go[:, None] & is_kth & (idxs == worst[:, None])
            vals = tl.where(put, best[:, None], vals)
            idxs = tl.where(put, (c0 + arg)[:, None], idxs)
            sim = tl.where(go[:, None] & (ncols[None, :] == arg[:, None]), float("-inf"), sim)
            kth = tl.min(vals, axis=1)
            best = tl.max(sim, axis=1)
            go = best > kth
        c0 += BLOCK_N
    out_ok = row_ok[:, None] & slot_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * k + slots[None, :]
    tl.store(val_ptr + offs, vals, mask=out_ok)
    tl.store(idx_ptr + offs, idxs, mask=out_ok)


def topk_slots(k: int) -> int:
    """Register slots the kernel holds per row for a top-k (a power of two >= 16)."""
    return max(16, next_power_of_2(k))


@on_tensor_device
def cosine_topk(
    x: torch.Tensor, y: torch.Tensor, inv_x: torch.Tensor, inv_y: torch.Tensor, k: int, exclude_self: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the streaming top-k kernel; inputs validated by coreset_ext.ops (k <= the columns
    available). Returns (values [n, k] float32, indices [n, k] int64), each row ordered by value
    descending, then index ascending."""
    n, d = x.shape
    m = y.shape[0]
    cfg = tiles(x.device, d)
    # Poisoned (NaN, -1), so that a slot the kernel failed to write shows.
    vals = torch.full((n, k), float("nan"), dtype=torch.float32, device=x.device)
    idxs = torch.full((n, k), -1, dtype=torch.int32, device=x.device)
    if n == 0:
        return vals, idxs.long()
    _cosine_topk_kernel[(cdiv(n, cfg["BLOCK_M"]),)](
        x, y, inv_x, inv_y, vals, idxs, n, m, d, k, x.stride(0), y.stride(0),
        EXCLUDE_SELF=bool(exclude_self), KP=topk_slots(k), **cfg,
    )
    # The kernel's slots are unordered: sort by index, then stably by value descending.
    idxs, order = torch.sort(idxs.long(), dim=1)
    vals = vals.gather(1, order)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, idxs.gather(1, order)
