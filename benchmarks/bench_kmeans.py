"""k-means benchmarks: full Lloyd fits from identical initial centroids, and k-means++ seeding.

CPU (always): n = 100k, d = 128, k = 100, ITERS Lloyd iterations from the same initial centroids:
coreset_ext vs scikit-learn (algorithm="lloyd") vs faiss-cpu vs the pure-PyTorch reference loop.
CPU grid (test_kmeans_cpu_grid; standalone: `python -m benchmarks.bench_kmeans --grid`, which writes
benchmarks/results/cpu-kmeans-grid.md): n in {10k, 100k, 1M} x d in {16, 64, 128, 256} x k in
{10, 100, 1000}, coreset_ext against scikit-learn timed interleaved, ratio per cell.
GPU (cuda only): n in {1M, 10M} x k in {1000, 65536}, d = 128, bf16: coreset_ext vs flash-kmeans,
fastkmeans, fast-pytorch-kmeans and a naive torch loop (full n x k distance matrix). The whole
table alone: `python benchmarks/run.py --gpu --quick -k test_kmeans_gpu`.

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
GPU_KS = [1000, 65_536]
# k = 65,536: fewer iterations and rounds (one iteration is 65x the k = 1000 work); peers that
# would take over a minute per fit there are skipped: the n x k matrix of naive, the reference
# loop, and fast-pytorch-kmeans beyond n * k = 1e11.
GPU_BIG_K_ITERS = 3
GPU_SLOW_IMPLS = {"naive": 1e10, "eager": 1e10, "fast-pytorch-kmeans": 1e11, "fastkmeans": 1e12}

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


def _ours_labels(x, c0, iters=ITERS):
    key = ("ours_labels", x.data_ptr(), x.shape, iters)
    if key not in _CACHE:
        km = cx.KMeans(c0.shape[0], init=c0, max_iter=iters, tol=0.0).fit(x)
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


# ------------------------------------------------------------------------------ CPU grid vs scikit-learn

GRID_NS = [10_000, 100_000, 1_000_000]
GRID_DS = [16, 64, 128, 256]
GRID_KS = [10, 100, 1000]
GRID_REPEATS = 3
GRID_MAX_ITERS = 5
# Lloyd iterations per fit: at most GRID_MAX_ITERS, fewer where one costs more than this many
# flops (2 n k d), so the whole grid stays within ~20 minutes on 2 cores; time is per iteration.
GRID_FLOPS_PER_FIT = 6e10
GRID_MAX_FIT_S = 60.0  # a cell whose first fit takes longer is skipped


def grid_iters(n: int, d: int, k: int) -> int:
    return max(1, min(GRID_MAX_ITERS, int(GRID_FLOPS_PER_FIT // (2 * n * k * d))))


def grid_cell(n: int, d: int, k: int, repeats: int = GRID_REPEATS) -> dict:
    """coreset_ext and scikit-learn (algorithm="lloyd") on the same data from the same initial
    centroids, the same number of Lloyd iterations (tol=0), the same thread count, timed
    interleaved in this process (the median of `repeats` each), who goes first alternating by repeat:
    the two use separate OpenMP pools, and the one just used still spins on the cores when the
    other starts. Returns the cell's row."""
    import time

    from threadpoolctl import threadpool_limits

    sk = pytest.importorskip("sklearn.cluster")
    threads = torch.get_num_threads()
    iters = grid_iters(n, d, k)
    x, c0 = _problem(n, d, k, "cpu", torch.float32)
    xn, c0n = x.numpy(), c0.numpy()
    times: dict[str, list[float]] = {"ours": [], "sklearn": []}
    fits = {}
    with threadpool_limits(threads):
        for rep in range(repeats):
            for impl in ("ours", "sklearn") if rep % 2 == 0 else ("sklearn", "ours"):
                start = time.perf_counter()
                if impl == "ours":
                    fits[impl] = cx.KMeans(k, init=c0, max_iter=iters, tol=0.0).fit(x)
                else:
                    fits[impl] = sk.KMeans(k, init=c0n, n_init=1, max_iter=iters, tol=0.0,
                                           algorithm="lloyd").fit(xn)
                times[impl].append((time.perf_counter() - start) / max(fits[impl].n_iter_, 1))
                if rep == 0 and impl == "ours" and times[impl][0] * iters > GRID_MAX_FIT_S:
                    return dict(n=n, d=d, k=k, iters=iters, skipped=f"fit over {GRID_MAX_FIT_S:.0f} s")
    ours, ref = float(np.median(times["ours"])), float(np.median(times["sklearn"]))
    inertia_ours, inertia_sk = fits["ours"].inertia_, float(fits["sklearn"].inertia_)
    return dict(n=n, d=d, k=k, iters=iters, threads=threads, ours_s_per_iter=ours, sklearn_s_per_iter=ref,
                ratio=ours / ref, n_iter=(fits["ours"].n_iter_, int(fits["sklearn"].n_iter_)),
                inertia_rel_diff=abs(inertia_ours - inertia_sk) / inertia_sk)


