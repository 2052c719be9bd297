"""k-means benchmarks: full Lloyd fits from identical initial centroids, and k-means++ seeding.

CPU (always): n = 100k, d = 128, k = 100, ITERS Lloyd iterations from the same initial centroids:
coreset_ext vs scikit-learn (algorithm="lloyd") vs faiss-cpu vs the pure-PyTorch reference loop.
GPU (cuda only): n in {1M, 10M}, d = 128, k = 1000, bf16: coreset_ext vs flash-kmeans,
fastkmeans, fast-pytorch-kmeans and a naive torch loop (full n x k distance matrix).

Each test records in extra_info (as metric_*, which the results table shows): iters (iterations
actually run), s_per_iter (median fit time / iters), inertia (sum of squared distances of the
returned centroids' assignment, computed the same way for every implementation, in float32),
agreement (fraction of points whose label equals coreset_ext's, where labels are comparable) and
init ("same" or "own" where a peer's API takes no initial centroids). floor_s is ITERS x 2 n k d flops at the bf16 rate of DESIGN.md.
Run: python -m pytest benchmarks/bench_kmeans.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import coreset_ext as cx
from benchmarks.common import floor_seconds, measure
from coreset_ext import ops, reference
from coreset_ext.cluster import kmeans_plusplus

ITERS = 10
CPU = dict(n=100_000, d=128, k=100)
GPU_NS = [1_000_000, 10_000_000]
GPU_D, GPU_K = 128, 1000

_CACHE: dict = {}


def _problem(n, d, k, device, dtype):
    """Gaussian mixture data and initial centroids (k points of x), cached per size."""
    key = (n, d, k, str(device), dtype)
    if key not in _CACHE:
        _CACHE.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        g = torch.Generator(device=device).manual_seed(0)
        centers = torch.randn(k, d, generator=g, device=device) * 2
        x = torch.empty(n, d, dtype=dtype, device=device)
        for s in range(0, n, 1 << 20):  # chunked so fp32 temporaries stay small
            m = min(n - s, 1 << 20)
            lab = torch.randint(k, (m,), generator=g, device=device)
            x[s : s + m] = (centers[lab] + torch.randn(m, d, generator=g, device=device)).to(dtype)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k].to(device)
        c0 = x[idx].float().clone()
        _CACHE[key] = (x, c0)
    return _CACHE[key]


def _record(benchmark, x, centers, n_iter, ours=None, labels=None, init="same"):
    """Inertia of `centers` on x (same formula for everyone) and agreement with coreset_ext."""
    centers = torch.as_tensor(np.asarray(centers) if not isinstance(centers, torch.Tensor) else centers)
    lab, dist = ops.kmeans_assign(x, centers.to(x.device, torch.float32))
    benchmark.extra_info["metric_inertia"] = float(dist.sum(dtype=torch.float64))
    benchmark.extra_info["metric_iters"] = int(n_iter)
    benchmark.extra_info["metric_init"] = init
    if ours is not None:
        if labels is None:
            got = lab
        else:  # peers return numpy arrays or tensors, on the GPU or not
            got = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
            got = got.to(lab.device).long().flatten()
        benchmark.extra_info["metric_agreement"] = float((got == ours.to(got.device)).float().mean())
    try:
        benchmark.extra_info["metric_s_per_iter"] = benchmark.stats.stats.median / max(int(n_iter), 1)
    except AttributeError:
        pass


def _ours_labels(x, c0):
    key = ("ours_labels", x.data_ptr(), x.shape)
    if key not in _CACHE:
        km = cx.KMeans(c0.shape[0], init=c0, max_iter=ITERS, tol=0.0).fit(x)
        _CACHE[key] = km.labels_
    return _CACHE[key]


def _reference_lloyd(x, c0, iters):
    """The pure-PyTorch reference loop: chunked assignment, index_add update (eager baseline)."""
    c = c0.clone()
    for _ in range(iters):
        labels, _ = reference.kmeans_assign(x, c.to(x.dtype))
        sums, counts = reference.kmeans_update(x, labels, c.shape[0])
        c = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], c)
    return c


def _naive_lloyd(x, c0, iters):
    """What people write first: the full n x k distance matrix, argmin, index_add_."""
    c = c0.clone()
    for _ in range(iters):
        cx_ = c.to(x.dtype)
        dist = (x.float() ** 2).sum(1, keepdim=True) - 2 * (x @ cx_.T).float() + (c**2).sum(1)
        labels = dist.argmin(dim=1)
        sums = torch.zeros_like(c).index_add_(0, labels, x.float())
        counts = torch.bincount(labels, minlength=c.shape[0])
        c = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], c)
    return c


# ------------------------------------------------------------------------------ CPU

CPU_IMPLS = ["coreset_ext", "scikit-learn", "faiss", "eager"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_kmeans_cpu(benchmark, impl):
    n, d, k = CPU["n"], CPU["d"], CPU["k"]
    x, c0 = _problem(n, d, k, "cpu", torch.float32)
    xn, c0n = x.numpy(), c0.numpy()
    size = dict(n=n, d=d, k=k, iters=ITERS)
    floor = ITERS * floor_seconds(flops=2 * n * k * d, dtype=torch.float32)
    common = dict(op="kmeans_fit", impl=impl, size=size, device="cpu", dtype=torch.float32,
                  floor_s=floor, rounds=3, warmup=1)
    if impl == "coreset_ext":
        km = measure(benchmark, lambda: cx.KMeans(k, init=c0, max_iter=ITERS, tol=0.0).fit(x), **common)
        _record(benchmark, x, km.cluster_centers_, km.n_iter_, _ours_labels(x, c0), km.labels_)
    elif impl == "scikit-learn":
        sk = pytest.importorskip("sklearn.cluster")
        fit = lambda: sk.KMeans(k, init=c0n, n_init=1, max_iter=ITERS, tol=0.0, algorithm="lloyd").fit(xn)  # noqa: E731
        km = measure(benchmark, fit, **common)
        _record(benchmark, x, km.cluster_centers_, km.n_iter_, _ours_labels(x, c0), km.labels_)
        benchmark.extra_info["metric_inertia_own"] = float(km.inertia_)
    elif impl == "faiss":
        faiss = pytest.importorskip("faiss")

        def fit():
            # max_points_per_centroid = n: no subsampling, so it is the same problem
            km = faiss.Kmeans(d, k, niter=ITERS, max_points_per_centroid=n, seed=1234)
            km.train(xn, init_centroids=c0n)
            return km

        km = measure(benchmark, fit, **common)
        _record(benchmark, x, km.centroids, ITERS, _ours_labels(x, c0))
    else:
        c = measure(benchmark, lambda: _reference_lloyd(x, c0, ITERS), **common)
        _record(benchmark, x, c, ITERS, _ours_labels(x, c0))


def test_kmeans_seeding_cpu(benchmark):
    n, d, k = CPU["n"], CPU["d"], CPU["k"]
    x, _ = _problem(n, d, k, "cpu", torch.float32)
    measure(benchmark, lambda: kmeans_plusplus(x, k, torch.Generator().manual_seed(0)),
            op="kmeans_seed", impl="coreset_ext", size=dict(n=n, d=d, k=k), device="cpu",
            dtype=torch.float32, rounds=2, warmup=0)


def test_kmeans_seeding_cpu_sklearn(benchmark):
    skc = pytest.importorskip("sklearn.cluster")
    n, d, k = CPU["n"], CPU["d"], CPU["k"]
    x, _ = _problem(n, d, k, "cpu", torch.float32)
    xn = x.numpy()
    measure(benchmark, lambda: skc.kmeans_plusplus(xn, k, random_state=0),
            op="kmeans_seed", impl="scikit-learn", size=dict(n=n, d=d, k=k), device="cpu",
            dtype=torch.float32, rounds=2, warmup=0)


# ------------------------------------------------------------------------------ GPU

GPU_IMPLS = ["coreset_ext", "flash-kmeans", "fastkmeans", "fast-pytorch-kmeans", "naive", "eager"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("n", GPU_NS)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_kmeans_gpu(benchmark, impl, n):
    d, k, dtype = GPU_D, GPU_K, torch.bfloat16
    x, c0 = _problem(n, d, k, "cuda", dtype)
    size = dict(n=n, d=d, k=k, iters=ITERS)
    floor = ITERS * floor_seconds(flops=2 * n * k * d, dtype=dtype)
    common = dict(op="kmeans_fit", impl=impl, size=size, device="cuda", dtype=dtype, floor_s=floor,
                  rounds=3, warmup=1)
    ours = _ours_labels(x, c0)
    if impl == "coreset_ext":
        km = measure(benchmark, lambda: cx.KMeans(k, init=c0, max_iter=ITERS, tol=0.0).fit(x), **common)
        _record(benchmark, x, km.cluster_centers_, km.n_iter_, ours, km.labels_)
    elif impl == "flash-kmeans":
        fk = pytest.importorskip("flash_kmeans")
        fit = lambda: fk.batch_kmeans_Euclid(x[None], k, max_iters=ITERS, tol=0.0,  # noqa: E731
                                             init_centroids=c0.to(dtype)[None].clone())
        try:
            ids, cent, it = measure(benchmark, fit, **common)
        except (TypeError, RuntimeError, ValueError) as exc:
            pytest.skip(f"flash-kmeans API/dtype mismatch: {exc}")
        _record(benchmark, x, cent[0].float(), it, ours, ids[0])
    elif impl == "fastkmeans":
        fkm = pytest.importorskip("fastkmeans")
        xn = x.float().cpu().numpy()

        def fit():
            km = fkm.FastKMeans(d, k, niter=ITERS, tol=-1.0, gpu=True, seed=0,
                                max_points_per_centroid=None)
            km.train(xn)
            return km

        try:
            km = measure(benchmark, fit, **common)
        except (TypeError, RuntimeError, ValueError) as exc:
            pytest.skip(f"fastkmeans API mismatch: {exc}")
        # its API takes numpy (host round trip included) and draws its own initial centroids
        _record(benchmark, x, km.centroids, ITERS, None, init="own")
    elif impl == "fast-pytorch-kmeans":
        fpk = pytest.importorskip("fast_pytorch_kmeans")

        def fit():
            km = fpk.KMeans(n_clusters=k, mode="euclidean", max_iter=ITERS, tol=-1.0, verbose=0)
            labels = km.fit_predict(x.float(), centroids=c0.clone())
            return km, labels

        try:
            km, labels = measure(benchmark, fit, **common)
        except (TypeError, RuntimeError, ValueError) as exc:
            pytest.skip(f"fast-pytorch-kmeans API mismatch: {exc}")
        _record(benchmark, x, km.centroids.float(), ITERS, ours, labels)
    elif impl == "naive":
        c = measure(benchmark, lambda: _naive_lloyd(x, c0, ITERS), **common)
        _record(benchmark, x, c, ITERS, ours)
    else:
        c = measure(benchmark, lambda: _reference_lloyd(x, c0, ITERS), **common)
        _record(benchmark, x, c, ITERS, ours)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("n", GPU_NS)
def test_kmeans_step_gpu(benchmark, n):
    """One Lloyd iteration of the two ops alone (assign + update + divide): the kernel cost."""
    d, k, dtype = GPU_D, GPU_K, torch.bfloat16
    x, c0 = _problem(n, d, k, "cuda", dtype)

    def step():
        labels, _ = ops.kmeans_assign(x, c0)
        sums, counts = ops.kmeans_update(x, labels, k)
        return sums / counts.clamp_min(1)[:, None]

    measure(benchmark, step, op="kmeans_step", impl="coreset_ext", size=dict(n=n, d=d, k=k),
            device="cuda", dtype=dtype, floor_s=floor_seconds(flops=2 * n * k * d, dtype=dtype))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("n", GPU_NS)
def test_kmeans_assign_gpu(benchmark, n):
    d, k, dtype = GPU_D, GPU_K, torch.bfloat16
    x, c0 = _problem(n, d, k, "cuda", dtype)
    measure(benchmark, lambda: ops.kmeans_assign(x, c0), op="kmeans_assign", impl="coreset_ext",
            size=dict(n=n, d=d, k=k), device="cuda", dtype=dtype,
            floor_s=floor_seconds(flops=2 * n * k * d, dtype=dtype))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("n", GPU_NS)
def test_kmeans_seeding_gpu(benchmark, n):
    """k-means++ on the device: KMeans's default sample (min(n, max(50k, 100 k)) points)."""
    d, k, dtype = GPU_D, GPU_K, torch.bfloat16
    x, _ = _problem(n, d, k, "cuda", dtype)
    km = cx.KMeans(k)
    km._start(x)
    measure(benchmark, lambda: km._init_centers(x, torch.Generator().manual_seed(0)),
            op="kmeans_seed", impl="coreset_ext", size=dict(n=n, d=d, k=k), device="cuda",
            dtype=dtype, rounds=3, warmup=1)
