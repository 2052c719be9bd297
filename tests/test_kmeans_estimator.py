"""cx.KMeans as a scikit-learn estimator: scikit-learn's own estimator checks, the numerics far from
the origin, sample_weight and spherical k-means against independent references, and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import coreset_ext as cx
from coreset_ext import ops
from coreset_ext.cluster import ConvergenceWarning

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.cluster import KMeans as SkKMeans  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

# Checks that cannot apply, by name, with the reason.
EXPECTED_FAILED = {
    # the project's rule: a bad argument fails where it is written (and again in fit, after
    # set_params); scikit-learn validates only in fit. clone and set_params still work.
    "check_do_not_raise_errors_in_init_or_set_params":
        "KMeans checks its arguments in __init__ as well as in fit (errors name the argument where it is written)",
    # as scikit-learn's own KMeans (xfail there): the k-means++ draws depend on the rows, so repeating
    # a row changes the random initialisation. From the same init the equivalence holds:
    # test_sample_weight_equals_repeated_rows.
    "check_sample_weight_equivalence_on_dense_data":
        "k-means++ draws differ on repeated rows (as scikit-learn's KMeans); tested from a fixed init instead",
}


@parametrize_with_checks([cx.KMeans(random_state=0)], expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _two_blobs(offset: float, n: int = 1000, seed: int = 0, dtype=np.float32):
    """Two blobs 1.0 apart (std 0.1) in 2-D, offset from the origin by `offset`."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    x = rng.normal(0, 0.1, (n, 2)) + np.stack([truth * 1.0, np.zeros(n)], 1) + offset
    return x.astype(dtype), truth


def _agreement(a, b) -> float:
    """Label agreement up to a permutation of the two labels."""
    same = float(np.mean(np.asarray(a) == np.asarray(b)))
    return max(same, 1 - same)


# ------------------------------------------------------------------------- estimator API

def test_params_clone_and_random_state_alias():
    km = cx.KMeans(5, random_state=3, metric="cosine", max_iter=20)
    params = km.get_params()
    assert params["n_clusters"] == 5 and params["random_state"] == 3 and params["metric"] == "cosine"
    twin = clone(km)
    assert twin is not km and twin.get_params() == params
    assert km.set_params(n_clusters=4, tol=0.0) is km and km.n_clusters == 4
    with pytest.raises(ValueError, match="invalid parameter 'k'"):
        km.set_params(k=3)
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(_seed()))
    a = cx.KMeans(4, random_state=7).fit(x)
    b = cx.KMeans(4, seed=7).fit(x)  # the older name
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    with pytest.raises(ValueError, match="seed = 1 and random_state = 2 disagree"):
        cx.KMeans(4, seed=1, random_state=2)
    assert "n_clusters=5" in repr(cx.KMeans(5)) and "random_state" not in repr(cx.KMeans(5))


@pytest.mark.parametrize("kind", ["numpy", "torch", "list"])
def test_methods_and_output_types(kind):
    x64 = np.random.default_rng(_seed()).normal(size=(200, 3))
    x = {"numpy": x64.astype(np.float32), "torch": torch.from_numpy(x64.astype(np.float32)),
         "list": x64.astype(np.float32).tolist()}[kind]
    km = cx.KMeans(3, random_state=0).fit(x)
    out_type = torch.Tensor if kind == "torch" else np.ndarray
    for value in (km.labels_, km.cluster_centers_, km.predict(x), km.transform(x), km.fit_predict(x),
                  km.fit_transform(x)):
        assert isinstance(value, out_type)
    assert km.n_features_in_ == 3 and km.n_iter_ >= 1
    centers = np.asarray(km.cluster_centers_, dtype=np.float64)
    d2 = ((x64[:, None, :] - centers[None]) ** 2).sum(-1)  # float64 reference
    assert np.array_equal(np.asarray(km.predict(x)), d2.argmin(1))
    np.testing.assert_allclose(np.asarray(km.transform(x)), np.sqrt(d2), rtol=1e-5, atol=1e-5)
    assert km.score(x) == pytest.approx(-d2.min(1).sum(), rel=1e-5)
    assert km.score(x) == pytest.approx(-km.inertia_, rel=1e-5)


def test_float64_kept_and_int_converted():
    rng = np.random.default_rng(_seed())
    x = rng.normal(size=(150, 4))
    km = cx.KMeans(3, random_state=0).fit(x)
    assert km.cluster_centers_.dtype == np.float64 and km.transform(x).dtype == np.float64
    xi = rng.integers(-5, 6, (150, 4))
    ki = cx.KMeans(3, random_state=0).fit(xi)
    kf = cx.KMeans(3, random_state=0).fit(xi.astype(np.float64))
    assert np.array_equal(ki.labels_, kf.labels_)
    kt = cx.KMeans(3, random_state=0).fit(torch.from_numpy(xi))  # int tensor: float32
    assert kt.cluster_centers_.dtype == torch.float32


