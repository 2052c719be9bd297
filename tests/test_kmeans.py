"""kmeans_assign, kmeans_update and KMeans against float64 brute force, the reference and scikit-learn.
opcheck, torch.compile and the other contracts every op keeps: tests/test_contracts.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _utils import check_assign, triton_interpreter_available

import coreset_ext as cx
from coreset_ext import _backend, ops, reference
from coreset_ext.cluster import ConvergenceWarning, kmeans_plusplus

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _data(n, d, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(device, dtype)


def _blobs(n, k, d, seed=0, spread=20.0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * spread
    truth = torch.randint(k, (n,), generator=g)
    return centers[truth] + std * torch.randn(n, d, generator=g), truth


# ------------------------------------------------------------------------- kmeans_assign

@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n,k,d", [(257, 37, 19), (1000, 5, 128), (3, 3, 1)])
def test_assign_cpu_matches_float64(metric, n, k, d, backend):
    x, c = _data(n, d, 1), _data(k, d, 2)
    labels, dist = ops.kmeans_assign(x, c, metric=metric, backend=backend)
    check_assign(x, c, labels, dist, metric, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_assign_cpu_dtypes(dtype):
    x, c = _data(300, 24, 1, dtype), _data(13, 24, 2)
    labels, dist = ops.kmeans_assign(x, c)
    check_assign(x.float(), c, labels, dist, "euclidean", 1e-5)


def _first_nearest(x, c, metric):
    """Lowest index attaining the float64 optimum (exact for the small-integer data used here)."""
    if metric == "euclidean":
        score = torch.cdist(x.double(), c.double()) ** 2
    else:
        score = -(reference.normalize(x.double()) @ reference.normalize(c.double()).T)
    best = score.min(dim=1, keepdim=True).values
    idx = torch.arange(c.shape[0]).expand_as(score)
    return torch.where((score - best).abs() <= 1e-9, idx, c.shape[0]).min(dim=1).values


def _int_data(n, d, seed):
    # small integers: every product and sum is exact in fp32, so ties are exact ties
    return torch.randint(-2, 3, (n, d), generator=torch.Generator().manual_seed(seed)).float()


def test_assign_noncontiguous_and_ties():
    x = _int_data(40, 64, 3).T  # [64, 40], strided
    c = _int_data(6, 40, 4)
    c[3] = c[1]  # exact duplicate: the lower index must win
    for backend in (None, "reference"):
        labels, dist = ops.kmeans_assign(x, c, backend=backend)
        check_assign(x, c, labels, dist, "euclidean", 1e-6)
        assert torch.equal(labels, _first_nearest(x, c, "euclidean"))
        assert not bool((labels == 3).any())


def test_assign_validation():
    x, c = _data(10, 4), _data(3, 4)
    with pytest.raises(ValueError, match="metric"):
        ops.kmeans_assign(x, c, metric="manhattan")
    with pytest.raises(ValueError, match="x"):
        ops.kmeans_assign(x[0], c)
    with pytest.raises(ValueError, match="x"):
        ops.kmeans_assign(x.long(), c)
    with pytest.raises(ValueError, match="centroids"):
        ops.kmeans_assign(x, c[:, :3])


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n,k,d", [(70, 37, 19), (33, 40, 200), (5, 1, 16)])
def test_assign_triton_interpreter(metric, n, k, d):
    if not triton_interpreter_available():
        pytest.skip("Triton interpreter not available (set TRITON_INTERPRET=1)")
    x, c = _data(n, d, 5), _data(k, d, 6)
    labels, dist = ops.kmeans_assign(x, c, metric=metric, backend="triton")
    check_assign(x, c, labels, dist, metric, 1e-5)


@pytest.mark.triton
def test_assign_triton_interpreter_ties_and_strides():
    if not triton_interpreter_available():
        pytest.skip("Triton interpreter not available (set TRITON_INTERPRET=1)")
    x = _int_data(48, 50, 7).T  # [50, 48] strided
    c = _int_data(40, 48, 8)
    c[35] = c[2]  # duplicate in another centroid tile: the lower index wins across tiles
    c[20] = c[4]  # and within a tile
    labels, dist = ops.kmeans_assign(x, c, backend="triton")
    check_assign(x, c, labels, dist, "euclidean", 1e-6)
    assert torch.equal(labels, _first_nearest(x, c, "euclidean"))
    assert not bool(((labels == 35) | (labels == 20)).any())


@pytest.mark.triton
def test_assign_triton_interpreter_far_from_origin():
    """fp32 products about the centroids' mean: at an offset of 3e3 the labels are float64's."""
    if not triton_interpreter_available():
        pytest.skip("Triton interpreter not available (set TRITON_INTERPRET=1)")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    c = torch.randn(40, 24, generator=g) + 3e3
    x = c[torch.randint(40, (90,), generator=g)] + 0.2 * torch.randn(90, 24, generator=g)
    labels, dist = ops.kmeans_assign(x, c, backend="triton")
    exact = ((x.double()[:, None] - c.double()[None]) ** 2).sum(-1)
    assert torch.equal(labels, exact.argmin(1))
    torch.testing.assert_close(dist.double(), exact.min(1).values, rtol=1e-3, atol=1e-3)
    labels, _ = ops.kmeans_assign(torch.tensor([[10000.3, 10000.0]]),
                                  torch.tensor([[10000.0, 10000.0], [10000.5, 10000.0]]), backend="triton")
    assert labels.tolist() == [1]


def _gpu_assign_configs():
    try:
        from coreset_ext.triton_kernels import kmeans
    except ImportError:  # no Triton: the test below is skipped anyway
        return []
    # the autotuner's candidates and the fixed per-architecture tiles (the default on a GPU)
    fixed = [*kmeans.ARCH_TILES.values(), kmeans.FP32_IEEE_TILES]
    return [dict(c.all_kwargs()) for c in kmeans.CONFIGS] + [dict(t) for t in fixed]


@pytest.mark.triton
@pytest.mark.parametrize("config", _gpu_assign_configs(),
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_assign_triton_gpu_configs(config, monkeypatch):
    """Each tile shape the GPU autotuner may pick, run by the interpreter (CI runs only the small
    fixed tiles otherwise): ragged tails in n and k, one and several d tiles, ties across tiles."""
    if not triton_interpreter_available():
        pytest.skip("Triton interpreter not available (set TRITON_INTERPRET=1)")
    from coreset_ext.triton_kernels import kmeans

    monkeypatch.setattr(kmeans, "TILES", config)
    for n, k, d in [(300, 150, 100), (70, 130, 200)]:
        x, c = _data(n, d, n), _data(k, d, k)
        c[k - 1] = c[1]  # a duplicate centroid in the last tile: the lower index must win
        labels, dist = ops.kmeans_assign(x, c, backend="triton")
        check_assign(x, c, labels, dist, "euclidean", 1e-5)
        assert not bool((labels == k - 1).any())


# ------------------------------------------------------------------------- kmeans_update

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_update_matches_reference(dtype):
    n, d, k = 500, 17, 11
    x = _data(n, d, 9, dtype=dtype)
    labels = torch.randint(k - 1, (n,), generator=torch.Generator().manual_seed(1))  # cluster k-1 empty
    sums, counts = ops.kmeans_update(x, labels, k)
    ref_sums, ref_counts = reference.kmeans_update(x.double(), labels, k)
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert sums.shape == (k, d) and counts.dtype == torch.int64
    assert torch.equal(counts, ref_counts)
    assert counts[k - 1] == 0 and bool((sums[k - 1] == 0).all())
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)


def test_update_deterministic_and_noncontiguous():
    x = _data(64, 300, 10).T  # [300, 64] strided
    labels = torch.randint(7, (300,), generator=torch.Generator().manual_seed(2))
    a, ca = ops.kmeans_update(x, labels, 7)
    b, cb = ops.kmeans_update(x.contiguous(), labels.int(), 7)
    assert torch.equal(a, b) and torch.equal(ca, cb)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n", [300, 20_000])
def test_fused_cpu_step_matches_assign_then_update(metric, n):
    """The fused CPU pass: kmeans_assign's labels and distances exactly, counts exactly, sums (x's
    dtype per range of rows, merged in float64) within float32 rounding of the float64 sums."""
    x, c = _data(n, 33, 30), _data(17, 33, 31)
    if not _backend.has_extension():
        pytest.skip("coreset_ext._C not built")
    labels, dist, sums, counts = ops.kmeans_lloyd_step(x, c, metric=metric)
    want_labels, want_dist = ops.kmeans_assign(x, c, metric=metric)
    assert torch.equal(labels, want_labels) and torch.equal(dist, want_dist)
    assert torch.equal(counts, torch.bincount(want_labels, minlength=17))
    want_sums = torch.zeros(17, 33, dtype=torch.float64).index_add_(0, want_labels, x.double())
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-5, atol=1e-4)
    # without distances: the same labels, sums and counts, bit for bit
    no_dist = ops.kmeans_lloyd_step(x, c, metric=metric, distance=False)
    assert no_dist[1] is None
    for got, want in zip(no_dist[::2] + no_dist[3:], (labels, sums, counts)):
        assert torch.equal(got, want)


def _numpy_lloyd(x: np.ndarray, c: np.ndarray, iters: int):
    """An independent Lloyd loop in float64 numpy: full distance matrix, first argmin, means (an
    empty cluster keeps its centroid)."""
    x, c = x.astype(np.float64), c.astype(np.float64).copy()
    for _ in range(iters):
        d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
        labels = d2.argmin(1)
        for j in range(c.shape[0]):
            rows = x[labels == j]
            if len(rows):
                c[j] = rows.mean(0)
    return c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,k", [(1, 3, 1), (257, 7, 15), (1031, 16, 16), (999, 5, 17), (777, 33, 32),
                                   (2049, 19, 33), (800, 11, 64), (801, 12, 65), (1000, 20, 100), (900, 9, 128),
                                   (901, 10, 129), (1500, 64, 600), (700, 3, 513)])
def test_fused_cpu_step_against_numpy_lloyd(n, d, k, dtype):
    """Lloyd iterations from the fused CPU step (both of its product paths: k <= 128 in registers
    (64 in float64), above through BLAS; k beyond the 512-row block) against an independent float64 numpy loop from
    the same initial centroids on fresh random data (odd n, d, k; data centred as KMeans does)."""
    if not _backend.has_extension():
        pytest.skip("coreset_ext._C not built")
    rng = np.random.default_rng([n, d, k])
    centres = rng.normal(size=(k, d)) * 3
    x = centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    x = x - x.mean(0)
    c0 = x[rng.choice(n, size=k, replace=False)]
    xt, c = torch.from_numpy(x).to(dtype), torch.from_numpy(c0).to(dtype)
    iters = 3
    for _ in range(iters):
        labels, dist, sums, counts = ops.kmeans_lloyd_step(xt, c, distance=False)
        assert dist is None and int(counts.sum()) == n
        assert torch.equal(counts, torch.bincount(labels, minlength=k))
        c = torch.where((counts > 0)[:, None], (sums.double() / counts.clamp_min(1)[:, None]).to(dtype), c)
    want = _numpy_lloyd(x, c0, iters)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(c.double().numpy(), want, rtol=tol, atol=tol)


def test_fused_cpu_step_same_whatever_the_threads():
    """Sums come from fixed ranges of rows merged in order: bit-identical for 1 and 2 threads."""
    if not _backend.has_extension():
        pytest.skip("coreset_ext._C not built")
    x, c = _data(30_011, 24, 40), _data(100, 24, 41)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.kmeans_lloyd_step(x, c)
        torch.set_num_threads(2)
        two = ops.kmeans_lloyd_step(x, c)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_update_bounds():
    x = _data(20, 3)
    labels = torch.zeros(20, dtype=torch.int64)
    labels[5] = 4
    with pytest.raises(ValueError, match="labels"):
        ops.kmeans_update(x, labels, 4)
    labels[5] = -1
    with pytest.raises(ValueError, match="labels"):
        ops.kmeans_update(x, labels, 4)
    with pytest.raises(ValueError, match="k"):
        ops.kmeans_update(x, labels.clamp_min(0), 0)
    with pytest.raises(ValueError, match="labels"):
        ops.kmeans_update(x, labels[:5], 4)
    # the kernel itself refuses out-of-range labels (no out-of-bounds write) when called directly
    with pytest.raises((IndexError, RuntimeError)):
        torch.ops.coreset_ext.kmeans_update(x, labels, 4)


# ------------------------------------------------------------------------- KMeans

def test_inertia_matches_sklearn_same_init():
    sk = pytest.importorskip("sklearn.cluster")
    x, _ = _blobs(2000, 10, 8, seed=1, spread=3.0, std=1.0)
    c0 = x[torch.randperm(2000, generator=torch.Generator().manual_seed(4))[:10]].clone()
    ours = cx.KMeans(10, init=c0, max_iter=50, tol=1e-4).fit(x)
    ref = sk.KMeans(10, init=c0.numpy(), n_init=1, max_iter=50, tol=1e-4, algorithm="lloyd").fit(x.numpy())
    assert abs(ours.inertia_ - ref.inertia_) <= 0.01 * ref.inertia_
    # and the reported inertia is the inertia of the returned labels and centres
    again = ((x.double() - ours.cluster_centers_.double()[ours.labels_]) ** 2).sum()
    assert abs(float(again) - ours.inertia_) <= 1e-4 * ours.inertia_


def test_same_seed_bit_identical():
    x = _data(1500, 12, 15)
    a = cx.KMeans(9, seed=3, n_init=2).fit(x)
    b = cx.KMeans(9, seed=3, n_init=2).fit(x)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert torch.equal(a.labels_, b.labels_)
    assert a.inertia_ == b.inertia_ and a.n_iter_ == b.n_iter_
    c = cx.KMeans(9, seed=4, n_init=2).fit(x)
    assert not torch.equal(a.cluster_centers_, c.cluster_centers_)


def test_blobs_recovered():
    metrics = pytest.importorskip("sklearn.metrics")
    x, truth = _blobs(3000, 8, 16, seed=2)
    km = cx.KMeans(8, n_init=3, seed=0).fit(x)
    assert metrics.adjusted_rand_score(truth.numpy(), km.labels_.numpy()) >= 0.99
    assert km.labels_.dtype == torch.int64 and km.cluster_centers_.shape == (8, 16)
    assert torch.equal(km.predict(x), km.labels_)
    assert torch.equal(km.fit_predict(x), km.labels_)


def test_random_init():
    x, _ = _blobs(500, 5, 6, seed=8)
    km = cx.KMeans(5, init="random", seed=1, max_iter=100).fit(x)
    again = ((x.double() - km.cluster_centers_.double()[km.labels_]) ** 2).sum()
    assert abs(float(again) - km.inertia_) <= 1e-4 * km.inertia_
    assert 1 <= km.n_iter_ <= 100


def test_cosine_spherical():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(5)
    dirs = reference.normalize(torch.randn(6, 32, generator=g))
    truth = torch.randint(6, (1200,), generator=g)
    scale = torch.rand(1200, 1, generator=g) * 10 + 0.1  # lengths must not matter
    x = (dirs[truth] + 0.05 * torch.randn(1200, 32, generator=g)) * scale
    km = cx.KMeans(6, metric="cosine", n_init=3, seed=1).fit(x)
    assert metrics.adjusted_rand_score(truth.numpy(), km.labels_.numpy()) >= 0.99
    torch.testing.assert_close(km.cluster_centers_.norm(dim=1), torch.ones(6))
    dist = km.transform(x)
    assert dist.shape == (1200, 6)
    torch.testing.assert_close(dist.argmin(dim=1), km.labels_)
    cos = reference.normalize(x.double()) @ km.cluster_centers_.double().T
    torch.testing.assert_close(dist.double(), 1 - cos, rtol=0, atol=1e-5)
    inertia = float((1 - cos.max(dim=1).values).sum())
    assert abs(inertia - km.inertia_) <= 1e-4 * max(inertia, 1.0)


def test_transform_and_numpy_input():
    x, _ = _blobs(400, 4, 5, seed=3)
    km = cx.KMeans(4, seed=0).fit(x.numpy())
    assert np.array_equal(cx.KMeans(4, seed=0).fit(x.clone().requires_grad_()).labels_.numpy(), km.labels_)
    # numpy in, numpy out; torch in, torch out
    assert isinstance(km.labels_, np.ndarray) and isinstance(km.cluster_centers_, np.ndarray)
    km = cx.KMeans(4, seed=0).fit(x)
    assert isinstance(km.labels_, torch.Tensor) and isinstance(km.cluster_centers_, torch.Tensor)
    dist = km.transform(x)
    # float32 distances by the matmul expansion (as scikit-learn): absolute error ~1e-3 here
    torch.testing.assert_close(dist.double(), torch.cdist(x.double(), km.cluster_centers_.double()),
                               rtol=1e-4, atol=2e-3)
    assert np.array_equal(km.predict(x.numpy()), km.labels_.numpy())


def test_empty_cluster_reseeded_from_farthest_point():
    x, _ = _blobs(300, 3, 4, seed=4, spread=5.0)
    init = x[:4].clone()
    init[2] = 1e4  # no point comes near it: empty after the first assignment
    km = cx.KMeans(4, init=init, max_iter=1).fit(x)
    # the rule: it takes the point farthest from its assigned centroid
    labels0, dist0 = reference.kmeans_assign(x.double(), init.double())
    far = int(torch.argmax(dist0))
    torch.testing.assert_close(km.cluster_centers_[2], x[far])
    # and the full fit ends with every cluster in use
    km = cx.KMeans(4, init=init, max_iter=100).fit(x)
    assert bool((torch.bincount(km.labels_, minlength=4) > 0).all())


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("batch_size", [None, 70])
@pytest.mark.parametrize("weighted", [False, True])
def test_several_empty_clusters_take_the_farthest_points(metric, batch_size, weighted):
    """Three clusters empty after the first assignment take, in index order, the three points
    farthest from the centroid they were assigned (float64 reference distances), whichever way
    the fit gets those distances (in memory or streamed, weighted or not)."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(400, 5, generator=g) + 0.1  # positive orthant
    x[:8] *= torch.linspace(2, 9, 8)[:, None]  # a spread of distances, no ties at the top
    init = x[torch.randperm(400, generator=g)[:7]].clone()
    empty = [1, 3, 6]
    init[empty] = -torch.rand(3, 5, generator=g) - 5.0  # no point is nearest to these (cosine < 0 too)
    w = torch.rand(400, generator=g) + 0.5 if weighted else None
    km = cx.KMeans(7, init=init, max_iter=1, metric=metric, batch_size=batch_size).fit(x, sample_weight=w)
    _, dist0 = reference.kmeans_assign(x.double(), init.double(), metric=metric)
    far = torch.sort(dist0, descending=True, stable=True).indices[:3]
    want = x[far].double()
    if metric == "cosine":
        want = reference.normalize(want)
    torch.testing.assert_close(km.cluster_centers_[empty].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("batch_size", [None, 90])
@pytest.mark.parametrize("weighted", [False, True])
def test_converged_fit_labels_and_inertia_match_its_centroids(metric, batch_size, weighted):
    """A fit that stops because no label changed keeps its last labels and takes their distances
    to the final centroids (no last assignment pass): both must still be exactly what an
    assignment against cluster_centers_ gives (float64 reference)."""
    x, _ = _blobs(700, 5, 6, seed=12, spread=3.0, std=1.0)
    w = torch.rand(700, generator=torch.Generator().manual_seed(3)) + 0.2 if weighted else None
    km = cx.KMeans(5, metric=metric, seed=2, max_iter=300, tol=0.0, batch_size=batch_size).fit(x, sample_weight=w)
    assert km.n_iter_ < 300  # stopped on unchanged labels
    labels, dist = reference.kmeans_assign(x.double(), km.cluster_centers_.double(), metric=metric)
    assert torch.equal(km.labels_, labels)
    want = float((dist * (1 if w is None else w.double())).sum())
    assert km.inertia_ == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_size", [None, 700])
def test_converged_half_precision_cosine_inertia(dtype, batch_size):
    """A cosine fit of float16/bfloat16 rows that stops on unchanged labels takes its inertia from
    the labels' own distances: the stored rows are unit vectors only to their rounding, and like
    the assignment those distances normalise them again (bfloat16 was 0.2% off otherwise)."""
    g = torch.Generator().manual_seed(1)
    c = torch.randn(6, 10, generator=g) * 4
    x = (c[torch.randint(6, (4000,), generator=g)] + torch.randn(4000, 10, generator=g) + 5).to(dtype)
    km = cx.KMeans(6, metric="cosine", random_state=0, tol=0.0, max_iter=300, batch_size=batch_size).fit(x)
    assert km.n_iter_ < 300  # stopped on unchanged labels
    _, dist = reference.kmeans_assign(x.double(), km.cluster_centers_.double(), metric="cosine")
    assert km.inertia_ == pytest.approx(float(dist.sum()), rel=5e-4)


@pytest.mark.parametrize("case", ["strict", "tol", "max_iter", "empty", "weighted", "cosine", "n_init",
                                  "empty_then_stop"])
def test_queued_iterations_give_the_per_iteration_result(monkeypatch, case):
    """On an accelerator KMeans queues CHECK_EVERY Lloyd iterations between two reads of their
    decisions (one host synchronisation per window). Forced here on the CPU with windows of 3:
    centroids, labels, inertia and n_iter_ must equal, bit for bit, the fit that reads every
    iteration, whether it stops mid-window (unchanged labels, tol), at max_iter, or re-seeds an
    empty cluster mid-window; the window queues 3 iterations and drops those past the stop."""
    x, _ = _blobs(900, 6, 5, seed=21, spread=2.0, std=1.0)
    params = dict(n_clusters=6, random_state=4, tol=0.0, max_iter=300)
    fit_kw = {}
    if case == "tol":
        params["tol"] = 1e-3
    elif case == "max_iter":
        params["max_iter"] = 7
    elif case == "empty":
        init = x[:6].clone()
        init[[1, 4]] = 1e3  # empty from the first iteration: re-seeded mid-window
        params["init"] = init
    elif case == "weighted":
        fit_kw["sample_weight"] = torch.rand(900, generator=torch.Generator().manual_seed(8)) + 0.1
    elif case == "cosine":
        params["metric"] = "cosine"
    elif case == "n_init":
        params.update(n_init=3, init="random")
    elif case == "empty_then_stop":
        # re-seeded in iteration 1 (which ends its window), labels unchanged in iteration 3 (the
        # next window's second): that stop takes its distances as reading every iteration does
        x, truth = _blobs(3000, 5, 8, seed=13, spread=10.0, std=1.0)
        init = torch.stack([x[truth == j].mean(0) for j in range(5)] + [torch.full((8,), 1e3)]) + 0.3
        params.update(init=init, metric="cosine")
    every = cx.KMeans(**params).fit(x, **fit_kw)
    steps = []
    original = cx.KMeans._step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cx.KMeans, "_check_every", lambda self, x, verbose: 3)
    monkeypatch.setattr(cx.KMeans, "_step", counted)
    queued = cx.KMeans(**params).fit(x, **fit_kw)
    assert torch.equal(queued.cluster_centers_, every.cluster_centers_)
    assert torch.equal(queued.labels_, every.labels_)
    assert queued.inertia_ == every.inertia_ and queued.n_iter_ == every.n_iter_
    if case in ("strict", "tol", "max_iter"):
        window_sizes = [min(3, params["max_iter"] - s) for s in range(0, queued.n_iter_, 3)]
        assert len(steps) == sum(window_sizes)


