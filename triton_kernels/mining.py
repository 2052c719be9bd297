"""Triton kernels of contrastive learning with mined potential samples (coreset_ext.ops.potential_mining).

The loss of `reference.potential_mining_rows` without an n x n (SimCLR, n = 2B rows [z1; z2]) or
B x K (MoCo, the queue) matrix:

- mining: the streaming top-k kernel of similarity.py (a running top-k per row in registers)
  ranks the candidates against each anchor's view; the SimCLR form asks for k + 1 neighbours of
  row p(i) without p(i) itself and drops i, the one other excluded candidate;
- the band: per-row thresholds lo_i, hi_i (from the positive's cosine, `reference.mining_band`),
  scaled to base-2 logit units, mask each tile of logits inside the online log-sum-exp
  (`_band_lse_kernel`); the backward (`_band_bwd_kernel`) recomputes the tiles from the saved
  lse and applies the same masks, both the row's and, for SimCLR (the candidates are the rows),
  the column's: w_ij = g_i p_ij [j in band_i] + g_j p_ji [i in band_j], acc_i = sum_j w_ij chat_j;
- the positives (the view and k mined per row) are O(n k d) gathers in torch around the launches:
  their logits, the terms of mined positives outside the band, and their gradients. Whether a
  mined positive lies in the band is decided twice, in the tile and from the gather, on the same
  input values in two fp32 summation orders: they can disagree only for a cosine within about
  1e-7 of a band edge (the term is then counted twice or not at all, a jump no larger than the
  band edge itself makes).

Columns are split across grid axis 1 where the row tiles alone are too few for the GPU; each
split writes its own (max, sum) or gradient slot and the wrapper adds the splits in order (no
float atomics in the kernels; the positives' scatter is torch's index_add_, deterministic under
torch.use_deterministic_algorithms). Logits and their scaling come from the shared tile
helpers (_tiles.py), tiles and input precision from contrastive.py's per-architecture tables (the
same operand shapes as its row-streaming kernels); sizes are runtime arguments that are not
specialised on. The launch configuration (`tiles`, `column_splits`) is public, for tools.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from coreset_ext import reference

from . import contrastive, similarity
from ._tiles import (
    LN2,
    LOG2E,
    compute_logits,
    feature_dims,
    load_logit_scale,
    load_rows,
    own_rows,
    split_columns,
    store_rows,
    update_lse,
)
from .launch import block_d, cdiv, num_sms, on_tensor_device


def tiles(d: int, device: torch.device, dtype: torch.dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): contrastive.tiles, whose row-streaming kernels
    hold the same operands (a row block, raw and normalised column tiles, an fp32 gradient block)."""
    return contrastive.tiles(d, device, dtype, backward)


