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

from .launch import cdiv, next_power_of_2, on_tensor_device

# Placeholder index of an empty top-k slot: larger than any real column, so that among the
# (equal, -inf) empty slots the one with the largest placeholder is replaced first.
_EMPTY = tl.constexpr(2**31 - 1)  # jit functions may only read constexpr globals


@triton.jit
def _cosine_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, d, stride_x, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr):
    """<x_i, y_j> for a [BLOCK_M, BLOCK_N] tile, fp32 accumulation."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    # A static loop: d is small (embeddings), and the interpreter rejects runtime range() bounds.
    for kk in tl.static_range(NUM_K):
        k0 = kk * BLOCK_K
        k_ok = (k0 + ks) < d
        a = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + (k0 + ks)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(y_ptr + cols.to(tl.int64)[:, None] * stride_y + (k0 + ks)[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _cosine_rowsum_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, gx_ptr, gy_ptr, lo_ptr, hi_ptr, out_ptr,
    n, m, d, stride_x, stride_y, clamp_min,
    HAS_GROUPS: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    inv_x = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)
    if HAS_GROUPS:
        gx = tl.load(gx_ptr + rows, mask=row_ok, other=-1)
    # Columns this row block can match: all of y, or (groups sorted) the span of its groups.
    col_lo = tl.load(lo_ptr + pid)
    col_hi = tl.load(hi_ptr + pid)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # A while loop: the interpreter (with numpy >= 2.3) rejects runtime range() bounds.
    c0 = col_lo
    while c0 < col_hi:
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_hi
        dot = _cosine_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, d, stride_x, stride_y,
                           BLOCK_M, BLOCK_N, BLOCK_K, NUM_K)
        inv_y = tl.load(inv_y_ptr + cols, mask=col_ok, other=0.0)
        sim = tl.maximum(dot * inv_x[:, None] * inv_y[None, :], clamp_min)
        keep = row_ok[:, None] & col_ok[None, :]
        if HAS_GROUPS:
            gy = tl.load(gy_ptr + cols, mask=col_ok, other=-2)
            keep = keep & (gx[:, None] == gy[None, :])
        if EXCLUDE_SELF:
            keep = keep & (rows[:, None] != cols[None, :])
        total += tl.sum(tl.where(keep, sim, 0.0), axis=1)
        c0 += BLOCK_N
    tl.store(out_ptr + rows, total, mask=row_ok)


def _inverse_norms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return 1.0 / x.float().norm(dim=1).clamp_min(eps)


def _launch_config(device: torch.device, d: int) -> dict:
    # The interpreter runs a program per block in numpy: small blocks keep odd-size tests cheap
    # and still cover multi-tile paths. tl.dot needs every block dim >= 16.
    if device.type == "cpu":
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    else:
        # 8 warps: with 4, ptxas (sm_90) spills registers for bf16 row sums and for the top-k.
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)
    cfg["NUM_K"] = cdiv(d, cfg["BLOCK_K"])
    return cfg


@on_tensor_device
def cosine_rowsum(
    x: torch.Tensor, y: torch.Tensor, inv_x: torch.Tensor, inv_y: torch.Tensor,
    groups: torch.Tensor | None, y_groups: torch.Tensor | None, clamp_min: float, exclude_self: bool,
) -> torch.Tensor:
    """Launches the row-sum kernel; inputs validated by coreset_ext.ops (x, y contiguous rows,
    same dtype; y may be x). Returns [n] float32 in x's row order."""
    n, d = x.shape
    m = y.shape[0]
    cfg = _launch_config(x.device, d)
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
        n, m, d, x.stride(0), y.stride(0), float(clamp_min),
        HAS_GROUPS=groups is not None, EXCLUDE_SELF=bool(exclude_self), **cfg,
    )
    if perm is not None:
        out = out[torch.argsort(perm)]  # back to x's row order (a gather: deterministic)
    return out


@triton.jit
def _cosine_topk_kernel(
    x_ptr, y_ptr, inv_x_ptr, inv_y_ptr, val_ptr, idx_ptr,
    n, m, d, k, stride_x, stride_y,
    EXCLUDE_SELF: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    inv_x = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)
    slots = tl.arange(0, KP)
    slot_ok = slots < k
    # Running top-k per row: values (slots past k hold +inf so they are never the minimum) and
    # indices (empty slots hold distinct placeholders above any real column).
    vals = tl.where(slot_ok[None, :], float("-inf"), float("inf")) + tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    idxs = tl.full((BLOCK_M, KP), _EMPTY, tl.int32) - slots[None, :]
    ncols = tl.arange(0, BLOCK_N)
    c0 = pid * 0  # an int32 scalar; while loops because the interpreter rejects runtime range() bounds
    while c0 < m:
        cols = c0 + ncols
        col_ok = cols < m
        dot = _cosine_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, d, stride_x, stride_y,
                           BLOCK_M, BLOCK_N, BLOCK_K, NUM_K)
        inv_y = tl.load(inv_y_ptr + cols, mask=col_ok, other=0.0)
        sim = dot * inv_x[:, None] * inv_y[None, :]
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
    cfg = _launch_config(x.device, d)
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
