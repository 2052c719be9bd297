"""KMeans: Lloyd's algorithm on the GPU or CPU, with scikit-learn's estimator API and torch tensors.

One Lloyd iteration is `ops.kmeans_assign` (fused nearest-centroid search, never the n x k matrix)
followed by `ops.kmeans_update` (deterministic per-cluster sums), so a fit is reproducible bit for
bit from its seed. With `batch_size`, a CPU tensor is streamed through the device chunk by chunk:
the same full Lloyd iterations, for data larger than device memory.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import warnings
import zlib
from typing import Iterator, NamedTuple

import numpy as np
import torch

from coreset_ext import distributed as dist_helpers
from coreset_ext import ops, reference
from coreset_ext._validation import POSITIVE_INT, SEED, Interval, Options, check_params, is_int

__all__ = ["KMeans", "ConvergenceWarning", "NotFittedError"]


class ConvergenceWarning(UserWarning):
    """A fit ended with fewer distinct clusters than asked for (as scikit-learn's of the same name)."""


class NotFittedError(ValueError, AttributeError):
    """predict/transform/score before fit (as scikit-learn's of the same name)."""


def _not_fitted() -> Exception:
    """The error for a call before fit: scikit-learn's NotFittedError when scikit-learn is loaded
    (its checks and pipelines catch that class), ours otherwise; both are ValueError and AttributeError."""
    message = "this KMeans is not fitted yet: call fit first"
    if "sklearn" in sys.modules:
        from sklearn.exceptions import NotFittedError as SklearnNotFittedError

        return SklearnNotFittedError(message)
    return NotFittedError(message)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _as_tensor(x, name: str) -> tuple[torch.Tensor, bool]:
    """(x as a 2-D float tensor, whether it came as a torch tensor).

    numpy arrays and other array-likes (lists, ...) are read with numpy; integer and boolean input
    becomes float32 (float64 from numpy, as scikit-learn), float64 stays float64.
    """
    is_torch = isinstance(x, torch.Tensor)
    if not is_torch:
        if hasattr(x, "toarray") or type(x).__module__.startswith("scipy.sparse"):
            raise TypeError(f"{name} is a sparse matrix: KMeans takes dense data (call .toarray())")
        try:
            arr = np.asarray(x)
            if arr.dtype.kind in "OUS":
                arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name} must be a tensor or an array of numbers: {exc}") from None
        if arr.dtype.kind == "c":
            raise ValueError(f"{name}: Complex data not supported (KMeans takes real data)")
        if arr.dtype.kind in "biu":
            arr = arr.astype(np.float64)
        if arr.dtype.kind != "f":
            raise ValueError(f"{name} must hold numbers, got an array of dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        with warnings.catch_warnings():
            # a read-only array (np.load(mmap_mode="r"), a memmap of embeddings) warns that torch cannot
            # protect it; KMeans only reads x (centring and normalising write to copies)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(arr)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n_samples, n_features], got shape {tuple(x.shape)}. Reshape your "
                         "data: x.reshape(-1, 1) for a single feature, x.reshape(1, -1) for a single sample")
    if not x.is_floating_point() and not x.is_complex():
        x = x.float()  # integer and boolean tensors: float32, torch's default float
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must have a real floating dtype (float32, float16, bfloat16, float64), got {x.dtype}")
    for axis, what in ((0, "sample"), (1, "feature")):
        if x.shape[axis] == 0:
            shape = f"({x.shape[0]}, {x.shape[1]})"
            raise ValueError(f"{name} has 0 {what}(s) (shape={shape}) while a minimum of 1 is required.")
    return x.detach(), is_torch  # clustering is not differentiated through


def _output(t: torch.Tensor, as_torch: bool, device: torch.device, dtype: torch.dtype | None = None):
    """A result for the caller: a tensor on `device` for torch input, a numpy array otherwise."""
    if dtype is not None:
        t = t.to(dtype)
    if as_torch:
        return t.to(device)
    return t.cpu().numpy()


# Lloyd iterations queued on an accelerator between two reads of their decisions (KMeans._check_every)
CHECK_EVERY = 4


class _LloydStep(NamedTuple):
    """One queued Lloyd iteration: from `centers`, the pass's labels, distances (or None), sums and
    counts, the means `new`, and `decisions` [n_empty, shift, changed] (float64, on the device)."""

    centers: torch.Tensor
    labels: torch.Tensor
    dist: torch.Tensor | None
    sums: torch.Tensor
    counts: torch.Tensor
    new: torch.Tensor
    decisions: torch.Tensor


