"""The pure-PyTorch contract of every op: CPU fallback, test oracle and benchmark baseline.

Each function states its formula. Every backend (Triton, CUDA, C++) must agree with these. They
run in the dtype they are given (tests call them in float64) and never hold more than one
`chunk_size`-row block of an N x N (or N x K) matrix; where gradients flow, each block is
recomputed in the backward pass (activation checkpointing), so memory stays O(N * chunk_size).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Norms are clamped below by EPS before dividing. 1e-6 is representable in fp16 (whose smallest
# subnormal is 6e-8), unlike F.normalize's default 1e-12, so all-zero rows give zeros, not NaN.
EPS = 1e-6
CHUNK_SIZE = 1024


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """What every op accumulates (and returns its losses, scores and distances) in: float64 for
    float64 input, float32 for float32, float16 and bfloat16."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x_i / max(||x_i||_2, EPS), row-wise."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(EPS)


def pair_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c_i = <a_i, b_i> / (max(||a_i||, EPS) * max(||b_i||, EPS)) for rows a_i, b_i; shape [B]."""
    return torch.linalg.vecdot(normalize(a), normalize(b))


def _nt_xent_chunk(z: torch.Tensor, start: int, size: int, temperature: float) -> torch.Tensor:
    """Per-row NT-Xent losses of rows z[start:start+size] against all 2B rows of z."""
    n = z.shape[0]
    half = n // 2
    rows = z[start : start + size]
    c = rows.shape[0]
    logits = rows @ z.T / temperature  # [c, 2B]: the only block of the 2B x 2B matrix held
    ar = torch.arange(c, device=z.device)
    self_col = start + ar
    logits = logits.index_put((ar, self_col), torch.tensor(float("-inf"), dtype=z.dtype, device=z.device))
    pos_col = (self_col + half) % n
    return torch.logsumexp(logits, dim=1) - logits[ar, pos_col]


def nt_xent_rows(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *, normalize_input: bool = True,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row SimCLR NT-Xent losses [2B] and positive-pair cosines [B].

    With z = [z1; z2] (2B rows, each normalised when `normalize_input`), s_ij = <z_i, z_j> and
    p(i) = (i + B) mod 2B the row's other view:

        loss_i = -s_{i,p(i)} / t + log sum_{j != i} exp(s_ij / t)
        cos_i  = pair_cosine(z1, z2)_i   (always a cosine, whatever `normalize_input`)
    """
    z = torch.cat([z1, z2], dim=0)
    if normalize_input:
        z = normalize(z)
    parts = []
    for start in range(0, z.shape[0], chunk_size):
        if torch.is_grad_enabled() and z.requires_grad:
            parts.append(checkpoint(_nt_xent_chunk, z, start, chunk_size, temperature,
                                    use_reentrant=False))
        else:
            parts.append(_nt_xent_chunk(z, start, chunk_size, temperature))
    with torch.no_grad():
        cos = pair_cosine(z1.detach(), z2.detach())
    return torch.cat(parts), cos


