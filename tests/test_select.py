"""Selection API: exact sizes, no duplicates, reproducible per seed, independent oracles, save/load."""

import numpy as np
import pytest
import torch

import coreset_ext as cx
from coreset_ext.select import Selection, available_methods, register_method
from coreset_ext.train.data import ArrayDataset

N, D = 97, 6


@pytest.fixture
def pool():
    g = torch.Generator().manual_seed(7)
    return {"scores": torch.rand(N, generator=g), "embeddings": torch.randn(N, D, generator=g),
            "labels": torch.randint(0, 4, (N,), generator=g)}


def _needs_kmeans(method, options):
    return method == "prototypes" or (method == "balanced_random" and options.get("by") == "cluster")


CASES = [("random", {}), ("balanced_random", {"by": "class"}), ("balanced_random", {"by": "cluster", "n_clusters": 5}),
         ("css", {}), ("prototypes", {"n_clusters": 5}), ("kcenter", {})]


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.33, 1.0])
def test_sizes_exact_distinct_and_reproducible(pool, method, options, fraction):
    if _needs_kmeans(method, options):
        pytest.importorskip("coreset_ext.cluster")
    a = cx.select(method, fraction=fraction, seed=3, **pool, **options)
    b = cx.select(method, fraction=fraction, seed=3, **pool, **options)
    budget = max(1, int(np.floor(fraction * N + 0.5)))
    assert len(a) == budget and a.indices.unique().numel() == budget
    assert int(a.indices.min()) >= 0 and int(a.indices.max()) < N
    assert torch.equal(a.indices, b.indices)
    assert a.method == method and a.dataset_size == N and a.options == options


def test_random_changes_with_seed(pool):
    a, b = cx.select("random", budget=30, seed=0, **pool), cx.select("random", budget=30, seed=1, **pool)
    assert not torch.equal(a.indices.sort().values, b.indices.sort().values)


def test_css_keeps_the_lowest_scores(pool):
    sel = cx.select("css", fraction=0.25, scores=pool["scores"])
    expect = np.argsort(pool["scores"].numpy().astype(np.float64), kind="stable")[: len(sel)]
    assert sorted(sel.indices.tolist()) == sorted(expect.tolist())
    high = cx.select("css", fraction=0.25, scores=pool["scores"], order="highest")
    assert float(pool["scores"][high.indices].min()) >= float(pool["scores"][sel.indices].max())
    with pytest.raises(ValueError, match="no finite score"):
        cx.select("css", budget=3, scores=torch.tensor([0.1, float("nan"), 0.3, 0.2]))


def test_kcenter_matches_a_naive_float64_greedy(pool):
    sel = cx.select("kcenter", budget=20, embeddings=pool["embeddings"], seed=5, chunk_size=16)
    x = pool["embeddings"].double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    picks = [int(sel.indices[0])]  # the seeded start; every later pick is the farthest point
    for _ in range(19):
        d = ((x[:, None, :] - x[None, picks, :]) ** 2).sum(-1).min(1)
        d[picks] = -1
        picks.append(int(d.argmax()))
    assert sel.indices.tolist() == picks


def test_balanced_random_spreads_over_classes():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 4)
    sel = cx.select("balanced_random", budget=30, labels=labels, seed=0)
    counts = torch.bincount(labels[sel.indices], minlength=3).tolist()
    assert counts == [13, 13, 4]  # class 2 is exhausted; its unused share goes to the others
    prop = cx.select("balanced_random", budget=42, labels=labels, seed=0, allocation="proportional")
    assert torch.bincount(labels[prop.indices], minlength=3).tolist() == [25, 15, 2]


