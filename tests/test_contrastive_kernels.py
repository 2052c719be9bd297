"""Triton contrastive kernels (triton_kernels/contrastive.py) and their launch helpers
(triton_kernels/launch.py): the switches and tables on the host side, and, in the interpreter, the
symmetric NT-Xent kernels against the float64 reference and against the non-symmetric ones."""

from __future__ import annotations

import pytest
import torch
from _utils import rel_err, views

from coreset_ext import reference

pytest.importorskip("triton")

from coreset_ext.triton_kernels import launch


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"CORESET_EXT_AUTOTUNE": "1"}, True),
    ({"CORESET_EXT_AUTOTUNE": "0"}, False),
    ({"CORESET_EXT_AUTOTUNE": "1", "CORESET_EXT_NO_AUTOTUNE": "1"}, False),
    ({"CORESET_EXT_NO_AUTOTUNE": "1"}, False),
])
def test_autotuning_is_opt_in(env, expected, monkeypatch):
    for name in ("CORESET_EXT_AUTOTUNE", "CORESET_EXT_NO_AUTOTUNE", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch.autotune_enabled() is expected
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter never autotunes
    assert launch.autotune_enabled() is False


def test_autotuned_caches_winners_on_disk():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, BLOCK: tl.constexpr):
        pass

    tuned = launch.autotuned([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])(kernel)
    # Triton keeps winners in its cache directory when asked, except under its interpreter
    assert tuned.cache_results is not launch.interpreting()


# --------------------------------------------------------------------------------------------
# NT-Xent launchers in the interpreter: symmetric kernels (normalised rows, t >= FIXED_BOUND_MIN_T)
# against the float64 reference and against the non-symmetric kernels
# --------------------------------------------------------------------------------------------

interpreter = pytest.mark.skipif(not launch.interpreting(), reason="runs the kernels in Triton's interpreter")


def _launch_nt_xent(z1, z2, t, g, normalize=True, eps=1e-6):
    from coreset_ext.triton_kernels import contrastive

    loss, lse, cos = contrastive.nt_xent_fwd(z1, z2, t, normalize, eps)
    g1, g2 = contrastive.nt_xent_bwd(g, z1, z2, lse, t, normalize, eps)
    return loss, lse, cos, g1, g2


def _reference_nt_xent(z1, z2, t, g, normalize=True):
    loss, lse, cos = reference.nt_xent_forward(z1, z2, t, normalize_input=normalize)
    g1, g2 = reference.nt_xent_rows_backward(g, z1, z2, t, normalize_input=normalize, lse=lse)
    return loss, lse, cos, g1, g2


