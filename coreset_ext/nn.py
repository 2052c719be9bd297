"""Loss modules over the fused contrastive ops: drop-in for lightly-style training loops.

    tracker = cx.ScoreTracker(len(dataset))             # per-example CSS: sums and counts
    criterion = cx.nn.NTXentLoss(temperature=0.5)
    loss = criterion(z1, z2, index=batch_index, tracker=tracker)
    ...
    css = tracker.mean()["css"]                          # after training

Both modules yield each example's positive-pair cosine (the CSS score of METHODS.md): pass
`index` and `tracker` to record it in a ScoreTracker without a host synchronisation (see
`ops.nt_xent`), or `return_cos=True` to get it. Both work under torch.autocast (float32 losses,
gradients in the inputs' dtypes).
"""

from __future__ import annotations

import torch

from coreset_ext import distributed, ops, reference
from coreset_ext._validation import (POSITIVE_INT, REDUCTIONS, Options, check, check_per_row, check_temperature,
                                     check_tensor)
from coreset_ext.ops.mining import check_options as check_mining_options
from coreset_ext.ops.scatter import INDEX_DTYPES

__all__ = ["NTXentLoss", "MoCoLoss", "PotentialMiningLoss"]


class NTXentLoss(torch.nn.Module):
    """SimCLR NT-Xent (normalised temperature-scaled cross entropy) over [z1; z2]; see `ops.nt_xent`.

    `gather_distributed=True` (under torch.distributed, e.g. DDP launched by torchrun): every rank
    gathers every rank's z1 and z2 (`distributed.all_gather_rows`, in rank order) and computes the
    exact loss over the global batch [Z1; Z2] of G = sum of the ranks' B rows: each row's positive
    is its own pair wherever it sits in the global batch, its negatives are the other 2G - 2 rows,
    and "mean" is the mean over all 2G rows ("sum" the global sum, "none" the 2G global row
    losses), the same value on every rank and equal to the single-process loss of the
    concatenated batch. Backward, each rank's rows receive the gradient of the sum of the ranks'
    losses (world_size x dL/dz_r), which DistributedDataParallel's average over ranks turns into
    exactly the single-process gradient of the global batch. Ranks may hold different batch sizes
    (the global batch is their concatenation); an empty batch, different widths or dtypes on
    different ranks, or bad input on any rank raise on every rank before any data moves.
    Scores: `index` holds this rank's examples' data set indices, and the positive cosines of this
    rank's rows are recorded (or returned with `return_cos`), so each rank's tracker holds its
    own examples until `ScoreTracker.sync()`.
    Cost per step: memory O(G x d) (the gathered rows and their gradients; never G x G);
    communication: forward one all-gather of 2 x B x d elements per rank (each rank receives
    2 x G x d) plus a header of a few integers; backward one reduce-scatter of the 2 x G x d
    gradients. Every rank computes the whole global loss (the fused kernels' O(G^2 d) work)
    rather than its own rows alone: that keeps the loss and its gradient one fused op.

    Example:
        >>> import torch, coreset_ext as cx
        >>> criterion = cx.nn.NTXentLoss(temperature=0.5)
        >>> z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
        >>> loss = criterion(z1, z2)
        >>> loss.backward()
    """

    def __init__(self, temperature: float = 0.5, normalize: bool = True, reduction: str = "mean",
                 gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.reduction = check("reduction", reduction, REDUCTIONS)
        self.normalize = bool(normalize)
        self.gather_distributed = check("gather_distributed", gather_distributed, bool)  # "no" is not False

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, index: torch.Tensor | None = None, tracker=None,
                scores: torch.Tensor | None = None, return_cos: bool = False, validate: bool | str = "device"):
        """The loss of `ops.nt_xent`; `index`/`tracker`, `scores`, `return_cos` and `validate` as there."""
        if not self.gather_distributed:
            return ops.nt_xent(z1, z2, self.temperature, normalize=self.normalize, reduction=self.reduction,
                               index=index, tracker=tracker, scores=scores, return_cos=return_cos,
                               validate=validate)
        distributed.require_process_group("gather_distributed")
        problem = _batch_problem(z1, z2, index, tracker, scores, validate)  # before the gather: all ranks stop
        (g1, g2), sizes = distributed.all_gather_rows(z1, z2, names=("z1", "z2"), problem=problem)
        loss, cos = ops.nt_xent(g1, g2, self.temperature, normalize=self.normalize, reduction=self.reduction,
                                return_cos=True, validate=validate)
        start = sum(sizes[: distributed.rank()])
        cos = cos[start : start + z1.shape[0]]  # this rank's pairs, in the order of its index
        return ops.loss_family.finish(loss, cos, index, tracker, scores, validate, return_cos)

    def extra_repr(self) -> str:
        extra = ", gather_distributed=True" if self.gather_distributed else ""
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}{extra}"


