"""torch.distributed helpers: gathers with a correct backward, agreement before collectives.

What the losses (`cx.nn.NTXentLoss(gather_distributed=True)`, `MoCoLoss`), the trackers
(`ScoreTracker.sync`, `TrainingDynamics.sync`) and `KMeans(distributed=True)` share when they run
on several processes (torchrun, one process per GPU):

- `world_size`, `rank`, `is_initialized`: 1, 0, False without a process group, so single-process
  code calls them unconditionally; `require_process_group(argument)` is the clear error where a
  group is needed and absent.
- `agree(problem, header)`: every rank contributes its local verdict (an exception or None) and a
  few integers in one all-gather, and every rank raises when any rank failed. A rank that raised
  alone before a collective would leave the others waiting in it until the group's timeout (30
  minutes by default); this is how bad input on one rank (an empty shard, a wrong width) becomes
  an error on all of them at once, never a hang.
- `all_gather_rows(*tensors)`: the rank-order concatenation of each tensor's rows (ranks may hold
  different numbers of rows), with a backward that gives every rank the gradient of its own rows
  summed over every rank's loss terms (a reduce-scatter). `torch.distributed.all_gather` and
  `all_reduce` have no backward at all: code that calls them in a loss trains on a gradient that
  misses the other ranks' terms (under DDP, off by 1/world_size; lightly's issues 1920 and 1977).
- `sum_in_rank_order(t)`: the sum over ranks of a tensor, added in rank order on every rank: the
  same bits on every rank, and the same bits as a single process adding the ranks' parts in
  that order (an all-reduce's order is the backend's).

Semantics of a gradient through `all_gather_rows`: each rank's backward sends the gradient of its
copy of the gathered rows back to their owners, so the rows of rank r receive the gradient of the
*sum over ranks* of the losses computed from the gathered tensor. When every rank computes the
same global loss L (as `NTXentLoss(gather_distributed=True)` does), each rank's rows receive
world_size x dL/dz_r, and DistributedDataParallel's average over ranks turns that into exactly the
gradient of L on a single process holding the whole batch.

Every helper takes `group` (None: the default group). Headers travel on the GPU under NCCL and on
the CPU otherwise (gloo).

Example (one process: the helpers degrade to the identity):
    >>> import torch, coreset_ext as cx
    >>> cx.distributed.world_size(), cx.distributed.rank()
    (1, 0)
    >>> cx.distributed.require_process_group("gather_distributed")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: gather_distributed=True needs an initialised torch.distributed process group ...
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from coreset_ext._validation import Options, check

__all__ = ["agree", "all_gather_rows", "all_reduce_", "any_rank", "broadcast_", "global_sum", "init_from_env",
           "is_initialized", "rank", "require_process_group", "sum_in_rank_order", "world_size"]

# dtypes a header can name (by position); anything else is refused before a collective
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)
_MAX_TRAILING = 3  # dimensions after the rows that a gathered tensor may have


def is_initialized() -> bool:
    """Whether torch.distributed is built and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Processes in `group` (1 without a process group)."""
    return dist.get_world_size(group) if is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank in `group` (0 without a process group)."""
    return dist.get_rank(group) if is_initialized() else 0