def column_splits(n_rows: int, n_cols: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Programs per row tile along the columns: enough for about two per SM, each streaming at
    least one column tile."""
    want = max(1, cdiv(2 * num_sms(device), cdiv(n_rows, block_m)))
    return max(1, min(want, cdiv(n_cols, block_n)))


@triton.jit
def band_mask(u, rows, row_ok, cols, col_ok, lo_ptr, hi_ptr, n_pairs, n_rows, PAIRED: tl.constexpr,
              BY_COLUMN: tl.constexpr):
    """Which logits u (base-2 units) of a [rows, cols] tile lie in the band [lo, hi] (thresholds
    in the same units) of their row, or with BY_COLUMN of their column (PAIRED only: s is
    symmetric, so u_ij is also column j's logit of row i). PAIRED (the columns are the rows
    [z1; z2]): never the row itself nor its other view, (i + B) mod 2B."""
    if BY_COLUMN:
        lo = tl.load(lo_ptr + cols, mask=col_ok, other=0.0)[None, :]
        hi = tl.load(hi_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        lo = tl.load(lo_ptr + rows, mask=row_ok, other=0.0)[:, None]
        hi = tl.load(hi_ptr + rows, mask=row_ok, other=0.0)[:, None]
    keep = row_ok[:, None] & col_ok[None, :] & (u >= lo) & (u <= hi)
    if PAIRED:  # (the pair relation is symmetric: one test serves rows and columns)
        prow = (rows + n_pairs) % n_rows
        keep = keep & (cols[None, :] != rows[:, None]) & (cols[None, :] != prow[:, None])
    return keep


@triton.jit
def row_block(x_ptr, inv_x_ptr, n_rows, d, stride_x, inv_t, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's anchors: (rows, row_ok, dims, dim_ok, raw row block, logit scale r_i log2(e)/t)."""
    rows, row_ok = own_rows(n_rows, BLOCK_M)
    dims, dim_ok = feature_dims(d, BLOCK_D)
    xr = load_rows(x_ptr, rows, row_ok, dims, dim_ok, stride_x)
    return rows, row_ok, dims, dim_ok, xr, load_logit_scale(inv_x_ptr, rows, row_ok, inv_t, True, BLOCK_M)


@triton.jit
def column_tile(start, hi, xr, scale_r, y_ptr, inv_y_ptr, dims, dim_ok, stride_y, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    """(cols, col_ok, base-2 logits u [rows, cols]) of the candidates start .. start + BLOCK_N."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    yc = load_rows(y_ptr, cols, col_ok, dims, dim_ok, stride_y)
    return cols, col_ok, compute_logits(xr, yc, scale_r, inv_y_ptr, cols, col_ok, True, PRECISION)


@triton.jit(do_not_specialize=["n_rows", "n_pairs", "n_cols"])
def _band_lse_kernel(
    x_ptr, inv_x_ptr, y_ptr, inv_y_ptr, lo_ptr, hi_ptr, m_part_ptr, l_part_ptr, n_rows, n_pairs, n_cols, d,
    stride_x, stride_y, inv_t,
    PAIRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Base-2 (max, sum of 2^(u - max)) of each row's logits in its band, over this split's columns
    # (a running maximum: the band may be empty, and t is any temperature the op takes).
    rows, row_ok, dims, dim_ok, xr, scale_r = row_block(x_ptr, inv_x_ptr, n_rows, d, stride_x, inv_t, BLOCK_M,
                                                        BLOCK_D)
    lo, hi = split_columns(n_cols, True, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols, col_ok, u = column_tile(start, hi, xr, scale_r, y_ptr, inv_y_ptr, dims, dim_ok, stride_y, BLOCK_N,
                                      PRECISION)
        keep = band_mask(u, rows, row_ok, cols, col_ok, lo_ptr, hi_ptr, n_pairs, n_rows, PAIRED, False)
        m_i, l_i = update_lse(m_i, l_i, tl.where(keep, u, float("-inf")), False)
    part = tl.program_id(1) * n_rows + rows
    tl.store(m_part_ptr + part, m_i, mask=row_ok)
    tl.store(l_part_ptr + part, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "n_pairs", "n_cols"])
def _band_bwd_kernel(
    x_ptr, inv_x_ptr, y_ptr, inv_y_ptr, yh_ptr, lo_ptr, hi_ptr, lse_ptr, g_ptr, acc_ptr, n_rows, n_pairs, n_cols,
    d, stride_x, stride_y, stride_yh, inv_t,
    PAIRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # acc_i = sum_j w_ij yhat_j over this split's columns, into slot program_id(1):
    # w_ij = g_i 2^(u_ij - lse_i) in row i's band, plus (PAIRED: the columns are the rows, s is
    # symmetric) g_j 2^(u_ij - lse_j) in column j's band, with lse in base-2 units.
    rows, row_ok, dims, dim_ok, xr, scale_r = row_block(x_ptr, inv_x_ptr, n_rows, d, stride_x, inv_t, BLOCK_M,
                                                        BLOCK_D)
    lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    g_r = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    lo, hi = split_columns(n_cols, True, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols, col_ok, u = column_tile(start, hi, xr, scale_r, y_ptr, inv_y_ptr, dims, dim_ok, stride_y, BLOCK_N,
                                      PRECISION)
        keep = band_mask(u, rows, row_ok, cols, col_ok, lo_ptr, hi_ptr, n_pairs, n_rows, PAIRED, False)
        w = tl.where(keep, g_r[:, None] * tl.exp2(tl.where(keep, u, 0.0) - lse_r[:, None]), 0.0)
        if PAIRED:
            keep_c = band_mask(u, rows, row_ok, cols, col_ok, lo_ptr, hi_ptr, n_pairs, n_rows, PAIRED, True)
            lse_c = tl.load(lse_ptr + cols, mask=col_ok, other=0.0) * LOG2E
            g_c = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
            w += tl.where(keep_c, g_c[None, :] * tl.exp2(tl.where(keep_c, u, 0.0) - lse_c[None, :]), 0.0)
        yhc = load_rows(yh_ptr, cols, col_ok, dims, dim_ok, stride_yh)
        acc += tl.dot(w.to(yh_ptr.dtype.element_ty), yhc, input_precision=PRECISION)
    store_rows(acc_ptr, tl.program_id(1) * n_rows + rows, row_ok, dims, dim_ok, d, acc)


def _operands(q, k, queue, eps):
    """(x rows, r_x, view rows' r, candidates, r_c, normalised candidates, paired) in fp32 norms:
    SimCLR x = [z1; z2] (one copy) is its own candidates; MoCo x = q, candidates the queue."""
    if queue is None:
        x = torch.cat([q, k])
        inv, xh = contrastive.row_normalize(x, eps)
        return x, inv, x, inv, xh, True
    x = q.contiguous()
    cand = queue.contiguous()
    inv_c, ch = contrastive.row_normalize(cand, eps)
    return x, contrastive.row_rnorm(x, eps), cand, inv_c, ch, False


def _view_rows(q, k, x, paired):
    """The other view of each anchor: rows p(i) of x (SimCLR) or the keys (MoCo)."""
    return x.roll(-q.shape[0], dims=0) if paired else k.contiguous()


def _mine(x, inv, view, inv_v, cand, inv_c, n_mined: int, paired: bool):
    """(index [n, k] int64, cosines [n, k] fp32) of each anchor's mined positives (descending)."""
    if not paired:
        vals, idx = similarity.cosine_topk(view, cand, inv_v, inv_c, n_mined, False)
        return idx, vals
    # row r's neighbours without r are those of anchor i = p(r) without p(i); drop i = p(r) too
    n, b = x.shape[0], x.shape[0] // 2
    vals, idx = similarity.cosine_topk(x, x, inv, inv, n_mined + 1, True)
    partner = (torch.arange(n, device=x.device) + b) % n
    keep = idx != partner[:, None]
    keep &= keep.cumsum(dim=1) <= n_mined
    vals, idx = vals[keep].view(n, n_mined), idx[keep].view(n, n_mined)
    return idx.roll(-b, dims=0), vals.roll(-b, dims=0)  # anchor i reads row p(i)


def _mined_logits(x, inv, cand, inv_c, index):
    """s_ij = cos(x_i, cand_j) for each anchor's mined j, [n, k] fp32 (O(n k d) gathers)."""
    picked = cand.float()[index]  # [n, k, d]
    return torch.linalg.vecdot(x.float()[:, None, :], picked) * inv[:, None] * inv_c[index]


def _launch(kernel, x, inv, cand, inv_c, paired, args, backward=False):
    n, d = x.shape
    bm, bn, nw, ns = tiles(d, x.device, x.dtype, backward)
    splits = column_splits(n, cand.shape[0], bm, bn, x.device)
    kernel[(cdiv(n, bm), splits)](x, inv, cand, inv_c, *args(splits), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(d),
                                  PAIRED=paired, PRECISION=contrastive.exact_precision(x.dtype, d), num_warps=nw,
                                  num_stages=ns)


@on_tensor_device
def potential_mining_fwd(q, k, queue, temperature: float, n_mined: int, weighting: str, weight_temperature: float,
                         threshold: float, mined_weight: float, lower: float, upper: float, eps: float):
    """q, k [B, d] (and queue [K, d]), one dtype. Returns (rows [n], lse [n], cos [B], index [n, k],
    alpha [n, k], edges [n, 2]) as `reference.potential_mining_forward` and `mine_potential_samples`."""
    x, inv, cand, inv_c, _, paired = _operands(q, k, queue, eps)
    n, d = x.shape
    b = q.shape[0]
    view = _view_rows(q, k, x, paired)
    inv_v = inv.roll(-b) if paired else contrastive.row_rnorm(view, eps)
    c = torch.linalg.vecdot(x.float(), view.float()) * inv * inv_v  # the positives' cosines [n]
    index, mined_cos = _mine(x, inv, view, inv_v, cand, inv_c, n_mined, paired)
    alpha = reference.mining_weights(mined_cos, weighting, weight_temperature, threshold, mined_weight)
    lo, hi = reference.mining_band(c, (lower, upper))
    scale = LOG2E.value / temperature
    lo_u, hi_u = (lo * scale).contiguous(), (hi * scale).contiguous()
    parts = {}

    def buffers(splits):
        parts["m"] = torch.empty(splits, n, device=x.device, dtype=torch.float32)
        parts["l"] = torch.empty(splits, n, device=x.device, dtype=torch.float32)
        return lo_u, hi_u, parts["m"], parts["l"], n, b, cand.shape[0], d, x.stride(0), cand.stride(0), 1.0 / temperature

    _launch(_band_lse_kernel, x, inv, cand, inv_c, paired, buffers)
    band_lse = torch.logsumexp((parts["m"] + torch.log2(parts["l"])) * LN2.value, dim=0)  # over the splits
    s = _mined_logits(x, inv, cand, inv_c, index)
    outside = (alpha > 0) & ~((s >= lo[:, None]) & (s <= hi[:, None]))  # mined positives the band left out
    inv_t = 1.0 / temperature
    terms = torch.cat([(c * inv_t)[:, None], band_lse[:, None], torch.where(outside, s * inv_t, float("-inf"))], 1)
    lse = torch.logsumexp(terms, dim=1)
    rows = lse - ((1.0 - alpha.sum(dim=1)) * c + (alpha * s).sum(dim=1)) * inv_t
    return rows, lse, c[:b].contiguous(), index, alpha, torch.stack([lo, hi], dim=1)


@on_tensor_device
def potential_mining_bwd(grad_rows, q, k, queue, lse, index, alpha, edges, temperature: float, eps: float):
    """(dL/dq, dL/dk) of sum_i grad_rows_i loss_i with the selection fixed; dL/dk None for MoCo."""
    x, inv, cand, inv_c, ch, paired = _operands(q, k, queue, eps)
    n, d = x.shape
    b = q.shape[0]
    inv_t = 1.0 / temperature
    g = grad_rows.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    lo, hi = edges[:, 0], edges[:, 1]
    scale = LOG2E.value * inv_t
    lo_u, hi_u = (lo * scale).contiguous(), (hi * scale).contiguous()
    slots = {}

    def buffers(splits):
        slots["acc"] = torch.empty(splits, n, d, device=x.device, dtype=torch.float32)
        return (ch, lo_u, hi_u, lse, g, slots["acc"], n, b, cand.shape[0], d, x.stride(0), cand.stride(0),
                ch.stride(0), inv_t)

    _launch(_band_bwd_kernel, x, inv, cand, inv_c, paired, buffers, backward=True)
    grad = slots["acc"].sum(dim=0)  # the band's sum_j w_ij chat_j, splits added in order
    # the positives: the view's term and the mined positives' (their band terms came from the tiles)
    xh = x.float() * inv[:, None]
    view = _view_rows(q, k, x, paired).float()
    view_h = view * (inv.roll(-b) if paired else contrastive.row_rnorm(view, eps))[:, None]
    c = torch.linalg.vecdot(xh, view_h)
    s = _mined_logits(x, inv, cand, inv_c, index)
    outside = (alpha > 0) & ~((s >= lo[:, None]) & (s <= hi[:, None]))
    g_view = g * (torch.exp(c * inv_t - lse) - (1.0 - alpha.sum(dim=1)))
    g_mined = g[:, None] * (torch.where(outside, torch.exp(s * inv_t - lse[:, None]), 0.0) - alpha)
    ch_f = cand.float()[index] * inv_c[index][..., None]  # [n, k, d] normalised mined rows
    grad += g_view[:, None] * view_h + (g_mined[..., None] * ch_f).sum(dim=1)
    if paired:  # the views and the mined positives are rows of x too
        grad.index_add_(0, (torch.arange(n, device=x.device) + b) % n, g_view[:, None] * xh)
        grad.index_add_(0, index.reshape(-1), (g_mined[..., None] * xh[:, None, :]).reshape(-1, d))
    gx = reference.normalize_backward(x.float(), grad * inv_t).to(x.dtype)
    return (gx[:b], gx[b:]) if paired else (gx, None)