def test_prototypes_keeps_the_farthest_from_the_nearest_centroid(pool):
    cluster = pytest.importorskip("coreset_ext.cluster")
    sel = cx.select("prototypes", budget=15, embeddings=pool["embeddings"], seed=2, n_clusters=4)
    x = pool["embeddings"].double()
    x = x / x.norm(dim=1, keepdim=True)
    centers = torch.as_tensor(cluster.KMeans(4, seed=2).fit(x.float()).cluster_centers_).double()
    dist = torch.cdist(x, centers).pow(2).min(1).values.numpy()
    expect = np.argsort(-dist, kind="stable")[:15]
    assert sorted(sel.indices.tolist()) == sorted(expect.tolist())
    easy = cx.select("prototypes", budget=15, embeddings=pool["embeddings"], seed=2, n_clusters=4, keep="easiest")
    assert sorted(easy.indices.tolist()) == sorted(np.argsort(dist, kind="stable")[:15].tolist())


def test_bad_input_is_a_clear_error(pool):
    with pytest.raises(ValueError, match="unknown method 'nope'.*css.*kcenter.*random"):
        cx.select("nope", fraction=0.1, **pool)
    for bad in (0, 0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction must be in"):
            cx.select("random", fraction=bad, **pool)
    with pytest.raises(ValueError, match=f"budget: {N + 1} is larger than the data set size {N}"):
        cx.select("random", budget=N + 1, **pool)
    with pytest.raises(ValueError, match="exactly one"):
        cx.select("random", fraction=0.1, budget=3, **pool)
    with pytest.raises(ValueError, match="disagree"):
        cx.select("random", fraction=0.1, scores=torch.rand(5), labels=torch.zeros(6))
    with pytest.raises(ValueError, match="embeddings: method 'kcenter' needs embeddings"):
        cx.select("kcenter", fraction=0.1, scores=pool["scores"])


def test_save_load_round_trip_and_subset(tmp_path, pool):
    ds = ArrayDataset(torch.rand(N, 1, 4, 4), pool["labels"], name="toy")
    sel = cx.select("css", fraction=0.3, scores=pool["scores"], seed=4, fingerprint=ds.fingerprint, order="lowest")
    sel.save(tmp_path / "s.npz")
    back = Selection.load(tmp_path / "s.npz", dataset=ds)
    assert torch.equal(back.indices, sel.indices) and torch.equal(back.scores, sel.scores)
    assert (back.method, back.options, back.dataset_size, back.seed, back.fingerprint) == \
        ("css", {"order": "lowest"}, N, 4, ds.fingerprint)
    sub = back.subset(ds)
    assert len(sub) == len(sel) and sub[0][0] == int(sel.indices[0])
    other = ArrayDataset(torch.rand(N + 3, 1, 4, 4), name="other")
    with pytest.raises(ValueError, match=f"{N} examples.*{N + 3}"):
        Selection.load(tmp_path / "s.npz", dataset=other)
    same_size = ArrayDataset(torch.rand(N, 1, 4, 4), name="other")
    with pytest.raises(ValueError, match=f"{ds.fingerprint}.*{same_size.fingerprint}"):
        sel.subset(same_size)
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="coreset-ext file"):
        Selection.load(tmp_path / "x.npz")


def test_registry_accepts_new_methods(pool):
    @register_method("every_other_test")
    def every_other(budget, *, n, **_):
        return torch.arange(0, n, 2)[:budget]

    try:
        assert "every_other_test" in available_methods()
        assert cx.select("every_other_test", budget=4, **pool).indices.tolist() == [0, 2, 4, 6]
    finally:
        from coreset_ext.select import registry

        registry._METHODS.pop("every_other_test")


def test_kcenter_rejects_non_finite_embeddings_and_bad_chunk_size(pool):
    for value in (float("nan"), float("inf")):
        bad = pool["embeddings"].clone()
        bad[int(torch.randint(0, N, ()))] = value
        with pytest.raises(ValueError, match="embeddings contains NaN or Inf"):
            cx.select("kcenter", budget=5, embeddings=bad, seed=0)
    for chunk_size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            cx.select("kcenter", budget=5, embeddings=pool["embeddings"], seed=0, chunk_size=chunk_size)