def _check_against_reference(b, d, t, dtype, tol, seed, normalize=True, correlated=True, device="cpu"):
    z1, z2 = views(b, d, seed=seed, correlated=correlated)
    g = torch.rand(2 * b, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.1
    ours = _launch_nt_xent(z1.to(device, dtype), z2.to(device, dtype), t, g.float().to(device), normalize)
    ours = [a.cpu() for a in ours]
    # the reference sees the inputs as rounded to dtype: the error left is the kernels' own
    want = _reference_nt_xent(z1.to(dtype).double(), z2.to(dtype).double(), t, g, normalize)
    for name, a, w in zip(("loss", "lse", "cos", "g1", "g2"), ours, want):
        assert a.dtype == (dtype if name in ("g1", "g2") else torch.float32), name
        assert a.shape == w.shape, name
        assert rel_err(a.double(), w) < tol, (name, rel_err(a.double(), w))
    return ours


@pytest.mark.triton
@interpreter
@pytest.mark.parametrize("b,d", [(1, 3), (3, 16), (17, 100), (37, 64), (70, 20)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_symmetric_matches_reference(b, d, dtype, tol, poison):
    """Sizes that are no multiple of the 32-row tile (2B = 34, 74, 140 rows: ragged last blocks),
    B = 1 (the positive is the only other row), d not a power of two."""
    from coreset_ext.triton_kernels import contrastive

    assert contrastive.symmetric(True, 0.2, d, dtype)
    _check_against_reference(b, d, 0.2, dtype, tol, seed=b * d)


@pytest.mark.triton
@interpreter
@pytest.mark.parametrize("run", [2, 3, 32])
def test_symmetric_tile_runs(run, monkeypatch, poison):
    """Several tiles per program (what large batches get on a GPU), runs that end before the last
    column block and runs cut by it: 2B = 260 rows in 9 blocks of 32."""
    from coreset_ext.triton_kernels import contrastive

    monkeypatch.setattr(contrastive, "symmetric_run", lambda n_blocks, device: run)
    _check_against_reference(130, 48, 0.1, torch.float32, 1e-5, seed=run)


@pytest.mark.triton
@interpreter
@pytest.mark.parametrize("b,d,t", [(37, 64, 0.5), (70, 100, 0.025)])
def test_symmetric_equals_non_symmetric(b, d, t, monkeypatch, poison):
    """The symmetric and the row-streaming kernels compute the same sums in another order: they
    agree to fp32 rounding, down to the smallest temperature that takes the fixed bound."""
    from coreset_ext.triton_kernels import contrastive

    assert t >= contrastive.FIXED_BOUND_MIN_T
    # independent views: with correlated ones at t = 0.025 every loss is ~1e-6, a difference of
    # two logits near 40 that fp32 resolves to its rounding alone
    z1, z2 = views(b, d, seed=b, dtype=torch.float32, correlated=False)
    g = torch.rand(2 * b, generator=torch.Generator().manual_seed(b)) + 0.1
    sym = _launch_nt_xent(z1, z2, t, g)
    monkeypatch.setattr(contrastive, "symmetric", lambda normalize, temperature, d, dtype: False)
    plain = _launch_nt_xent(z1, z2, t, g)
    for a, w in zip(sym, plain):
        assert rel_err(a, w) < 2e-6


@pytest.mark.triton
@interpreter
@pytest.mark.parametrize("normalize,t", [(False, 0.3), (True, 0.01)])
def test_fallback_where_the_fixed_bound_does_not_hold(normalize, t, poison):
    """Raw rows, or a temperature below FIXED_BOUND_MIN_T: the row-streaming kernels with a running
    maximum, against the reference."""
    from coreset_ext.triton_kernels import contrastive

    assert not contrastive.symmetric(normalize, t, 40, torch.float16)
    _check_against_reference(37, 40, t, torch.float32, 1e-4, seed=3, normalize=normalize, correlated=False)


@pytest.mark.triton
@interpreter
def test_symmetric_not_under_deterministic_algorithms():
    from coreset_ext.triton_kernels import contrastive

    torch.use_deterministic_algorithms(True)
    try:
        assert not contrastive.symmetric(True, 0.2, 64, torch.float16)
    finally:
        torch.use_deterministic_algorithms(False)


def _count_launches(monkeypatch):
    """Records the name of every Triton kernel launched (interpreter or compiled)."""
    from triton.runtime.interpreter import InterpretedFunction

    names = []
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counted)
    return names


@pytest.mark.triton
@interpreter
@pytest.mark.parametrize("symmetric,launches", [(True, 6), (False, 4)])
def test_launches_per_step(symmetric, launches, monkeypatch):
    """A forward and backward launch: symmetric, prologue + tiles + finish each way; the
    row-streaming kernels unsplit, prologue + tiles each way. No concatenation of z1 and z2 and no
    copy of the gradient halves: the only tensors made are outputs and fp32 work buffers."""
    from coreset_ext.triton_kernels import contrastive

    monkeypatch.setattr(contrastive, "symmetric", lambda normalize, temperature, d, dtype: symmetric)
    monkeypatch.setattr(contrastive, "column_splits", lambda n, block_m, device: 1)
    names = _count_launches(monkeypatch)
    z1, z2 = views(20, 16, seed=1, dtype=torch.float32)
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("torch.cat in a launcher") or cat(*a, **k))
    _launch_nt_xent(z1, z2, 0.2, torch.ones(40))
    assert len(names) == launches, names


# --------------------------------------------------------------------------------------------
# MoCo InfoNCE against a queue
# --------------------------------------------------------------------------------------------


def _launch_moco(q, k, queue, t, g, **kwargs):
    from coreset_ext.triton_kernels import contrastive

    loss, lse, cos = contrastive.info_nce_queue_fwd(q, k, queue, t, True, 1e-6, **kwargs)
    return loss, lse, cos, contrastive.info_nce_queue_bwd(g, q, k, queue, lse, t, True, 1e-6)


def _moco_inputs(b, kq, d, seed):
    q, k = views(b, d, seed=seed, dtype=torch.float32)
    queue = torch.randn(kq, d, generator=torch.Generator().manual_seed(seed))
    return q, k, queue, torch.rand(b, generator=torch.Generator().manual_seed(seed)) + 0.1


@pytest.mark.triton
@interpreter
@pytest.mark.parametrize("t", [0.2, 0.01])
def test_moco_many_splits_against_reference(t, monkeypatch, poison):
    """More queue splits than the combine merges per load (16), some of them empty; with the fixed
    bound (t = 0.2) and with a running maximum (t = 0.01)."""
    from coreset_ext.triton_kernels import contrastive

    monkeypatch.setattr(contrastive, "_queue_splits", lambda b, k, bm, bn, device: 20)
    q, k, queue, g = _moco_inputs(5, 700, 24, seed=2)
    loss, lse, cos, gq = _launch_moco(q, k, queue, t, g)
    ref_loss, ref_lse, ref_cos = reference.info_nce_queue_forward(q.double(), k.double(), queue.double(), t)
    ref_gq = reference.info_nce_queue_rows_backward(g.double(), q.double(), k.double(), queue.double(), t,
                                                    lse=ref_lse)
    for a, w in ((loss, ref_loss), (lse, ref_lse), (cos, ref_cos), (gq, ref_gq)):
        assert rel_err(a.double(), w) < 1e-5


@pytest.mark.triton
@interpreter
def test_moco_deterministic_and_cached_queue_norms(monkeypatch, poison):
    """Under deterministic algorithms the splits' gradients go to slots summed in order (two runs
    bit-identical, equal to the atomics' sum within rounding); a caller's cached queue norms give
    the forward it computes itself."""
    from coreset_ext.triton_kernels import contrastive

    monkeypatch.setattr(contrastive, "_queue_splits", lambda b, k, bm, bn, device: 3)
    q, k, queue, g = _moco_inputs(7, 200, 16, seed=3)
    atomics = _launch_moco(q, k, queue, 0.2, g)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _launch_moco(q, k, queue, 0.2, g), _launch_moco(q, k, queue, 0.2, g)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first[3], second[3])
    assert rel_err(first[3], atomics[3]) < 1e-6
    cached = _launch_moco(q, k, queue, 0.2, g, queue_rnorm=contrastive.row_rnorm(queue, 1e-6))
    for a, w in zip(cached, atomics):
        assert torch.equal(a, w)


