"""KMeans: Lloyd's algorithm on the GPU or CPU, with scikit-learn's interface and torch tensors.

One Lloyd iteration is `ops.kmeans_assign` (fused nearest-centroid search, never the n x k matrix)
followed by `ops.kmeans_update` (deterministic per-cluster sums), so a fit is reproducible bit for
bit from its seed. With `batch_size`, a CPU tensor is streamed through the device chunk by chunk:
the same full Lloyd iterations, for data larger than device memory.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator

import numpy as np
import torch

from coreset_ext import ops, reference
from coreset_ext._validation import POSITIVE_INT, SEED, Interval, Options, check_params, is_int

__all__ = ["KMeans", "ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """A fit ended with fewer distinct clusters than asked for (as scikit-learn's of the same name)."""

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n_samples, n_features], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must have a floating dtype (float32, float16, bfloat16, float64), got {x.dtype}")
    return x.detach()  # clustering is not differentiated through


class KMeans:
    """k-means clustering (Lloyd) with scikit-learn's shape: `fit`, `predict`, `fit_predict`, `transform`.

    Args:
        n_clusters: number of clusters k (1 <= k <= n_samples).
        metric: "euclidean" (squared distances, centroids are means) or "cosine" (spherical k-means:
            points and centroids are normalised, assignment by largest cosine, distance 1 - cosine).
        init: "k-means++" (greedy, 2 + int(ln k) candidates per round, as scikit-learn), "random"
            (k distinct points), or initial centroids of shape [k, d] (tensor or array).
        n_init: number of runs from different seeds; the run of lowest inertia is kept (1 when
            `init` is an array).
        max_iter, tol: Lloyd stops after `max_iter` iterations, when the labels stop changing, or
            when the squared centroid shift summed over clusters is <= tol * (mean per-feature
            variance of x), as in scikit-learn.
        seed: same seed (and same data, device, dtype) -> bit-identical result. None draws one
            from torch's global generator.
        batch_size: if set, the data stays where it is (e.g. CPU) and is streamed to `device` in
            chunks of this many rows each iteration: exact full Lloyd, not mini-batch.
        device: where to compute; None means x's device.
        verbose: show progress (iteration, inertia, centroid shift).
        init_sample_size: k-means++ seeds from a random sample of this many points; "auto" uses
            min(n, max(50_000, 100 * k)); None uses every point.

    Attributes (torch tensors on the device x came from; CPU for numpy input):
        cluster_centers_ [k, d] float32, labels_ [n] int64, inertia_ (float: sum of squared
        distances, or of 1 - cosine), n_iter_ (int).

    Empty clusters: when an iteration leaves a cluster empty, it is re-seeded with the point
    farthest from its own centroid (scikit-learn's rule; the farthest points go to the empty
    clusters in index order, and are removed from the clusters they came from).

    Float64 input is clustered in float32; float16/bfloat16 are kept for the assignment (float32
    accumulation) and the centroids are float32.

    Example:
        >>> import torch, coreset_ext as cx
        >>> x = torch.cat([torch.randn(50, 2) + 10, torch.randn(50, 2) - 10])
        >>> km = cx.KMeans(n_clusters=2, seed=0).fit(x)
        >>> sorted(torch.bincount(km.labels_).tolist())
        [50, 50]
    """

    # what each numeric or option argument accepts (scikit-learn's declarative style)
    _parameter_constraints = {
        "n_clusters": [POSITIVE_INT],
        "metric": [Options("euclidean", "cosine")],
        "n_init": [POSITIVE_INT],
        "max_iter": [POSITIVE_INT],
        "tol": [Interval(float, 0, None)],
        "batch_size": [None, POSITIVE_INT],
        "seed": [None, SEED],
        "init_sample_size": [Options("auto"), None, POSITIVE_INT],
    }

    def __init__(
        self,
        n_clusters: int,
        *,
        metric: str = "euclidean",
        init="k-means++",
        n_init: int = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        seed: int | None = None,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        verbose: bool = False,
        init_sample_size: int | str | None = "auto",
    ) -> None:
        p = check_params(locals(), self._parameter_constraints)
        if isinstance(init, str) and init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++', 'random' or an array [k, d], got {init!r}")
        if is_int(init_sample_size) and init_sample_size < n_clusters:
            # k-means++ on fewer points than k would have to pick some centres twice
            raise ValueError(f"init_sample_size = {init_sample_size} is smaller than n_clusters = {n_clusters}")
        self.n_clusters = p["n_clusters"]
        self.metric = metric
        self.init = init
        self.n_init = p["n_init"]
        self.max_iter = p["max_iter"]
        self.tol = p["tol"]
        self.seed = seed
        self.batch_size = p["batch_size"]
        self.device = None if device is None else torch.device(device)
        self.verbose = bool(verbose)
        self.init_sample_size = init_sample_size

    # ---------------------------------------------------------------- data plumbing

    def _prepare(self, x) -> torch.Tensor:
        """x as a tensor of a clustering dtype, on the device it will be stored on during the fit."""
        x = _as_tensor(x, "x")
        if x.dtype == torch.float64:
            x = x.float()
        device = self._device_  # set by fit
        if self.batch_size is None:
            if x.device != device:
                x = x.to(device)
            if self.metric == "cosine":
                x = _normalize_rows(x)  # once per fit, not per iteration
        return x

    def _chunks(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(start row, rows on the compute device, normalised for cosine) for every chunk of x."""
        n = x.shape[0]
        step = n if self.batch_size is None else self.batch_size
        for s in range(0, max(n, 1), max(step, 1)):
            xc = x[s : s + step]
            if xc.device != self._device_:
                # asynchronous host-to-device only: a device-to-host copy into pinned memory
                # returns before it lands, and the CPU would read the chunk too early
                xc = xc.to(self._device_, non_blocking=xc.device.type == "cpu")
            if self.metric == "cosine" and self.batch_size is not None:
                xc = _normalize_rows(xc)  # streamed chunks arrive raw (in-memory x was normalised once)
            yield s, xc

    def _pass(self, x: torch.Tensor, centers: torch.Tensor, update: bool):
        """One assignment pass over x (and the update sums when `update`).

        Returns labels [n] and distances [n] on x's device, and sums [k, d] and counts [k] on
        the compute device (None without update). The inertia is `_inertia(dist)`, when needed.
        """
        whole = self.batch_size is None
        labels = dist = sums = counts = None
        if not whole:
            labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
            dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for s, xc in self._chunks(x):
            # x was checked finite once (fit/predict), not once per iteration
            if update:
                lab, dst, sc, cc = ops.kmeans_lloyd_step(xc, centers, metric=self.metric)
                # chunk sums are added in chunk order: deterministic
                sums, counts = (sc, cc) if sums is None else (sums + sc, counts + cc)
            else:
                lab, dst = ops.kmeans_assign(xc, centers, metric=self.metric, validate=False)
            if whole:
                labels, dist = lab, dst
            else:
                labels[s : s + xc.shape[0]].copy_(lab)
                dist[s : s + xc.shape[0]].copy_(dst)
        return labels, dist, sums, counts

    def _rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x[idx] as float32 rows on the compute device (normalised for cosine)."""
        rows = x[idx.to(x.device)].to(self._device_)
        if self.metric == "cosine" and self.batch_size is not None:
            # what _prepare did to in-memory x, so that both seed from the same rows
            rows = _normalize_rows(rows)
        rows = rows.to(torch.float32)
        return reference.normalize(rows) if self.metric == "cosine" else rows

    # ---------------------------------------------------------------- initialisation

    def _init_centers(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, k = x.shape[0], self.n_clusters
        if self.init == "random":
            return self._rows(x, torch.randperm(n, generator=gen)[:k])
        size = n if self.init_sample_size is None else (
            min(n, max(50_000, 100 * k)) if self.init_sample_size == "auto" else min(n, int(self.init_sample_size)))
        idx = torch.arange(n) if size == n else torch.randperm(n, generator=gen)[:size].sort().values
        return kmeans_plusplus(self._rows(x, idx), k, gen)

    def _user_centers(self, d: int) -> torch.Tensor:
        init = _as_tensor(self.init, "init")
        if tuple(init.shape) != (self.n_clusters, d):
            raise ValueError(f"init must have shape (n_clusters, n_features) = {(self.n_clusters, d)}, "
                             f"got {tuple(init.shape)}")
        if not bool(torch.isfinite(init).all()):
            raise ValueError("init contains NaN or Inf")
        c = init.to(self._device_, torch.float32)
        return reference.normalize(c) if self.metric == "cosine" else c

    # ---------------------------------------------------------------- Lloyd

    def _means(self, centers, sums, counts):
        """Centroids from the update sums; a cluster without points keeps its centroid."""
        filled = (counts > 0)[:, None]
        if self.metric == "cosine":
            new = reference.normalize(sums.float())
        else:
            new = sums.float() / counts.clamp_min(1)[:, None].float()
        return torch.where(filled, new, centers)

    def _reseed_empty(self, x, centers, labels, dist, sums, counts):
        """Centroids after re-seeding empty clusters with the farthest points (rare: its own syncs)."""
        empty = torch.nonzero(counts == 0).flatten().tolist()
        far = torch.sort(dist, descending=True, stable=True).indices[: len(empty)]
        pts = self._rows(x, far)
        old = labels[far].to(self._device_)
        sums, counts = sums.clone(), counts.clone()
        for j, c in enumerate(empty):  # a short python loop: no float atomics, fixed order
            sums[old[j]] -= pts[j]
            counts[old[j]] -= 1
            sums[c] = pts[j]
            counts[c] = 1
        # a cluster emptied by giving its only point away keeps its previous centroid
        return self._means(centers, sums, counts)

    def _lloyd(self, x, centers, tol, run):
        bar = None
        if self.verbose:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_iter, desc=f"KMeans run {run}", leave=True)
        labels_old = None
        strict = False
        it = 0
        for it in range(self.max_iter):
            labels, dist, sums, counts = self._pass(x, centers, update=True)
            new = self._means(centers, sums, counts)
            # The iteration's three decisions (empty clusters? how far did the centroids move?
            # did any label change?) cross to the host together: one synchronisation, not three.
            # (labels live on x's device, which streaming with batch_size leaves on the CPU)
            moved = labels.ne(labels_old).any() if labels_old is not None else torch.ones((), dtype=torch.bool)
            n_empty, shift, changed = torch.stack([
                (counts == 0).sum().to(torch.float64), ((new - centers) ** 2).sum().to(torch.float64),
                moved.to(counts.device, torch.float64)]).tolist()
            if n_empty:
                new = self._reseed_empty(x, centers, labels, dist, sums, counts)
                shift = float(((new - centers) ** 2).sum())
            centers = new
            if bar is not None:
                bar.update(1)
                bar.set_postfix(inertia=f"{_inertia(dist):.6g}", shift=f"{shift:.3g}")
            if not changed:
                strict = True  # labels unchanged: the centroids cannot move any more
                break
            if shift <= tol:
                break
            labels_old = labels
        if not strict:
            # assign against the final centroids so labels_ and inertia_ match cluster_centers_
            labels, dist, _, _ = self._pass(x, centers, update=False)
        if bar is not None:
            bar.close()
        return centers, labels, _inertia(dist), it + 1

    def _tol(self, x: torch.Tensor) -> float:
        """tol * mean per-feature variance of x, checking on the way that x is finite.

        Per block of rows: torch.var_mean (Welford, float32 like scikit-learn's np.var on float32
        data); blocks are merged with Chan's formula in float64. NaN/Inf make a mean or a
        variance non-finite, so that is the finiteness check too.
        """
        if self.tol == 0:
            self._check_finite(x)  # as scikit-learn: no variance needed, only the finiteness check
            return 0.0
        count, mean, m2 = 0, None, None
        for _, chunk in self._chunks(x):
            for b in range(0, chunk.shape[0], 1 << 20):  # float32 temporaries stay bounded
                block = chunk[b : b + (1 << 20)]
                v, m = torch.var_mean(block.float(), dim=0, correction=0)
                nb = block.shape[0]
                v, m = v.double(), m.double()
                if mean is None:
                    count, mean, m2 = nb, m, v * nb
                else:
                    delta = m - mean
                    total = count + nb
                    mean = mean + delta * (nb / total)
                    m2 = m2 + v * nb + delta * delta * (count * nb / total)
                    count = total
        var = m2 / count
        if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
            raise ValueError("x contains NaN or Inf")
        return float(var.mean()) * self.tol

    def _check_finite(self, x: torch.Tensor) -> None:
        """ValueError if x holds NaN/Inf. A NaN/Inf makes the (fast, float32) chunk sum non-finite;
        a non-finite sum of finite values (overflow) is told apart by the exact check."""
        for _, chunk in self._chunks(x):
            if not math.isfinite(float(chunk.sum())) and not bool(torch.isfinite(chunk).all()):
                raise ValueError("x contains NaN or Inf")

    # ---------------------------------------------------------------- public API

    def fit(self, x, y=None) -> "KMeans":
        """Clusters x [n, d] (tensor or array). Returns self."""
        x = _as_tensor(x, "x")
        source_device = x.device
        self._device_ = self.device or x.device
        x = self._prepare(x)
        n, d = x.shape
        if self.n_clusters > n:
            raise ValueError(f"n_clusters = {self.n_clusters} is larger than the number of samples n = {n}")
        tol = self._tol(x)
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator().manual_seed(int(seed))
        user = not isinstance(self.init, str)
        best = None
        for run in range(1 if user else self.n_init):
            centers = self._user_centers(d) if user else self._init_centers(x, gen)
            result = self._lloyd(x, centers, tol, run)
            if best is None or result[2] < best[2]:
                best = result
        centers, labels, inertia, n_iter = best
        found = int((torch.bincount(labels, minlength=self.n_clusters) > 0).sum())  # O(n), once per fit
        if found < self.n_clusters:
            warnings.warn(f"Number of distinct clusters ({found}) found smaller than n_clusters "
                          f"({self.n_clusters}). Possibly due to duplicate points in x.", ConvergenceWarning,
                          stacklevel=2)
        self.cluster_centers_ = centers.to(source_device)
        self.labels_ = labels.to(source_device)
        self.inertia_ = inertia
        self.n_iter_ = n_iter
        return self

    def _fitted_input(self, x) -> tuple[torch.Tensor, torch.device]:
        """x checked against the fitted model and prepared as in fit, and the device it came from."""
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("this KMeans is not fitted yet: call fit first")
        x = _as_tensor(x, "x")
        if x.shape[1] != self.cluster_centers_.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features but the model was fitted on {self.cluster_centers_.shape[1]}")
        source = x.device
        x = self._prepare(x)
        self._check_finite(x)
        return x, source

    def predict(self, x) -> torch.Tensor:
        """Index of the nearest centroid of every row of x: int64 [n], on x's device."""
        x, source = self._fitted_input(x)
        labels, _, _, _ = self._pass(x, self.cluster_centers_.to(self._device_), update=False)
        return labels.to(source)

    def fit_predict(self, x, y=None) -> torch.Tensor:
        """fit(x), then labels_."""
        return self.fit(x).labels_

    def transform(self, x) -> torch.Tensor:
        """Distance of every row of x to every centroid: float32 [n, k] on x's device.

        euclidean: euclidean distances (not squared, like scikit-learn); cosine: 1 - cosine.
        """
        x, source = self._fitted_input(x)
        c = self.cluster_centers_.to(self._device_, torch.float32)
        if self.metric == "cosine":
            c = reference.normalize(c)
        out = torch.empty(x.shape[0], self.n_clusters, dtype=torch.float32, device=source)
        rows = self.batch_size or 65536
        for s in range(0, x.shape[0], rows):
            xc = x[s : s + rows].to(self._device_, torch.float32)
            if self.metric == "cosine":
                block = 1 - reference.normalize(xc) @ c.T
            else:
                block = torch.cdist(xc, c)
            out[s : s + xc.shape[0]] = block.to(source)
        return out


def _inertia(dist: torch.Tensor) -> float:
    """Sum of the distances (squared euclidean, or 1 - cosine), accumulated in float64."""
    return float(dist.sum(dtype=torch.float64))


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by max(norm, EPS), norms taken in float32, result in x's dtype (no float32 copy)."""
    norm = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(reference.EPS)
    return x / norm[:, None].to(x.dtype)


def kmeans_plusplus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding on x's device: k rows of x [m, d] (float32) as initial centroids.

    As scikit-learn: the first centre is uniform; each next one is the best (lowest resulting
    potential) of 2 + int(ln k) candidates drawn with probability proportional to the squared
    distance to the nearest centre so far. Random numbers come from the CPU generator `gen`, so a
    seed gives the same draws on every device.
    """
    m, d = x.shape
    dev = x.device
    trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(dim=1)
    centers = torch.empty(k, d, dtype=x.dtype, device=dev)
    first = torch.randint(m, (1,), generator=gen).to(dev)
    centers[0] = x[first[0]]
    closest = (x_sq - 2 * x @ centers[0] + x_sq[first[0]]).clamp_min(0)
    for c in range(1, k):
        r = torch.rand(trials, generator=gen, dtype=torch.float64).to(dev)
        cum = torch.cumsum(closest, dim=0, dtype=torch.float64)
        cand = torch.searchsorted(cum, r * cum[-1]).clamp_max(m - 1)
        dc = (x_sq[None, :] - 2 * x[cand] @ x.T + x_sq[cand][:, None]).clamp_min(0)  # [trials, m]
        dc = torch.minimum(dc, closest[None, :])
        # index_select with a one-element tensor: indexing with a 0-dim device tensor would
        # read it on the host, a synchronisation per round
        best = torch.argmin(dc.sum(dim=1, dtype=torch.float64)).view(1)
        centers[c] = x.index_select(0, cand.index_select(0, best))[0]
        closest = dc.index_select(0, best)[0]
    return centers