class KMeans:
    """k-means clustering (Lloyd) with scikit-learn's estimator API, on torch tensors or numpy arrays.

    `fit`, `predict`, `fit_predict`, `transform`, `fit_transform`, `score`, `get_params`,
    `set_params` (so `sklearn.base.clone` and pipelines work). Results follow the input: torch in
    -> torch out (on x's device), numpy (or any array-like) in -> numpy out.

    Args:
        n_clusters: number of clusters k (1 <= k <= n_samples).
        init: "k-means++" (greedy, 2 + int(ln k) candidates per round, as scikit-learn), "random"
            (k distinct points), or initial centroids of shape [k, d] (tensor or array).
        n_init: number of runs from different seeds; the run of lowest inertia is kept (1 when
            `init` is an array).
        max_iter, tol: Lloyd stops after `max_iter` iterations, when the labels stop changing, or
            when the squared centroid shift summed over clusters is <= tol * (mean per-feature
            variance of x), as in scikit-learn.
        random_state: int seed: same seed (and same data, device, dtype) -> bit-identical result.
            None draws one from torch's global generator.
        metric: "euclidean" (squared distances, centroids are means) or "cosine" (spherical k-means:
            points and centroids are normalised, assignment by largest cosine, distance 1 - cosine).
        batch_size: if set, the data stays where it is (e.g. CPU) and is streamed to `device` in
            chunks of this many rows each iteration: exact full Lloyd, not mini-batch.
        device: where to compute; None means x's device.
        verbose: show progress (iteration, inertia, centroid shift).
        init_sample_size: k-means++ seeds from a random sample of this many points; "auto" uses
            min(n, max(50_000, 100 * k)); None uses every point.
        seed: older name of `random_state` (give one or the other).
        distributed: fit on data sharded across torch.distributed ranks (see "Several processes").

    Attributes: cluster_centers_ [k, d], labels_ [n] int64, inertia_ (float: sum of squared
    distances, or of 1 - cosine, weighted by sample_weight), n_iter_ (int), n_features_in_ (int).
    Tensors on the device x came from for torch input, numpy arrays for numpy input.

    Numerics: euclidean data is centred (its float64 mean subtracted, as scikit-learn) before
    clustering and the mean added back to the centroids, and the assignment kernels take their
    products about the centroids' mean: data far from the origin (an offset of 1e4 around a spread
    of 1) clusters as well as data at the origin. float64 input is clustered in float64 (on the GPU
    by the reference path: pass float32 for speed); float32 in float32; float16/bfloat16 are kept
    for the assignment (float32 accumulation) and the centroids are float32. Integer input is
    converted to float (float32 from torch, float64 from numpy).

    Several processes (`distributed=True`, under torch.distributed): every rank calls `fit` with
    its own shard of the data (the rank-order concatenation of the shards is the data set; every
    rank needs at least one row, the same n_features and dtype) and the same parameters. Each
    iteration combines the ranks' per-cluster sums and counts (`distributed.sum_in_rank_order`:
    one all-gather of world_size x k x (d + 1) values), k-means++ seeds from the same random sample
    of the global data on every rank (its rows gathered), and an empty cluster takes the globally
    farthest point. Every rank ends with the same `cluster_centers_`, `inertia_` and `n_iter_`,
    and `labels_` for its own shard. Centroids, labels and n_iter_ equal, bit for bit, those of
    the single-process fit of the concatenated data streamed in chunks of the shards' size
    (`batch_size` = rows per rank, equal shards of at most 65,536 rows, the same device and
    dtype): the sums are added in the same order (inertia_ to float64 rounding). Against an
    in-memory fit of the concatenation they agree to rounding (its per-cluster sums are added in
    another order). `sample_weight` is not supported there.

    Empty clusters: when an iteration leaves a cluster empty, it is re-seeded with the point
    farthest from its own centroid (scikit-learn's rule; the farthest points go to the empty
    clusters in index order, and are removed from the clusters they came from). Fewer distinct
    points than clusters (e.g. all points identical) is not an error: the fit ends with some
    clusters empty (an identical data set gives one non-empty cluster) and a ConvergenceWarning.

    Synchronisation: on a GPU, in-memory fits queue CHECK_EVERY (4) Lloyd iterations and read
    their decisions (empty clusters? centroid shift? any label changed?) in one host
    synchronisation; the iterations queued past the one that stops are dropped, so centroids,
    labels and n_iter_ are those of reading every iteration. CPU, verbose, distributed fits and
    fits streaming CPU data (batch_size) read every iteration (batch_size over data already on
    the GPU queues as in memory).

    Bad input raises ValueError naming the argument: n_clusters < 1 or > n_samples, NaN/Inf
    entries, no features or no samples, non-2-D input; TypeError for sparse matrices.

    Example:
        >>> import torch, coreset_ext as cx
        >>> x = torch.cat([torch.randn(50, 2) + 10, torch.randn(50, 2) - 10])
        >>> km = cx.KMeans(n_clusters=2, random_state=0).fit(x)
        >>> sorted(torch.bincount(km.labels_).tolist())
        [50, 50]
        >>> km.predict(x[:3].numpy()).dtype  # numpy in, numpy out
        dtype('int64')
    """

    _shards: "_Shards | None" = None  # set for the length of a distributed fit

    # what each numeric or option argument accepts (scikit-learn's declarative style); checked
    # where a bad value is written (__init__) and again by fit (after set_params). Arguments are
    # stored as given, as scikit-learn's clone expects.
    _parameter_constraints = {
        "n_clusters": [POSITIVE_INT],
        "metric": [Options("euclidean", "cosine")],
        "n_init": [POSITIVE_INT],
        "max_iter": [POSITIVE_INT],
        "tol": [Interval(float, 0, None)],
        "batch_size": [None, POSITIVE_INT],
        "random_state": [None, SEED],
        "seed": [None, SEED],
        "init_sample_size": [Options("auto"), None, POSITIVE_INT],
        "distributed": [Options(False, True)],
    }

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init="k-means++",
        n_init: int = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state: int | None = None,
        metric: str = "euclidean",
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        verbose: bool = False,
        init_sample_size: int | str | None = "auto",
        seed: int | None = None,
        distributed: bool = False,
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.metric = metric
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.init_sample_size = init_sample_size
        self.seed = seed
        self.distributed = distributed
        self._check_params()

    # ---------------------------------------------------------------- scikit-learn's estimator protocol

    @classmethod
    def _param_names(cls) -> list[str]:
        return list(_init_param_names(cls))

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments by name (scikit-learn's protocol: `sklearn.base.clone`)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> "KMeans":
        """Sets constructor arguments by name (checked at the next fit). Returns self."""
        names = self._param_names()
        for name, value in params.items():
            if name not in names:
                raise ValueError(f"invalid parameter {name!r} for KMeans; valid parameters: {names}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items()
                   if not (isinstance(v, str) and v == defaults[k]) and v is not defaults[k]
                   and not (is_int(v) and is_int(defaults[k]) and v == defaults[k])
                   and not (isinstance(v, float) and v == defaults[k])]
        return f"KMeans({', '.join(changed)})"

    def __sklearn_tags__(self):
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags  # only asked for by sklearn

        return Tags(estimator_type="clusterer", target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags(preserves_dtype=["float64", "float32"]),
                    input_tags=InputTags(allow_nan=False))

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "cluster_centers_")

    def _check_params(self) -> None:
        check_params(self.get_params(), self._parameter_constraints)
        if self.seed is not None and self.random_state is not None and self.seed != self.random_state:
            raise ValueError(f"seed = {self.seed} and random_state = {self.random_state} disagree: "
                             "seed is the older name of random_state, give one")
        if isinstance(self.init, str) and self.init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++', 'random' or an array [k, d], got {self.init!r}")
        if is_int(self.init_sample_size) and self.init_sample_size < self.n_clusters:
            # k-means++ on fewer points than k would have to pick some centres twice
            raise ValueError(f"init_sample_size = {self.init_sample_size} is smaller than "
                             f"n_clusters = {self.n_clusters}")
        if not isinstance(self.verbose, (bool, int, np.integer)):
            raise ValueError(f"verbose must be a bool, got {self.verbose!r}")

    # ---------------------------------------------------------------- data plumbing

    def _start(self, x: torch.Tensor) -> None:
        """The fit's compute device and centroid dtype for x; no centring yet (set once the mean is known)."""
        self._device = x.device if self.device is None else torch.device(self.device)
        self._cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self._shift = None

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """x in its clustering dtype on the device it is stored on during the fit: the compute device
        unless streaming; in memory, centred (euclidean) or normalised (cosine) once per fit."""
        if self.batch_size is None:
            if x.device != self._device:
                x = x.to(self._device)
            if self.metric == "cosine":
                x = _normalize_rows(x, out=_fresh_like(x))  # once per fit, not per iteration
            elif self._shift is not None:
                x = torch.sub(x, self._shift.to(x.dtype), out=_fresh_like(x))
        return x

    def _chunks(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(start row, rows on the compute device, centred or normalised as in memory) per chunk of x."""
        n = x.shape[0]
        step = n if self.batch_size is None else self.batch_size
        for s in range(0, max(n, 1), max(step, 1)):
            xc = x[s : s + step]
            if self.batch_size is not None:
                if xc.device != self._device:
                    # asynchronous host-to-device only: a device-to-host copy into pinned memory
                    # returns before it lands, and the CPU would read the chunk too early
                    xc = xc.to(self._device, non_blocking=xc.device.type == "cpu")
                if self.metric == "cosine":
                    xc = _normalize_rows(xc)  # streamed chunks arrive raw (in-memory x was normalised once)
                elif self._shift is not None:
                    xc = xc - self._shift.to(xc.dtype)
            yield s, xc

    def _pass(self, x: torch.Tensor, centers: torch.Tensor, update: bool, weights: torch.Tensor | None = None,
              distance: bool = True):
        """One assignment pass over x (and the update sums when `update`).

        Returns labels [n] and distances [n] on x's device, and sums [k, d] and counts [k] on
        the compute device (None without update). With `weights` (on the compute device, in
        memory: [n]), sums and counts are weighted: sum of w_i x_i and of w_i per cluster.
        An update pass with `distance=False` returns no distances (None; the CPU kernel then
        skips them, as a Lloyd iteration needs only labels, sums and counts).
        """
        distance = distance or not update
        whole = self.batch_size is None
        labels = dist = sums = counts = None
        k = centers.shape[0]
        if not whole:
            labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
            dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if distance else None
        for s, xc in self._chunks(x):
            # x was checked finite once (fit/predict), not once per iteration
            if update and weights is None:
                lab, dst, sc, cc = ops.kmeans_lloyd_step(xc, centers, metric=self.metric, distance=distance)
            elif update:
                # weighted: the same kernels, the update summing rows scaled by their weights
                w = weights[s : s + xc.shape[0]]
                lab, dst = ops.kmeans_assign(xc, centers, metric=self.metric, validate=False)
                sc, _ = ops.kmeans_update(xc * w[:, None].to(xc.dtype), lab, k, validate=False)
                if lab.device.type == "cpu":
                    cc = torch.bincount(lab, weights=w.double(), minlength=k)
                else:  # bincount sizes its output from the labels' maximum: a host synchronisation
                    cc = ops.kmeans_update(w.double()[:, None], lab, k, validate=False)[0][:, 0]
            else:
                lab, dst = ops.kmeans_assign(xc, centers, metric=self.metric, validate=False)
            if update:
                # chunk sums are added in chunk order: deterministic
                sums, counts = (sc, cc) if sums is None else (sums + sc, counts + cc)
            if whole:
                labels, dist = lab, dst if distance else None
            else:
                labels[s : s + xc.shape[0]].copy_(lab)
                if distance:
                    dist[s : s + xc.shape[0]].copy_(dst)
        if update and self._shards is not None:  # the ranks' sums and counts, added in rank order
            sums, counts = self._shards.sum(sums), self._shards.sum(counts)
        return labels, dist, sums, counts

    def _own_distances(self, x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """float32 [n] distance of every row of x to the centroid it was assigned, on x's device: what
        re-seeding ranks points by. The labels are this pass's nearest centroids, so these are the
        assignment's distances, in O(n d) instead of a second assignment pass (a GEMM over every
        centroid: at n = 10k, d = 256, k = 1000 it made a 5-iteration fit 7 passes to scikit-learn's 6)."""
        dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        acc = torch.float64 if self._cdtype == torch.float64 else torch.float32
        c = centers.to(acc)
        for s, xc in self._chunks(x):
            # 8192-row blocks: the gathered centroids stay in cache (65,536 rows of d = 128 are a
            # 32 MiB temporary, page-faulted afresh each time: 30 ms at n = 100k against 4)
            for b in range(0, xc.shape[0], 1 << 13):
                xb = xc[b : b + (1 << 13)].to(acc)
                own = c.index_select(0, labels[s + b : s + b + xb.shape[0]].to(c.device))
                if self.metric == "cosine":
                    # rows normalised again in acc, as the assignment does: stored in float16 or
                    # bfloat16 the prepared rows are unit vectors only to their rounding (bfloat16:
                    # 0.2% off an inertia of 1 - cosine)
                    d = 1 - (reference.normalize(xb) * own).sum(1)
                else:
                    d = own.sub_(xb).square_().sum(1)
                dist[s + b : s + b + xb.shape[0]] = d.to(dist.device, torch.float32)
        return dist

    def _rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x[idx] as rows of the centroid dtype on the compute device, prepared as in memory."""
        rows = x[idx.to(x.device)].to(self._device)
        if self.batch_size is not None:
            # what _prepare did to in-memory x, so that both seed from the same rows
            if self.metric == "cosine":
                rows = _normalize_rows(rows)
            elif self._shift is not None:
                rows = rows - self._shift.to(rows.dtype)
        rows = rows.to(self._cdtype)
        return reference.normalize(rows) if self.metric == "cosine" else rows

    # ---------------------------------------------------------------- initialisation

    def _init_centers(self, x: torch.Tensor, gen: torch.Generator, weights: torch.Tensor | None = None) -> torch.Tensor:
        n, k = x.shape[0], self.n_clusters
        # sharded: the same draws over the global rows on every rank, the drawn rows gathered
        rows = self._rows if self._shards is None else functools.partial(self._shards.rows_at, self)
        if self._shards is not None:
            n = self._shards.total
        if self.init == "random":
            return rows(x, torch.randperm(n, generator=gen)[:k])
        size = n if self.init_sample_size is None else (
            min(n, max(50_000, 100 * k)) if self.init_sample_size == "auto" else min(n, int(self.init_sample_size)))
        idx = torch.arange(n) if size == n else torch.randperm(n, generator=gen)[:size].sort().values
        w = None if weights is None else weights[idx.to(weights.device)]
        return kmeans_plusplus(rows(x, idx), k, gen, sample_weight=w)

    def _user_centers(self, d: int) -> torch.Tensor:
        init, _ = _as_tensor(self.init, "init")
        if tuple(init.shape) != (self.n_clusters, d):
            raise ValueError(f"init must have shape (n_clusters, n_features) = {(self.n_clusters, d)}, "
                             f"got {tuple(init.shape)}")
        if not bool(torch.isfinite(init).all()):
            raise ValueError("init contains NaN or Inf")
        c = init.to(self._device, torch.float64)
        if self.metric == "cosine":
            return reference.normalize(c).to(self._cdtype)
        return (c - self._shift).to(self._cdtype) if self._shift is not None else c.to(self._cdtype)

    # ---------------------------------------------------------------- Lloyd

    def _means(self, centers, sums, counts):
        """Centroids from the update sums; a cluster without points (or weight) keeps its centroid."""
        filled = (counts > 0)[:, None]
        if self.metric == "cosine":
            new = reference.normalize(sums.to(self._cdtype))
        elif sums.dtype == torch.float32 == self._cdtype and counts.dtype == torch.int64:
            # unweighted float32 (the CPU kernel's sums): the float32 quotient is the correctly rounded
            # one, the same bits as the float64 division below rounded to float32, in 3 ops, not 6
            new = sums / counts.clamp_min(1)[:, None]
        else:
            new = (sums.double() / counts.double().clamp_min(1e-300)[:, None]).to(self._cdtype)
        return torch.where(filled, new, centers)

    def _reseed_empty(self, x, centers, labels, dist, sums, counts, weights):
        """Centroids after re-seeding empty clusters with the farthest points (rare: its own syncs)."""
        empty = torch.nonzero(counts == 0).flatten().tolist()
        w = torch.ones(len(empty), dtype=torch.float64)
        if self._shards is None:
            far = _farthest(dist, len(empty))
            pts = self._rows(x, far)
            old = labels[far].to(self._device)
            if weights is not None:
                w = weights[far.to(weights.device)].cpu()
        else:  # the globally farthest points, in the single-process order (sharded fits take no weights)
            pts, old = self._shards.farthest(self, x, labels, dist, len(empty))
        sums, counts = sums.clone(), counts.clone()
        for j, c in enumerate(empty):  # a short python loop: no float atomics, fixed order
            wj = float(w[j])
            sums[old[j]] -= pts[j] * wj
            counts[old[j]] -= wj if counts.is_floating_point() else 1
            sums[c] = pts[j] * wj
            counts[c] = wj if counts.is_floating_point() else 1
        # a cluster emptied by giving its only point away keeps its previous centroid
        return self._means(centers, sums, counts)

    def _check_every(self, x: torch.Tensor, verbose: bool) -> int:
        """Lloyd iterations queued between two reads of their decisions on the host. On an
        accelerator a read is a synchronisation: the host waits for the device, and the device then
        idles while the host launches the next iteration; reading every CHECK_EVERY iterations
        keeps both busy, at the cost of at most CHECK_EVERY - 1 iterations computed past the one
        that converged (discarded: the result is the same). On the CPU a read costs nothing, and
        the progress bar, sharded fits (a collective per iteration) and data streamed from the CPU
        read every iteration."""
        if x.device.type == "cpu" or verbose or self._shards is not None:
            return 1
        return CHECK_EVERY

    def _step(self, x, centers, labels_old, weights, distance: bool) -> "_LloydStep":
        """One Lloyd iteration on the device, its decisions (empty clusters, squared centroid shift,
        whether a label changed) left there as one float64 [3] tensor."""
        labels, dist, sums, counts = self._pass(x, centers, update=True, weights=weights, distance=distance)
        new = self._means(centers, sums, counts)
        # (labels live on x's device, which streaming with batch_size leaves on the CPU)
        if labels_old is None:
            moved = True
        elif labels.device.type == "cpu":  # one pass, no [n] temporary: half the time of ne().any()
            moved = not torch.equal(labels, labels_old)
        else:
            moved = labels.ne(labels_old).any()
        if self._shards is not None:
            moved = self._shards.any(moved)  # a label changed on some rank
        moved = torch.tensor(float(moved), dtype=torch.float64) if isinstance(moved, bool) else moved
        decisions = torch.stack([(counts == 0).sum().to(torch.float64), ((new - centers) ** 2).sum().to(torch.float64),
                                 moved.to(counts.device, torch.float64)])
        return _LloydStep(centers, labels, dist, sums, counts, new, decisions)

    def _lloyd(self, x, centers, tol, run, weights):
        bar = None
        if self.verbose:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_iter, desc=f"KMeans run {run}", leave=True)
        check_every = self._check_every(x, bar is not None)
        labels_old = labels = dist = None
        strict = stop = False
        emptied = False  # did the last iteration leave a cluster empty?
        it = 0
        while it < self.max_iter and not stop:
            # queue iterations on the device, each from the last one's centroids
            steps = []
            for _ in range(min(check_every, self.max_iter - it)):
                # distances only where this iteration may read them: verbose, or re-seeding, which
                # tends to recur (else it takes them in a pass of its own). A later step of the
                # window is resolved only if the ones before it emptied nothing, so it takes them
                # as reading every iteration would (own distances, not the kernel's: other bits)
                prev = steps[-1] if steps else None
                steps.append(self._step(x, centers if prev is None else prev.new,
                                        labels_old if prev is None else prev.labels, weights,
                                        distance=bar is not None or (emptied and prev is None)))
            # their decisions cross to the host together: one synchronisation per window
            for step, (n_empty, shift, changed) in zip(steps, torch.stack([s.decisions for s in steps]).tolist()):
                it += 1
                labels, dist, new = step.labels, step.dist, step.new
                emptied = n_empty > 0
                if n_empty:
                    if dist is None:
                        dist = self._own_distances(x, step.centers, labels)
                    new = self._reseed_empty(x, step.centers, labels, dist, step.sums, step.counts, weights)
                    shift = float(((new - step.centers) ** 2).sum())
                centers = new
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(inertia=f"{_inertia(dist, weights):.6g}", shift=f"{shift:.3g}")
                if not changed:
                    strict = stop = True  # labels unchanged: the centroids cannot move any more
                elif shift <= tol:
                    stop = True
                labels_old = labels
                if stop or n_empty:
                    break  # the iterations queued after this one started from other centroids: dropped
        if not strict:
            # assign against the final centroids so labels_ and inertia_ match cluster_centers_
            labels, dist, _, _ = self._pass(x, centers, update=False)
        elif dist is None:
            # labels unchanged: they are the final centroids' assignment already (as scikit-learn,
            # which skips its last assignment pass then); only their distances are missing
            dist = self._own_distances(x, centers, labels)
        if bar is not None:
            bar.close()
        inertia = _inertia(dist, weights)
        if self._shards is not None:
            inertia = float(self._shards.sum(torch.tensor(inertia, dtype=torch.float64, device=self._device)))
        return centers, labels, inertia, it

    def _column_sums(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Per-feature sums of x's (prepared) chunks, float64 [d], and n (over every rank, sharded).

        Blocks of 65536 rows are summed in x's dtype and the block sums added in float64. Up to
        32 features the block sum is a product with a row of ones (a BLAS matrix-vector product:
        at d = 16 torch's column sum took 7.7 ms for 1M rows against 4.1 ms, and at d = 16 it once
        took a fifth of a 5-iteration fit); from 64 features on, torch's own column sum is the
        faster (2.8 ms against 7.2 ms at n = 100k, d = 128; 2 cores)."""
        total, n = None, 0
        for _, chunk in self._chunks(x):
            for b in range(0, chunk.shape[0], 1 << 16):
                block = chunk[b : b + (1 << 16)].to(self._cdtype)
                # the sums' precision is ours: autocast off (entered only when on: ~10 us a fit)
                off = torch.autocast(block.device.type, enabled=False) \
                    if torch.is_autocast_enabled(block.device.type) else contextlib.nullcontext()
                with off:
                    if block.shape[1] <= 32:
                        part = (torch.ones(1, block.shape[0], dtype=block.dtype, device=block.device) @ block)[0]
                    else:
                        part = block.sum(0)
                part = part.double()
                total = part if total is None else total + part
                n += block.shape[0]
        if self._shards is not None:
            return self._shards.sum(total), self._shards.total
        return total, n

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        """float64 per-feature mean of raw x, checking on the way that x is finite (a NaN/Inf makes
        a sum non-finite; a non-finite sum of finite values, an overflow, is told apart exactly)."""
        total, n = self._column_sums(x)
        if not bool(torch.isfinite(total).all()):
            self._check_finite(x)
        return total / n

    def _mean_variance(self, x: torch.Tensor) -> float:
        """Mean per-feature variance of prepared x, the scale of scikit-learn's tol: the summed
        squared deviations from the per-feature means over n d, as one dot product per block of
        rows (no [n, d] temporary: squaring the block first took 20 ms at n = 100k, d = 128
        against 3). Euclidean x is centred already (by its own float64 mean). Cosine x (unit rows)
        is centred here, block by block, by its column means: as mean of squares minus squared
        mean the two terms are ~1 each and cancel in float32 when the rows point one way (unit rows
        about one direction at spread 1e-4: a variance of 1e-4 for a true 2e-9, so tol stopped
        such fits 5 orders of magnitude early). Either centre is only as exact as the float32 column
        sums it came from (off by ~1e-4 of the mean at n = 65536: 16 to 150 times the variance of
        data that tight), so the centred blocks' own column sums are taken too and their squared
        mean subtracted: the deviations are small, their sums exact enough."""
        mean = None
        if self.metric == "cosine":
            total, n = self._column_sums(x)
            mean = (total / n).to(self._device, self._cdtype)
        # [sum of squares, column sums of the centred rows (d)], float64
        acc = torch.zeros(1 + x.shape[1], dtype=torch.float64, device=self._device)
        for _, chunk in self._chunks(x):
            for b in range(0, chunk.shape[0], 1 << 13):  # 8192 rows: a centred block stays in cache
                block = chunk[b : b + (1 << 13)].to(self._cdtype)
                if mean is not None:
                    block = block - mean.to(block.device)
                flat = block.contiguous().view(-1)
                acc[0] += torch.dot(flat, flat).to(self._device, torch.float64)
                acc[1:] += block.sum(0).to(self._device, torch.float64)
        if self._shards is not None:
            acc, n = self._shards.sum(acc), self._shards.total
        else:
            n = x.shape[0]
        squares = float(acc[0]) - float((acc[1:] ** 2).sum()) / n
        return max(squares, 0.0) / n / x.shape[1]

    def _check_finite(self, x: torch.Tensor) -> None:
        """ValueError if x holds NaN/Inf. A NaN/Inf makes the (fast, float32) chunk sum non-finite;
        a non-finite sum of finite values (overflow) is told apart by the exact check."""
        for _, chunk in self._chunks(x):
            if not math.isfinite(float(chunk.sum())) and not bool(torch.isfinite(chunk).all()):
                raise ValueError("x contains NaN or Inf")

    def _sample_weight(self, sample_weight, n: int) -> torch.Tensor | None:
        """sample_weight as float64 [n] on the compute device, checked; None when absent."""
        if sample_weight is None:
            return None
        w = sample_weight if isinstance(sample_weight, torch.Tensor) else torch.as_tensor(np.asarray(sample_weight))
        if w.dim() == 0:
            w = w.expand(n)
        if w.dim() != 1 or w.shape[0] != n:
            raise ValueError(f"sample_weight must have shape ({n},), one weight per sample, got {tuple(w.shape)}")
        if w.is_complex() or not (w.is_floating_point() or w.dtype in (torch.int8, torch.int16, torch.int32,
                                                                        torch.int64, torch.uint8, torch.bool)):
            raise ValueError(f"sample_weight must hold real numbers, got {w.dtype}")
        w = w.detach().to(self._device, torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("sample_weight must be finite and >= 0")
        if not float(w.sum()) > 0:
            raise ValueError("sample_weight is all zero: at least one sample needs a positive weight")
        return w

    # ---------------------------------------------------------------- public API

    def _generator(self) -> torch.Generator:
        """The fit's generator: seeded by random_state (or seed), else by a draw from torch's global
        generator; sharded, every rank takes rank 0's seed (the same draws everywhere)."""
        seed = next((s for s in (self.random_state, self.seed) if s is not None), None)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if self._shards is not None:
            seed = int(dist_helpers.broadcast_(torch.tensor([seed], dtype=torch.int64)).item())
        return torch.Generator().manual_seed(int(seed))

    def fit(self, x, y=None, sample_weight=None) -> "KMeans":
        """Clusters x [n, d] (tensor or array-like); `y` is ignored; `sample_weight` [n] (>= 0)
        weighs each point in the means, the inertia and the k-means++ draws. Returns self."""
        self._check_params()
        # sharded: every rank's shard checked, and the ranks agreed, before anything else
        self._shards = _Shards.join(x, sample_weight, self.get_params()) if self.distributed else None
        x, as_torch = _as_tensor(x, "x")
        source_device = x.device
        self._start(x)
        n, d = x.shape
        if self.n_clusters > (n if self._shards is None else self._shards.total):
            raise ValueError(f"n_samples={n if self._shards is None else self._shards.total} should be >= "
                             f"n_clusters={self.n_clusters}")
        weights = self._sample_weight(sample_weight, n)
        mean = self._mean(x)  # also the NaN/Inf check
        if self.metric == "euclidean":
            self._shift = mean.to(self._device)
        x = self._prepare(x)
        tol = self._mean_variance(x) * self.tol if self.tol > 0 else 0.0
        user = not isinstance(self.init, str)
        gen = None if user else self._generator()  # given centroids draw nothing
        best = None
        for run in range(1 if user else self.n_init):
            centers = self._user_centers(d) if user else self._init_centers(x, gen, weights)
            result = self._lloyd(x, centers, tol, run, weights)
            if best is None or result[2] < best[2]:
                best = result
        centers, labels, inertia, n_iter = best
        sizes = torch.bincount(labels, minlength=self.n_clusters)  # O(n), once per fit
        found = int(((sizes if self._shards is None else self._shards.sum(sizes)) > 0).sum())
        self._shards = None  # predict, score and transform work on this rank's input alone
        if found < self.n_clusters:
            warnings.warn(f"Number of distinct clusters ({found}) found smaller than n_clusters "
                          f"({self.n_clusters}). Possibly due to duplicate points in x.", ConvergenceWarning,
                          stacklevel=2)
        self._centers = centers  # centred, on the compute device: what predict/transform compare with
        if self._shift is not None:
            centers = (centers.double() + self._shift).to(self._cdtype)
        self.cluster_centers_ = _output(centers, as_torch, source_device)
        self.labels_ = _output(labels, as_torch, source_device)
        self.inertia_ = inertia
        self.n_iter_ = n_iter
        self.n_features_in_ = d
        return self

    def _fitted_input(self, x) -> tuple[torch.Tensor, bool, torch.device]:
        """x checked against the fitted model and prepared as in fit (centred by the fit's mean, or
        normalised), with whether it came as a tensor and where from."""
        if not hasattr(self, "cluster_centers_"):
            raise _not_fitted()
        x, as_torch = _as_tensor(x, "x")
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[1]} features, but KMeans is expecting {self.n_features_in_} "
                             "features as input")
        source = x.device
        if x.dtype == torch.float64 and self._cdtype == torch.float32:
            x = x.float()
        self._check_finite(x)
        return self._prepare(x), as_torch, source

    def predict(self, x):
        """Index of the nearest centroid of every row of x: int64 [n] (tensor on x's device, or numpy)."""
        x, as_torch, source = self._fitted_input(x)
        labels, _, _, _ = self._pass(x, self._centers, update=False)
        return _output(labels, as_torch, source)

    def fit_predict(self, x, y=None, sample_weight=None):
        """fit(x), then labels_."""
        return self.fit(x, sample_weight=sample_weight).labels_

    def score(self, x, y=None, sample_weight=None) -> float:
        """Minus the inertia of x against the fitted centroids (higher is better, as scikit-learn)."""
        x, _, _ = self._fitted_input(x)
        _, dist, _, _ = self._pass(x, self._centers, update=False)
        return -_inertia(dist, self._sample_weight(sample_weight, x.shape[0]))

    def transform(self, x):
        """Distance of every row of x to every centroid [n, k] (float64 for float64 fits, else float32).

        euclidean: euclidean distances (not squared, like scikit-learn), taken on the centred data;
        cosine: 1 - cosine.
        """
        x, as_torch, source = self._fitted_input(x)
        out_dtype = self._cdtype
        c = self._centers.to(out_dtype)
        out = torch.empty(x.shape[0], self.n_clusters, dtype=out_dtype, device=source)
        rows = self.batch_size or 65536
        for s, xc in self._chunks(x):
            for b in range(0, xc.shape[0], rows):
                xb = xc[b : b + rows].to(out_dtype)
                block = 1 - reference.normalize(xb) @ c.T if self.metric == "cosine" else torch.cdist(xb, c)
                out[s + b : s + b + xb.shape[0]] = block.to(source)
        return _output(out, as_torch, source)

    def fit_transform(self, x, y=None, sample_weight=None):
        """fit(x), then transform(x)."""
        return self.fit(x, sample_weight=sample_weight).transform(x)


