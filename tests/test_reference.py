"""The reference ops against naive float64 formulas written independently here."""

import math

import pytest
import torch

from coreset_ext import reference as ref


def naive_nt_xent_rows(z1, z2, t):
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-6)
    n, b = z.shape[0], z1.shape[0]
    out = []
    for i in range(n):
        p = (i + b) % n
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(n) if j != i)
        out.append(-float(z[i] @ z[p]) / t + math.log(denom))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("b,d", [(1, 3), (5, 8), (13, 4)])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_rows(b, d, t, gen):
    z1 = torch.randn(b, d, generator=gen, dtype=torch.float64)
    z2 = torch.randn(b, d, generator=gen, dtype=torch.float64)
    rows, cos = ref.nt_xent_rows(z1, z2, t, chunk_size=3)  # chunk smaller than 2B: exercises chunking
    torch.testing.assert_close(rows, naive_nt_xent_rows(z1, z2, t))
    expected_cos = torch.tensor([float(z1[i] @ z2[i] / (z1[i].norm() * z2[i].norm())) for i in range(b)],
                                dtype=torch.float64)
    torch.testing.assert_close(cos, expected_cos)
    assert ref.nt_xent(z1, z2, t, reduction="sum").item() == pytest.approx(rows.sum().item())
    assert ref.nt_xent(z1, z2, t).item() == pytest.approx(rows.mean().item())


def test_nt_xent_gradcheck_chunked(gen):
    z1 = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ref.nt_xent(a, b, 0.3, chunk_size=3), (z1, z2))


def test_nt_xent_low_temperature_no_overflow(gen):
    z1 = torch.randn(64, 16, generator=gen)
    loss = ref.nt_xent(z1, z1 + 0.01 * torch.randn(64, 16, generator=gen), 0.01)
    assert torch.isfinite(loss)


def test_info_nce_queue(gen):
    b, d, k, t = 6, 7, 11, 0.2
    q = torch.randn(b, d, generator=gen, dtype=torch.float64)
    kk = torch.randn(b, d, generator=gen, dtype=torch.float64)
    queue = torch.randn(k, d, generator=gen, dtype=torch.float64)
    rows, cos = ref.info_nce_queue_rows(q, kk, queue, t, chunk_size=4)
    n = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    qn, kn, un = n(q), n(kk), n(queue)
    for i in range(b):
        pos = float(qn[i] @ kn[i]) / t
        negs = [float(qn[i] @ un[j]) / t for j in range(k)]
        expected = -pos + math.log(math.exp(pos) + sum(math.exp(x) for x in negs))
        assert rows[i].item() == pytest.approx(expected, rel=1e-10)
        assert cos[i].item() == pytest.approx(float(qn[i] @ kn[i]), rel=1e-10)
    q.requires_grad_(True)
    kk.requires_grad_(True)
    ref.info_nce_queue(q, kk, queue, t).backward()
    assert q.grad is not None and kk.grad is None, "k gets no gradient"


def test_pair_cosine_zero_rows_fp16():
    a = torch.zeros(3, 8, dtype=torch.float16)
    b = torch.randn(3, 8).half()
    assert torch.isfinite(ref.pair_cosine(a, b)).all()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kmeans_assign(metric, gen):
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    c = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    labels, dist = ref.kmeans_assign(x, c, metric=metric, chunk_size=16)
    for i in range(50):
        if metric == "euclidean":
            d = [float(((x[i] - c[j]) ** 2).sum()) for j in range(7)]
            best = min(range(7), key=lambda j: d[j])
            assert dist[i].item() == pytest.approx(d[best], rel=1e-9, abs=1e-12)
        else:
            s = [float(x[i] @ c[j] / (x[i].norm() * c[j].norm())) for j in range(7)]
            best = max(range(7), key=lambda j: s[j])
            assert dist[i].item() == pytest.approx(1 - s[best], rel=1e-9, abs=1e-12)
        assert labels[i].item() == best


def test_kmeans_update(gen):
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (40,), generator=gen)
    sums, counts = ref.kmeans_update(x, labels, 6)
    for c in range(6):
        m = labels == c
        torch.testing.assert_close(sums[c], x[m].sum(0))
        assert counts[c].item() == int(m.sum())
    assert counts[5] == 0


def test_scatter_reference_sums_duplicates():
    s = torch.zeros(3)
    ref.score_scatter_add_(s, torch.tensor([1, 1, 1]), torch.tensor([1.0, 2.0, 3.0]))
    assert s.tolist() == [0.0, 6.0, 0.0]
