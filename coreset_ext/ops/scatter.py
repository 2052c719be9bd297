"""score_scatter_add_: per-example score accumulation (the op behind ScoreTracker), and the
device-side screening every score path shares (`DeviceErrors`).

The schema and its kernels are compiled (csrc/ops.cpp, csrc/cpu, csrc/cuda) and dispatched by
device; where `_C` lacks them, the reference serves under the same name (`define_fallback`).

Validation without a host synchronisation (issue 14): a training step must not wait on the host,
so by default bad entries (an index out of range, a non-finite value) are found on the device,
left out of the write, and counted in a small device tensor; the next host-side check reads
that tensor (one synchronisation, where the caller waits anyway) and raises the ValueError
naming what was wrong. Nothing bad is ever written, and nothing bad goes unreported.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from coreset_ext import _backend, reference
from coreset_ext._validation import Options, check, check_same_device, check_tensor

__all__ = ["score_scatter_add_", "check_scatter_errors", "DeviceErrors", "INDEX_DTYPES", "SCATTER_VALUE_DTYPES"]

SCATTER_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
VALIDATE = ("device", True, False)


class DeviceErrors:
    """What sync-free validation found on the device, until a host-side `raise_if_any` reads it.

    `screen(index, values, size)` returns (index, values, ok) with every bad entry (index outside
    [0, size), or with `check_values` a non-finite value) redirected to slot 0 with value 0, so a
    scatter of them writes nothing, and records on the device the lowest and highest index seen
    and how many values of each name were not finite. `raise_if_any(what)` reads that (one host
    synchronisation), clears it, and raises the ValueError a host-side check would have raised.
    Only in-place device operations on preallocated tensors: safe inside a captured CUDA graph.
    """

    def __init__(self, size: int, names: tuple[str, ...], device: torch.device) -> None:
        self.size = size
        self.names = names
        # lowest and highest index seen, non-finite count per name: views of one tensor, read at once
        self.flags = torch.zeros(2 + len(names), dtype=torch.int64, device=device)
        self.to(device)

    def to(self, device: torch.device | str) -> "DeviceErrors":
        self.flags = self.flags.to(device)
        self.lowest, self.highest = self.flags[0], self.flags[1]
        self.nonfinite = {name: self.flags[2 + i] for i, name in enumerate(self.names)}
        return self

    def screen(self, index: torch.Tensor, values: dict[str, torch.Tensor], *, check_values: bool = True):
        """(safe index, {name: safe values}, ok mask per name); see the class."""
        lo, hi = torch.aminmax(index)
        torch.minimum(self.lowest, lo, out=self.lowest)
        torch.maximum(self.highest, hi, out=self.highest)
        safe_index = index.clamp(0, self.size - 1)
        in_range = safe_index == index
        out, oks = {}, {}
        for name, v in values.items():
            ok = in_range
            if check_values:
                finite = torch.isfinite(v)
                self.nonfinite[name].add_(finite.logical_not().sum())
                ok = ok & finite
            out[name] = torch.where(ok, v, 0)
            oks[name] = ok
        return safe_index, out, oks

    def raise_if_any(self, what: str) -> None:
        """Raises the ValueError for what the device found since the last call (then forgets it)."""
        lo, hi, *nonfinite = self.flags.tolist()  # the one host synchronisation
        if not (lo < 0 or hi >= self.size or any(nonfinite)):
            return
        self.flags.zero_()
        later = "; those entries were left out (found on the device, reported at this check)"
        if lo < 0 or hi >= self.size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"index contains {bad}, out of range for {what}{later}")
        name, count = next((n, c) for n, c in zip(self.names, nonfinite) if c)
        raise ValueError(f"{name} contains NaN or Inf ({count} value(s)){later}")


# Device-side findings of score_scatter_add_(validate="device"), per scores buffer.
_PENDING: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_scatter_errors(scores: torch.Tensor) -> None:
    """Raises the ValueError for what `score_scatter_add_(scores, ..., validate="device")` left
    out since the last check of this buffer (an index out of range, a NaN/Inf value), then
    forgets it. One host synchronisation: call it where the loop waits anyway (end of an epoch,
    before reading the scores).

    Example:
        >>> import torch, coreset_ext as cx
        >>> s = torch.zeros(4)
        >>> _ = cx.ops.score_scatter_add_(s, torch.tensor([1, 9]), torch.tensor([0.5, 1.0]))
        >>> s
        tensor([0.0000, 0.5000, 0.0000, 0.0000])
        >>> cx.ops.check_scatter_errors(s)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: index contains 9, out of range for scores of size 4; those entries were left out ...
    """
    errors = _PENDING.get(scores)
    if errors is not None:
        errors.raise_if_any(f"scores of size {scores.shape[0]}")


def score_scatter_add_(
    scores: torch.Tensor, index: torch.Tensor, values: torch.Tensor, *, deterministic: bool | None = None,
    validate: bool | str = "device",
) -> torch.Tensor:
    """Adds `values[i]` to `scores[index[i]]` for every i, in place, and returns `scores`.

    Duplicate indices are summed, never dropped. `scores` is a contiguous float32 1-D buffer;
    `index` int32 or int64; `values` float32, float16 or bfloat16 (accumulated in float32).
    On CUDA the default path uses atomics (duplicates summed in varying order); with
    `deterministic=True`, or when `torch.are_deterministic_algorithms_enabled()`, a sort-based
    segmented reduction gives bit-identical results run to run. The CPU kernel is always
    deterministic.

    `validate`:
    - "device" (default): checked on the device without a host synchronisation, so a training
      step never waits: an entry whose index is out of range or whose value is NaN/Inf is left
      out, and `check_scatter_errors(scores)` (or the next call with `validate=True`) raises the
      ValueError naming it.
    - True: checked here before anything is written; the ValueError names the bad value now, at
      one host synchronisation (tens of microseconds on a GPU, and a stall of the pipeline).
    - False: no check, for indices from your own data loader: the kernels still never write out
      of bounds (the CPU kernel raises, the CUDA kernel skips out-of-range entries).
    Under torch.compile the checks are traced out; the kernels' own bounds checks remain.

    Example:
        >>> import torch, coreset_ext as cx
        >>> s = torch.zeros(4)
        >>> cx.ops.score_scatter_add_(s, torch.tensor([1, 1, 3]), torch.tensor([0.5, 0.25, 2.0]))
        tensor([0.0000, 0.7500, 0.0000, 2.0000])
    """
    check_tensor("scores", scores, dim=1, dtypes=(torch.float32,))
    if not scores.is_contiguous():
        raise ValueError("scores must be contiguous (it is updated in place)")
    check_tensor("index", index, dim=1, dtypes=INDEX_DTYPES)
    check_tensor("values", values, dim=1, dtypes=SCATTER_VALUE_DTYPES)
    if index.shape[0] != values.shape[0]:
        raise ValueError(f"index has {index.shape[0]} entries but values has {values.shape[0]}")
    check_same_device(scores=scores, index=index, values=values)
    if scores.requires_grad:
        raise ValueError("scores must not require grad: it is a buffer updated in place")
    if not any(validate is v or (isinstance(validate, str) and validate == v) for v in VALIDATE):
        check("validate", validate, bool, Options("device"))  # raises, naming validate
    compiling = torch.compiler.is_compiling()
    if not compiling and values.numel() and scores.numel() and \
            values.untyped_storage().data_ptr() == scores.untyped_storage().data_ptr():
        # the kernels read values while writing scores: an overlap would read partial sums
        raise ValueError("values must not share memory with scores (pass values.clone())")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if validate is True and not compiling:
        check_scatter_errors(scores)  # what earlier sync-free calls found, before this one writes
    if validate is True and not compiling and index.numel():
        # Checked here (one host sync on the GPU) so the error names the value. The kernels check
        # again themselves (CPU: raises before the first write; CUDA: skips bad entries), which is
        # what protects calls made past this wrapper and compiled graphs, where this is traced out.
        lo, hi = torch.aminmax(index)
        finite = torch.isfinite(values).all().to(lo.dtype)
        lo, hi, finite = torch.stack([lo, hi, finite]).tolist()  # one host sync for all three
        if lo < 0 or hi >= scores.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"index contains {bad}, out of range for scores of size {scores.shape[0]}")
        if not finite:  # a NaN would stay in the buffer for good
            raise ValueError("values contains NaN or Inf (from non-finite inputs?); validate=False adds them anyway")
    elif validate == "device" and not compiling and index.numel():
        errors = _PENDING.get(scores)
        if errors is None:
            errors = _PENDING[scores] = DeviceErrors(scores.shape[0], ("values",), scores.device)
        if scores.device.type == "cpu" and _backend.resolve("score_scatter_add_", "cpu") == "cpp":
            # the same screen fused into the CPU kernel: one pass, not six ATen calls (about 20x at
            # a training step's few hundred entries)
            torch.ops.coreset_ext.score_scatter_add_screened_cpu(scores, index, values, errors.flags, True)
            return scores
        index, screened, _ = errors.screen(index, {"values": values})
        values = screened["values"]
    try:
        torch.ops.coreset_ext.score_scatter_add_(scores, index, values, bool(deterministic))
    except IndexError as exc:
        raise ValueError(str(exc).split("\n")[0]) from None
    return scores


def _scatter_reference(scores, index, values, deterministic):
    # index_add_ checks bounds itself, so even a call that bypasses the wrapper cannot write
    # outside the buffer.
    reference.score_scatter_add_(scores, index, values)


_backend.define_fallback(
    "score_scatter_add_(Tensor(a!) scores, Tensor index, Tensor values, bool deterministic) -> ()",
    _scatter_reference,
)
_backend.register_op("score_scatter_add_", gpu=("cuda",), cpu=("cpp",))


@torch.library.register_fake("coreset_ext::score_scatter_add_")
def _(scores, index, values, deterministic):
    return None
