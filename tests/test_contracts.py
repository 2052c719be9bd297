"""Every op through every contract of DESIGN.md ("Contracts every op keeps"), from the table in
tests/_utils.py (one row per op):

- correctness: the public function against the float64 reference, on fresh random inputs of odd
  sizes, in float32 and in a low-precision dtype (float32 results either way);
- gradients against autograd through the reference, and gradcheck in float64 on the CPU path;
- torch.library.opcheck of the custom op (and of its backward op);
- torch.compile(fullgraph=True) on the CPU backends and CUDA: the same outputs and gradients as eager;
- determinism under torch.use_deterministic_algorithms(True): bit-identical reruns;
- poisoned outputs: NaN-filled allocations (torch.empty and, through ATen, the C++ kernels') show
  any element a kernel leaves unwritten;
- non-contiguous inputs (gaps holding poison, column-major): still correct;
- torch.autocast (bf16, CPU and CUDA): float32 inputs give what they give without it.

Each runs on the CPU backends, on the Triton path in the interpreter (marked `triton`, run with
TRITON_INTERPRET=1; float32 and float16, the interpreter having no bf16 tl.dot) and on CUDA
(marked `cuda`).
"""

from __future__ import annotations

import pytest
import torch
from _utils import (
    CONTRACTS, HALF, LAYOUTS, PLAIN, deterministic_algorithms, poisoned, rel_err, strided,
    triton_interpreter_available, upcast,
)

DTYPES = {"cpu": (torch.float32, torch.bfloat16), "triton": (torch.float32, torch.float16),
          "cuda": (torch.float32, torch.bfloat16)}
DEVICE = {"cpu": "cpu", "triton": "cpu", "cuda": "cuda"}


def _targets(row):
    """(kind, backend) where the row runs: each CPU backend, the Triton interpreter, CUDA."""
    out = [pytest.param("cpu", b, id=f"cpu-{b or 'auto'}") for b in (row.backends if row.backend_op else (None,))]
    if row.triton:
        out.append(pytest.param("triton", "triton", id="triton", marks=pytest.mark.triton))
    out.append(pytest.param("cuda", None, id="cuda", marks=pytest.mark.cuda))
    return out


def cases(kinds=("cpu", "triton", "cuda"), dtypes=False, grads=False):
    """pytest params (row, variant, kind, backend, dtype) over the table: every variant of every
    row (with gradients only, if `grads`) on every target of `kinds`, in each dtype of the target
    if `dtypes`, else in float32."""
    params = []
    for row in CONTRACTS:
        if grads and not row.grads:
            continue
        for variant in row.variants:
            for target in _targets(row):
                kind, backend = target.values
                if kind not in kinds:
                    continue
                for dtype in DTYPES[kind] if dtypes else (torch.float32,):
                    params.append(pytest.param(
                        row, variant, kind, backend, dtype, marks=target.marks,
                        id=f"{row.name}-{variant.id}-{target.id}" + (f"-{str(dtype)[6:]}" if dtypes else "")))
    return params


ARGS = "row,variant,kind,backend,dtype"


def _need(kind):
    if kind == "triton" and not triton_interpreter_available():
        pytest.skip("needs Triton and TRITON_INTERPRET=1")
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _weights(gen):
    """Loss weights per output row (random, so every row's gradient counts differently)."""
    seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    return lambda shape: 0.1 + torch.rand(shape, dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(seed))


def _run(fn, inputs, grads=(), weights=None):
    """fn(inputs) and, given `weights`, the gradients of sum(weights * output 0) with respect to
    the inputs named in `grads` (a view that requires grad keeps its own)."""
    if weights is None or not grads:
        return tuple(fn(inputs)), ()
    inputs = dict(inputs)
    for name in grads:
        t = inputs[name]
        if t.requires_grad:
            t.retain_grad()
        else:
            t = t.detach().requires_grad_()
        inputs[name] = t
    out = tuple(fn(inputs))
    first = out[0].float() if out[0].dtype in HALF else out[0]
    (first * weights(first.shape).to(first.device, first.dtype)).sum().backward()
    return tuple(o.detach() for o in out), tuple(inputs[n].grad for n in grads)


def _ours(row, variant, backend):
    return lambda inputs: row.call(inputs, backend, **variant.call)


def _reference(row, variant):
    return lambda inputs: row.reference(inputs, **variant.call)


