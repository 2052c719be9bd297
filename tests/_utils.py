"""Shared test utilities: the helpers every op's tests use, and the contract table.

The table (`CONTRACTS`) has one row per public op: how to make fresh random inputs, how to call
the public function, the torch.library overloads (with their arguments) that opcheck checks, the
float64 reference it must agree with and how closely, and which inputs get gradients.
tests/test_contracts.py runs every row through every contract of DESIGN.md ("Contracts every op
keeps"): correctness against the reference, gradients, opcheck, torch.compile(fullgraph=True),
determinism, poisoned outputs and non-contiguous inputs, on the CPU backends, the Triton
interpreter and CUDA. A new op gets all of them by adding one row.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable
from unittest import mock

import torch

from coreset_ext import _backend, ops, reference

# --------------------------------------------------------------------------------------- helpers


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64; the absolute error where the reference is zero
    (||ref|| <= 1e-12: NT-Xent with B = 1, whose loss and gradient are exactly 0)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    scale = float(ref.norm())
    return float((out - ref).norm()) / (scale if scale > 1e-12 else 1.0)


def views(b: int, d: int, *, dtype=torch.float64, device="cpu", seed: int = 0, gen: torch.Generator | None = None,
          correlated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of a batch, [b, d] each, drawn in float64: z2 = z1 + 0.7 noise (or independent).
    From `gen` when given, else from a generator seeded with `seed`."""
    g = gen if gen is not None else torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
    z2 = (z1 + 0.7 * torch.randn(b, d, generator=g, dtype=torch.float64)) if correlated else \
        torch.randn(b, d, generator=g, dtype=torch.float64)
    return z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)


def _poison_(t: torch.Tensor) -> torch.Tensor:
    """Fills t with what no correct kernel leaves behind: NaN, or the largest integer. Without
    autograd: an allocation made with requires_grad=True is a leaf, which may not be filled in
    place while autograd records."""
    with torch.no_grad():
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype != torch.bool and not t.is_complex():
            return t.fill_(torch.iinfo(t.dtype).max)
    return t