@pytest.mark.parametrize("k", GRID_KS)
@pytest.mark.parametrize("d", GRID_DS)
@pytest.mark.parametrize("n", GRID_NS)
def test_kmeans_cpu_grid(benchmark, n, d, k):
    """One cell of the CPU grid: the benchmark's time is the interleaved pair (ours + scikit-learn);
    metric_ratio is ours / scikit-learn per Lloyd iteration (below 1: ours is faster)."""
    row = {}

    def pair():
        row.update(grid_cell(n, d, k))

    measure(benchmark, pair, op="kmeans_grid", impl="coreset_ext+scikit-learn", size=dict(n=n, d=d, k=k),
            device="cpu", dtype=torch.float32, rounds=1, warmup=0)
    if "skipped" in row:
        pytest.skip(row["skipped"])
    for key in ("ratio", "ours_s_per_iter", "sklearn_s_per_iter", "inertia_rel_diff", "iters"):
        benchmark.extra_info[f"metric_{key}"] = row[key]


def grid_table(rows: list[dict], command: str, device: str, repeats: int = GRID_REPEATS) -> str:
    """The Markdown results table of the CPU grid: one row per cell, ratio = ours / scikit-learn."""
    done = [r for r in rows if "ratio" in r]
    lines = [
        "# k-means on the CPU: coreset_ext against scikit-learn, per Lloyd iteration",
        "",
        f"Device: {device}; torch {torch.__version__}; both with {torch.get_num_threads()} thread(s). Same data (a Gaussian",
        "mixture), same initial centroids, a fixed number of Lloyd iterations (tol=0; fewer on the biggest",
        f"cells), timed interleaved in one process, median of {repeats}. ratio = ours / scikit-learn",
        "(below 1: ours is faster). The CPU was shared with other work while this ran: ratios are the",
        "comparison, absolute times are noisy.",
        "",
        f"Command: `{command}`",
        "",
    ]
    if done:
        worst = max(done, key=lambda r: r["ratio"])
        best = min(done, key=lambda r: r["ratio"])
        lose = [r for r in done if r["ratio"] > 1.0]
        lines += [f"Cells: {len(done)} measured, {len(rows) - len(done)} skipped; ours faster in "
                  f"{len(done) - len(lose)}. Worst ratio {worst['ratio']:.2f} (n={worst['n']}, d={worst['d']}, "
                  f"k={worst['k']}), best {best['ratio']:.2f} (n={best['n']}, d={best['d']}, k={best['k']}).", ""]
    lines += ["| n | d | k | iters | ours ms/iter | scikit-learn ms/iter | ratio | inertia rel. diff |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "ratio" in r:
            lines.append(f"| {r['n']} | {r['d']} | {r['k']} | {r['iters']} | {r['ours_s_per_iter'] * 1e3:.2f} | "
                         f"{r['sklearn_s_per_iter'] * 1e3:.2f} | {r['ratio']:.2f} | {r['inertia_rel_diff']:.1e} |")
        else:
            lines.append(f"| {r['n']} | {r['d']} | {r['k']} | {r['iters']} | - | - | {r['skipped']} | - |")
    return "\n".join(lines) + "\n"


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
@pytest.mark.parametrize("k", GPU_KS)
@pytest.mark.parametrize("n", GPU_NS)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_kmeans_gpu(benchmark, impl, n, k):
    """The GPU table: n in {1M, 10M} x k in {1000, 65536}, d = 128, bf16, from the same centroids."""
    if n * k > GPU_SLOW_IMPLS.get(impl, float("inf")):
        pytest.skip(f"{impl} at n * k = {n * k:.1e}: over a minute per fit")
    d, dtype = GPU_D, torch.bfloat16
    iters = ITERS if k <= GPU_K else GPU_BIG_K_ITERS
    x, c0 = _problem(n, d, k, "cuda", dtype)
    size = dict(n=n, d=d, k=k, iters=iters)
    floor = iters * floor_seconds(flops=2 * n * k * d, dtype=dtype)
    common = dict(op="kmeans_fit", impl=impl, size=size, device="cuda", dtype=dtype, floor_s=floor,
                  rounds=3 if k <= GPU_K else 2, warmup=1)
    ours = _ours_labels(x, c0, iters)
    if impl == "coreset_ext":
        km = measure(benchmark, lambda: cx.KMeans(k, init=c0, max_iter=iters, tol=0.0).fit(x), **common)
        _record(benchmark, x, km.cluster_centers_, km.n_iter_, ours, km.labels_)
    elif impl == "flash-kmeans":
        fk = pytest.importorskip("flash_kmeans")
        fit = lambda: fk.batch_kmeans_Euclid(x[None], k, max_iters=iters, tol=0.0,  # noqa: E731
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
            km = fkm.FastKMeans(d, k, niter=iters, tol=-1.0, gpu=True, seed=0,
                                max_points_per_centroid=None)
            km.train(xn)
            return km

        try:
            km = measure(benchmark, fit, **common)
        except (TypeError, RuntimeError, ValueError) as exc:
            pytest.skip(f"fastkmeans API mismatch: {exc}")
        # its API takes numpy (host round trip included) and draws its own initial centroids
        _record(benchmark, x, km.centroids, iters, None, init="own")
    elif impl == "fast-pytorch-kmeans":
        fpk = pytest.importorskip("fast_pytorch_kmeans")

        def fit():
            km = fpk.KMeans(n_clusters=k, mode="euclidean", max_iter=iters, tol=-1.0, verbose=0)
            labels = km.fit_predict(x.float(), centroids=c0.clone())
            return km, labels

        try:
            km, labels = measure(benchmark, fit, **common)
        except (TypeError, RuntimeError, ValueError) as exc:
            pytest.skip(f"fast-pytorch-kmeans API mismatch: {exc}")
        _record(benchmark, x, km.centroids.float(), iters, ours, labels)
    elif impl == "naive":
        c = measure(benchmark, lambda: _naive_lloyd(x, c0, iters), **common)
        _record(benchmark, x, c, iters, ours)
    else:
        c = measure(benchmark, lambda: _reference_lloyd(x, c0, iters), **common)
        _record(benchmark, x, c, iters, ours)


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


def main() -> None:
    """`python -m benchmarks.bench_kmeans --grid [--out FILE] [--n ...] [--cells N,D,K ...]`: the CPU grid as a
    Markdown table. With --cells, only those cells, printed (written only where --out/--json are given)."""
    import argparse
    import json
    import sys

    from tqdm.auto import tqdm

    from benchmarks.run import device_name

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--grid", action="store_true", required=True)
    parser.add_argument("--out", help="default: benchmarks/results/cpu-kmeans-grid.md (without --cells)")
    parser.add_argument("--json", help="the rows as measured (seconds per iteration), for later comparison; "
                        "default: benchmarks/results/parts/cpu-kmeans-grid.json (without --cells)")
    parser.add_argument("--repeats", type=int, default=GRID_REPEATS, help="timed fits per side and cell (median)")
    parser.add_argument("--n", type=int, nargs="*", default=GRID_NS)
    parser.add_argument("--d", type=int, nargs="*", default=GRID_DS)
    parser.add_argument("--k", type=int, nargs="*", default=GRID_KS)
    parser.add_argument("--cells", nargs="+", metavar="N,D,K",
                        help="only these cells (instead of the --n x --d x --k product), e.g. 10000,16,10")
    parser.add_argument("--threads", type=int, help="threads for both sides (default: torch's, all cores); 1 "
                        "compares the single-thread paths when other work keeps a core busy")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.cells:
        try:
            cells = [tuple(int(v) for v in c.split(",")) for c in args.cells]
        except ValueError:
            parser.error(f"--cells takes N,D,K triples of integers, got {args.cells}")
        if any(len(c) != 3 or min(c) < 1 for c in cells):
            parser.error(f"--cells takes N,D,K triples of positive integers, got {args.cells}")
    else:
        cells = [(n, d, k) for n in args.n for d in args.d for k in args.k]
        args.out = args.out or "benchmarks/results/cpu-kmeans-grid.md"
        args.json = args.json or "benchmarks/results/parts/cpu-kmeans-grid.json"
    grid_cell(2000, 16, 10, repeats=1)  # warm-up: first calls load the kernels
    rows = []
    for n, d, k in tqdm(cells, desc="k-means CPU grid"):
        rows.append(grid_cell(n, d, k, repeats=args.repeats))
        tqdm.write(json.dumps(rows[-1]))
    command = "python -m benchmarks.bench_kmeans " + " ".join(sys.argv[1:])
    table = grid_table(rows, command, device_name(False), args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        print(f"wrote {args.out}")
    else:
        print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "torch": torch.__version__, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