def _batch_problem(z1, z2, index, tracker, scores, validate, names=("z1", "z2")) -> ValueError | None:
    """What the loss op, or recording its scores, would refuse in this rank's own batch (None if
    nothing): found before a gather, so that every rank raises together instead of the others
    waiting in the next collective (the gather's backward, a global sum). `names`: the inputs'."""
    try:
        for name, z in zip(names, (z1, z2)):
            check_tensor(name, z, dim=2, dtypes=ops.loss_family.LOSS_DTYPES, what="[batch, dim]")
        if z1.shape != z2.shape or z1.dtype != z2.dtype:
            raise ValueError(f"{names[0]} and {names[1]} must have the same shape and dtype, got {tuple(z1.shape)} "
                             f"{z1.dtype} and {tuple(z2.shape)} {z2.dtype}")
        if tracker is not None and scores is not None:
            raise ValueError("pass tracker or scores, not both (tracker: sums and counts; scores: a raw buffer)")
        if (index is None) != (tracker is None and scores is None):
            raise ValueError("index and tracker must be given together (index: dataset indices of the batch, "
                             "tracker: the ScoreTracker to record the positive cosines in)")
        if index is not None:
            check_per_row("index", index, "the batch", z1, dtypes=INDEX_DTYPES)
        check("validate", validate, bool, Options("device"))
        if scores is not None:  # what score_scatter_add_ refuses once the loss is computed
            check_tensor("scores", scores, dim=1, dtypes=(torch.float32,))
            if not scores.is_contiguous() or scores.requires_grad:
                raise ValueError("scores must be a contiguous buffer that does not require grad")
            if validate is True and index.numel() and not 0 <= int(index.min()) <= int(index.max()) < len(scores):
                raise ValueError(f"index holds entries out of range for scores of size {len(scores)}")
    except ValueError as e:
        return e
    return None