@contextlib.contextmanager
def poisoned(native: bool = False):
    """While active, every torch.empty / torch.empty_like starts as NaN (integers: their maximum),
    so an output element a kernel never writes shows. `native=True` poisons the allocations ATen
    makes as well (the C++ kernels' at::empty): torch's deterministic mode with
    `fill_uninitialized_memory` (on by default), warn-only so no op refuses to run."""
    empty, empty_like = torch.empty, torch.empty_like
    patches = [
        mock.patch.object(torch, "empty", lambda *a, **k: _poison_(empty(*a, **k))),
        mock.patch.object(torch, "empty_like", lambda *a, **k: _poison_(empty_like(*a, **k))),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        if native:
            stack.enter_context(deterministic_algorithms(warn_only=True))
            fill = torch.utils.deterministic.fill_uninitialized_memory
            torch.utils.deterministic.fill_uninitialized_memory = True
            stack.callback(setattr, torch.utils.deterministic, "fill_uninitialized_memory", fill)
        yield


@contextlib.contextmanager
def deterministic_algorithms(warn_only: bool = False):
    """torch.use_deterministic_algorithms(True) inside, the previous setting restored after."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


LAYOUTS = ("gaps", "columns")


def strided(t: torch.Tensor, layout: str = "gaps", requires_grad: bool = False):
    """t's values in a non-contiguous layout, as (view, leaf): "gaps" puts them at every other
    element of the last dimension of a buffer twice as wide whose gaps hold poison (NaN, or the
    largest integer), so a kernel that ignores the strides reads it; "columns" is column-major
    (2-D; a 1-D t gets gaps). `leaf` is the buffer the view is taken of, made to require grad
    when asked: its gradient is the view's, with zeros in the gaps."""
    if layout == "columns" and t.dim() == 2:
        leaf = t.detach().T.contiguous()
        leaf.requires_grad_(requires_grad)
        return leaf.T, leaf
    leaf = _poison_(t.new_empty(*t.shape[:-1], 2 * t.shape[-1]))
    leaf[..., ::2] = t.detach()
    leaf.requires_grad_(requires_grad)
    return leaf[..., ::2], leaf


def triton_interpreter_available() -> bool:
    """Whether Triton kernels can run on CPU tensors here (TRITON_INTERPRET=1 and Triton installed)."""
    return _backend.why_unavailable("triton", "cpu") is None


def check_assign(x, c, labels, dist, metric, tol):
    """Labels are a nearest centroid in float64 (ties within `tol` aside); distances match."""
    n, k = x.shape[0], c.shape[0]
    assert labels.dtype == torch.int64 and dist.dtype == torch.float32
    assert labels.shape == (n,) and dist.shape == (n,)
    labels, dist = labels.cpu(), dist.cpu().double()
    assert bool(((labels >= 0) & (labels < k)).all())
    x64, c64 = x.detach().cpu().double(), c.detach().cpu().double()
    if metric == "euclidean":
        full = torch.cdist(x64, c64) ** 2
        best = full.min(dim=1).values
        chosen = full.gather(1, labels[:, None]).squeeze(1)
        scale = (x64 * x64).sum(1) + (c64 * c64).sum(1).max()
        assert bool((chosen - best <= tol * scale).all())
        assert bool(((dist - chosen).abs() <= tol * scale).all())
    else:
        sim = reference.normalize(x64) @ reference.normalize(c64).T
        best = sim.max(dim=1).values
        chosen = sim.gather(1, labels[:, None]).squeeze(1)
        assert bool((best - chosen <= tol).all())
        assert bool(((dist - (1 - chosen)).abs() <= tol).all())


def check_topk(x, y, exclude_self, values, indices, want_values, want_indices, tol):
    """cosine_topk's answer against the float64 top-k (`want_values`, `want_indices`) [n, k]:
    values within `tol` (relative), every index a distinct candidate whose float64 cosine is the
    value expected at that place (within 2 tol: the kernel may swap neighbours whose similarities
    it computes within tol of each other), and the expected indices exactly in every row whose
    k + 1 best cosines are more than 10 tol apart."""
    n, k = want_values.shape
    assert values.shape == indices.shape == (n, k) and indices.dtype == torch.int64
    assert rel_err(values, want_values) < tol, rel_err(values, want_values)
    x64 = reference.normalize(x.detach().cpu().double())
    y64 = x64 if y is None else reference.normalize(y.detach().cpu().double())
    cos = x64 @ y64.T
    if exclude_self and y is None:
        cos.fill_diagonal_(float("-inf"))
    idx = indices.cpu()
    assert bool(((idx >= 0) & (idx < cos.shape[1])).all())
    assert k == 1 or bool((idx.sort(dim=1).values.diff(dim=1) > 0).all()), "an index repeated in a row"
    got = cos.gather(1, idx)
    assert float((got - want_values.cpu().double()).abs().max()) <= 2 * tol, "a neighbour of another similarity"
    best = cos.topk(min(k + 1, cos.shape[1]), dim=1).values
    gaps = -best.diff(dim=1)
    clear = (gaps > 10 * tol).all(dim=1) if gaps.shape[1] else torch.ones(n, dtype=torch.bool)
    assert torch.equal(idx[clear], want_indices.cpu()[clear])


# ----------------------------------------------------------------------------- contract table


@dataclass(frozen=True)
class Variant:
    """One set of arguments a row is checked with: `make` goes to the row's input maker (sizes,
    options of the data), `call` to its public function (and to its reference and overloads).
    `tol` overrides the row's tolerance."""

    id: str
    make: dict = field(default_factory=dict)
    call: dict = field(default_factory=dict)
    tol: Any = None


@dataclass(frozen=True)
class Contract:
    """One op in the contract table.

    make(gen, dtype, device, small=False, **variant.make) -> the op's inputs by name: fresh random
        values (never zeros) at odd sizes, floating inputs in `dtype` (`small`: a size for
        gradcheck). Non-tensor entries (k, ...) and None pass through unchanged.
    call(inputs, backend, **variant.call) -> the public function's outputs, as a tuple.
    reference(inputs, **variant.call) -> the reference's outputs; given float64 copies of the
        inputs, the oracle (it is differentiable where the op has gradients).
    overloads(inputs, backend, **variant.call) -> [(torch.ops overload, args)] for opcheck, the
        backward ops included; `backend` is the string the public function resolves.
    tol: {(kind, dtype) or kind: tolerance} of the outputs; kind "cpu", "triton" or "cuda".
        For `check` (default: rel_err of every floating output below it, other outputs equal).
        PLAIN: twice the error of the plain-PyTorch reference run in that dtype, plus 1e-4.
    grads: the inputs that get gradients, through output 0; grad_tol as tol, for rel_err.
    backend_op: the op name `_backend.resolve` knows, for ops taking a `backend=` argument
        (None: dispatched by device; `backends` and `triton` then do not apply).
    backends: the CPU backends checked by name (None: the automatic choice).
    triton: whether backend="triton" runs CPU tensors under TRITON_INTERPRET=1.
    contiguous: inputs that must stay contiguous (buffers updated in place).
    layout_exact: outputs are bit-identical whatever the layout of the inputs.
    deterministic(kind, **variant.call): whether the op promises bit-identical results there
        under torch.use_deterministic_algorithms(True).
    no_gradcheck(**variant.call): None, or why float64 gradcheck of the whole function does not
        apply to these arguments (the test is skipped with this reason; the gradients are still
        checked against autograd through the reference).
    """

    name: str
    make: Callable[..., dict]
    call: Callable[..., tuple]
    reference: Callable[..., tuple]
    overloads: Callable[..., list]
    variants: tuple[Variant, ...]
    tol: dict
    grads: tuple[str, ...] = ()
    grad_tol: dict = field(default_factory=dict)
    backend_op: str | None = None
    backends: tuple = (None,)
    triton: bool = False
    check: Callable | None = None
    contiguous: tuple[str, ...] = ()
    layout_exact: bool = False
    deterministic: Callable[..., bool] = lambda kind, **call: True
    no_gradcheck: Callable[..., str | None] = lambda **call: None

    def tolerance(self, kind: str, dtype: torch.dtype, variant: Variant, grad: bool = False):
        if variant.tol is not None and not grad:
            return variant.tol
        table = self.grad_tol if grad else self.tol
        for key in ((kind, dtype), kind):
            if key in table:
                return table[key]
        raise KeyError(f"{self.name}: no {'gradient ' if grad else ''}tolerance for {kind}, {dtype}")

    def resolve(self, device: torch.device, backend: str | None) -> str:
        """The backend string the public function passes to its custom op."""
        return _backend.resolve(self.backend_op, device.type, backend or "") if self.backend_op else ""


PLAIN = "plain"  # see Contract.tol
HALF = (torch.float16, torch.bfloat16)


def upcast(inputs: dict) -> dict:
    """float64 CPU copies of the floating inputs (the reference's inputs); the rest on the CPU."""
    return {k: (v.detach().cpu().double() if v.is_floating_point() else v.cpu()) if isinstance(v, torch.Tensor)
            else v for k, v in inputs.items()}


# ---- score_scatter_add_


def _scatter_make(gen, dtype, device, small=False, n=257, m=200, buckets=None, index_dtype=torch.int64):
    return {
        "scores": torch.randn(n, generator=gen).to(device),  # float32, updated in place
        "index": torch.randint(0, buckets or n, (m,), generator=gen).to(device, index_dtype),  # duplicates
        "values": torch.randn(m, generator=gen).to(device, dtype),
    }


def _scatter_call(inputs, backend, deterministic=None):
    scores = inputs["scores"].clone()
    return (ops.score_scatter_add_(scores, inputs["index"], inputs["values"], deterministic=deterministic),)


def _scatter_reference(inputs, deterministic=None):
    return (reference.score_scatter_add_(inputs["scores"].clone(), inputs["index"], inputs["values"]),)


def _scatter_overloads(inputs, backend, deterministic=None):
    # both kernels (atomics and the sorted reduction) whatever the variant asks for
    return [(torch.ops.coreset_ext.score_scatter_add_.default,
             (inputs["scores"].clone(), inputs["index"], inputs["values"], det)) for det in (False, True)]


def _scatter_check(out, want, tol, inputs, **call):
    # elementwise: (rtol, atol), as the oracle comparisons of tests/test_scatter.py
    rtol, atol = tol
    assert out[0].dtype == torch.float32
    torch.testing.assert_close(out[0].double().cpu(), want[0], rtol=rtol, atol=atol)


# ---- kmeans_update


def _update_make(gen, dtype, device, small=False, labels_dtype=torch.int64):
    n, d, k = 301, 17, 11
    return {
        "x": torch.randn(n, d, generator=gen).to(device, dtype),
        "labels": torch.randint(0, k - 1, (n,), generator=gen).to(device, labels_dtype),  # cluster k-1 empty
        "k": k,
    }


def _update_overloads(inputs, backend):
    return [(torch.ops.coreset_ext.kmeans_update.default, (inputs["x"], inputs["labels"].long(), inputs["k"]))]


# ---- kmeans_assign


def _assign_make(gen, dtype, device, small=False):
    n, k, d = 131, 37, 19
    return {"x": torch.randn(n, d, generator=gen).to(device, dtype),
            "centroids": torch.randn(k, d, generator=gen).to(device, dtype)}


def _assign_check(out, want, tol, inputs, metric):
    check_assign(inputs["x"], inputs["centroids"], out[0], out[1], metric, tol)


# ---- cosine_rowsum


def _rowsum_make(gen, dtype, device, small=False, y=False, groups=0):
    n, m, d = 45, 29, 19  # the interpreter's tiles are 16: ragged in rows, columns and d
    x = torch.randn(n, d, generator=gen).to(device, dtype)
    yy = torch.randn(m, d, generator=gen).to(device, dtype) if y else None
    gx = torch.randint(0, groups, (n,), generator=gen).to(device) if groups else None
    gy = torch.randint(0, groups, (m,), generator=gen).to(device) if groups and y else None
    return {"x": x, "y": yy, "groups": gx, "y_groups": gy}


def _rowsum_call(inputs, backend, clamp_min=0.0, exclude_self=False):
    return (ops.cosine_rowsum(inputs["x"], inputs["y"], clamp_min=clamp_min, groups=inputs["groups"],
                              y_groups=inputs["y_groups"], exclude_self=exclude_self, backend=backend),)


def _rowsum_reference(inputs, clamp_min=0.0, exclude_self=False):
    return (reference.cosine_rowsum(inputs["x"], inputs["y"], clamp_min=clamp_min, groups=inputs["groups"],
                                    y_groups=inputs["y_groups"], exclude_self=exclude_self),)


def _rowsum_overloads(inputs, backend, clamp_min=0.0, exclude_self=False):
    return [(torch.ops.coreset_ext.cosine_rowsum.default,
             (inputs["x"], inputs["y"], inputs["groups"], inputs["y_groups"], clamp_min, exclude_self, backend))]


# ---- cosine_topk


def _topk_make(gen, dtype, device, small=False, y=False):
    n, m, d = 37, 29, 13
    return {"x": torch.randn(n, d, generator=gen).to(device, dtype),
            "y": torch.randn(m, d, generator=gen).to(device, dtype) if y else None}


def _topk_call(inputs, backend, k, exclude_self=True):
    return tuple(ops.cosine_topk(inputs["x"], k, y=inputs["y"], exclude_self=exclude_self, backend=backend))


def _topk_reference(inputs, k, exclude_self=True):
    return tuple(reference.cosine_topk(inputs["x"], k, y=inputs["y"], exclude_self=exclude_self))


def _topk_overloads(inputs, backend, k, exclude_self=True):
    return [(torch.ops.coreset_ext.cosine_topk.default,
             (inputs["x"], inputs["y"], k, exclude_self and inputs["y"] is None, backend))]


def _topk_check(out, want, tol, inputs, k, exclude_self=True):
    check_topk(inputs["x"], inputs["y"], exclude_self, out[0], out[1], want[0], want[1], tol)


# ---- contrastive losses


def _needs_grad(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _nt_xent_make(gen, dtype, device, small=False, scale=False, correlated=True):
    b, d = (5, 6) if small else (21, 20)  # 2B = 42 rows: two ragged tiles of 32 in the interpreter
    z1, z2 = views(b, d, gen=gen, correlated=correlated)
    if scale:  # unnormalised rows: keep the logits O(1)
        z1, z2 = z1 / (2 * math.sqrt(d)), z2 / (2 * math.sqrt(d))
    return {"z1": z1.to(device, dtype), "z2": z2.to(device, dtype)}


def _nt_xent_call(inputs, backend, temperature, normalize=True):
    return tuple(ops.nt_xent(inputs["z1"], inputs["z2"], temperature, normalize=normalize, reduction="none",
                             return_cos=True, backend=backend))


def _nt_xent_reference(inputs, temperature, normalize=True):
    return tuple(reference.nt_xent_rows(inputs["z1"], inputs["z2"], temperature, normalize_input=normalize))


def _nt_xent_overloads(inputs, backend, temperature, normalize=True):
    z1, z2 = inputs["z1"], inputs["z2"]
    lse = torch.ops.coreset_ext.nt_xent_rows(z1, z2, temperature, normalize, backend)[1]
    grad_rows = torch.rand(2 * z1.shape[0], device=z1.device)
    return [
        (torch.ops.coreset_ext.nt_xent_rows.default, (_needs_grad(z1), _needs_grad(z2), temperature, normalize,
                                                      backend)),
        (torch.ops.coreset_ext.nt_xent_rows_backward.default, (grad_rows, z1, z2, lse, temperature, normalize,
                                                               backend)),
    ]


def _info_nce_make(gen, dtype, device, small=False, scale=False):
    b, kq, d = (4, 6, 5) if small else (37, 53, 20)
    q, k = views(b, d, gen=gen)
    queue = torch.randn(kq, d, generator=gen, dtype=torch.float64)
    if scale:
        q, k, queue = (t / (2 * math.sqrt(d)) for t in (q, k, queue))
    return {"q": q.to(device, dtype), "k": k.to(device, dtype), "queue": queue.to(device, dtype)}


def _info_nce_call(inputs, backend, temperature, normalize=True):
    return tuple(ops.info_nce_queue(inputs["q"], inputs["k"], inputs["queue"], temperature, normalize=normalize,
                                    reduction="none", return_cos=True, backend=backend))


def _info_nce_reference(inputs, temperature, normalize=True):
    return tuple(reference.info_nce_queue_rows(inputs["q"], inputs["k"], inputs["queue"], temperature,
                                               normalize_input=normalize))


def _info_nce_overloads(inputs, backend, temperature, normalize=True):
    q, k, queue = inputs["q"], inputs["k"], inputs["queue"]
    lse = torch.ops.coreset_ext.info_nce_queue_rows(q, k, queue, temperature, normalize, backend)[1]
    grad_rows = torch.rand(q.shape[0], device=q.device)
    return [
        (torch.ops.coreset_ext.info_nce_queue_rows.default, (_needs_grad(q), k, queue, temperature, normalize,
                                                             backend)),
        (torch.ops.coreset_ext.info_nce_queue_rows_backward.default,
         (grad_rows, q, k, queue, lse, temperature, normalize, backend)),
    ]


def _pair_cosine_make(gen, dtype, device, small=False):
    b, d = (5, 6) if small else (37, 20)
    a, c = views(b, d, gen=gen)
    return {"a": a.to(device, dtype), "b": c.to(device, dtype)}


def _pair_cosine_overloads(inputs, backend):
    a, b = inputs["a"], inputs["b"]
    return [
        (torch.ops.coreset_ext.pair_cosine.default, (_needs_grad(a), _needs_grad(b), backend)),
        (torch.ops.coreset_ext.pair_cosine_backward.default, (torch.rand(a.shape[0], device=a.device), a, b,
                                                              backend)),
    ]


def _mining_make(gen, dtype, device, small=False, queue=False):
    # SimCLR: 2B = 42 rows, two ragged tiles of 32 in the interpreter; MoCo: 37 queries, 53 keys
    b, kq, d = ((5, 7, 6) if small else (21, 53, 20)) if not queue else ((4, 7, 5) if small else (37, 53, 20))
    q, k = views(b, d, gen=gen)
    qu = torch.randn(kq, d, generator=gen, dtype=torch.float64).to(device, dtype) if queue else None
    return {"q": q.to(device, dtype), "k": k.to(device, dtype), "queue": qu}


def _mining_call(inputs, backend, temperature, **options):
    return tuple(ops.potential_mining(inputs["q"], inputs["k"], inputs["queue"], temperature, reduction="none",
                                      return_cos=True, backend=backend, **options))


def _mining_reference(inputs, temperature, **options):
    return tuple(reference.potential_mining_rows(inputs["q"], inputs["k"], inputs["queue"], temperature, **options))


def _mining_args(temperature, n_mined=reference.MINING_K, weighting=reference.MINING_WEIGHTING,
                 weight_temperature=reference.MINING_WEIGHT_TEMPERATURE, threshold=reference.MINING_THRESHOLD,
                 mined_weight=reference.MINING_MINED_WEIGHT, band=reference.MINING_BAND):
    """The custom op's scalar arguments after q, k, queue (as ops.potential_mining passes them)."""
    return (temperature, n_mined, weighting, weight_temperature, threshold, mined_weight, *band)


def _mining_overloads(inputs, backend, temperature, **options):
    q, k, queue = inputs["q"], inputs["k"], inputs["queue"]
    args = _mining_args(temperature, **options)
    rows, lse, _, index, alpha, edges = torch.ops.coreset_ext.potential_mining_rows(q, k, queue, *args, backend)
    grad_rows = torch.rand(rows.shape[0], device=q.device)
    # SimCLR: both views learn; MoCo: the queries alone (k and the queue are constants)
    k_in = k if queue is not None else _needs_grad(k)
    return [
        (torch.ops.coreset_ext.potential_mining_rows.default, (_needs_grad(q), k_in, queue, *args, backend)),
        (torch.ops.coreset_ext.potential_mining_rows_backward.default,
         (grad_rows, q, k, queue, lse, index, alpha, edges, temperature, backend)),
    ]


def _mining_variants(temperature, n_mined):
    """Each switch of the op in one form: its defaults at the form's default `temperature`, the
    threshold weighting with `n_mined` neighbours (some pass, some not) and a narrower band, top1
    at t = 0.01, and a band with lo = hi that keeps no negative (each row its positives alone)."""
    return (
        Variant("defaults", call=dict(temperature=temperature)),
        Variant("threshold-band", call=dict(temperature=0.3, n_mined=n_mined, weighting="threshold", threshold=0.4,
                                            mined_weight=0.5, band=(0.1, 0.9))),
        Variant("top1-t0.01", call=dict(temperature=0.01, weighting="top1", band=(0.0, 1.0))),
        Variant("empty-band", call=dict(temperature=0.2, n_mined=2, weighting="top1", mined_weight=2.0,
                                        band=(0.5, 0.5))),
    )


def _mining_no_gradcheck(temperature, weighting=reference.MINING_WEIGHTING, **options):
    # SimCLR form: the soft weights are smooth functions of z1, z2 (the cosines of each view to
    # its mined neighbours) that the loss holds constant (the selection carries no gradient, by
    # the op's definition, issue 18): finite differences see them move, the analytic gradient by
    # design does not. The threshold and top1 variants, whose selection is locally constant, are
    # gradchecked; soft's gradients are checked against autograd through the reference, which
    # holds the selection constant too. (MoCo form: the weights come from k and the queue, which
    # get no gradient, so its soft variant is gradchecked.)
    if weighting == "soft":
        return "soft mining weights are constants of the loss (no gradient through the selection)"
    return None


# Tolerances (rel_err) follow DESIGN.md, "Testing": well under 1e-4 on the CPU and in the
# interpreter; the GPU's are those of the GPU tests (TF32 products in the similarity kernels).
# Low-precision inputs are compared with the reference on the same rounded inputs, so what is
# left is the kernels' own error (fp32 inside) and, for gradients, their rounding to the dtype.
F16, BF16 = torch.float16, torch.bfloat16
LOSS_TOL = {"cpu": 1e-5, "triton": 1e-4, ("cuda", BF16): PLAIN, "cuda": 1e-4}
LOSS_GRAD_TOL = {("cpu", BF16): 5e-3, "cpu": 1e-5, ("triton", F16): 1e-3, "triton": 1e-4, ("cuda", BF16): PLAIN,
                 "cuda": 1e-4}
SIMILARITY_TOL = {"cpu": 1e-5, "triton": 1e-5, ("cuda", BF16): 1e-2, "cuda": 2e-3}

CONTRACTS: tuple[Contract, ...] = (
    Contract(
        name="score_scatter_add_",
        make=_scatter_make, call=_scatter_call, reference=_scatter_reference, overloads=_scatter_overloads,
        variants=(
            Variant("random", call=dict(deterministic=False), tol=(1e-6, 1e-5)),
            # heavy duplication: 65,536 entries into 50 slots
            Variant("duplicates-int32-deterministic",
                    make=dict(n=1000, m=65536, buckets=50, index_dtype=torch.int32),
                    call=dict(deterministic=True), tol=(1e-4, 1e-3)),
            Variant("duplicates-default", make=dict(n=1000, m=65536, buckets=50), tol=(1e-4, 1e-3)),
        ),
        tol={}, check=_scatter_check, contiguous=("scores",), layout_exact=True,
        # deterministic=False asks for atomics, which the CUDA kernel uses
        deterministic=lambda kind, deterministic=None: kind != "cuda" or deterministic is not False,
    ),
    Contract(
        name="kmeans_update",
        make=_update_make,
        call=lambda inputs, backend: tuple(ops.kmeans_update(inputs["x"], inputs["labels"], inputs["k"])),
        reference=lambda inputs: tuple(reference.kmeans_update(inputs["x"], inputs["labels"].long(), inputs["k"])),
        overloads=_update_overloads,
        variants=(Variant("int64-labels"), Variant("int32-labels", make=dict(labels_dtype=torch.int32))),
        tol={"cpu": 1e-6, "cuda": 1e-5}, layout_exact=True,
    ),
    Contract(
        name="kmeans_assign",
        make=_assign_make,
        call=lambda inputs, backend, metric: tuple(
            ops.kmeans_assign(inputs["x"], inputs["centroids"], metric=metric, backend=backend)),
        reference=lambda inputs, metric: tuple(reference.kmeans_assign(inputs["x"], inputs["centroids"],
                                                                       metric=metric)),
        overloads=lambda inputs, backend, metric: [(torch.ops.coreset_ext.kmeans_assign.default,
                                                    (inputs["x"], inputs["centroids"], metric, backend))],
        variants=(Variant("euclidean", call=dict(metric="euclidean")),
                  Variant("cosine", call=dict(metric="cosine"))),
        # the Triton kernel normalises the centroids for cosine, then rounds them to x's dtype
        tol={("triton", F16): 1e-3, ("cuda", BF16): 2e-2, "cpu": 1e-5, "triton": 1e-5, "cuda": 1e-5},
        check=_assign_check, backend_op="kmeans_assign", backends=(None, "reference"), triton=True,
    ),
    Contract(
        name="cosine_rowsum",
        make=_rowsum_make, call=_rowsum_call, reference=_rowsum_reference, overloads=_rowsum_overloads,
        variants=(
            Variant("plain"),
            Variant("groups", make=dict(groups=3)),
            Variant("self-excluded-negative-clamp", call=dict(exclude_self=True, clamp_min=-0.3)),
            Variant("groups-self-excluded", make=dict(groups=3), call=dict(exclude_self=True)),
            Variant("y-with-groups", make=dict(y=True, groups=3), call=dict(clamp_min=0.1)),
            Variant("y", make=dict(y=True), call=dict(clamp_min=0.1)),
        ),
        tol=SIMILARITY_TOL, backend_op="cosine_rowsum", triton=True,
    ),
    Contract(
        name="cosine_topk",
        make=_topk_make, call=_topk_call, reference=_topk_reference, overloads=_topk_overloads,
        variants=(
            Variant("self-excluded", call=dict(k=7)),
            Variant("self-kept", call=dict(k=5, exclude_self=False)),
            Variant("y", make=dict(y=True), call=dict(k=6, exclude_self=False)),
        ),
        tol=SIMILARITY_TOL, check=_topk_check, backend_op="cosine_topk", triton=True,
    ),
    Contract(
        name="nt_xent",
        make=_nt_xent_make, call=_nt_xent_call, reference=_nt_xent_reference, overloads=_nt_xent_overloads,
        variants=(
            Variant("normalized", call=dict(temperature=0.5)),
            Variant("unnormalized", make=dict(scale=True), call=dict(temperature=0.3, normalize=False)),
            # independent views: correlated ones at t = 0.01 have losses near 1e-10, which fp32 cannot resolve
            Variant("t0.01", make=dict(correlated=False), call=dict(temperature=0.01)),
        ),
        tol=LOSS_TOL, grads=("z1", "z2"), grad_tol=LOSS_GRAD_TOL, backend_op="nt_xent", triton=True,
        backends=(None, "reference"),  # None: "cpp" where _C is built
    ),
    Contract(
        name="info_nce_queue",
        make=_info_nce_make, call=_info_nce_call, reference=_info_nce_reference, overloads=_info_nce_overloads,
        variants=(
            Variant("normalized", call=dict(temperature=0.2)),
            Variant("unnormalized", make=dict(scale=True), call=dict(temperature=0.1, normalize=False)),
        ),
        tol=LOSS_TOL, grads=("q",), grad_tol=LOSS_GRAD_TOL, backend_op="info_nce_queue", triton=True,
        backends=(None, "reference"),
    ),
    Contract(
        name="potential_mining",  # the SimCLR form: the 2B rows [z1; z2] mine among each other
        make=_mining_make, call=_mining_call, reference=_mining_reference, overloads=_mining_overloads,
        variants=_mining_variants(temperature=0.5, n_mined=3),
        # backends: the default (None), the reference being the only CPU backend
        tol=LOSS_TOL, grads=("q", "k"), grad_tol=LOSS_GRAD_TOL, backend_op="potential_mining", triton=True,
        no_gradcheck=_mining_no_gradcheck,
    ),
    Contract(
        name="potential_mining_queue",  # the MoCo form: the queries mine the queue; only q learns
        make=lambda gen, dtype, device, small=False: _mining_make(gen, dtype, device, small, queue=True),
        call=_mining_call, reference=_mining_reference, overloads=_mining_overloads,
        variants=_mining_variants(temperature=0.2, n_mined=5),
        tol=LOSS_TOL, grads=("q",), grad_tol=LOSS_GRAD_TOL, backend_op="potential_mining", triton=True,
    ),
    Contract(
        name="pair_cosine",
        make=_pair_cosine_make,
        call=lambda inputs, backend: (ops.pair_cosine(inputs["a"], inputs["b"], backend=backend),),
        reference=lambda inputs: (reference.pair_cosine(inputs["a"], inputs["b"]),),
        overloads=_pair_cosine_overloads,
        variants=(Variant("default"),),
        tol=LOSS_TOL, grads=("a", "b"), grad_tol=LOSS_GRAD_TOL, backend_op="pair_cosine", triton=True,
        backends=(None, "reference"),
    ),
)