def _check(row, variant, kind, dtype, inputs, got, weights=None):
    """Outputs (and gradients) `got` against the float64 reference on the same inputs."""
    out, grads = got
    want, want_grads = _run(_reference(row, variant), upcast(inputs), row.grads, weights)
    assert len(out) == len(want)
    for o, w in zip(out, want):
        assert o.shape == w.shape
        if o.is_floating_point():
            assert o.dtype == torch.float32, "float32 results whatever the input dtype"
    tol = row.tolerance(kind, dtype, variant)
    plain = None
    if tol == PLAIN or (grads and row.tolerance(kind, dtype, variant, grad=True) == PLAIN):
        # DESIGN.md: within twice the error that plain PyTorch makes in this dtype
        plain = _run(_reference(row, variant), inputs, row.grads, weights)
    if tol == PLAIN:
        for o, w, p in zip(out, want, plain[0]):
            assert rel_err(o, w) <= 2 * rel_err(p, w) + 1e-4, (rel_err(o, w), rel_err(p, w))
    elif row.check is not None:
        row.check(out, want, tol, inputs, **variant.call)
    else:
        for i, (o, w) in enumerate(zip(out, want)):
            if o.is_floating_point():
                assert rel_err(o, w) < tol, f"output {i}: rel_err {rel_err(o, w):.3g} >= {tol}"
            else:
                assert torch.equal(o.cpu(), w), f"output {i} differs"
    if grads:
        tol = row.tolerance(kind, dtype, variant, grad=True)
        for i, (name, g, w) in enumerate(zip(row.grads, grads, want_grads)):
            assert g is not None and g.dtype == inputs[name].dtype and g.shape == w.shape
            limit = 2 * rel_err(plain[1][i], w) + 1e-4 if tol == PLAIN else tol
            assert rel_err(g, w) < limit, f"gradient of {name}: rel_err {rel_err(g, w):.3g} >= {limit:.3g}"


def _make(row, variant, kind, dtype, gen, **kw):
    return row.make(gen, dtype, DEVICE[kind], **kw, **variant.make)


def _flat(got):
    out, grads = got
    return out + grads


# --------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(ARGS, cases(dtypes=True))
def test_matches_reference(row, variant, kind, backend, dtype, gen):
    _need(kind)
    inputs = _make(row, variant, kind, dtype, gen)
    _check(row, variant, kind, dtype, inputs, _run(_ours(row, variant, backend), inputs))


@pytest.mark.parametrize(ARGS, cases(dtypes=True, grads=True))
def test_gradients_match_reference(row, variant, kind, backend, dtype, gen):
    _need(kind)
    inputs = _make(row, variant, kind, dtype, gen)
    weights = _weights(gen)
    got = _run(_ours(row, variant, backend), inputs, row.grads, weights)
    _check(row, variant, kind, dtype, inputs, got, weights)


@pytest.mark.parametrize(ARGS, cases(kinds=("cpu",), grads=True))
def test_gradcheck_float64(row, variant, kind, backend, dtype, gen):
    why = row.no_gradcheck(**variant.call)
    if why is not None:
        pytest.skip(why)
    inputs = _make(row, variant, kind, torch.float64, gen, small=True)

    def f(*leaves):
        return row.call({**inputs, **dict(zip(row.grads, leaves))}, backend, **variant.call)[0]

    assert torch.autograd.gradcheck(f, tuple(inputs[n].detach().requires_grad_() for n in row.grads))


# ------------------------------------------------------------------------ opcheck, compile


@pytest.mark.parametrize(ARGS, cases())
def test_opcheck(row, variant, kind, backend, dtype, gen):
    _need(kind)
    inputs = _make(row, variant, kind, dtype, gen)
    for overload, args in row.overloads(inputs, row.resolve(torch.device(DEVICE[kind]), backend), **variant.call):
        torch.library.opcheck(overload, args)


# The interpreter reads real data, so torch.compile cannot trace a Triton op over CPU tensors
# (DESIGN.md, "Testing"): compile is checked on the CPU backends here and on CUDA.
@pytest.mark.parametrize(ARGS, cases(kinds=("cpu", "cuda")))
def test_compile_fullgraph(row, variant, kind, backend, dtype, gen):
    _need(kind)
    torch._dynamo.reset()
    inputs = _make(row, variant, kind, dtype, gen)
    weights = _weights(gen)
    eager = _run(_ours(row, variant, backend), inputs, row.grads, weights)
    compiled = torch.compile(_ours(row, variant, backend), fullgraph=True)
    got = _run(compiled, inputs, row.grads, weights)
    for g, e in zip(_flat(got), _flat(eager)):
        assert torch.equal(g, e), "compiled and eager results differ"


