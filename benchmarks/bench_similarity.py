"""cosine_rowsum (SAS) and cosine_topk (ELFS k-NN) against chunked eager PyTorch.

GPU sizes (n = 50k and 1M for the row sum, 100k and 1M for top-k; d = 128, k = 50) run only on
CUDA; the CPU runs a small size so that the suite stays quick. Floor: 2 * n^2 * d flops at the
TF32 rate (float32 inputs; the eager baselines run their matmuls in TF32 too). At n = 1M each
eager call takes seconds, so those sizes time 3 rounds after 1 warm-up. Peers: none installs as a small wheel for these ops (faiss-gpu does
not), so the baselines are the reference (eager) and, for the row sum, its chunk under
torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import floor_seconds, measure
from coreset_ext import ops, reference

D = 128
K = 50
CHUNK = 1024  # rows per block of the eager baselines: 1024 x 1M float32 = 4 GB at n = 1M

ROWSUM_SIZES = [
    pytest.param(("cpu", 2048), id="cpu-n2048"),
    pytest.param(("cuda", 50_000), id="cuda-n50k", marks=pytest.mark.cuda),
    pytest.param(("cuda", 1_000_000), id="cuda-n1M", marks=pytest.mark.cuda),
]
TOPK_SIZES = [
    pytest.param(("cpu", 2048), id="cpu-n2048"),
    pytest.param(("cuda", 100_000), id="cuda-n100k", marks=pytest.mark.cuda),
    pytest.param(("cuda", 1_000_000), id="cuda-n1M", marks=pytest.mark.cuda),
]


@pytest.fixture(autouse=True)
def _tf32_matmuls():
    """The Triton kernels multiply float32 in TF32; let the eager baselines' matmuls do the same,
    so that both are measured against the same (TF32) floor."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def _setup(case):
    device, n = case
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, D, device=device, generator=g)
    groups = torch.randint(0, 10, (n,), device=device, generator=g)
    # Big GPU sizes take seconds per call: a few timed rounds are enough.
    rounds = 3 if n >= 1_000_000 else None
    return device, n, x, groups, rounds


@pytest.mark.parametrize("case", ROWSUM_SIZES)
@pytest.mark.parametrize("impl", ["eager", "compile", "coreset_ext"])
def test_cosine_rowsum(benchmark, case, impl):
    device, n, x, _, rounds = _setup(case)
    if impl == "coreset_ext":
        fn = lambda: ops.cosine_rowsum(x)  # noqa: E731
    elif impl == "eager":
        fn = lambda: reference.cosine_rowsum(x, chunk_size=CHUNK)  # noqa: E731
    else:
        if device == "cpu":
            pytest.skip("compile baseline is measured on the GPU only")
        xn = reference.normalize(x)
        block = torch.compile(lambda rows, cols: (rows @ cols.T).clamp_min(0.0).sum(dim=1), dynamic=False)
        fn = lambda: torch.cat([block(xn[s : s + CHUNK], xn) for s in range(0, n, CHUNK)])  # noqa: E731
    measure(benchmark, fn, op="cosine_rowsum", impl=impl, size={"n": n, "d": D}, device=device,
            dtype=torch.float32, pass_="fwd", floor_s=floor_seconds(flops=2 * n * n * D, dtype=torch.float32),
            rounds=rounds, warmup=1 if rounds else 2)


@pytest.mark.parametrize("case", ROWSUM_SIZES[:2])
@pytest.mark.parametrize("impl", ["eager", "coreset_ext"])
def test_cosine_rowsum_groups(benchmark, case, impl):
    """SAS's use: 10 latent classes, so only same-class pairs count (about n^2 / 10 of the work)."""
    device, n, x, groups, rounds = _setup(case)
    if impl == "coreset_ext":
        fn = lambda: ops.cosine_rowsum(x, groups=groups)  # noqa: E731
    else:
        fn = lambda: reference.cosine_rowsum(x, groups=groups, chunk_size=CHUNK)  # noqa: E731
    measure(benchmark, fn, op="cosine_rowsum_groups10", impl=impl, size={"n": n, "d": D, "groups": 10},
            device=device, dtype=torch.float32, pass_="fwd",
            floor_s=floor_seconds(flops=2 * n * n * D / 10, dtype=torch.float32), rounds=rounds)


@pytest.mark.parametrize("case", TOPK_SIZES)
@pytest.mark.parametrize("impl", ["eager", "coreset_ext"])
def test_cosine_topk(benchmark, case, impl):
    device, n, x, _, rounds = _setup(case)
    if impl == "coreset_ext":
        fn = lambda: ops.cosine_topk(x, K)  # noqa: E731
    else:
        fn = lambda: reference.cosine_topk(x, K, chunk_size=CHUNK)  # noqa: E731
    measure(benchmark, fn, op="cosine_topk", impl=impl, size={"n": n, "d": D, "k": K}, device=device,
            dtype=torch.float32, pass_="fwd", floor_s=floor_seconds(flops=2 * n * n * D, dtype=torch.float32),
            rounds=rounds, warmup=1 if rounds else 2)
