"""cx.score: CSS and embeddings of a pre-trained encoder, against an independent recomputation."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import coreset_ext as cx
from coreset_ext.train import Augment


def _encoder(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(24, 10))
    for p in net.parameters():  # wide weights: cosines that differ clearly between examples
        p.data.normal_(0, 0.5)
    return net


def _cosine64(a, b):
    a, b = a.double(), b.double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@pytest.mark.parametrize("batch_size", [64, 7])
def test_css_is_the_mean_cosine_over_pairs_of_seeded_builtin_views(batch_size):
    g = torch.Generator().manual_seed(11)
    x = torch.rand(23, 1, 8, 8, generator=g)
    encoder, views = _encoder(), 3
    out = cx.score(encoder, TensorDataset(x, torch.arange(23)), views=views, seed=5, batch_size=batch_size)
    # independently: the documented draw order (per batch, per pair, view 1 then view 2) from one
    # generator seeded with `seed`, each view encoded in float64
    aug, gen = Augment.for_data("TensorDataset", (1, 8, 8)), torch.Generator().manual_seed(5)
    ref64 = _encoder().double().eval()
    expect = torch.zeros(23, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, 23, batch_size):
            xb = x[s:s + batch_size]
            for _ in range(views):
                v1, v2 = aug(xb, gen), aug(xb, gen)
                expect[s:s + batch_size] += _cosine64(ref64(v1.double()), ref64(v2.double())) / views
        embeddings = ref64(x.double())
    torch.testing.assert_close(out["css"].double(), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["embeddings"].double(), embeddings, rtol=1e-5, atol=1e-5)
    assert float(expect.std()) > 1e-3 and out["css"].dtype == torch.float32


def test_css_with_a_user_transform_and_from_a_data_loader():
    g = torch.Generator().manual_seed(12)
    x = torch.rand(10, 1, 8, 8, generator=g)
    noise = torch.randn(1000, 1, 8, 8, generator=g)
    calls = []

    def transform(v):  # a deterministic "random" transform: the k-th call adds noise[k]
        calls.append(1)
        return v + 0.3 * noise[len(calls) - 1]

    encoder = _encoder(1)
    out = cx.score(encoder, TensorDataset(x), views=2, transform=transform)
    with torch.no_grad():
        expect, k = torch.zeros(10, dtype=torch.float64), 0
        for _ in range(2):  # per pair, example by example: view 1 then view 2
            v1, v2 = [], []
            for i in range(10):
                v1.append(x[i] + 0.3 * noise[k])
                v2.append(x[i] + 0.3 * noise[k + 1])
                k += 2
            expect += _cosine64(encoder(torch.stack(v1)), encoder(torch.stack(v2))) / 2
    torch.testing.assert_close(out["css"].double(), expect, rtol=1e-5, atol=1e-5)
    loader = DataLoader(cx.with_index(TensorDataset(x)), batch_size=4)
    assert torch.equal(cx.score(encoder, loader, views=1, seed=0)["css"],
                       cx.score(encoder, TensorDataset(x), views=1, seed=0)["css"])


def test_bad_arguments_are_named():
    data = TensorDataset(torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="metrics"):
        cx.score(_encoder(), data, metrics=("el2n",))
    with pytest.raises(ValueError, match="views"):
        cx.score(_encoder(), data, views=0)
    with pytest.raises(ValueError, match="transform/augment"):
        cx.score(_encoder(), data, transform=lambda v: v, augment=lambda x, g: x)
    with pytest.raises(ValueError, match=r"data: expected a map-style torch Dataset"):
        cx.score(_encoder(), 42)