# -------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(ARGS, cases())
def test_deterministic(row, variant, kind, backend, dtype, gen):
    _need(kind)
    if not row.deterministic(kind, **variant.call):
        pytest.skip("these arguments ask for the nondeterministic path")
    inputs = _make(row, variant, kind, dtype, gen)
    weights = _weights(gen)
    with deterministic_algorithms():
        first = _run(_ours(row, variant, backend), inputs, row.grads, weights)
        second = _run(_ours(row, variant, backend), inputs, row.grads, weights)
    for a, b in zip(_flat(first), _flat(second)):
        assert torch.equal(a, b), "two runs on the same inputs differ"


# --------------------------------------------------------------- poisoned outputs, layouts


def _poison_cases():
    """Each case with Python's torch.empty poisoned and, where C++ kernels may serve (not in the
    interpreter, whose wrappers allocate with torch.empty), ATen's allocations too."""
    out = []
    for p in cases(dtypes=True):
        for native in (False, True) if p.values[2] != "triton" else (False,):
            name = "aten" if native else "torch.empty"
            out.append(pytest.param(*p.values, native, marks=p.marks, id=f"{p.id}-{name}"))
    return out


@pytest.mark.parametrize(ARGS + ",native", _poison_cases())
def test_poisoned_outputs(row, variant, kind, backend, dtype, native, gen):
    _need(kind)
    inputs = _make(row, variant, kind, dtype, gen)
    weights = _weights(gen)
    with poisoned(native=native):
        got = _run(_ours(row, variant, backend), inputs, row.grads, weights)
    _check(row, variant, kind, dtype, inputs, got, weights)


@pytest.mark.parametrize(ARGS, cases(dtypes=True))
def test_non_contiguous_inputs(row, variant, kind, backend, dtype, gen):
    _need(kind)
    inputs = _make(row, variant, kind, dtype, gen)
    weights = _weights(gen)
    views, leaves = {}, {}
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and n not in row.contiguous]
    for i, name in enumerate(names):
        layout = LAYOUTS[i % 2]  # alternate, so that a kernel sees both in one call
        views[name], leaf = strided(inputs[name], layout, requires_grad=name in row.grads)
        assert not views[name].is_contiguous()
        if layout == "gaps" or inputs[name].dim() == 1:
            leaves[name] = leaf
    got = _run(_ours(row, variant, backend), {**inputs, **views}, row.grads, weights)
    _check(row, variant, kind, dtype, inputs, got, weights)
    for name in row.grads:
        if name in leaves:  # the gaps between the elements get no gradient
            assert bool((leaves[name].grad[..., 1::2] == 0).all())
    if row.layout_exact and row.deterministic(kind, **variant.call):
        with deterministic_algorithms():
            strided_out = _run(_ours(row, variant, backend), {**inputs, **views})
            contiguous_out = _run(_ours(row, variant, backend), inputs)
        for a, b in zip(_flat(strided_out), _flat(contiguous_out)):
            assert torch.equal(a, b), "the layout of the inputs changed the result"


# ---------------------------------------------------------------------------------- autocast


AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.bfloat16}


@pytest.mark.parametrize(ARGS, cases(kinds=("cpu", "cuda")))
def test_autocast(row, variant, kind, backend, dtype, gen):
    """Under torch.autocast (bf16 on the CPU and CUDA) an op takes float32 inputs and gives what it
    documents without autocast: float32 results (accumulation is the op's own, never lowered to
    bf16 mid-formula) within the float32 tolerance of the float64 reference, and gradients in
    the inputs' dtype."""
    _need(kind)
    inputs = _make(row, variant, kind, dtype, gen)
    weights = _weights(gen)
    with torch.autocast(DEVICE[kind], dtype=AUTOCAST_DTYPE[kind]):
        got = _run(_ours(row, variant, backend), inputs, row.grads, weights)
    _check(row, variant, kind, dtype, inputs, got, weights)