# --------------------------------------------------------------------------------------------
# on a GPU (tools/gpu_session.sh issue14 runs these)
# --------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or launch.interpreting(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("b", [1000, 4096])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gpu_symmetric_and_streaming_bf16(b, symmetric, monkeypatch):
    """Both NT-Xent families on the GPU in bf16 against float64 (the error left is bf16's rounding
    of the weights in the gradient products: GPU-FIGURES measured 1.7e-3 at B = 4096)."""
    from coreset_ext.triton_kernels import contrastive

    if not symmetric:
        monkeypatch.setattr(contrastive, "symmetric", lambda normalize, temperature, d, dtype: False)
    assert contrastive.symmetric(True, 0.2, 128, torch.bfloat16) == symmetric
    _check_against_reference(b, 128, 0.2, torch.bfloat16, 1e-2, seed=b, device="cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("tf32", [False, True])
def test_gpu_fp32(tf32, monkeypatch):
    """fp32 with TF32 off (3xTF32: fp32's accuracy) and on (TF32, symmetric kernels)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    _check_against_reference(1000, 128, 0.2, torch.float32, 1e-2 if tf32 else 1e-5, seed=5, device="cuda")


@pytest.mark.cuda
@needs_cuda
def test_gpu_new_batch_sizes_compile_nothing():
    """After one step, other batch sizes (2B divisible by 16 or not, more tiles per run) launch the
    kernels already compiled: the count of compiled variants does not grow."""
    from coreset_ext import ops
    from coreset_ext.triton_kernels import contrastive as C

    kernels = [C._info_nce_prologue_kernel, C._nt_xent_sym_fwd_kernel, C._nt_xent_sym_bwd_kernel,
               C._info_nce_fwd_combine_kernel, C._info_nce_bwd_combine_kernel]

    def step(b):
        z1 = torch.randn(b, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ops.nt_xent(z1, torch.randn(b, 128, device="cuda", dtype=torch.bfloat16), 0.5, backend="triton").backward()
        torch.cuda.synchronize()

    def compiled():
        return sum(len(k.device_caches[torch.cuda.current_device()][0]) for k in kernels)

    step(1000)
    before = compiled()
    for b in (1001, 1500, 3000):
        step(b)
    assert compiled() == before > 0
