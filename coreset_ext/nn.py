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

from coreset_ext import ops, reference
from coreset_ext._validation import POSITIVE_INT, REDUCTIONS, check, check_temperature

__all__ = ["NTXentLoss", "MoCoLoss"]


class NTXentLoss(torch.nn.Module):
    """SimCLR NT-Xent (normalised temperature-scaled cross entropy) over [z1; z2]; see `ops.nt_xent`.

    Example:
        >>> import torch, coreset_ext as cx
        >>> criterion = cx.nn.NTXentLoss(temperature=0.5)
        >>> z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
        >>> loss = criterion(z1, z2)
        >>> loss.backward()
    """

    def __init__(self, temperature: float = 0.5, normalize: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.reduction = check("reduction", reduction, REDUCTIONS)
        self.normalize = bool(normalize)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, index: torch.Tensor | None = None, tracker=None,
                scores: torch.Tensor | None = None, return_cos: bool = False, validate: bool | str = "device"):
        """The loss of `ops.nt_xent`; `index`/`tracker`, `scores`, `return_cos` and `validate` as there."""
        return ops.nt_xent(z1, z2, self.temperature, normalize=self.normalize, reduction=self.reduction,
                           index=index, tracker=tracker, scores=scores, return_cos=return_cos, validate=validate)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}"


class MoCoLoss(torch.nn.Module):
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
                 reduction: str = "mean") -> None:
        super().__init__()
        dim = check("dim", dim, POSITIVE_INT)
        queue_size = check("queue_size", queue_size, POSITIVE_INT)
        self.temperature = check_temperature(temperature)
        self.reduction = check("reduction", reduction, REDUCTIONS)
        self.normalize = bool(normalize)
        self.register_buffer("queue", reference.normalize(torch.randn(queue_size, dim)))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (slots, keys) of the last forward
        self._arange: dict[int, torch.Tensor] = {}
        # a saved state holds the pending keys; a loaded one replaces them
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.flush_())
        self.register_load_state_dict_pre_hook(lambda module, *args: setattr(module, "_pending", None))

    def forward(self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor | None = None, tracker=None,
                scores: torch.Tensor | None = None, return_cos: bool = False, validate: bool | str = "device"):
        """The loss of `ops.info_nce_queue` against the queue; `index`/`tracker` etc. as there."""
        self._check_keys(k)
        self.flush_()
        out = ops.info_nce_queue(q, k, self.queue, self.temperature, normalize=self.normalize,
                                 reduction=self.reduction, index=index, tracker=tracker, scores=scores,
                                 return_cos=return_cos, validate=validate)
        slots, keys = self._reserve(k)
        # a copy of the B keys (never of the queue): the caller may refill k's storage before the
        # next step (a static input buffer under CUDA graphs)
        self._pending = slots, keys.to(self.queue.dtype, copy=True)
        return out

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

    def extra_repr(self) -> str:
        return f"dim={self.queue.shape[1]}, queue_size={self.queue.shape[0]}, temperature={self.temperature}"