class _KeyQueue:
    """The ring of past keys a MoCo-form loss owns (MoCoLoss, PotentialMiningLoss with a queue):
    buffers `queue` [queue_size, dim] (random unit rows at first) and `ptr`. A forward reserves the
    next slots for its keys (`_defer_enqueue`) and they are written at the start of the next
    forward (`flush_`), or at `state_dict()`; see MoCoLoss for why."""

    queue: torch.Tensor
    ptr: torch.Tensor

    def _init_queue(self, dim: int, queue_size: int) -> None:
        self.register_buffer("queue", reference.normalize(torch.randn(queue_size, dim)))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (slots, keys) of the last forward
        self._arange: dict[int, torch.Tensor] = {}
        # a saved state holds the pending keys; a loaded one replaces them
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.flush_())
        self.register_load_state_dict_pre_hook(lambda module, *args: setattr(module, "_pending", None))

    def _defer_enqueue(self, k: torch.Tensor) -> None:
        """Reserves the ring's next slots for k, written by the next flush_."""
        slots, keys = self._reserve(k)
        # a copy of the B keys (never of the queue): the caller may refill k's storage before the
        # next step (a static input buffer under CUDA graphs)
        self._pending = slots, keys.to(self.queue.dtype, copy=True)

    def flush_(self) -> None:
        """Writes the keys of the last forward into the slots reserved for them (a no-op when
        there are none); forward and state_dict call it."""
        if self._pending is not None:
            slots, k = self._pending
            self._pending = None
            self._write(slots, k)  # no grad needed: k was detached and copied at forward

    @torch.no_grad()
    def enqueue_(self, k: torch.Tensor) -> None:
        """Writes the keys k [B, dim] into the ring at `ptr` (wrapping) now and advances `ptr`."""
        self._check_keys(k)
        self.flush_()
        self._write(*self._reserve(k))

    def _check_keys(self, k: torch.Tensor) -> None:
        if not isinstance(k, torch.Tensor) or k.dim() != 2 or k.shape[1] != self.queue.shape[1]:
            shape = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
            raise ValueError(f"k must have shape [batch, {self.queue.shape[1]}], got {shape}")

    def _reserve(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the ring slots for k's rows, the rows to write there), advancing `ptr` past them."""
        size = self.queue.shape[0]
        k = k.detach()
        b = k.shape[0]
        if b > size:  # only the newest queue_size keys survive one pass around the ring
            self.ptr.add_(b - size).remainder_(size)
            k, b = k[b - size:], size
        slots = torch.add(self.ptr, self._offsets(b)).remainder_(size)
        self.ptr.add_(b).remainder_(size)
        return slots, k

    def _offsets(self, b: int) -> torch.Tensor:
        """arange(b) on the queue's device, kept for the batch sizes seen (one operation less per
        step; a training loop sees one or two sizes)."""
        offsets = self._arange.get(b)
        if offsets is None or offsets.device != self.queue.device:
            if len(self._arange) >= 8:
                self._arange.clear()
            offsets = self._arange[b] = torch.arange(b, device=self.queue.device)
        return offsets

    def _write(self, slots: torch.Tensor, k: torch.Tensor) -> None:
        if k.dtype != self.queue.dtype:
            k = k.to(self.queue.dtype)
        # A key holding NaN or Inf would poison every later loss until the ring came round: its
        # slot keeps the key it held instead (decided on the device, no host synchronisation).
        finite = torch.isfinite(k).all(dim=1, keepdim=True)
        self.queue.index_copy_(0, slots, torch.where(finite, k, self.queue.index_select(0, slots)))


class MoCoLoss(_KeyQueue, torch.nn.Module):
    """MoCo InfoNCE against a queue of past keys that this module owns; see `ops.info_nce_queue`.

    The queue [queue_size, dim] is a buffer initialised with random unit rows (as in MoCo) and used
    as a ring: `forward(q, k)` computes the loss against the current queue, reserves the next
    slots of the ring for k (advancing `ptr`) and writes k there at the start of the next
    forward (or at `flush_()`, or `state_dict()`). Each loss therefore sees the keys of every
    earlier step and none of its own, as in MoCo, and the queue is never copied: the loss saves
    it for its backward, and autograd's version counter refuses a backward that runs after the
    next forward wrote into it ("modified by an inplace operation"), rather than computing a
    gradient against the wrong keys. So call backward before the next forward (one forward per
    step). The position lives on the queue's device and the writes are index_copy_, so a
    training step never waits on the host. A batch that does not divide the queue size wraps
    around; one larger than the queue keeps its last `queue_size` keys. A key row that is not
    finite is not enqueued (its slot keeps its old key).

    `gather_distributed=True` (under torch.distributed): the keys of every rank are gathered (in
    rank order, `distributed.all_gather_rows`, no gradient) and all of them are enqueued, on every
    rank, so the ranks share one queue of the global batches' keys (as MoCo's own code does;
    without it each rank's queue holds only its own keys, lightly's issue 1018). The first
    gathered forward copies rank 0's queue and pointer to every rank, so the queues are identical
    from then on. "mean" ("sum") is over every rank's queries, the same value on every rank, and
    each rank's queries receive world_size x its gradient, as in NTXentLoss: DDP's average is then
    the single-process gradient, whatever the ranks' batch sizes; "none" gives this rank's rows.
    Cost per step: one all-gather of B x dim key elements per rank (each rank receives G x dim,
    G the global batch) plus a header, and one all-reduce of a scalar; memory O(queue_size x dim
    + G x dim); nothing in the backward. A global batch larger than the queue keeps its newest
    queue_size keys, as on one process.

    Example:
        >>> import torch, coreset_ext as cx
        >>> criterion = cx.nn.MoCoLoss(dim=16, queue_size=64, temperature=0.2)
        >>> q, k = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        >>> criterion(q, k).backward()
        >>> int(criterion.ptr)
        8
        >>> criterion.flush_()
        >>> torch.equal(criterion.queue[:8], k)
        True
    """

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, dim: int, queue_size: int = 65536, temperature: float = 0.2, normalize: bool = True,
                 reduction: str = "mean", gather_distributed: bool = False) -> None:
        super().__init__()
        self.gather_distributed = check("gather_distributed", gather_distributed, bool)  # "no" is not False
        self._queue_shared = False  # rank 0's queue copied to every rank (at the first gathered forward)
        dim = check("dim", dim, POSITIVE_INT)
        queue_size = check("queue_size", queue_size, POSITIVE_INT)
        self.temperature = check_temperature(temperature)
        self.reduction = check("reduction", reduction, REDUCTIONS)
        self.normalize = bool(normalize)
        self._init_queue(dim, queue_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor | None = None, tracker=None,
                scores: torch.Tensor | None = None, return_cos: bool = False, validate: bool | str = "device"):
        """The loss of `ops.info_nce_queue` against the queue; `index`/`tracker` etc. as there."""
        if self.gather_distributed:
            enqueued = self._gathered_keys(q, k, index, tracker, scores, validate)
        else:
            self._check_keys(k)
            enqueued = k
        self.flush_()
        gathered = self.gather_distributed and self.reduction != "none"
        out = ops.info_nce_queue(q, k, self.queue, self.temperature, normalize=self.normalize,
                                 reduction="sum" if gathered else self.reduction, index=index, tracker=tracker,
                                 scores=scores, return_cos=return_cos, validate=validate)
        if gathered:  # the global sum or mean over every rank's queries
            loss = distributed.global_sum(out[0] if return_cos else out)
            loss = loss / enqueued.shape[0] if self.reduction == "mean" else loss
            out = (loss, out[1]) if return_cos else loss
        self._defer_enqueue(enqueued)
        return out

    def _gathered_keys(self, q: torch.Tensor, k: torch.Tensor, index, tracker, scores, validate) -> torch.Tensor:
        """Every rank's keys in rank order (this rank's input checked first, so that bad input on
        any rank raises on all of them); shares rank 0's queue the first time."""
        distributed.require_process_group("gather_distributed")
        problem = None
        try:
            self._check_keys(k)
        except ValueError as e:
            problem = e
        # q as k (whose dtype the gather makes the same on every rank): a q of another dtype on one
        # rank gave a loss of another dtype, and the global sum of mismatched sizes aborted gloo
        problem = problem or _batch_problem(q, k, index, tracker, scores, validate, names=("q", "k"))
        (keys,), _ = distributed.all_gather_rows(k.detach() if problem is None else k, names=("k",),
                                                 problem=problem)
        if not self._queue_shared:
            shapes = distributed.agree(None, list(self.queue.shape)).tolist()
            if any(shape != shapes[0] for shape in shapes):  # the same table on every rank: all raise
                raise ValueError(f"queue_size and dim must be the same on every rank, got the queue shapes {shapes}")
            self.flush_()
            distributed.broadcast_(self.queue)
            distributed.broadcast_(self.ptr)
            self._queue_shared = True
        return keys

    def extra_repr(self) -> str:
        extra = ", gather_distributed=True" if self.gather_distributed else ""
        return f"dim={self.queue.shape[1]}, queue_size={self.queue.shape[0]}, temperature={self.temperature}{extra}"