# ------------------------------------------------------------------------- far from the origin

@pytest.mark.parametrize("offset", [1e4, 3e3, -1e4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_offset_blobs_match_sklearn(offset, dtype):
    x, truth = _two_blobs(offset, seed=_seed(), dtype=dtype)
    ours = cx.KMeans(2, random_state=0, n_init=3).fit(x)
    ref = SkKMeans(2, random_state=0, n_init=3).fit(x)
    assert _agreement(ours.labels_, truth) == 1.0
    assert _agreement(ours.labels_, ref.labels_) == 1.0
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-3)
    # and the reported inertia is that of the returned centres, in float64
    again = ((x.astype(np.float64) - ours.cluster_centers_.astype(np.float64)[ours.labels_]) ** 2).sum()
    assert ours.inertia_ == pytest.approx(again, rel=1e-3)


def test_offset_large_magnitude_against_float64_lloyd():
    """Spread 1e3 around an offset of 1e6: float32 k-means from a fixed init follows float64 Lloyd.

    Both run on the same (float32-representable) points from one point of each blob, so that no
    cluster empties: the loop below keeps an empty cluster's centroid where KMeans re-seeds it,
    and a random init of 5 points failed ~1 seed in 4 on that difference alone."""
    rng = np.random.default_rng(_seed())
    centres = rng.normal(0, 1e3, (5, 8))
    truth = rng.integers(0, 5, 2000)
    x = (centres[truth] + rng.normal(0, 50.0, (2000, 8)) + 1e6).astype(np.float32).astype(np.float64)
    init = x[[np.flatnonzero(truth == j)[0] for j in range(5)]]
    ours = cx.KMeans(5, init=init.astype(np.float32), max_iter=30, tol=0.0).fit(x.astype(np.float32))
    c = init.copy()  # float64 Lloyd
    for _ in range(30):
        lab = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(5)])
    lab = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    assert np.mean(ours.labels_ == lab) >= 0.999
    assert ours.inertia_ == pytest.approx(((x - c[lab]) ** 2).sum(), rel=1e-3)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_assign_far_from_origin(backend):
    labels, dist = ops.kmeans_assign(torch.tensor([[10000.3, 10000.0]]),
                                     torch.tensor([[10000.0, 10000.0], [10000.5, 10000.0]]), backend=backend)
    assert labels.tolist() == [1]
    assert dist.item() == pytest.approx(0.04, rel=1e-2)  # 0.2^2, with x and c rounded to float32
    g = torch.Generator().manual_seed(_seed())
    c = torch.randn(20, 16, generator=g) + 3e3
    x = c[torch.randint(20, (500,), generator=g)] + 0.05 * torch.randn(500, 16, generator=g)
    labels, dist = ops.kmeans_assign(x, c, backend=backend)
    exact = ((x.double()[:, None] - c.double()[None]) ** 2).sum(-1)
    assert torch.equal(labels, exact.argmin(1))
    torch.testing.assert_close(dist.double(), exact.min(1).values, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------- sample_weight, spherical

def test_sample_weight_matches_sklearn():
    rng = np.random.default_rng(_seed())
    x = rng.normal(size=(800, 5)).astype(np.float32) + rng.integers(0, 3, (800, 1)).astype(np.float32) * 3
    w = rng.uniform(0.1, 5.0, 800)
    init = x[rng.choice(800, 6, replace=False)]
    ours = cx.KMeans(6, init=init, max_iter=50, tol=0.0).fit(x, sample_weight=w)
    ref = SkKMeans(6, init=init, n_init=1, max_iter=50, tol=0.0, algorithm="lloyd").fit(x, sample_weight=w)
    assert np.mean(ours.labels_ == ref.labels_) >= 0.995
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-4)
    assert ours.score(x, sample_weight=w) == pytest.approx(ref.score(x, sample_weight=w), rel=1e-4)


@pytest.mark.parametrize("batch_size", [None, 64])
def test_sample_weight_equals_repeated_rows(batch_size):
    rng = np.random.default_rng(_seed())
    x = rng.normal(size=(300, 4)).astype(np.float32)
    reps = rng.integers(0, 4, 300)
    init = x[reps > 0][:5]
    a = cx.KMeans(5, init=init, max_iter=20, tol=0.0, batch_size=batch_size).fit(x, sample_weight=reps)
    b = cx.KMeans(5, init=init, max_iter=20, tol=0.0).fit(np.repeat(x, reps, axis=0))
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-5, atol=1e-5)
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-5)


