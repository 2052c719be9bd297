"""What the fused loss ops share (ops/contrastive.py, ops/mining.py): argument checks, the backend
choice, the eager autograd path that skips the dispatcher outside torch.compile, and the scores'
hand-off. One module, so each loss file holds only its own formula and kernels' plumbing.
"""

from __future__ import annotations

import torch

from coreset_ext import _backend, reference
from coreset_ext._validation import check_per_row, check_reduction, check_same_device, check_tensor, check_temperature
from coreset_ext.ops.scatter import INDEX_DTYPES, score_scatter_add_

LOSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_MAX_D = 256  # = triton_kernels.contrastive.MAX_D (not imported: Triton may be absent)
# Widest d the loss kernels take when Triton is requested by name: beyond it their tiles need more
# shared memory than a GPU has (fp32, d = 1024: 196,608 bytes; an A100 has 166,912) and spill
# kilobytes of registers per thread (tools/triton_aot.py).
TRITON_MAX_D_REQUESTED = 512
SCORE_METRIC = "css"  # the tracker metric the positive-pair cosines are recorded under (METHODS.md)


def eager_function(name: str, fwd, setup, backward, bwd, *, reduces: bool) -> type[torch.autograd.Function]:
    """The eager path of an op: a plain torch.autograd.Function whose forward is the op's
    implementation `fwd` followed by the custom op's `setup`, and whose backward is the custom
    op's formula `backward` calling the implementation `bwd` instead of the backward custom op.
    One contract, two entry points; this one skips the dispatcher. With `reduces`, the last
    argument is the loss reduction, applied to output 0 inside the node ("none": the rows): a
    separate mean would be a second autograd node, measured at about 30 us per step on the CPU.
    (forward takes ctx rather than a separate setup_context: measured, about 40 us less.)"""

    def forward(ctx, *args):
        inputs, reduction = (args[:-1], args[-1]) if reduces else (args, "none")
        output = fwd(*inputs)
        setup(ctx, inputs, output)
        if reduction == "none":
            ctx.reduction = None
            return output
        ctx.reduction, ctx.rows = reduction, output[0].shape[0]
        return (reference.reduce_loss(output[0], reduction), *output[1:])

    def backward_(ctx, grad, *grads):
        if grad is not None and ctx.reduction is not None:  # the reduction's gradient, per row
            grad = (grad / ctx.rows if ctx.reduction == "mean" else grad).expand(ctx.rows)
        out = backward(ctx, grad, *grads, bwd=bwd)
        return (*out, None) if reduces else out

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_)})


def check_rows(**inputs) -> None:
    """Each input a non-empty [batch, dim] tensor of a loss dtype."""
    for name, x in inputs.items():
        check_tensor(name, x, dim=2, dtypes=LOSS_DTYPES, what="[batch, dim]")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")


def check_alike(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """The two views of one batch: same shape, dtype and device."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} and {name_b} must share a dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        check_same_device(**{name_a: a, name_b: b})


def check_loss_args(x: torch.Tensor, temperature, reduction, index, tracker, scores) -> float:
    """The arguments every loss takes beside its inputs; returns the temperature as a float."""
    t = check_temperature(temperature)
    check_reduction(reduction)
    if tracker is not None and scores is not None:
        raise ValueError("pass tracker or scores, not both (tracker: sums and counts; scores: a raw buffer)")
    if (index is None) != (tracker is None and scores is None):
        raise ValueError("index and tracker must be given together (index: dataset indices of the batch, "
                         "tracker: the ScoreTracker to record the positive cosines in)")
    if tracker is not None and not callable(getattr(tracker, "record", None)):
        raise ValueError(f"tracker must have a record(index, **values) method (a ScoreTracker), got "
                         f"{type(tracker).__name__}")
    if index is not None:
        check_per_row("index", index, "the batch", x, dtypes=INDEX_DTYPES)
    return t


def choose_backend(op: str, x: torch.Tensor, requested: str | None) -> str:
    """The backend that runs: Triton has no float64 path, so float64 goes to the reference, and
    its tiles are sized for d <= 256 (projection heads), so wider inputs do too unless Triton was
    requested by name."""
    d = x.shape[-1]
    if requested == "triton" and op != "pair_cosine" and d > TRITON_MAX_D_REQUESTED:
        raise ValueError(f"backend='triton' takes feature dimensions up to {TRITON_MAX_D_REQUESTED} for "
                         f"{op}, got d = {d}; leave backend=None to use the reference")
    chosen = _backend.resolve(op, x.device.type, requested or "")
    if chosen == "triton" and x.dtype == torch.float64:
        if requested:
            raise ValueError("backend='triton' has no float64 path; use float32/float16/bfloat16")
        return "reference"
    if chosen == "triton" and not requested and d > TRITON_MAX_D:
        return "reference"
    return chosen


def run_loss(custom_op, eager: type[torch.autograd.Function], args: tuple, reduction: str):
    """(loss, positive cosines) of a loss op: its custom op under torch.compile, which traces it
    through the fake kernel, and otherwise its eager Function, which reduces inside the node.
    Outputs 0 and 2 are the rows and the cosines; any after them (mining's selection) are dropped."""
    if torch.compiler.is_compiling():
        out = custom_op(*args)
        return reference.reduce_loss(out[0], reduction), out[2]
    out = eager.apply(*args, reduction)
    return out[0], out[2]


def finish(loss, cos, index, tracker, scores, validate, return_cos: bool):
    """The loss as asked for, after recording the positive cosines at `index`."""
    if tracker is not None:
        tracker.record(index, **{SCORE_METRIC: cos})
    elif scores is not None:
        score_scatter_add_(scores, index, cos, validate=validate)
    return (loss, cos) if return_cos else loss


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`; x itself when it is already (skips a call per tensor on the hot path)."""
    return x if x.dtype == dtype else x.to(dtype)


def unaliased(outputs: tuple) -> tuple:
    """A custom op's outputs may not share memory with each other: copy those that do (the
    reference's gradient halves are views of one buffer). The eager path keeps the views."""
    seen, out = set(), []
    for o in outputs:
        ptr = o.untyped_storage().data_ptr()
        out.append(o.clone() if ptr in seen else o)
        seen.add(ptr)
    return tuple(out)
