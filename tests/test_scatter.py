"""score_scatter_add_ against a naive float64 loop for each kind of duplication; bad input; the
kernels' own bounds checks; the reference backend without _C. opcheck, torch.compile,
determinism, poisoned outputs and non-contiguous inputs: tests/test_contracts.py."""

import pytest
import torch
from _utils import deterministic_algorithms

import coreset_ext as cx
from coreset_ext import _backend

INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def naive(scores, index, values):
    """Independent oracle: one float64 addition per entry, in a Python loop."""
    out = scores.double().cpu().clone()
    for i, v in zip(index.cpu().tolist(), values.double().cpu().tolist()):
        out[i] += v
    return out


def make_index(kind, n, m, gen, dtype):
    if kind == "unique":
        idx = torch.randperm(n, generator=gen)[:m]
    elif kind == "all_equal":
        idx = torch.full((m,), int(torch.randint(0, n, (), generator=gen)))
    elif kind == "half_equal":
        idx = torch.randint(0, n, (m,), generator=gen)
        idx[: m // 2] = idx[0]
    else:
        idx = torch.randint(0, n, (m,), generator=gen)
    return idx.to(dtype)


def tolerance(values_dtype, m):
    # float32 accumulation of m terms in an order the oracle does not follow
    return 1e-6 * max(1.0, m**0.5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("kind", ["unique", "all_equal", "half_equal", "random"])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_naive(device, kind, index_dtype, value_dtype, deterministic, gen):
    n, m = 257, 200
    scores = torch.randn(n, generator=gen).to(device)
    index = make_index(kind, n, m, gen, index_dtype).to(device)
    values = torch.randn(m, generator=gen).to(value_dtype).to(device)
    expected = naive(scores, index, values)
    out = cx.ops.score_scatter_add_(scores, index, values, deterministic=deterministic)
    assert out is scores
    err = (scores.double().cpu() - expected).abs().max().item()
    assert err <= tolerance(value_dtype, m) * expected.abs().max().item() + 1e-6


@pytest.mark.cuda
def test_deterministic_flag_is_followed_on_cuda(gen):
    index = torch.randint(0, 10, (65536,), generator=gen).cuda()
    values = torch.randn(65536, generator=gen).cuda()
    outs = []
    with deterministic_algorithms():
        for _ in range(3):
            s = torch.zeros(10, device="cuda")
            cx.ops.score_scatter_add_(s, index, values)
            outs.append(s)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bad_input(device):
    s = torch.zeros(5, device=device)
    i = torch.tensor([0, 1], device=device)
    v = torch.ones(2, device=device)
    with pytest.raises(ValueError, match="index contains 5"):
        cx.ops.score_scatter_add_(s, torch.tensor([0, 5], device=device), v, validate=True)
    with pytest.raises(ValueError, match="index contains -1"):
        cx.ops.score_scatter_add_(s, torch.tensor([-1, 0], device=device), v, validate=True)
    with pytest.raises(ValueError, match="validate must be"):
        cx.ops.score_scatter_add_(s, i, v, validate="host")
    with pytest.raises(ValueError, match="index has 2 entries but values has 3"):
        cx.ops.score_scatter_add_(s, i, torch.ones(3, device=device))
    with pytest.raises(ValueError, match="index must be"):
        cx.ops.score_scatter_add_(s, i.float(), v)
    with pytest.raises(ValueError, match="index must be"):
        cx.ops.score_scatter_add_(s, i[None], v)
    with pytest.raises(ValueError, match="values must be"):
        cx.ops.score_scatter_add_(s, i, v.double())
    with pytest.raises(ValueError, match="scores must be"):
        cx.ops.score_scatter_add_(s.double(), i, v)
    with pytest.raises(ValueError, match="scores must be"):
        cx.ops.score_scatter_add_(torch.zeros(5, 2, device=device), i, v)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cx.ops.score_scatter_add_(s, i, torch.tensor([1.0, float("nan")], device=device), validate=True)
    with pytest.raises(ValueError, match="share memory"):
        cx.ops.score_scatter_add_(s, torch.tensor([1, 2, 3, 4, 0], device=device), s)
    with pytest.raises(ValueError, match="share memory"):
        cx.ops.score_scatter_add_(s, i, s[3:])
    with pytest.raises(ValueError, match="require grad"):
        cx.ops.score_scatter_add_(torch.zeros(5, device=device, requires_grad=True), i, v)
    assert torch.equal(s, torch.zeros(5, device=device)), "a rejected call must not write"
    cx.ops.score_scatter_add_(s, i, torch.tensor([1.0, float("inf")], device=device), validate=False)
    assert s[1].item() == float("inf")  # what validate=False is for


@pytest.mark.parametrize("index_dtype,value_dtype", [(torch.int64, torch.float32), (torch.int32, torch.bfloat16)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_device_validation_leaves_bad_entries_out_and_reports_them(device, index_dtype, value_dtype, gen):
    """validate="device" (the default): no host synchronisation; entries with an index out of
    range or a non-finite value are not written (the rest are, duplicates summed), and the next
    host-side check (check_scatter_errors, or a call with validate=True) raises naming the
    problem, once."""
    n, m = 31, 40
    index = torch.randint(0, n, (m,), generator=gen)
    values = torch.randn(m, generator=gen)
    bad = torch.randperm(m, generator=gen)[:6]
    index[bad[:2]] = torch.tensor([n + 4, -3])
    values[bad[2:4]] = torch.tensor([float("nan"), float("-inf")])
    good = torch.ones(m, dtype=torch.bool)
    good[bad[:4]] = False
    index, values = index.to(index_dtype), values.to(value_dtype)  # (the CPU screen is one C++ pass per dtype pair)
    expected = naive(torch.zeros(n), index[good], values[good])
    s = torch.zeros(n, device=device)
    cx.ops.score_scatter_add_(s, index.to(device), values.to(device))
    assert torch.allclose(s.double().cpu(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="index contains -3"):  # the lowest, then the highest
        cx.ops.check_scatter_errors(s)
    cx.ops.check_scatter_errors(s)  # reported once
    cx.ops.score_scatter_add_(s, index[good].to(device), torch.full((int(good.sum()),), float("nan"), device=device))
    with pytest.raises(ValueError, match="NaN or Inf"):  # the next validate=True call checks first
        cx.ops.score_scatter_add_(s, index[:1].to(device), values[:1].to(device), validate=True)
    assert torch.allclose(s.double().cpu(), expected, atol=1e-6), "nothing non-finite was written"


@pytest.mark.cuda
def test_device_validation_does_not_synchronise():
    s = torch.zeros(100, device="cuda")
    index, values = torch.tensor([1, 500, 2], device="cuda"), torch.tensor([1.0, 2.0, float("nan")], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        cx.ops.score_scatter_add_(s, index, values)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match="index contains 500"):
        cx.ops.check_scatter_errors(s)


@pytest.mark.cuda
def test_mismatched_devices():
    with pytest.raises(ValueError, match="must share a device"):
        cx.ops.score_scatter_add_(torch.zeros(5, device="cuda"), torch.tensor([0]), torch.ones(1, device="cuda"))


def test_cpu_kernel_checks_bounds_itself():
    """Called past the wrapper, the compiled kernel still refuses to write out of bounds.

    Run in a subprocess: on the lent GPU machine a C++ exception thrown from an extension has been
    seen to kill the process (torch's own exceptions were fine); there this is reported as a skip
    rather than taking the whole test session down. Everywhere else it must raise cleanly.
    """
    import subprocess
    import sys

    if not _backend.has_extension():
        pytest.skip("_C not built")
    code = (
        "import torch, coreset_ext\n"
        "s = torch.zeros(4)\n"
        "try:\n"
        "    torch.ops.coreset_ext.score_scatter_add_(s, torch.tensor([0, 1, 4]), torch.ones(3), False)\n"
        "except IndexError as e:\n"
        "    assert 'index contains 4, out of range' in str(e), e\n"
        "    assert s.tolist() == [0.0] * 4, 'bounds are checked before the first write'\n"
        "    print('raised')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode < 0 and torch.cuda.is_available():
        pytest.skip(f"C++ exceptions from extensions crash this environment (signal {-out.returncode})")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "raised"


@pytest.mark.cuda
def test_cuda_kernel_skips_out_of_range():
    s = torch.zeros(4, device="cuda")
    torch.ops.coreset_ext.score_scatter_add_(s, torch.tensor([0, 7, -3], device="cuda"),
                                             torch.ones(3, device="cuda"), False)
    assert s.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_reference_backend_without_extension(tmp_path):
    """With _C missing, the package imports, warns once how to build, and the op still works."""
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "sys.modules['coreset_ext._C'] = None\n"  # makes `from coreset_ext import _C` fail
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, coreset_ext as cx\n"
        "    s = torch.zeros(3)\n"
        "    cx.ops.score_scatter_add_(s, torch.tensor([2, 2]), torch.tensor([1., 2.]))\n"
        "msgs = [str(x.message) for x in w if 'pip install' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert s.tolist() == [0.0, 0.0, 3.0], s\n"
        "from coreset_ext import _backend\n"
        "assert _backend.select_backend('score_scatter_add_', torch.device('cpu')) == 'reference'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_unvalidated_calls_match_and_never_write_out_of_bounds(device, gen):
    n, m = 64, 500
    index = torch.randint(0, n, (m,), generator=gen).to(device)
    values = torch.randn(m, generator=gen).to(device)
    a = torch.zeros(n, device=device)
    b = torch.zeros(n, device=device)
    cx.ops.score_scatter_add_(a, index, values, deterministic=True)
    cx.ops.score_scatter_add_(b, index, values, deterministic=True, validate=False)
    assert torch.equal(a, b)
    if device == "cuda":  # the CUDA kernel skips what the wrapper no longer checks
        guard = torch.zeros(n + 8, device=device)
        buf = guard[:n]
        cx.ops.score_scatter_add_(buf, torch.tensor([n, n + 3, -1, 0], device=device),
                                  torch.ones(4, device=device), validate=False)
        assert guard.tolist() == [1.0] + [0.0] * (n + 7)