def reduce_loss(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """'mean' and 'sum' over rows; 'none' returns the rows."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *, normalize_input: bool = True,
    reduction: str = "mean", chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """SimCLR NT-Xent over the 2B rows [z1; z2], reduced over rows (see `nt_xent_rows`)."""
    rows, _ = nt_xent_rows(z1, z2, temperature, normalize_input=normalize_input, chunk_size=chunk_size)
    return reduce_loss(rows, reduction)


def info_nce_queue_rows(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2, *,
    normalize_input: bool = True, chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row MoCo InfoNCE losses [B] and positive cosines [B].

    q [B, d] receives gradients; k [B, d] and queue [K, d] (negatives, one per row) do not.
    With all three normalised when `normalize_input`:

        loss_i = -<q_i, k_i>/t + log( exp(<q_i, k_i>/t) + sum_j exp(<q_i, queue_j>/t) )
        cos_i  = pair_cosine(q, k)_i
    """
    k = k.detach()
    queue = queue.detach()
    if normalize_input:
        q, k, queue = normalize(q), normalize(k), normalize(queue)
    pos = (q * k).sum(dim=1) / temperature

    def block(qc: torch.Tensor, pc: torch.Tensor) -> torch.Tensor:
        neg = qc @ queue.T / temperature  # [c, K]
        return torch.logsumexp(torch.cat([pc[:, None], neg], dim=1), dim=1) - pc

    parts = []
    for s in range(0, q.shape[0], chunk_size):
        qc, pc = q[s : s + chunk_size], pos[s : s + chunk_size]
        if torch.is_grad_enabled() and q.requires_grad:
            parts.append(checkpoint(block, qc, pc, use_reentrant=False))
        else:
            parts.append(block(qc, pc))
    with torch.no_grad():
        cos = pair_cosine(q.detach(), k)
    return torch.cat(parts), cos


def info_nce_queue(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2, *,
    normalize_input: bool = True, reduction: str = "mean", chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """MoCo InfoNCE against a negative queue, reduced over rows (see `info_nce_queue_rows`)."""
    rows, _ = info_nce_queue_rows(q, k, queue, temperature, normalize_input=normalize_input,
                                  chunk_size=chunk_size)
    return reduce_loss(rows, reduction)


def score_scatter_add_(scores: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """scores[index[i]] += values[i] for every i, in place; duplicate indices are summed.

    (`scores[index] += values` would keep only one of the duplicates: a bug this op exists to avoid.)
    """
    return scores.index_add_(0, index.long(), values.to(scores.dtype))


def kmeans_assign(
    x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "euclidean", chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of x: (labels [n] int64, distance [n]).

    euclidean: label_i = argmin_c ||x_i - c||^2, distance_i = that squared distance (clamped >= 0);
    cosine:    label_i = argmax_c <x_i/|x_i|, c/|c|>, distance_i = 1 - that cosine.
    Ties go to the lowest centroid index.
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    labels, dist = [], []
    if metric == "cosine":
        cn = normalize(centroids)
        for s in range(0, x.shape[0], chunk_size):
            sim = normalize(x[s : s + chunk_size]) @ cn.T
            best, idx = sim.max(dim=1)
            labels.append(idx)
            dist.append(1 - best)
    else:
        c2 = (centroids * centroids).sum(dim=1)
        for s in range(0, x.shape[0], chunk_size):
            xc = x[s : s + chunk_size]
            d2 = (xc * xc).sum(dim=1, keepdim=True) - 2 * xc @ centroids.T + c2
            best, idx = d2.min(dim=1)
            labels.append(idx)
            dist.append(best.clamp_min(0))
    return torch.cat(labels), torch.cat(dist)


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums [k, d] (float32 or the input's wider dtype) and counts [k] int64:

        sums_c = sum_{i: labels_i = c} x_i,   counts_c = |{i: labels_i = c}|
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    sums = torch.zeros(k, x.shape[1], dtype=acc, device=x.device).index_add_(0, labels, x.to(acc))
    counts = torch.bincount(labels, minlength=k)
    return sums, counts


# --------------------------------------------------------------------------------------------
# cosine_rowsum / cosine_topk (similarity family: SAS row sums, ELFS k-NN pairs)
# --------------------------------------------------------------------------------------------


def _similarity_inputs(x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-normalised x and y (y = x when None) in the accumulation dtype: float64 stays float64,
    everything else is computed in float32."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xn = normalize(x.to(acc))
    yn = xn if y is None else normalize(y.to(acc))
    return xn, yn


def cosine_rowsum(
    x: torch.Tensor, y: torch.Tensor | None = None, *, clamp_min: float = 0.0, groups: torch.Tensor | None = None,
    y_groups: torch.Tensor | None = None, exclude_self: bool = False, chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Clamped cosine row sums, [n] (float32, or float64 for float64 input):

        r_i = sum_{j in J(i)} max(cos(x_i, y_j), clamp_min)

    with cos as in `pair_cosine` (norms clamped below by EPS) and y = x when None. J(i) is every
    row of y; with `groups` (a label per row of x) and `y_groups` (per row of y; defaults to
    `groups` when y is None), only the j with y_groups[j] == groups[i]; with `exclude_self`
    (y is x), j == i is left out.
    """
    xn, yn = _similarity_inputs(x, y)
    if groups is not None and y_groups is None:
        y_groups = groups
    parts = []
    for s in range(0, xn.shape[0], chunk_size):
        sim = (xn[s : s + chunk_size] @ yn.T).clamp_min(clamp_min)  # [c, m]: one block of rows
        if groups is not None:
            sim = sim.masked_fill(groups[s : s + chunk_size, None] != y_groups[None, :], 0.0)
        if exclude_self:
            ar = torch.arange(sim.shape[0], device=sim.device)
            sim[ar, s + ar] = 0.0
        parts.append(sim.sum(dim=1))
    return torch.cat(parts) if parts else xn.new_zeros(0)


def top_k_rows(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of sim: (values, column indices) [rows, k], ordered by
    value descending, then index ascending; of several equal values at the k-th place the lowest
    indices are kept."""
    v, i = torch.topk(sim, k, dim=1)
    # torch.topk does not say which of several equal values at the k-th place it keeps. Rows
    # with more copies of their k-th value than were returned are redone with a stable sort,
    # which keeps the lowest indices (rare: ties need exactly equal similarities).
    kth = v[:, -1:]
    tied = (sim == kth).sum(dim=1) > (v == kth).sum(dim=1)
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        sv, si = torch.sort(sim[rows], dim=1, descending=True, stable=True)
        v[rows], i[rows] = sv[:, :k], si[:, :k]
    # Order within the row: value descending, then index ascending.
    i, order = torch.sort(i, dim=1)
    v = v.gather(1, order)
    v, order = torch.sort(v, dim=1, descending=True, stable=True)
    return v, i.gather(1, order)


def cosine_topk(
    x: torch.Tensor, k: int, *, y: torch.Tensor | None = None, exclude_self: bool = True,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of y (y = x when None) most cosine-similar to each row of x:
    (values [n, k] float32 (float64 for float64 input), indices [n, k] int64).

    Each row is ordered by similarity descending; equal similarities by ascending index of y, so
    when several rows of y tie at the k-th value the lowest indices are kept. With `exclude_self`
    (only when y is None), j == i is never returned.
    """
    xn, yn = _similarity_inputs(x, y)
    vals, idxs = [], []
    for s in range(0, xn.shape[0], chunk_size):
        sim = xn[s : s + chunk_size] @ yn.T  # [c, m]: one block of rows
        if exclude_self and y is None:
            ar = torch.arange(sim.shape[0], device=sim.device)
            sim[ar, s + ar] = float("-inf")
        v, i = top_k_rows(sim, k)
        vals.append(v)
        idxs.append(i)
    if not vals:
        return xn.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64, device=x.device)
    return torch.cat(vals), torch.cat(idxs)


# --------------------------------------------------------------------------------------------
# Contrastive losses: exact, chunked backward passes (the CPU backend of ops.nt_xent,
# ops.info_nce_queue and ops.pair_cosine). The forward functions above stay the oracle: tests check
# these formulas against autograd through them in float64.
# --------------------------------------------------------------------------------------------


def normalize_backward(x: torch.Tensor, grad_zhat: torch.Tensor) -> torch.Tensor:
    """Gradient through zhat = x / max(||x||, EPS): above EPS, (g - zhat <g, zhat>) / ||x||;
    at or below it the clamp is a constant, so g / EPS."""
    return _normalize_backward(*_normalized(x), grad_zhat)


def _normalize_backward(zhat: torch.Tensor, norm: torch.Tensor, c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # normalize_backward given what the forward already has: zhat, ||x|| and max(||x||, EPS)
    proj = (g * zhat).sum(dim=-1, keepdim=True) * (norm > EPS)
    return torch.addcmul(g, zhat, proj, value=-1) / c


def _normalized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(zhat, ||x||, max(||x||, EPS)) row-wise."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    c = norm.clamp_min(EPS)
    return x / c, norm, c


def _masked_logits(rows_scaled: torch.Tensor, z: torch.Tensor, start: int) -> torch.Tensor:
    """Logits of rows start .. start + c (already divided by t) against all of z, with each row's
    own entry at -inf."""
    logits = torch.mm(rows_scaled, z.t())
    logits.diagonal(start).fill_(float("-inf"))
    return logits


def nt_xent_forward(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, normalize_input: bool = True,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row losses [2B], per-row log-sum-exp of the denominators [2B], positive cosines [B]) of
    `nt_xent_rows` in one pass without gradients: the CPU backend of ops.nt_xent.

        lse_i = log sum_{j != i} exp(s_ij / t),   loss_i = lse_i - s_{i,p(i)} / t

    A batch of at most `chunk_size` rows is one dense block, which also holds the positive logits
    (its diagonal at offset B): small batches are bound by the count of operations, not their
    size. Larger batches go `chunk_size` rows at a time.
    """
    half = z1.shape[0]
    z = torch.cat([z1, z2])
    if normalize_input:
        z = normalize(z)
    zt = z * (1.0 / temperature)
    n = z.shape[0]
    if n <= chunk_size:
        logits = torch.mm(zt, z.t())
        pos = logits.diagonal(half)  # s_{i, i+B} / t
        pos2 = torch.cat([pos, pos])
        cos = pos * temperature if normalize_input else pair_cosine(z1, z2)
        lse = torch.logsumexp(logits.fill_diagonal_(float("-inf")), dim=1)
        return lse - pos2, lse, cos
    pos = (zt[:half] * z[half:]).sum(dim=1)
    cos = pos * temperature if normalize_input else pair_cosine(z1, z2)
    lse = torch.cat([torch.logsumexp(_masked_logits(zt[s : s + chunk_size], z, s), dim=1)
                     for s in range(0, n, chunk_size)])
    return lse - torch.cat([pos, pos]), lse, cos


def nt_xent_rows_backward(
    grad_rows: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, temperature: float, *,
    normalize_input: bool = True, lse: torch.Tensor | None = None, chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of sum_i g_i loss_i (see `nt_xent_rows`) with respect to z1 and z2.

    With p_ij = exp(s_ij / t - lse_i) (zero on the diagonal), p(i) the other view and
    w_ij = g_i (p_ij - [j = p(i)]):

        dL/dzhat_i = (1/t) sum_j (w_ij + w_ji) zhat_j

    then through the normalisation. The two halves returned are views of one [2B, d] buffer. A
    batch of at most `chunk_size` rows is one dense block, where the w_ji term is its transpose;
    beyond it, s is symmetric, so p_ji = exp(s_ij / t - lse_j) and each chunk of rows needs only
    its own [chunk, 2B] block.
    """
    if lse is None:
        _, lse, _ = nt_xent_forward(z1, z2, temperature, normalize_input=normalize_input, chunk_size=chunk_size)
    x = torch.cat([z1, z2], dim=0)
    z, norm, c = _normalized(x) if normalize_input else (x, None, None)
    n, half = z.shape[0], z1.shape[0]
    inv_t = 1.0 / temperature
    if n <= chunk_size:  # grad_rows and lse are z's dtype (ops pass them so)
        # one dense block, in as few operations as the formula allows (small batches are bound by
        # their count): p = exp(s / t - lse_i), 1/t folded into the products (beta=0 ignores the
        # first argument of addmm)
        w = torch.addmm(lse[:, None], z, z.t(), beta=-1, alpha=inv_t).fill_diagonal_(float("-inf")).exp_()
        w.diagonal(half).sub_(1)  # the positives: p_ij - [j = p(i)]
        w.diagonal(-half).sub_(1)
        w.mul_(grad_rows[:, None])
        gz = torch.addmm(z, w + w.t(), z, beta=0, alpha=inv_t)
    else:
        gs = grad_rows * inv_t
        zt = z * inv_t
        parts = []
        for s in range(0, n, chunk_size):
            logits = _masked_logits(zt[s : s + chunk_size], z, s)
            rows = slice(s, s + logits.shape[0])
            w = (logits - lse[rows, None]).exp_().mul_(gs[rows, None]) + (logits - lse[None, :]).exp_().mul_(gs)
            parts.append(w @ z)
        gz = torch.cat(parts)
        gz = torch.addcmul(gz, (gs + gs.roll(half)).unsqueeze(1), z.roll(half, dims=0), value=-1)
    gx = _normalize_backward(z, norm, c, gz) if normalize_input else gz
    return gx[:half], gx[half:]


def info_nce_queue_forward(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, *, normalize_input: bool = True,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row losses [B], per-row log-sum-exp [B], positive cosines [B]) of
    `info_nce_queue_rows` in one pass without gradients: the CPU backend of ops.info_nce_queue.

        lse_i = log( exp(<q_i, k_i>/t) + sum_j exp(<q_i, queue_j>/t) ),   loss_i = lse_i - <q_i, k_i>/t
    """
    inv_t = 1.0 / temperature
    if normalize_input:  # q / (max(||q||, EPS) t): the rows and the temperature in one division
        qt = q / (torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min_(EPS) * temperature)
        k, queue = normalize(k), normalize(queue)
        pos = torch.linalg.vecdot(qt, k)  # <qhat_i, khat_i> / t
        cos = pos * temperature
    else:
        qt = q * inv_t
        pos, cos = torch.linalg.vecdot(qt, k), pair_cosine(q, k)
    qq = queue.t()
    neg = torch.logsumexp(torch.mm(qt, qq), dim=1) if q.shape[0] <= chunk_size else torch.cat(
        [torch.logsumexp(torch.mm(qt[s : s + chunk_size], qq), dim=1) for s in range(0, q.shape[0], chunk_size)])
    lse = torch.logaddexp(pos, neg)
    return lse - pos, lse, cos


def info_nce_queue_rows_backward(
    grad_rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, *,
    normalize_input: bool = True, lse: torch.Tensor | None = None, chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Gradient of sum_i g_i loss_i (see `info_nce_queue_rows`) with respect to q:

        dL/dqhat_i = (g_i / t) [ sum_j p_ij queuehat_j + (p_pos,i - 1) khat_i ],
        p_ij = exp(<qhat_i, queuehat_j>/t - lse_i),  p_pos,i = exp(<qhat_i, khat_i>/t - lse_i)
    """
    if lse is None:
        _, lse, _ = info_nce_queue_forward(q, k, queue, temperature, normalize_input=normalize_input,
                                           chunk_size=chunk_size)
    if normalize_input:
        (qh, norm, c), kh, quh = _normalized(q), normalize(k), normalize(queue)
    else:
        qh, kh, quh = q, k, queue
    inv_t = 1.0 / temperature
    # p_ij = exp(<qhat_i, queuehat_j> / t - lse_i), a block of rows at a time, and
    # p_pos,i - 1 = -sum_j p_ij (the probabilities sum to 1; and more exactly so where p_pos ~ 1)
    gz, p_neg = [], []
    for s in range(0, q.shape[0], chunk_size):
        p = torch.addmm(lse[s : s + chunk_size, None], qh[s : s + chunk_size], quh.t(), beta=-1, alpha=inv_t).exp_()
        gz.append(p @ quh)
        p_neg.append(p.sum(dim=1, keepdim=True))
    gz, p_neg = (torch.cat(gz), torch.cat(p_neg)) if len(gz) > 1 else (gz[0], p_neg[0])
    gz = torch.addcmul(gz, p_neg, kh, value=-1).mul_((grad_rows * inv_t)[:, None])
    return _normalize_backward(qh, norm, c, gz) if normalize_input else gz


def pair_cosine_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of sum_i g_i pair_cosine(a, b)_i: dc/dahat = bhat, dc/dbhat = ahat, then through
    the normalisations."""
    g = grad[:, None]
    (ah, an, ac), (bh, bn, bc) = _normalized(a), _normalized(b)
    return _normalize_backward(ah, an, ac, g * bh), _normalize_backward(bh, bn, bc, g * ah)


# --------------------------------------------------------------------------------------------
# potential_mining (METHODS.md section 4: contrastive learning with mined potential samples).
# No public code of the paper exists; every open choice below is ours, documented and switchable.
# --------------------------------------------------------------------------------------------

MINING_K = 4  # mined positives per anchor
MINING_WEIGHTINGS = ("soft", "threshold", "top1")
MINING_WEIGHTING = "soft"
MINING_WEIGHT_TEMPERATURE = 0.1  # soft: softmax(cos / this) over the k mined
MINING_THRESHOLD = 0.9  # threshold: mined with cosine >= this count, equally
MINING_MINED_WEIGHT = 1.0  # the mined positives' total weight, against the view's 1
MINING_BAND = (0.25, 1.0)  # (lower, upper) band edges, see `mining_band`


def mining_band(cos_pos: torch.Tensor, band: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row similarity thresholds (lo_i, hi_i) of the negatives an anchor keeps.

    An anchor's candidates are ranked by their cosine s_ij to it; its own positive's cosine c_i
    sets the scale: with edges (lower, upper) in [0, 1],

        lo_i = -1 + lower (1 + c_i),   hi_i = -1 + upper (1 + c_i),   keep lo_i <= s_ij <= hi_i.

    upper = 1 drops exactly the candidates more similar to the anchor than its own positive
    (likely false negatives); lower > 0 drops the easiest tail, those far below the positive,
    whose gradient exp((s_ij - c_i) / t) / D is smallest. Thresholds instead of rank quantiles:
    they are exact and cost one pass (a quantile needs a selection over every candidate).
    """
    scale = 1.0 + cos_pos
    return -1.0 + band[0] * scale, -1.0 + band[1] * scale


def mining_weights(mined_cos: torch.Tensor, weighting: str, weight_temperature: float, threshold: float,
                   mined_weight: float) -> torch.Tensor:
    """alpha [n, k]: the weights of an anchor's k mined positives (cosines to its other view,
    ordered descending) in its loss; the view's weight is 1 - alpha.sum(1).

    Mined weights w: "soft" softmax(cos / weight_temperature); "threshold" equal weights over those
    with cos >= threshold (none may pass); "top1" the nearest alone. Each row's w sums to 1 (or 0
    when no mined positive passes), then [1, mined_weight * w] is normalised to sum to 1.
    """
    if weighting == "soft":
        w = torch.softmax(mined_cos / weight_temperature, dim=1)
    elif weighting == "threshold":
        passed = (mined_cos >= threshold).to(mined_cos.dtype)
        w = passed / passed.sum(dim=1, keepdim=True).clamp_min(1.0)
    elif weighting == "top1":
        w = torch.zeros_like(mined_cos)
        w[:, 0] = 1.0
    else:
        raise ValueError(f"weighting must be one of {MINING_WEIGHTINGS}, got {weighting!r}")
    w = mined_weight * w
    return w / (1.0 + w.sum(dim=1, keepdim=True))


def _mining_operands(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None):
    """(anchors, their other views, candidates, paired), normalised. SimCLR (queue None): the 2B
    rows z = [q; k] are the anchors, row i's view is row p(i) = (i + B) mod 2B, and the candidates
    are z itself without i and p(i) (paired). MoCo: the anchors are q, the views k, the
    candidates the queue."""
    if queue is None:
        z = normalize(torch.cat([q, k]))
        return z, z.roll(-q.shape[0], dims=0), z, True
    return normalize(q), normalize(k), normalize(queue), False


def _candidate_mask(start: int, c: int, n_cand: int, paired: bool, device) -> torch.Tensor | None:
    """[c, n_cand] True where a candidate is excluded for rows start .. start + c (paired: the row
    itself and its other view); None when nothing is."""
    if not paired:
        return None
    rows = torch.arange(start, start + c, device=device)
    cols = torch.arange(n_cand, device=device)
    half = n_cand // 2
    return (cols[None, :] == rows[:, None]) | (cols[None, :] == ((rows + half) % n_cand)[:, None])


def mine_potential_samples(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, *, n_mined: int = MINING_K,
    weighting: str = MINING_WEIGHTING, weight_temperature: float = MINING_WEIGHT_TEMPERATURE,
    threshold: float = MINING_THRESHOLD, mined_weight: float = MINING_MINED_WEIGHT,
    band: tuple[float, float] = MINING_BAND, chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selection of `potential_mining_rows`, without gradients: (index [n, n_mined] int64 of
    each anchor's mined positives among the candidates, alpha [n, n_mined] their weights,
    band_edges [n, 2] the anchor's (lo, hi) thresholds).

    The mined positives of anchor i are the `n_mined` candidates most cosine-similar to i's other
    view (descending; ties to the lower index), weighted by `mining_weights`; the thresholds are
    `mining_band` of the cosine of i and its view. n = 2B (SimCLR, queue None) or B (MoCo).
    """
    with torch.no_grad():
        anchors, views, cand, paired = _mining_operands(q.detach(), k.detach(), None if queue is None else queue.detach())
        idx, vals = [], []
        for s in range(0, views.shape[0], chunk_size):
            sim = views[s : s + chunk_size] @ cand.T
            # the view of row i is row p(i): the excluded columns are p(i)'s own pair, i.e. i and p(i)
            excluded = _candidate_mask(s, sim.shape[0], cand.shape[0], paired, sim.device)
            if excluded is not None:
                sim = sim.masked_fill(excluded, float("-inf"))
            v, i = top_k_rows(sim, n_mined)  # ties: lower index first
            vals.append(v)
            idx.append(i)
        index, mined_cos = torch.cat(idx), torch.cat(vals)
        alpha = mining_weights(mined_cos, weighting, weight_temperature, threshold, mined_weight)
        lo, hi = mining_band(torch.linalg.vecdot(anchors, views), band)
    return index, alpha, torch.stack([lo, hi], dim=1)


def _kept(s, start, index, alpha, edges, paired) -> torch.Tensor:
    """[c, n_cand] the terms of the denominators of rows start .. start + c besides the view: the
    candidates in the band (not excluded) and the mined positives of nonzero weight."""
    kept = (s >= edges[:, :1]) & (s <= edges[:, 1:])
    excluded = _candidate_mask(start, s.shape[0], s.shape[1], paired, s.device)
    if excluded is not None:
        kept = kept & ~excluded
    return kept | torch.zeros_like(kept).scatter_(1, index, alpha > 0)  # the mined positives always count


def _mining_block(anchors, views, cand, start, index, alpha, edges, temperature, paired):
    """(loss rows, lse rows) of anchors[start : start + c] with their selection fixed."""
    a = anchors[start : start + index.shape[0]]
    s = a @ cand.T  # [c, n_cand] cosines: the only block held
    kept = _kept(s, start, index, alpha, edges, paired)
    pos = torch.linalg.vecdot(a, views[start : start + a.shape[0]]) / temperature
    logits = (s / temperature).masked_fill(~kept, float("-inf"))
    lse = torch.logsumexp(torch.cat([pos[:, None], logits], dim=1), dim=1)
    target = (1.0 - alpha.sum(dim=1)) * pos + (alpha * s.gather(1, index)).sum(dim=1) / temperature
    return lse - target, lse


def potential_mining_rows(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, temperature: float = 0.5, *,
    n_mined: int = MINING_K, weighting: str = MINING_WEIGHTING,
    weight_temperature: float = MINING_WEIGHT_TEMPERATURE, threshold: float = MINING_THRESHOLD,
    mined_weight: float = MINING_MINED_WEIGHT, band: tuple[float, float] = MINING_BAND,
    selection: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor losses of contrastive learning with mined potential samples, and the positive
    cosines: ([n], [B]), n = 2B (SimCLR: queue None, q and k the two views z1, z2) or B (MoCo: q
    the queries, k their keys, the queue the candidates; only q receives gradients).

    Rows are normalised (cosines throughout). For anchor i with view v(i) (SimCLR: row
    p(i) = (i + B) mod 2B of [z1; z2]; MoCo: k_i), candidates C_i (SimCLR: the 2B rows but i and
    p(i); MoCo: the queue) and s_ij = <a_i, c_j>, `mine_potential_samples` picks the mined
    positives M_i with weights alpha_ij and the band [lo_i, hi_i]; with c_i = <a_i, v(i)>,
    alpha_i0 = 1 - sum_j alpha_ij (the view's weight) and K_i = M_i (alpha > 0) u {j in C_i:
    lo_i <= s_ij <= hi_i}:

        loss_i = log( e^{c_i/t} + sum_{j in K_i} e^{s_ij/t} ) - alpha_i0 c_i/t - sum_{j in M_i} alpha_ij s_ij/t

    A weighted InfoNCE whose denominator holds each positive once and the kept negatives. When
    the band keeps no negative, the row is the same formula over its positives alone: finite
    (the view's term is always there), >= 0, and 0 when the view is its only positive.

    The selection (which samples, their weights, the band) is a constant of the loss: no gradient
    flows through it (pass `selection` = `mine_potential_samples(...)` to fix it, as gradcheck
    does). cos_i = pair_cosine(q, k)_i.
    """
    if selection is None:
        selection = mine_potential_samples(q, k, queue, n_mined=n_mined, weighting=weighting,
                                           weight_temperature=weight_temperature, threshold=threshold,
                                           mined_weight=mined_weight, band=band, chunk_size=chunk_size)
    index, alpha, edges = selection
    if queue is not None:
        k, queue = k.detach(), queue.detach()
    anchors, views, cand, paired = _mining_operands(q, k, queue)
    parts = []
    for s in range(0, anchors.shape[0], chunk_size):
        sel = (index[s : s + chunk_size], alpha[s : s + chunk_size], edges[s : s + chunk_size])
        args = (anchors, views, cand, s, *sel, temperature, paired)
        if torch.is_grad_enabled() and anchors.requires_grad:
            parts.append(checkpoint(_mining_block, *args, use_reentrant=False)[0])
        else:
            parts.append(_mining_block(*args)[0])
    with torch.no_grad():
        cos = pair_cosine(q.detach(), k.detach())
    return torch.cat(parts), cos


def potential_mining_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, temperature: float = 0.5, *,
    reduction: str = "mean", **options,
) -> torch.Tensor:
    """`potential_mining_rows` reduced over rows; `options` as there."""
    rows, _ = potential_mining_rows(q, k, queue, temperature, **options)
    return reduce_loss(rows, reduction)


def potential_mining_forward(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, temperature: float, selection: tuple, *,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss rows [n], lse rows [n], cos [B]) of `potential_mining_rows` for a fixed selection,
    without gradients: the CPU backend's forward."""
    anchors, views, cand, paired = _mining_operands(q, k, queue)
    index, alpha, edges = selection
    loss, lse = [], []
    for s in range(0, anchors.shape[0], chunk_size):
        c = slice(s, s + chunk_size)
        lo, ls = _mining_block(anchors, views, cand, s, index[c], alpha[c], edges[c], temperature, paired)
        loss.append(lo)
        lse.append(ls)
    return torch.cat(loss), torch.cat(lse), pair_cosine(q, k)


def potential_mining_rows_backward(
    grad_rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, temperature: float,
    selection: tuple, lse: torch.Tensor, *, chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient of sum_i g_i loss_i (`potential_mining_rows`, selection fixed): (dL/dq, dL/dk),
    dL/dk None for MoCo (only q learns). With pi_ij = e^{s_ij/t - lse_i} on K_i (0 elsewhere) and
    pi_i0 = e^{c_i/t - lse_i}:

        dL/ds_ij = (g_i/t) (pi_ij - alpha_ij),   dL/dc_i = (g_i/t) (pi_i0 - alpha_i0)

    then through s_ij = <a_i, c_j>, c_i = <a_i, v(i)> (SimCLR: every one a row of z) and the
    normalisation."""
    index, alpha, edges = selection
    if queue is None:
        x = torch.cat([q, k])
        (anchors, norm, clamped), paired = _normalized(x), True
        views, cand = anchors.roll(-q.shape[0], dims=0), anchors
    else:
        (anchors, norm, clamped), paired = _normalized(q), False
        views, cand = normalize(k), normalize(queue)
    gs = grad_rows / temperature
    grad = torch.zeros_like(anchors)
    for s in range(0, anchors.shape[0], chunk_size):
        c = slice(s, s + chunk_size)
        a, g = anchors[c], gs[c, None]
        sc = a @ cand.T
        kept = _kept(sc, s, index[c], alpha[c], edges[c], paired)
        p = torch.where(kept, (sc / temperature - lse[c, None]).exp(), 0.0)
        gsim = g * p.scatter_add(1, index[c], -alpha[c])
        gview = g * ((torch.linalg.vecdot(a, views[c]) / temperature - lse[c]).exp() - (1.0 - alpha[c].sum(dim=1)))[:, None]
        grad[c] += gsim @ cand + gview * views[c]
        if paired:  # the candidates and the views are rows of z too
            grad += gsim.T @ a
            grad.index_add_(0, (torch.arange(s, s + a.shape[0], device=a.device) + q.shape[0]) % anchors.shape[0],
                            gview * a)
    grad = _normalize_backward(anchors, norm, clamped, grad)
    if paired:
        return grad[: q.shape[0]], grad[q.shape[0]:]
    return grad, None
