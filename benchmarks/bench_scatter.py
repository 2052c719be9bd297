"""Scatter of 65,536 scores into buffers of 50k, 1M and 10M: ours against index_add_, scatter_add_
and index_put_(accumulate=True), unique and duplicate indices."""

import pytest
import torch

import coreset_ext as cx
from benchmarks.common import devices, floor_seconds, measure

M = 65_536
BUFFERS = [50_000, 1_000_000, 10_000_000]


def impls(scores, index, values):
    return {
        "coreset_ext": lambda: cx.ops.score_scatter_add_(scores, index, values),
        "coreset_ext_unvalidated": lambda: cx.ops.score_scatter_add_(scores, index, values, validate=False),
        "coreset_ext_deterministic": lambda: cx.ops.score_scatter_add_(scores, index, values, deterministic=True),
        "index_add_": lambda: scores.index_add_(0, index, values),
        "scatter_add_": lambda: scores.scatter_add_(0, index, values),
        "index_put_": lambda: scores.index_put_((index,), values, accumulate=True),
    }


@pytest.mark.parametrize("impl", ["coreset_ext", "coreset_ext_unvalidated", "coreset_ext_deterministic", "index_add_", "scatter_add_", "index_put_"])
@pytest.mark.parametrize("indices", ["unique", "duplicate"])
@pytest.mark.parametrize("n", BUFFERS)
@pytest.mark.parametrize("device", devices())
def test_scatter(benchmark, device, n, indices, impl):
    g = torch.Generator().manual_seed(0)
    if indices == "unique":  # unique where the buffer allows it (a 50k buffer repeats some)
        index = torch.randperm(max(n, M), generator=g)[:M] % n
    else:  # 64 distinct examples, each seen 1024 times: the worst case for atomics
        index = torch.randint(0, 64, (M,), generator=g)
    scores = torch.zeros(n, device=device)
    index = index.to(device)
    values = torch.randn(M, generator=g).to(device)
    fn = impls(scores, index, values)[impl]
    # bytes: index (8) and value (4) read, one 4-byte read-modify-write per entry
    floor = floor_seconds(bytes_moved=M * (8 + 4 + 8), dtype=torch.float32)
    measure(benchmark, fn, op="score_scatter_add_", impl=impl,
            size={"n": n, "m": M, "indices": indices}, device=device, dtype=torch.float32,
            floor_s=floor)
