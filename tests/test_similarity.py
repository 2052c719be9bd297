"""cosine_rowsum and cosine_topk against float64 brute force (full n x m matrices, small sizes).
opcheck, torch.compile and the other contracts every op keeps: tests/test_contracts.py."""

from __future__ import annotations

import pytest
import torch
from _utils import rel_err, triton_interpreter_available

import coreset_ext as cx
from coreset_ext import _backend, ops, reference


def brute_rowsum(x, y=None, clamp_min=0.0, gx=None, gy=None, exclude_self=False):
    """The formula written out over a dense float64 matrix (tests only)."""
    x = x.double()
    y = x if y is None else y.double()
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(reference.EPS)
    yn = y / y.norm(dim=1, keepdim=True).clamp_min(reference.EPS)
    s = (xn @ yn.T).clamp_min(clamp_min)
    keep = torch.ones_like(s, dtype=torch.bool)
    if gx is not None:
        keep &= gx[:, None] == (gx if gy is None else gy)[None, :]
    if exclude_self:
        keep &= ~torch.eye(s.shape[0], s.shape[1], dtype=torch.bool)
    return (s * keep).sum(dim=1)


def brute_topk(x, k, y=None, exclude_self=True):
    """Per row, a Python sort by (-value, index): the documented order and tie rule."""
    x = x.double()
    yy = x if y is None else y.double()
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(reference.EPS)
    yn = yy / yy.norm(dim=1, keepdim=True).clamp_min(reference.EPS)
    s = xn @ yn.T
    vals, idxs = [], []
    for i in range(s.shape[0]):
        cand = [(-float(s[i, j]), j) for j in range(s.shape[1]) if not (exclude_self and y is None and j == i)]
        cand.sort()
        vals.append([-v for v, _ in cand[:k]])
        idxs.append([j for _, j in cand[:k]])
    return torch.tensor(vals, dtype=torch.float64), torch.tensor(idxs, dtype=torch.int64)