@functools.cache
def _init_param_names(cls: type) -> tuple[str, ...]:
    """The constructor's argument names, read once per class (inspect.signature costs ~20 us, and
    get_params runs twice a fit: the checks in __init__ and in fit)."""
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")


def _inertia(dist: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Sum of the distances (squared euclidean, or 1 - cosine), weighted, accumulated in float64."""
    if weights is None:
        return float(dist.sum(dtype=torch.float64))
    return float((dist.double() * weights.to(dist.device)).sum())


def _farthest(dist: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of the m largest distances, largest first, ties to the lower index: the first m of
    a stable descending sort, from the candidates at or above the m-th largest value (a top-k and
    a sort of a few entries: 0.3 ms at n = 100k against 9 ms for sorting every distance)."""
    m = min(m, dist.shape[0])
    if m == 0:
        return torch.zeros(0, dtype=torch.int64, device=dist.device)
    threshold = torch.topk(dist, m).values[-1]
    candidates = torch.nonzero(dist >= threshold).flatten()  # ascending index
    return candidates[torch.sort(dist[candidates], descending=True, stable=True).indices[:m]]


def _normalize_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows divided by max(norm, EPS), norms taken in float32 (float64 for float64), result in x's
    dtype (written into `out` when given)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(x, dim=1, dtype=acc).clamp_min(reference.EPS)
    return torch.div(x, norm[:, None].to(x.dtype), out=out)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _fresh_like(x: torch.Tensor) -> torch.Tensor | None:
    """An uninitialised tensor shaped as x for a one-off copy of it (centred or normalised), or None
    (let the op allocate). On the CPU it is a numpy array's memory: numpy asks the kernel for
    transparent huge pages on large arrays (madvise), torch's allocator does not, and the first
    touch of a fresh 51 MB torch tensor (n = 100k, d = 128) is 12,500 page faults: x - mean took
    19 ms into a new torch tensor against 7 ms into a numpy one (2 cores), a third of a
    5-iteration fit at k = 10."""
    if x.device.type != "cpu" or x.dtype not in _NUMPY_DTYPES:
        return None
    return torch.from_numpy(np.empty(tuple(x.shape), dtype=_NUMPY_DTYPES[x.dtype]))


def kmeans_plusplus(x: torch.Tensor, k: int, gen: torch.Generator,
                    sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding on x's device: k rows of x [m, d] (float32/float64) as initial centroids.

    As scikit-learn: the first centre is drawn with probability proportional to the weight
    (uniform without `sample_weight`); each next one is the best (lowest resulting weighted
    potential) of 2 + int(ln k) candidates drawn with probability proportional to weight x squared
    distance to the nearest centre so far. Random numbers come from the CPU generator `gen`, so a
    seed gives the same draws on every device.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0], [0.0, 0.1], [9.0, 9.0]])
        >>> c = kmeans_plusplus(x, 2, torch.Generator().manual_seed(0))
        >>> sorted(c[:, 0].tolist())
        [0.0, 9.0]
    """
    m, d = x.shape
    dev = x.device
    trials = 2 + int(math.log(k))
    w = None if sample_weight is None else sample_weight.to(dev, torch.float64)
    x_sq = (x * x).sum(dim=1)
    centers = torch.empty(k, d, dtype=x.dtype, device=dev)
    if w is None:
        first = torch.randint(m, (1,), generator=gen).to(dev)
    else:
        cum_w = torch.cumsum(w, dim=0)
        r0 = torch.rand(1, generator=gen, dtype=torch.float64).to(dev)
        first = torch.searchsorted(cum_w, r0 * cum_w[-1], right=True).clamp_max(m - 1)
    centers[0] = x.index_select(0, first)[0]
    closest = (x_sq - 2 * x @ centers[0] + x_sq.index_select(0, first)).clamp_min(0)
    for c in range(1, k):
        r = torch.rand(trials, generator=gen, dtype=torch.float64).to(dev)
        mass = closest.double() if w is None else closest.double() * w
        cum = torch.cumsum(mass, dim=0)
        cand = torch.searchsorted(cum, r * cum[-1]).clamp_max(m - 1)
        dc = (x_sq[None, :] - 2 * x[cand] @ x.T + x_sq[cand][:, None]).clamp_min(0)  # [trials, m]
        dc = torch.minimum(dc, closest[None, :])
        pot = dc.sum(dim=1, dtype=torch.float64) if w is None else (dc.double() * w).sum(dim=1)
        # index_select with a one-element tensor: indexing with a 0-dim device tensor would
        # read it on the host, a synchronisation per round
        best = torch.argmin(pot).view(1)
        centers[c] = x.index_select(0, cand.index_select(0, best))[0]
        closest = dc.index_select(0, best)[0]
    return centers


class _Shards:
    """This rank's part of data sharded across torch.distributed ranks (KMeans(distributed=True)):
    the rank-order concatenation of the shards is the data set, shard r starting at `offset`."""

    def __init__(self, sizes: list[int]) -> None:
        self.rank = dist_helpers.rank()
        self.sizes = sizes
        self.offset = sum(sizes[: self.rank])
        self.total = sum(sizes)

    @classmethod
    def join(cls, x, sample_weight, params: dict) -> "_Shards":
        """Checks this rank's shard, then agrees with the other ranks (every rank raises if one
        shard is bad, or if their widths, dtypes or estimator settings differ: different n_clusters
        or max_iter would leave the ranks in collectives of different sizes or counts)."""
        dist_helpers.require_process_group("distributed")
        # plain values compared as they are, objects (a RandomState, a device) by type alone
        plain = sorted((k, v if isinstance(v, (bool, int, float, str, type(None))) else type(v).__name__)
                       for k, v in params.items())
        settings = zlib.crc32(repr(plain).encode())
        problem, header = None, [0, 0, 0, settings]
        try:
            if sample_weight is not None:
                raise ValueError("sample_weight is not supported with distributed=True")
            t, _ = _as_tensor(x, "x")  # no rows is an error here too: every rank needs a shard
            if not bool(torch.isfinite(t).all()):
                raise ValueError("x contains NaN or Inf")
            header = [t.shape[0], t.shape[1], _FLOAT_DTYPES.index(t.dtype), settings]
        except (ValueError, TypeError) as e:
            problem = e
        table = dist_helpers.agree(problem, header).tolist()
        odd = next((r for r, row in enumerate(table) if row[3] != settings), None)
        if odd is not None:
            raise ValueError(f"KMeans settings (n_clusters, max_iter, init, ...) must be the same on every rank; "
                             f"rank {odd}'s differ from rank {dist_helpers.rank()}'s")
        for r, (_, d, code, _) in enumerate(table):
            if (d, code) != tuple(table[0][1:3]):
                raise ValueError(f"x must have the same number of features and dtype on every rank, got "
                                 f"{table[0][1]} {_FLOAT_DTYPES[table[0][2]]} on rank 0 and {d} {_FLOAT_DTYPES[code]} "
                                 f"on rank {r}")
        return cls([row[0] for row in table])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return dist_helpers.sum_in_rank_order(t)

    def any(self, flag: torch.Tensor) -> bool:
        return dist_helpers.any_rank(bool(flag))

    def rows_at(self, km: KMeans, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The rows at global indices `idx`, in idx's order, prepared as km._rows prepares them."""
        idx = idx.cpu()
        here = (idx >= self.offset) & (idx < self.offset + x.shape[0])
        rows = km._rows(x, idx[here] - self.offset)
        where = here.nonzero().flatten().to(rows.device)
        (where, rows), _ = dist_helpers.all_gather_rows(where, rows, names=("positions", "rows"), allow_empty=True)
        out = rows.new_empty(idx.shape[0], rows.shape[1])
        out[where] = rows
        return out

    def farthest(self, km: KMeans, x, labels, dist, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, labels) of the m points farthest from their centroids over every shard, in the
        single-process order (distance descending, ties to the lower global index): each rank's
        own m farthest, gathered in rank order and sorted stably."""
        order = _farthest(dist, m)
        device = km._device
        parts = (dist[order].double().to(device), labels[order].to(device), km._rows(x, order))
        (far_dist, far_labels, far_rows), _ = dist_helpers.all_gather_rows(
            *parts, names=("distances", "labels", "rows"), allow_empty=True)
        pick = torch.sort(far_dist, descending=True, stable=True).indices[:m]
        return far_rows[pick], far_labels[pick]
