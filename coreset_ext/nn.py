"""Loss modules over the fused contrastive ops: drop-in for lightly-style training loops.

    criterion = cx.nn.NTXentLoss(temperature=0.5)
    loss = criterion(z1, z2, index=batch_index, scores=tracker.sums["css"])

Both modules also yield each example's positive-pair cosine (the CSS score of METHODS.md): pass
`index` and `scores` to scatter-add it into a ScoreTracker buffer, or `return_cos=True` to get it.
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

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, index: torch.Tensor | None = None,
                scores: torch.Tensor | None = None, return_cos: bool = False, validate: bool = True):
        return ops.nt_xent(z1, z2, self.temperature, normalize=self.normalize, reduction=self.reduction,
                           index=index, scores=scores, return_cos=return_cos, validate=validate)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}"


class MoCoLoss(torch.nn.Module):
    """MoCo InfoNCE against a queue of past keys that this module owns; see `ops.info_nce_queue`.

    The queue [queue_size, dim] is a buffer initialised with random unit rows (as in MoCo) and used
    as a ring: `forward(q, k)` computes the loss against the current queue, then writes k's rows
    at the ring position and advances it. The position lives on the queue's device and the write
    is an index_copy_, so a training step never waits on the host. A batch that does not divide
    the queue size wraps around; one larger than the queue keeps its last `queue_size` keys. A key
    row that is not finite is not enqueued (its slot keeps its old key).

    Example:
        >>> import torch, coreset_ext as cx
        >>> criterion = cx.nn.MoCoLoss(dim=16, queue_size=64, temperature=0.2)
        >>> q, k = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        >>> criterion(q, k).backward()
        >>> int(criterion.ptr)
        8
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor | None = None,
                scores: torch.Tensor | None = None, return_cos: bool = False, validate: bool = True):
        # The backward pass reads the queue, and enqueue_ is about to overwrite part of it in place:
        # give the loss a snapshot when gradients will flow (what MoCo's reference code does too).
        queue = self.queue.clone() if torch.is_grad_enabled() and q.requires_grad else self.queue
        out = ops.info_nce_queue(q, k, queue, self.temperature, normalize=self.normalize,
                                 reduction=self.reduction, index=index, scores=scores, return_cos=return_cos,
                                 validate=validate)
        self.enqueue_(k)
        return out

    @torch.no_grad()
    def enqueue_(self, k: torch.Tensor) -> None:
        """Writes the keys k [B, dim] into the ring at `ptr` (wrapping) and advances `ptr`."""
        size = self.queue.shape[0]
        if k.dim() != 2 or k.shape[1] != self.queue.shape[1]:
            raise ValueError(f"k must have shape [batch, {self.queue.shape[1]}], got {tuple(k.shape)}")
        k = k.detach()
        b = k.shape[0]
        if b > size:  # only the newest queue_size keys survive one pass around the ring
            self.ptr.add_(b - size).remainder_(size)
            k, b = k[b - size:], size
        slots = (self.ptr + torch.arange(b, device=self.queue.device)) % size
        k = k.to(self.queue.dtype)
        # A key holding NaN or Inf would poison every later loss until the ring came round: its
        # slot keeps the key it held instead (decided on the device, no host synchronisation).
        finite = torch.isfinite(k).all(dim=1, keepdim=True)
        self.queue.index_copy_(0, slots, torch.where(finite, k, self.queue.index_select(0, slots)))
        self.ptr.add_(b).remainder_(size)

    def extra_repr(self) -> str:
        return f"dim={self.queue.shape[1]}, queue_size={self.queue.shape[0]}, temperature={self.temperature}"