def init_from_env(device: str = "auto") -> bool:
    """Initialises the default process group from torchrun's environment (WORLD_SIZE > 1, RANK,
    MASTER_ADDR, ...) unless one exists; returns whether it did (the caller then destroys it).
    NCCL when the run uses CUDA (`device` "auto" with a GPU, or "cuda..."), gloo otherwise."""
    import os

    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available() and (device == "auto" or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def require_process_group(argument: str) -> None:
    """ValueError naming `argument` unless a torch.distributed process group is initialised."""
    if not is_initialized():
        raise ValueError(f"{argument}=True needs an initialised torch.distributed process group (launch with "
                         "torchrun and call torch.distributed.init_process_group first), and none is")


def _header_device(group) -> torch.device:
    """Where small control tensors travel: NCCL moves only GPU tensors, gloo CPU ones."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _through_group_device(collective, group, *tensors: torch.Tensor) -> None:
    """Runs `collective(*tensors)`, which writes into its first tensor, on copies on the group's
    device when NCCL would be handed CPU tensors (a CPU tracker or CPU k-means shards under a
    GPU run's group), writing the result back."""
    device = _header_device(group)
    if device.type == "cpu" or all(t.device.type != "cpu" for t in tensors):
        collective(*tensors)
        return
    moved = [t.to(device) for t in tensors]
    collective(*moved)
    tensors[0].copy_(moved[0])


def _gather_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # all_gather_single is the newer name of all_gather_into_tensor (which now warns)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _through_group_device(lambda o, i: gather(o, i, group=group), group, out, inp)


def _reduce_scatter_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    _through_group_device(lambda o, i: scatter(o, i, group=group), group, out, inp)


def all_reduce_(t: torch.Tensor, *, op: str = "sum", group=None) -> torch.Tensor:
    """All-reduces `t` in place ("sum" or "max"; through the group's device if NCCL would be
    handed a CPU tensor); returns t. Without a process group: t.

    Example:
        >>> import torch, coreset_ext as cx
        >>> cx.distributed.all_reduce_(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    check("op", op, Options("sum", "max"))  # with or without a process group: the same contract
    if is_initialized():
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        _through_group_device(lambda x: dist.all_reduce(x, op=reduce_op, group=group), group, t)
    return t


def agree(problem: BaseException | None, header: Sequence[int] = (), *, group=None) -> torch.Tensor:
    """Every rank's verdict and header in one all-gather: [world_size, len(header)] int64 (CPU).

    `problem` is this rank's reason to stop (an exception, or None). When any rank has one, every
    rank raises: the ranks that had one raise their own (with a note naming the rank), the others
    a ValueError naming the ranks that failed. Every rank must call it at the same point with a
    header of the same length. Without a process group it raises `problem` or returns the header.
    """
    w = world_size(group)
    if not is_initialized():
        if problem is not None:
            raise problem
        return torch.tensor([list(header)], dtype=torch.int64).reshape(1, len(header))
    device = _header_device(group)
    mine = torch.tensor([int(problem is not None), *header], dtype=torch.int64, device=device)
    table = torch.empty(w * mine.numel(), dtype=torch.int64, device=device)
    _gather_single(table, mine, group)
    table = table.view(w, -1).cpu()
    failed = table[:, 0].nonzero().flatten().tolist()
    if failed:
        if problem is not None:
            problem.add_note(f"(raised on rank {rank(group)} of {w}; every rank stopped with it)")
            raise problem
        raise ValueError(f"rank(s) {failed} of {w} refused their input (their own error says why); "
                         "this rank stops too rather than wait for them")
    return table[:, 1:]


def _describe(t: torch.Tensor) -> list[int]:
    """[ndim, dtype code, trailing dims padded with -1]: what must agree across ranks."""
    trailing = list(t.shape[1:]) + [-1] * (_MAX_TRAILING - (t.dim() - 1))
    return [t.dim(), _DTYPES.index(t.dtype), *trailing]


def _shape_text(row: list[int]) -> str:
    dim, code, *trailing = row
    return f"[rows, {', '.join(str(s) for s in trailing[: dim - 1])}] {_DTYPES[code]}".replace(", ]", "]")


def all_gather_rows(
    *tensors: torch.Tensor, names: Sequence[str] | None = None, group=None, allow_empty: bool = False,
    problem: BaseException | None = None,
) -> tuple[tuple[torch.Tensor, ...], list[int]]:
    """Each tensor's rows from every rank, concatenated in rank order, and the ranks' row counts.

    The tensors of one rank share their number of rows (dim 0); ranks may hold different numbers.
    Before any data moves, one all-gather of a small header checks on every rank that each tensor
    has the same trailing shape and dtype everywhere and (unless `allow_empty`) that no rank holds
    zero rows; a mismatch, or a `problem` some rank passes in (its local validation), raises on
    every rank (see `agree`). Then one all-gather per tensor (rows padded to the largest rank's).

    Backward: the rows of this rank receive the sum over ranks of the gradient of their gathered
    copy (one reduce-scatter per tensor), so gradients flow to where the rows came from.
    Communication: each rank receives sum(rows) x row size elements per tensor forward, and sends
    as many backward.

    Without a process group it returns the tensors themselves.

    Example (one process; under torchrun every rank gets every rank's rows):
        >>> import torch, coreset_ext as cx
        >>> z = torch.randn(4, 8, requires_grad=True)
        >>> (everyone,), rows_per_rank = cx.distributed.all_gather_rows(z, names=("z",))
        >>> everyone.shape, rows_per_rank
        (torch.Size([4, 8]), [4])
    """
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(tensors))]
    if not tensors or len(names) != len(tensors):  # under a process group: an IndexError, a negative size
        raise ValueError(f"names: one per tensor, and at least one tensor; got {len(names)} name(s) for "
                         f"{len(tensors)} tensor(s)")
    if problem is None:
        problem = _local_problem(tensors, names)
    if not is_initialized():
        if problem is not None:
            raise problem
        return tuple(tensors), [tensors[0].shape[0]] if tensors else []
    header = [tensors[0].shape[0]] if problem is None else [0]
    for t in tensors:
        header += _describe(t) if problem is None else [0] * (2 + _MAX_TRAILING)
    table = agree(problem, header, group=group).tolist()
    sizes = [row[0] for row in table]
    width = 2 + _MAX_TRAILING
    for i, name in enumerate(names):
        described = [row[1 + i * width : 1 + (i + 1) * width] for row in table]
        odd = next((r for r, d in enumerate(described) if d != described[0]), None)
        if odd is not None:
            raise ValueError(f"{name} must have the same shape after the rows and the same dtype on every rank, got "
                             f"{_shape_text(described[0])} on rank 0 and {_shape_text(described[odd])} on rank {odd}")
    empty = [r for r, n in enumerate(sizes) if n == 0]
    if empty and not allow_empty:
        raise ValueError(f"{names[0]} has no rows on rank(s) {empty}: every rank needs at least one row "
                         f"(rows per rank: {sizes})")
    return _GatherRows.apply(group, sizes, *tensors), sizes


def _local_problem(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> ValueError | None:
    """Why these tensors cannot be gathered, checked on this rank alone (None if they can)."""
    for t, name in zip(tensors, names):
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.dim() > 1 + _MAX_TRAILING:
            what = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            return ValueError(f"{name} must be a tensor with 1 to {1 + _MAX_TRAILING} dimensions, got {what}")
        if t.dtype not in _DTYPES:
            return ValueError(f"{name} has dtype {t.dtype}, which cannot be gathered")
        if t.shape[0] != tensors[0].shape[0]:
            return ValueError(f"{name} has {t.shape[0]} rows but {names[0]} has {tensors[0].shape[0]}")
    return None


class _GatherRows(torch.autograd.Function):
    """all_gather of rows (uneven counts padded to the largest) whose backward reduce-scatters."""

    @staticmethod
    def forward(ctx, group, sizes: list[int], *tensors: torch.Tensor):
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank(group)
        top = max(sizes)
        out = []
        for t in tensors:
            padded = t if t.shape[0] == top else torch.cat([t, t.new_zeros(top - t.shape[0], *t.shape[1:])])
            buffer = t.new_empty(len(sizes) * top, *t.shape[1:])
            _gather_single(buffer, padded.contiguous(), group)
            if all(n == top for n in sizes):
                out.append(buffer)
            else:
                out.append(torch.cat([buffer[r * top : r * top + n] for r, n in enumerate(sizes)]))
        ctx.mark_non_differentiable(*[o for o in out if not o.is_floating_point()])
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        sizes, top = ctx.sizes, max(ctx.sizes)
        mine = sizes[ctx.rank]
        out = []
        for g in grads:
            if g is None or not g.is_floating_point():
                out.append(None)
                continue
            if all(n == top for n in sizes):
                padded = g.contiguous()
            else:
                padded = g.new_zeros(len(sizes) * top, *g.shape[1:])
                offset = 0
                for r, n in enumerate(sizes):
                    padded[r * top : r * top + n] = g[offset : offset + n]
                    offset += n
            own = g.new_empty(top, *g.shape[1:])
            _reduce_scatter_single(own, padded, ctx.group)
            out.append(own[:mine])
        return (None, None, *out)


def global_sum(local: torch.Tensor, *, group=None) -> torch.Tensor:
    """The sum over ranks of a scalar `local` (one all-reduce), the same value on every rank; its
    gradient reaches this rank's `local` as world_size x 1, the gradient of the sum of the ranks'
    (identical) results, as through `all_gather_rows`. Without a process group: `local`.

    Example:
        >>> import torch, coreset_ext as cx
        >>> x = torch.tensor(2.0, requires_grad=True)
        >>> cx.distributed.global_sum(x * 3)
        tensor(6., grad_fn=<MulBackward0>)
    """
    if not is_initialized():
        return local
    w = world_size(group)
    total = all_reduce_(local.detach().clone(), group=group)
    # the value of the total, the gradient of w x local: no communication in the backward
    return w * local + (total - w * local).detach()


def sum_in_rank_order(t: torch.Tensor, *, group=None) -> torch.Tensor:
    """The sum over ranks of `t` (same shape and dtype on every rank: agree on them first), added
    in rank order ((t_0 + t_1) + t_2 ...), so that every rank gets the same bits, and the bits a
    single process gets adding the ranks' parts in that order. One all-gather of world_size x
    t.numel() elements. Without a process group: `t`.

    Example:
        >>> import torch, coreset_ext as cx
        >>> cx.distributed.sum_in_rank_order(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    w = world_size(group)
    if w == 1:
        return t
    parts = t.new_empty(w, *t.shape)
    _gather_single(parts.view(-1), t.contiguous().view(-1), group)
    total = parts[0]
    for r in range(1, w):
        total = total + parts[r]
    return total


def any_rank(flag: bool | torch.Tensor, *, group=None) -> bool:
    """Whether `flag` holds on any rank (one all-reduce; the flag itself without a group)."""
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_header_device(group))
    return bool(all_reduce_(t, op="max", group=group).item())


def broadcast_(t: torch.Tensor, src: int = 0, *, group=None) -> torch.Tensor:
    """Overwrites `t` on every rank with rank `src`'s (in place; returns t). Without a group: t."""
    if is_initialized():
        _through_group_device(lambda x: dist.broadcast(x, src, group=group), group, t)
    return t