def _data(n, d, seed, groups=0, m=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = None if m is None else torch.randn(m, d, generator=g)
    gx = torch.randint(0, groups, (n,), generator=g) if groups else None
    gy = torch.randint(0, groups, (m,), generator=g) if (groups and m is not None) else None
    return x, y, gx, gy


# ---------------------------------------------------------------------------------- rowsum, CPU

@pytest.mark.parametrize("n,d,groups,clamp,excl", [
    (1, 3, 0, 0.0, False), (37, 5, 0, 0.0, True), (130, 17, 4, 0.0, False), (129, 8, 3, 0.2, True),
    (200, 16, 0, -1.0, False), (64, 33, 7, -0.3, True),
])
def test_rowsum_cpu_matches_float64(n, d, groups, clamp, excl):
    x, _, gx, _ = _data(n, d, seed=n + d, groups=groups)
    want = brute_rowsum(x, clamp_min=clamp, gx=gx, exclude_self=excl)
    got = ops.cosine_rowsum(x, clamp_min=clamp, groups=gx, exclude_self=excl)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert rel_err(got, want) < 1e-5
    got64 = reference.cosine_rowsum(x.double(), clamp_min=clamp, groups=gx, exclude_self=excl, chunk_size=7)
    assert rel_err(got64, want) < 1e-12


def test_rowsum_cpu_separate_y_with_groups():
    x, y, gx, gy = _data(45, 9, seed=3, groups=3, m=71)
    want = brute_rowsum(x, y, clamp_min=0.1, gx=gx, gy=gy)
    got = ops.cosine_rowsum(x, y, clamp_min=0.1, groups=gx, y_groups=gy)
    assert rel_err(got, want) < 1e-5


def test_rowsum_non_contiguous_and_zero_rows():
    x = torch.randn(40, 24)[:, ::2]  # non-contiguous
    x[3] = 0.0  # all-zero row: cosine 0 with every row (norm clamped by EPS)
    want = brute_rowsum(x, exclude_self=True)
    assert rel_err(ops.cosine_rowsum(x, exclude_self=True), want) < 1e-5
    assert float(ops.cosine_rowsum(x, exclude_self=True)[3]) == 0.0


# ---------------------------------------------------------------------------------- topk, CPU

@pytest.mark.parametrize("n,d,k,excl", [(2, 3, 1, True), (33, 5, 7, True), (70, 16, 50, False), (101, 9, 64, True)])
def test_topk_cpu_matches_bruteforce(n, d, k, excl):
    x, _, _, _ = _data(n, d, seed=k + n)
    want_v, want_i = brute_topk(x, k, exclude_self=excl)
    v, i = ops.cosine_topk(x, k, exclude_self=excl)
    assert v.dtype == torch.float32 and i.dtype == torch.int64 and v.shape == i.shape == (n, k)
    assert torch.equal(i, want_i)
    assert rel_err(v, want_v) < 1e-5


def test_topk_cpu_separate_y_and_ties():
    x, y, _, _ = _data(20, 4, seed=11, m=30)
    want_v, want_i = brute_topk(x, 6, y=y)
    v, i = ops.cosine_topk(x, 6, y=y)  # exclude_self is ignored for a separate y
    assert torch.equal(i, want_i) and rel_err(v, want_v) < 1e-5
    # Exact ties: duplicated rows of y tie; the lowest indices are kept, in ascending order.
    y = torch.randn(5, 4).repeat(4, 1)  # row r equals rows r+5, r+10, r+15
    q = y[2:3] + 0.0
    v, i = ops.cosine_topk(q, 3, y=y)
    assert i.tolist() == [[2, 7, 12]]
    v, i = reference.cosine_topk(q.double(), 3, y=y.double(), chunk_size=1)
    assert i.tolist() == [[2, 7, 12]]


# ---------------------------------------------------------------------------------- Triton (interpreter)

triton_only = pytest.mark.triton


def _triton_here():
    if not triton_interpreter_available():
        pytest.skip("needs TRITON_INTERPRET=1 (or a GPU)")


@triton_only
@pytest.mark.parametrize("n,d,groups,clamp,excl", [(1, 3, 0, 0.0, False), (37, 20, 0, 0.0, True),
                                                   (53, 16, 3, 0.1, False), (40, 7, 5, -0.5, True)])
def test_rowsum_triton_interpreter(n, d, groups, clamp, excl):
    _triton_here()
    x, _, gx, _ = _data(n, d, seed=n * 3 + d, groups=groups)
    want = brute_rowsum(x, clamp_min=clamp, gx=gx, exclude_self=excl)
    got = ops.cosine_rowsum(x, clamp_min=clamp, groups=gx, exclude_self=excl, backend="triton")
    assert rel_err(got, want) < 1e-5


@triton_only
def test_rowsum_triton_separate_y_groups():
    _triton_here()
    x, y, gx, gy = _data(29, 18, seed=5, groups=3, m=41)
    want = brute_rowsum(x, y, clamp_min=0.0, gx=gx, gy=gy)
    assert rel_err(ops.cosine_rowsum(x, y, groups=gx, y_groups=gy, backend="triton"), want) < 1e-5
    want = brute_rowsum(x, y, clamp_min=0.0)
    assert rel_err(ops.cosine_rowsum(x, y, backend="triton"), want) < 1e-5


@triton_only
@pytest.mark.parametrize("n,m,d,k,excl", [(35, None, 20, 5, True), (17, 50, 8, 16, True), (40, None, 16, 20, False)])
def test_topk_triton_interpreter(n, m, d, k, excl):
    _triton_here()
    x, y, _, _ = _data(n, d, seed=n + k, m=m)
    want_v, want_i = brute_topk(x, k, y=y, exclude_self=excl)
    v, i = ops.cosine_topk(x, k, y=y, exclude_self=excl, backend="triton")
    assert torch.equal(i, want_i)
    assert rel_err(v, want_v) < 1e-5


@triton_only
def test_triton_gpu_tiles(monkeypatch):
    """The GPU's 64-wide tiles (the interpreter runs 16 otherwise), ragged in rows and in d, with
    several d tiles: row sums with groups and self-exclusion, and top-k."""
    _triton_here()
    from coreset_ext.triton_kernels import similarity

    cfg = similarity.tiles
    monkeypatch.setattr(similarity, "tiles", lambda device, d: cfg(torch.device("cuda"), d))
    x, y, gx, gy = _data(150, 100, seed=9, groups=3, m=130)
    got = ops.cosine_rowsum(x, y, groups=gx, y_groups=gy, clamp_min=0.1, backend="triton")
    assert rel_err(got, brute_rowsum(x, y, clamp_min=0.1, gx=gx, gy=gy)) < 1e-5
    got = ops.cosine_rowsum(x, groups=gx, exclude_self=True, backend="triton")
    assert rel_err(got, brute_rowsum(x, gx=gx, exclude_self=True)) < 1e-5
    want_v, want_i = brute_topk(x, 10, exclude_self=True)
    v, i = ops.cosine_topk(x, 10, exclude_self=True, backend="triton")
    assert torch.equal(i, want_i) and rel_err(v, want_v) < 1e-5


@triton_only
def test_topk_triton_ties_keep_lowest_index():
    _triton_here()
    y = torch.randn(5, 16).repeat(8, 1)  # 40 rows: row r equals rows r+5, r+10, ...
    v, i = ops.cosine_topk(y[1:2] + 0.0, 4, y=y, backend="triton")
    assert i.tolist() == [[1, 6, 11, 16]]


@triton_only
def test_compile_fullgraph_over_triton_path(monkeypatch):
    """The automatic Triton choice (as on a GPU) traces under torch.compile: the op is opaque and
    its fake kernel gives the shapes, so the interpreter runs only at run time."""
    _triton_here()
    auto = _backend.default_backend
    monkeypatch.setattr(_backend, "default_backend",
                        lambda op, device: "triton" if op.startswith("cosine_") else auto(op, device))
    x, _, gx, _ = _data(40, 16, seed=12, groups=3)

    @torch.compile(fullgraph=True)
    def f(x, g):
        return ops.cosine_rowsum(x, groups=g) + 1, ops.cosine_topk(x, 4)[1]

    r, i = f(x, gx)
    assert rel_err(r - 1, brute_rowsum(x, gx=gx)) < 1e-5
    assert torch.equal(i, brute_topk(x, 4)[1])


# ---------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.cuda


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_rowsum_and_topk(dtype):
    x, _, gx, _ = _data(3001, 128, seed=1, groups=7)
    xd = x.cuda().to(dtype)
    xr = xd.float().cpu()  # the rounded inputs the kernel sees
    tol = 2e-3 if dtype == torch.float32 else 1e-2  # TF32 products / bf16 inputs
    for g in (None, gx):
        want = brute_rowsum(xr, gx=g, exclude_self=True)
        got = ops.cosine_rowsum(xd, groups=None if g is None else g.cuda(), exclude_self=True)
        assert rel_err(got.cpu(), want) < tol
    v, i = ops.cosine_topk(xd, 50)
    xn = reference.normalize(xr.double())
    true = (xn[:, None, :] * xn[i.cpu()]).sum(-1)  # the returned neighbours' exact cosines
    assert rel_err(v.cpu(), true) < tol
    want_v, _ = reference.cosine_topk(xr.double(), 50)
    assert rel_err(v.cpu(), want_v) < tol
    assert (i.cpu() != torch.arange(3001)[:, None]).all()


# ---------------------------------------------------------------------------------- plumbing

def test_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="groups"):
        ops.cosine_rowsum(x, groups=torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match="groups"):
        ops.cosine_rowsum(x, groups=torch.zeros(10))
    with pytest.raises(ValueError, match="y_groups"):
        ops.cosine_rowsum(x, torch.randn(5, 4), groups=torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ValueError, match="y_groups"):
        ops.cosine_rowsum(x, torch.randn(5, 4), groups=torch.zeros(10, dtype=torch.int64),
                          y_groups=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="exclude_self"):
        ops.cosine_rowsum(x, torch.randn(5, 4), exclude_self=True)
    with pytest.raises(ValueError, match="y has 3 columns"):
        ops.cosine_rowsum(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="x must be"):
        ops.cosine_rowsum(torch.randn(10))
    with pytest.raises(ValueError, match="NaN"):
        ops.cosine_rowsum(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="clamp_min"):
        ops.cosine_rowsum(x, clamp_min=float("inf"))
    with pytest.raises(ValueError, match="k must"):
        ops.cosine_topk(x, 10)  # only 9 others
    with pytest.raises(ValueError, match="k must"):
        ops.cosine_topk(x, 0)
    assert ops.cosine_topk(x, 10, exclude_self=False)[1].shape == (10, 10)
    with pytest.raises(ValueError, match="y is"):
        ops.cosine_topk(x, 2, y=torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend"):
        ops.cosine_topk(x, 2, backend="cuda")


def test_float64_served_exactly():
    x = torch.randn(30, 5, dtype=torch.float64)
    got = cx.ops.cosine_rowsum(x)
    assert got.dtype == torch.float64 and rel_err(got, brute_rowsum(x)) < 1e-12