def _spherical_numpy(x, init, iters):
    """Independent spherical k-means in float64 numpy: unit rows, argmax cosine, normalised sums."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = init / np.linalg.norm(init, axis=1, keepdims=True)
    for _ in range(iters):
        lab = (u @ c.T).argmax(1)
        for j in range(c.shape[0]):
            if (lab == j).any():
                s = u[lab == j].sum(0)
                c[j] = s / np.linalg.norm(s)
    lab = (u @ c.T).argmax(1)
    return lab, c, float((1 - (u @ c.T).max(1)).sum())


@pytest.mark.parametrize("weighted", [False, True])
def test_spherical_matches_numpy(weighted):
    rng = np.random.default_rng(_seed())
    dirs = rng.normal(size=(4, 16))
    x = (dirs[rng.integers(0, 4, 600)] + 0.4 * rng.normal(size=(600, 16))) * rng.uniform(0.5, 20, (600, 1))
    init = x[:4].copy()
    w = rng.integers(1, 4, 600) if weighted else None
    ours = cx.KMeans(4, metric="cosine", init=init, max_iter=25, tol=0.0).fit(x, sample_weight=w)
    xr = x if w is None else np.repeat(x, w, axis=0)
    lab, c, inertia = _spherical_numpy(xr, init, 25)
    np.testing.assert_allclose(ours.cluster_centers_, c, rtol=1e-6, atol=1e-6)
    if w is None:
        assert np.array_equal(ours.labels_, lab)
    assert ours.inertia_ == pytest.approx(inertia, rel=1e-6)


# ------------------------------------------------------------------------- bad input

def test_bad_input():
    x = np.random.default_rng(_seed()).normal(size=(20, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="n_clusters"):
        cx.KMeans(0)
    with pytest.raises(ValueError, match="n_samples=20 should be >= n_clusters=21"):
        cx.KMeans(21).fit(x)
    with pytest.raises(ValueError, match="n_clusters"):
        cx.KMeans(3).set_params(n_clusters=0).fit(x)
    for bad in (np.nan, np.inf, -np.inf):
        xb = x.copy()
        xb[4, 2] = bad
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            cx.KMeans(2).fit(xb)
    with pytest.raises(ValueError, match=r"0 feature\(s\)"):
        cx.KMeans(2).fit(np.zeros((5, 0), np.float32))
    with pytest.raises(ValueError, match=r"0 sample\(s\)"):
        cx.KMeans(2).fit(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="Reshape your data"):
        cx.KMeans(2).fit(x[:, 0])
    with pytest.raises(ValueError, match="Complex data not supported"):
        cx.KMeans(2).fit(x + 1j)
    with pytest.raises(ValueError, match="sample_weight must have shape"):
        cx.KMeans(2).fit(x, sample_weight=np.ones(19))
    with pytest.raises(ValueError, match="sample_weight must be finite and >= 0"):
        cx.KMeans(2).fit(x, sample_weight=-np.ones(20))
    with pytest.raises(ValueError, match="sample_weight is all zero"):
        cx.KMeans(2).fit(x, sample_weight=np.zeros(20))
    with pytest.raises(ValueError, match="not fitted"):
        cx.KMeans(2).predict(x)
    with pytest.raises(ValueError, match="X has 2 features, but KMeans is expecting 3"):
        cx.KMeans(2).fit(x).predict(x[:, :2])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_identical_points_one_cluster_and_a_warning(metric):
    x = np.tile(np.random.default_rng(_seed()).normal(size=(1, 5)) + 100, (50, 1)).astype(np.float32)
    with pytest.warns(ConvergenceWarning, match=r"distinct clusters \(1\) found smaller than n_clusters \(4\)"):
        km = cx.KMeans(4, random_state=0, metric=metric).fit(x)
    assert np.unique(km.labels_).size == 1
    assert np.isfinite(km.cluster_centers_).all() and km.inertia_ == pytest.approx(0.0, abs=1e-5)


def test_read_only_input_is_read_without_a_warning(tmp_path):
    """Embeddings memory-mapped read-only (np.load(mmap_mode="r")) cluster as the same array in
    memory, x untouched and no warning from torch about a non-writable array."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 1, (60, 3)), rng.normal(9, 1, (60, 3))]).astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        km = cx.KMeans(2, random_state=0).fit(mapped)
        labels = km.predict(mapped)
    ref = cx.KMeans(2, random_state=0).fit(x.copy())
    np.testing.assert_array_equal(km.labels_, ref.labels_)
    np.testing.assert_array_equal(labels, ref.labels_)
    np.testing.assert_array_equal(np.asarray(mapped), x)