@pytest.mark.parametrize("m", [1, 3, 40, 500])
def test_farthest_is_a_stable_descending_sort(m):
    """The points re-seeding takes: the first m of a stable descending sort (ties to the lower
    index), here on distances with many ties."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    dist = torch.randint(0, 20, (500,), generator=g).float() / 4
    want = torch.sort(dist, descending=True, stable=True).indices[:m]
    assert torch.equal(cx.cluster._farthest(dist, m), want)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("batch_size", [None, 300])
def test_tol_scale_is_the_mean_feature_variance(monkeypatch, metric, batch_size):
    """tol is relative to the mean per-feature variance of the data the fit clusters (scikit-learn's
    rule), float64 reference: euclidean data far from the origin, and cosine rows that all point
    one way (their squares' mean and squared mean are ~1 each and cancel if taken apart)."""
    seen = []
    original = cx.KMeans._mean_variance
    monkeypatch.setattr(cx.KMeans, "_mean_variance", lambda self, x: seen.append(original(self, x)) or seen[-1])
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    if metric == "cosine":
        x = torch.tensor([1.0, 2.0, 2.0, 0.5]) + 1e-3 * torch.randn(1000, 4, generator=g)
    else:
        x = 1e4 + 0.5 * torch.randn(1000, 4, generator=g)
    cx.KMeans(3, metric=metric, tol=1e-4, batch_size=batch_size, random_state=0).fit(x)
    rows = reference.normalize(x.double()) if metric == "cosine" else x.double()
    assert seen[0] == pytest.approx(float(rows.var(0, unbiased=False).mean()), rel=1e-2)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("batch_size", [None, 7000])
def test_tol_scale_of_tight_data_is_not_the_centres_error(monkeypatch, metric, batch_size):
    """The centre (cosine's column means, euclidean's shift) comes from float32 column sums, off
    by ~1e-5 of the mean at n = 20k: for rows this tight (spread 1e-4 about one point) its squared
    error was 4 to 7 times the variance, and tol as many times too loose."""
    seen = []
    original = cx.KMeans._mean_variance
    monkeypatch.setattr(cx.KMeans, "_mean_variance", lambda self, x: seen.append(original(self, x)) or seen[-1])
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.tensor([1.0, 2.0, 2.0, 0.5]) + 1e-4 * torch.randn(20_000, 4, generator=g)
    if metric == "euclidean":
        x = 1e4 + 5e3 * x
    cx.KMeans(3, metric=metric, tol=1e-4, batch_size=batch_size, max_iter=1, n_init=1, init="random",
              random_state=0).fit(x)
    rows = reference.normalize(x.double()) if metric == "cosine" else x.double()
    assert seen[0] == pytest.approx(float(rows.var(0, unbiased=False).mean()), rel=1e-3)


def test_duplicate_points_more_clusters_than_distinct():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(10, 1)
    with pytest.warns(ConvergenceWarning, match=r"distinct clusters \(2\) found smaller than n_clusters \(3\)"):
        km = cx.KMeans(3, seed=0).fit(x)  # only 2 distinct points: must not crash or produce NaN
    assert bool(torch.isfinite(km.cluster_centers_).all())
    assert km.inertia_ == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_batch_size_equals_in_memory(metric):
    x = _data(1000, 10, 17)
    a = cx.KMeans(7, metric=metric, seed=5).fit(x)
    b = cx.KMeans(7, metric=metric, seed=5, batch_size=97).fit(x)
    assert torch.equal(a.labels_, b.labels_)
    assert a.n_iter_ == b.n_iter_
    torch.testing.assert_close(a.cluster_centers_, b.cluster_centers_, rtol=1e-5, atol=1e-6)
    assert abs(a.inertia_ - b.inertia_) <= 1e-5 * a.inertia_
    assert torch.equal(b.predict(x), a.labels_)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_batch_size_seeds_from_the_same_rows_bf16(init):
    """Cosine on bf16: in-memory x is normalised once in bf16, streamed chunks arrive raw; the
    seeding must see the same rows either way, bit for bit."""
    x = _data(500, 12, 23).to(torch.bfloat16)
    seeds = []
    for batch_size in (None, 64):
        km = cx.KMeans(6, metric="cosine", init=init, batch_size=batch_size)
        km._start(x)
        seeds.append(km._init_centers(km._prepare(x), torch.Generator().manual_seed(4)))
    assert torch.equal(seeds[0], seeds[1])


def test_kmeans_plusplus_picks_rows():
    x = _data(200, 6, 18)
    c = kmeans_plusplus(x, 10, torch.Generator().manual_seed(0))
    assert bool((c[:, None, :] == x[None, :, :]).all(dim=2).any(dim=1).all())
    assert len({tuple(r.tolist()) for r in c}) == 10


def test_verbose(capsys):
    x = _data(200, 4, 19)
    cx.KMeans(3, seed=0, verbose=True, max_iter=3).fit(x)
    err = capsys.readouterr().err
    assert "inertia" in err and "shift" in err


def test_bad_inputs():
    x = _data(20, 3)
    with pytest.raises(ValueError, match="n_clusters"):
        cx.KMeans(0)
    with pytest.raises(ValueError, match="n_clusters"):
        cx.KMeans(21).fit(x)
    with pytest.raises(ValueError, match="x"):
        cx.KMeans(2).fit(x[:, 0])
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x"):
        cx.KMeans(2).fit(bad)
    with pytest.raises(ValueError, match="x"):
        cx.KMeans(2, tol=0.0).fit(bad)
    with pytest.raises(ValueError, match="x"):
        cx.KMeans(2, metric="cosine").fit(bad)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="x"):
        cx.KMeans(2, batch_size=7).fit(bad)
    with pytest.raises(ValueError, match="init"):
        cx.KMeans(2, init=torch.zeros(3, 3)).fit(x)
    with pytest.raises(ValueError, match="init"):
        cx.KMeans(2, init="kmeans")
    with pytest.raises(ValueError, match="metric"):
        cx.KMeans(2, metric="l1")
    with pytest.raises(ValueError, match="batch_size"):
        cx.KMeans(2, batch_size=0)
    for name, value in [("n_init", True), ("max_iter", True), ("batch_size", True), ("tol", False),
                        ("seed", "abc"), ("seed", 2**70), ("seed", -2**64)]:
        with pytest.raises(ValueError, match=name):
            cx.KMeans(2, **{name: value})
    with pytest.raises(ValueError, match="x"):
        cx.KMeans(2).fit(x).predict(x[:, :2])