class PotentialMiningLoss(_KeyQueue, torch.nn.Module):
    """Contrastive learning with mined potential samples (METHODS.md section 4); see
    `ops.potential_mining` for the loss, its settings and their defaults.

    SimCLR form (`queue_size` None, the default): `forward(z1, z2)` over the batch, temperature 0.5
    by default. MoCo form (`dim` and `queue_size` given): `forward(q, k)` against a queue of past
    keys that this module owns and advances exactly as `MoCoLoss` does (the same ring: keys
    enqueued after the loss, written at the next forward or `state_dict()`; one forward per
    step, backward before the next), temperature 0.2 by default; `n_mined` is at most
    `queue_size`. In the SimCLR form a batch too small for `n_mined` (fewer than n_mined + 1
    examples, e.g. a data set's short last batch) mines the 2B - 2 candidates it has. Scores
    (`index`/`tracker`, `return_cos`) as in NTXentLoss and MoCoLoss.

    Example:
        >>> import torch, coreset_ext as cx
        >>> criterion = cx.nn.PotentialMiningLoss(n_mined=2)
        >>> z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
        >>> criterion(z1, z2).backward()
        >>> moco = cx.nn.PotentialMiningLoss(dim=16, queue_size=64, weighting="top1")
        >>> q, k = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        >>> moco(q, k).backward()
        >>> int(moco.ptr)
        8
    """

    def __init__(self, temperature: float | None = None, *, dim: int | None = None, queue_size: int | None = None,
                 n_mined: int = reference.MINING_K, weighting: str = reference.MINING_WEIGHTING,
                 weight_temperature: float = reference.MINING_WEIGHT_TEMPERATURE,
                 threshold: float = reference.MINING_THRESHOLD, mined_weight: float = reference.MINING_MINED_WEIGHT,
                 band: tuple[float, float] = reference.MINING_BAND, reduction: str = "mean") -> None:
        super().__init__()
        if (dim is None) != (queue_size is None):
            raise ValueError("dim and queue_size must be given together (the MoCo form's queue), or neither (the "
                             "SimCLR form)")
        self.moco = queue_size is not None
        self.temperature = check_temperature((0.2 if self.moco else 0.5) if temperature is None else temperature)
        self.reduction = check("reduction", reduction, REDUCTIONS)
        self.n_mined = check("n_mined", n_mined, POSITIVE_INT)
        weighting, weight_temperature, threshold, mined_weight, lower, upper = check_mining_options(
            weighting, weight_temperature, threshold, mined_weight, band)
        self.options = {"n_mined": self.n_mined, "weighting": weighting, "weight_temperature": weight_temperature,
                        "threshold": threshold, "mined_weight": mined_weight, "band": (lower, upper)}
        if self.moco:
            dim = check("dim", dim, POSITIVE_INT)
            queue_size = check("queue_size", queue_size, POSITIVE_INT)
            if self.n_mined > queue_size:
                raise ValueError(f"n_mined must be at most queue_size ({queue_size}), got {self.n_mined}")
            self._init_queue(dim, queue_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor | None = None, tracker=None,
                scores: torch.Tensor | None = None, return_cos: bool = False, validate: bool | str = "device"):
        """The loss of `ops.potential_mining` (z1, z2 for the SimCLR form; q, k against the queue
        for the MoCo form); `index`/`tracker`, `scores`, `return_cos`, `validate` as there."""
        if not self.moco:
            options = self.options
            rows = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 2 else 0  # (else the op says why)
            if 2 <= rows and 2 * rows - 2 < self.n_mined:  # a short last batch mines what it has
                options = {**options, "n_mined": 2 * rows - 2}
            return ops.potential_mining(q, k, None, self.temperature, reduction=self.reduction, index=index,
                                        tracker=tracker, scores=scores, return_cos=return_cos, validate=validate,
                                        **options)
        self._check_keys(k)
        self.flush_()
        out = ops.potential_mining(q, k, self.queue, self.temperature, reduction=self.reduction, index=index,
                                   tracker=tracker, scores=scores, return_cos=return_cos, validate=validate,
                                   **self.options)
        self._defer_enqueue(k)
        return out

    def extra_repr(self) -> str:
        form = (f"dim={self.queue.shape[1]}, queue_size={self.queue.shape[0]}, " if self.moco else "")
        return form + f"temperature={self.temperature}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