# ------------------------------------------------------------------------- GPU

# every (k, d, dtype, metric) is autotuned once on the GPU: keep the grid small
_CUDA_ASSIGN_CASES = [(5000, 1000, 128, dt, m) for dt in (torch.float32, torch.bfloat16, torch.float16)
                      for m in ("euclidean", "cosine")]
_CUDA_ASSIGN_CASES += [(777, 37, 19, torch.float32, "euclidean"), (777, 37, 19, torch.bfloat16, "cosine"),
                       (300, 50, 200, torch.float32, "cosine"), (300, 50, 200, torch.bfloat16, "euclidean")]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n,k,d,dtype,metric", _CUDA_ASSIGN_CASES)
def test_assign_cuda(n, k, d, dtype, metric):
    x, c = _data(n, d, 20, dtype, "cuda"), _data(k, d, 21, torch.float32, "cuda")
    labels, dist = ops.kmeans_assign(x, c, metric=metric)
    assert _backend.select_backend("kmeans_assign", x.device) == "triton"
    # compare with the centroids as the kernel sees them (rounded to x's dtype)
    cr = c.to(dtype) if metric == "euclidean" else reference.normalize(c).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    check_assign(x.float(), cr.float(), labels, dist, metric, tol)


@pytest.mark.cuda
@cuda
def test_assign_cuda_no_recompile_per_k():
    """A new n_clusters or d within a BLOCK_D class launches the compiled kernel (K, D are runtime)."""
    from coreset_ext.triton_kernels import kmeans

    x = torch.randn(4096, 128, device="cuda")
    ops.kmeans_assign(x, torch.randn(100, 128, device="cuda"))
    cache = kmeans._kmeans_assign_kernel.device_caches[torch.cuda.current_device()][0]
    before = len(cache)
    for k, d in [(257, 128), (1000, 100), (65, 97)]:
        xd = torch.randn(4096, d, device="cuda")
        labels, dist = ops.kmeans_assign(xd, torch.randn(k, d, device="cuda"))
        assert labels.shape == (4096,)
    assert len(cache) == before


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_update_cuda(dtype):
    n, d, k = 100_000, 130, 97
    x = _data(n, d, 22, dtype, "cuda")
    g = torch.Generator().manual_seed(6)
    labels = torch.cat([torch.zeros(60_000, dtype=torch.int64),  # one giant cluster
                        torch.randint(k - 1, (n - 60_000,), generator=g)]).cuda()
    sums, counts = ops.kmeans_update(x, labels, k)
    ref_sums, ref_counts = reference.kmeans_update(x.double(), labels, k)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-4, atol=1e-3)
    again = ops.kmeans_update(x, labels, k)
    assert torch.equal(sums, again[0]) and torch.equal(counts, again[1])
    out_of_range = labels.clone()
    out_of_range[12_345] = k  # labels were drawn below k - 1: adding one would stay in range
    with pytest.raises(ValueError, match="labels"):
        ops.kmeans_update(x, out_of_range, k)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kmeans_cuda_seed_stream_and_sklearn(metric):
    x, truth = _blobs(20_000, 20, 32, seed=7)
    a = cx.KMeans(20, metric=metric, seed=2, device="cuda").fit(x)
    b = cx.KMeans(20, metric=metric, seed=2, device="cuda").fit(x.cuda())
    assert a.labels_.device.type == "cpu" and b.labels_.device.type == "cuda"
    assert torch.equal(a.labels_, b.labels_.cpu())
    assert torch.equal(a.cluster_centers_, b.cluster_centers_.cpu())
    s = cx.KMeans(20, metric=metric, seed=2, device="cuda", batch_size=3001).fit(x)
    assert torch.equal(s.labels_, a.labels_)
    torch.testing.assert_close(s.cluster_centers_, a.cluster_centers_, rtol=1e-5, atol=1e-5)
    if metric == "euclidean":
        sk = pytest.importorskip("sklearn.cluster")
        c0 = x[:20].clone()
        ours = cx.KMeans(20, init=c0, max_iter=30, device="cuda").fit(x)
        ref = sk.KMeans(20, init=c0.numpy(), n_init=1, max_iter=30, algorithm="lloyd").fit(x.numpy())
        assert abs(ours.inertia_ - ref.inertia_) <= 0.01 * ref.inertia_


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kmeans_cuda_queued_iterations_equal_per_iteration(monkeypatch, metric):
    """On the GPU a fit reads its decisions every CHECK_EVERY iterations: the same centroids,
    labels and n_iter_ as reading every one, with re-seeding mid-window and a stop mid-window."""
    x, _ = _blobs(30_000, 24, 16, seed=9, spread=2.0, std=1.0)
    init = x[:24].clone()
    init[[3, 11]] = 1e3  # empty after the first iteration
    x, init = x.cuda(), init.cuda()
    queued = cx.KMeans(24, init=init, metric=metric, tol=0.0).fit(x)
    monkeypatch.setattr(cx.KMeans, "_check_every", lambda self, x, verbose: 1)
    every = cx.KMeans(24, init=init, metric=metric, tol=0.0).fit(x)
    assert queued.n_iter_ == every.n_iter_
    assert torch.equal(queued.cluster_centers_, every.cluster_centers_)
    assert torch.equal(queued.labels_, every.labels_)
    assert queued.inertia_ == every.inertia_


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kmeans_cuda_lloyd_iteration_captures_in_a_cuda_graph(metric):
    """A queued Lloyd iteration (assignment, deterministic update, means, decisions) issues no
    host synchronisation: it captures in a CUDA graph, and a replay gives the eager result."""
    x, _ = _blobs(50_000, 40, 64, seed=15, spread=2.0, std=1.0)
    x = reference.normalize(x).cuda() if metric == "cosine" else x.cuda()
    km = cx.KMeans(40, metric=metric)
    km._start(x)
    centers = x[:40].clone()
    labels_old = torch.zeros(x.shape[0], dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and loads every kernel before the capture
        eager = km._step(x, centers, labels_old, None, distance=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = km._step(x, centers, labels_old, None, distance=False)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.labels, eager.labels)
    assert torch.equal(captured.new, eager.new)
    assert torch.equal(captured.decisions, eager.decisions)


@pytest.mark.cuda
@cuda
def test_kmeans_cuda_weighted_matches_cpu():
    """Weighted fits on the GPU (weights summed per cluster by the deterministic update kernel,
    not bincount, which synchronises) follow the CPU's from the same centroids."""
    x, _ = _blobs(20_000, 12, 8, seed=13, spread=3.0, std=1.0)
    w = torch.rand(20_000, generator=torch.Generator().manual_seed(14)) * 3 + 0.1
    init = x[:12].clone()
    cpu = cx.KMeans(12, init=init, max_iter=15, tol=0.0).fit(x, sample_weight=w)
    gpu = cx.KMeans(12, init=init.cuda(), max_iter=15, tol=0.0).fit(x.cuda(), sample_weight=w.cuda())
    torch.testing.assert_close(gpu.cluster_centers_.cpu(), cpu.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert (gpu.labels_.cpu() == cpu.labels_).float().mean() > 0.999
    assert gpu.inertia_ == pytest.approx(cpu.inertia_, rel=1e-4)


# ------------------------------------------------------------------------- degenerate input

def _poison(t, value):
    """A copy of t with `value` at a fresh random position."""
    t = t.clone()
    t.view(-1)[int(torch.randint(0, t.numel(), ()))] = value
    return t


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_assign_rejects_non_finite(backend, value):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    x, c = _data(30, 5, seed), _data(4, 5, seed + 1)
    with pytest.raises(ValueError, match="^x contains NaN or Inf"):
        ops.kmeans_assign(_poison(x, value), c, backend=backend)
    with pytest.raises(ValueError, match="^centroids contains NaN or Inf"):
        ops.kmeans_assign(x, _poison(c, value), metric="cosine", backend=backend)
    labels, dist = ops.kmeans_assign(x, c, backend=backend)  # finite input still goes through
    check_assign(x, c, labels, dist, "euclidean", 1e-5)


@pytest.mark.parametrize("batch_size", [None, 7])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_predict_and_transform_reject_non_finite(metric, batch_size):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    km = cx.KMeans(3, metric=metric, seed=0, batch_size=batch_size).fit(_data(40, 4, seed))
    bad = _poison(_data(25, 4, seed + 1), float("nan"))
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        km.predict(bad)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        km.transform(_poison(bad, float("inf")))


def test_init_sample_size_smaller_than_n_clusters():
    with pytest.raises(ValueError, match="init_sample_size = 4 is smaller than n_clusters = 5"):
        cx.KMeans(5, init_sample_size=4)
    x = _data(60, 3, int(torch.randint(0, 2**31 - 1, ())))
    km = cx.KMeans(5, init_sample_size=5, seed=0).fit(x)  # the smallest accepted sample: distinct seeds
    assert torch.unique(km.cluster_centers_, dim=0).shape[0] == 5


def test_no_warning_when_every_cluster_is_found():
    x, _ = _blobs(120, 4, 3, seed=int(torch.randint(0, 2**31 - 1, ())))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        km = cx.KMeans(4, seed=0).fit(x)
    assert torch.unique(km.labels_).numel() == 4


def test_float64_means_keep_counts_beyond_float32():
    # int64 counts went through float32 on the float64 path: 2**24 + 1 points read as 2**24
    km = cx.KMeans(2)
    km._cdtype = torch.float64
    n = 2**24 + 1
    sums = torch.tensor([[float(n) * 3.0], [5.0]], dtype=torch.float64)
    means = km._means(torch.zeros(2, 1, dtype=torch.float64), sums, torch.tensor([n, 0]))
    assert means.tolist() == [[3.0], [0.0]]
