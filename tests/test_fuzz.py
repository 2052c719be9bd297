"""Fuzzing every public op, module, reader and CLI command with random, odd and hostile input.

Each case asserts one of two outcomes: a result equal to the float64 reference, or a ValueError
(a clean CLI error line, exit 2) whose message names the argument or file at fault. Any other
exception type, a crash, or a result that differs from the reference fails.

CI runs a bounded, derandomised number of examples per test; `make fuzz` runs many more with
fresh randomness (CORESET_EXT_FUZZ_EXAMPLES, CORESET_EXT_FUZZ_RANDOM=1).
"""

from __future__ import annotations

import io
import os
import re
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import coreset_ext as cx
from coreset_ext import reference
from coreset_ext.cli import main as cli_main
from coreset_ext.io import load_npz, save_npz

EXAMPLES = int(os.environ.get("CORESET_EXT_FUZZ_EXAMPLES", "25"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("CORESET_EXT_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                database=None)

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPES = FLOATS + [torch.int64, torch.int32, torch.uint8, torch.bool]
VALUES = ["normal", "nan", "inf", "huge", "zeros"]
# The losses run in float32 without a host synchronisation, so they cannot check magnitudes:
# entries whose squares overflow float32 (|z| >= 1e17) are outside their documented domain.
LOSS_VALUES = st.sampled_from(["normal", "nan", "inf", "zeros"])


@st.composite
def tensors(draw, dims=st.integers(0, 3), side=st.integers(0, 7), dtypes=st.sampled_from(DTYPES),
            values=st.sampled_from(VALUES)):
    """A random tensor: any rank, sides including 0, any dtype, hostile values, sometimes strided."""
    shape = draw(st.lists(side, min_size=draw(dims), max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    kind = draw(values)
    if x.numel() and kind == "nan":
        x.view(-1)[0] = float("nan")
    elif x.numel() and kind == "inf":
        x.view(-1)[-1] = float("inf")
    elif kind == "huge":
        x = x * 1e30
    elif kind == "zeros":
        x = torch.zeros_like(x)
    dtype = draw(dtypes)
    x = x.clamp(-1e4, 1e4).round() if not dtype.is_floating_point else x
    x = x.abs() if dtype in (torch.uint8, torch.bool) else x
    x = x.to(dtype)
    if x.dim() == 2 and draw(st.booleans()):  # strided: the transpose of a contiguous tensor
        x = x.T.contiguous().T
    return x


def anything():
    """Arguments that are not what an op asks for: numbers, strings, None, lists, bools."""
    return st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=4), st.lists(st.integers(-2, 5), max_size=4), tensors())


def outcome(call, *names):
    """Runs `call`: returns its result, or None when it raised a ValueError naming one of `names`.
    Any other exception, or a ValueError naming none of them, fails the test."""
    try:
        return call()
    except ValueError as e:
        msg = str(e)
        assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), f"error names no argument: {msg!r}"
        return None


def finite(*ts) -> bool:
    return all(not isinstance(t, torch.Tensor) or bool(torch.isfinite(t.double()).all()) for t in ts)


def close(got, want, tol):
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp_min(1.0) if want.numel() else 1.0
    assert torch.allclose(got, want, rtol=tol, atol=tol * float(scale), equal_nan=True), (got, want)


def tolerance(*ts) -> float:
    low = any(isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) for t in ts)
    return 5e-2 if low else 1e-4


# ------------------------------------------------------------------------------------- ops


@fuzz
@given(scores=tensors(dims=st.just(1)), index=anything(), values=anything(), validate=st.booleans())
def test_score_scatter_add_(scores, index, values, validate):
    before = scores.clone() if isinstance(scores, torch.Tensor) else None
    out = outcome(lambda: cx.ops.score_scatter_add_(scores, index, values, validate=validate),
                  "scores", "index", "values")
    if out is None or not validate:
        return
    want = before.double().index_add(0, index.long(), values.double())
    close(out, want, tolerance(values))


@fuzz
@given(x=tensors(dims=st.just(2)), y=st.one_of(st.none(), tensors(dims=st.just(2))),
       clamp_min=st.one_of(st.floats(-2, 2), anything()), exclude_self=st.booleans(),
       grouped=st.booleans(), g=st.integers(1, 3))
def test_cosine_rowsum(x, y, clamp_min, exclude_self, grouped, g):
    groups = y_groups = None
    if grouped:
        groups = torch.arange(x.shape[0]) % g if x.dim() == 2 else torch.zeros(1)
        y_groups = None if y is None else torch.arange(y.shape[0]) % g
    out = outcome(lambda: cx.ops.cosine_rowsum(x, y, clamp_min=clamp_min, groups=groups, y_groups=y_groups,
                                               exclude_self=exclude_self),
                  "x", "y", "clamp_min", "groups", "y_groups", "exclude_self")
    if out is None:
        return
    want = reference.cosine_rowsum(x.double(), None if y is None else y.double(), clamp_min=float(clamp_min),
                                   groups=groups, y_groups=y_groups, exclude_self=exclude_self)
    close(out, want, tolerance(x) * max(1, x.shape[0]))


@fuzz
@given(x=tensors(dims=st.just(2)), k=anything(), y=st.one_of(st.none(), tensors(dims=st.just(2))),
       exclude_self=st.booleans())
def test_cosine_topk(x, k, y, exclude_self):
    out = outcome(lambda: cx.ops.cosine_topk(x, k, y=y, exclude_self=exclude_self), "x", "y", "k")
    if out is None:
        return
    values, indices = out
    want, _ = reference.cosine_topk(x.double(), k, y=None if y is None else y.double(), exclude_self=exclude_self)
    close(values, want, tolerance(x))
    # the indices point at rows whose cosine is the value reported
    yy = x if y is None else y
    cos = reference.pair_cosine(x.double().repeat_interleave(k, 0), yy.double()[indices.flatten()])
    close(cos.view_as(values), values, tolerance(x))


@fuzz
@given(z1=tensors(dims=st.just(2), dtypes=st.sampled_from(FLOATS), values=LOSS_VALUES), z2=anything(),
       temperature=st.one_of(st.floats(0.05, 2.0), anything()), reduction=st.sampled_from(["mean", "sum", "none", "x"]),
       same=st.booleans(), normalize=st.booleans())
def test_nt_xent(z1, z2, temperature, reduction, same, normalize):
    if same:  # a well-formed second view most of the time, to reach the loss itself
        z2 = z1.flip(0) + 0.5
    out = outcome(lambda: cx.ops.nt_xent(z1, z2, temperature, normalize=normalize, reduction=reduction),
                  "z1", "z2", "temperature", "reduction")
    if out is None:
        return
    a, b = z1.double(), z2.double()
    rows, _ = reference.nt_xent_rows(a, b, float(temperature), normalize_input=normalize)
    if finite(a, b, rows):
        close(out, reference.reduce_loss(rows, reduction), tolerance(z1) * (1 if normalize else 10))


@fuzz
@given(q=tensors(dims=st.just(2), dtypes=st.sampled_from(FLOATS), values=LOSS_VALUES), queue=anything(),
       temperature=st.one_of(st.floats(0.05, 2.0), anything()), well_formed=st.booleans())
def test_info_nce_queue(q, queue, temperature, well_formed):
    k = q + 0.25 if isinstance(q, torch.Tensor) else q
    if well_formed and q.dim() == 2:
        queue = torch.randn(5, q.shape[1], dtype=torch.float64).to(q.dtype)
    out = outcome(lambda: cx.ops.info_nce_queue(q, k, queue, temperature), "q", "k", "queue", "temperature")
    if out is None:
        return
    rows, _ = reference.info_nce_queue_rows(q.double(), k.double(), queue.double(), float(temperature))
    if finite(q, queue, rows):
        close(out, rows.mean(), tolerance(q, queue))


@fuzz
@given(a=tensors(dims=st.just(2)), b=anything())
def test_pair_cosine(a, b):
    out = outcome(lambda: cx.ops.pair_cosine(a, b), "a", "b")
    if out is not None and finite(a, b):
        close(out, reference.pair_cosine(a.double(), b.double()), tolerance(a))


@fuzz
@given(x=tensors(dims=st.just(2)), centroids=anything(), metric=st.sampled_from(["euclidean", "cosine", "l1"]))
def test_kmeans_assign(x, centroids, metric):
    out = outcome(lambda: cx.ops.kmeans_assign(x, centroids, metric=metric), "x", "centroids", "metric")
    if out is None:
        return
    labels, dist = out
    _, want = reference.kmeans_assign(x.double(), centroids.double(), metric=metric)
    if finite(want):  # labels may differ on near-ties; the distances may not
        close(dist, want, tolerance(x, centroids) * 10)


@fuzz
@given(x=tensors(dims=st.just(2)), labels=anything(), k=anything())
def test_kmeans_update(x, labels, k):
    out = outcome(lambda: cx.ops.kmeans_update(x, labels, k), "x", "labels", "k")
    if out is None:
        return
    sums, counts = out
    want_sums, want_counts = reference.kmeans_update(x.double(), labels.long(), k)
    assert torch.equal(counts, want_counts)
    if finite(x):
        close(sums, want_sums, tolerance(x))


# --------------------------------------------------------------------------- modules, KMeans


@fuzz
@given(temperature=anything(), reduction=anything(), dim=anything(), queue_size=anything())
def test_loss_modules(temperature, reduction, dim, queue_size):
    outcome(lambda: cx.nn.NTXentLoss(temperature=temperature, reduction=reduction), "temperature", "reduction")
    module = outcome(lambda: cx.nn.MoCoLoss(dim=dim, queue_size=queue_size, temperature=0.2), "dim", "queue_size")
    if module is not None and queue_size <= 1000 and dim <= 64:
        assert module.queue.shape == (queue_size, dim)


@fuzz
@given(x=tensors(dims=st.just(2), side=st.integers(0, 12)), n_clusters=anything(), n_init=anything(),
       max_iter=anything(), tol=anything(), seed=anything())
def test_kmeans_estimator(x, n_clusters, n_init, max_iter, tol, seed):
    km = outcome(lambda: cx.KMeans(n_clusters, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed),
                 "n_clusters", "n_init", "max_iter", "tol", "seed")
    if km is None or max_iter > 50:
        return
    fitted = outcome(lambda: km.fit(x), "x", "n_clusters")
    if fitted is not None:
        assert fitted.labels_.shape == (x.shape[0],)
        assert int(fitted.labels_.min()) >= 0 and int(fitted.labels_.max()) < n_clusters


# ------------------------------------------------------------------------------- selection


@fuzz
@given(method=st.sampled_from(["random", "css", "kcenter", "prototypes", "balanced_random", "nope"]),
       fraction=st.one_of(st.none(), st.floats(-0.5, 1.5), anything()), budget=st.one_of(st.none(), anything()),
       n=st.integers(0, 30), seed=anything())
def test_select(method, fraction, budget, n, seed):
    g = torch.Generator().manual_seed(n)
    scores, embeddings = torch.randn(n, generator=g), torch.randn(n, 4, generator=g)
    sel = outcome(lambda: cx.select(method, fraction=fraction, budget=budget, scores=scores, embeddings=embeddings,
                                    seed=seed),
                  "method", "fraction", "budget", "seed", "scores", "embeddings", "n_clusters")
    if sel is not None:
        idx = torch.as_tensor(sel.indices)
        assert idx.unique().numel() == idx.numel() and (idx.numel() == 0 or (0 <= int(idx.min()) and int(idx.max()) < n))


# --------------------------------------------------------------------------------- readers


def _valid_files(tmp):
    """One good file of every kind the package reads."""
    tracker = cx.ScoreTracker(6)
    tracker.update(torch.tensor([0, 2, 2]), css=torch.tensor([0.5, 0.25, 1.0]))
    tracker.save(tmp / "scores.npz")
    dyn = cx.TrainingDynamics(6)
    dyn.save(tmp / "dynamics.npz")
    cx.select("random", budget=3, dataset_size=6, seed=0).save(tmp / "selection.npz")
    return {"scores.npz": lambda p: cx.ScoreTracker.load(p), "dynamics.npz": lambda p: cx.TrainingDynamics.load(p),
            "selection.npz": lambda p: cx.Selection.load(p)}


@fuzz
@given(name=st.sampled_from(["scores.npz", "dynamics.npz", "selection.npz"]),
       how=st.sampled_from(["truncate", "flip", "empty", "garbage"]), where=st.floats(0, 1), seed=st.integers(0, 99))
def test_corrupted_files(tmp_path_factory, name, how, where, seed):
    tmp = tmp_path_factory.mktemp("files")
    readers = _valid_files(tmp)
    path = tmp / name
    data = bytearray(path.read_bytes())
    at = int(where * (len(data) - 1))
    if how == "truncate":
        data = data[:at]
    elif how == "flip":
        data[at] ^= 1 << (seed % 8)
    elif how == "empty":
        data = bytearray()
    else:
        data = bytearray(np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8).tobytes())
    path.write_bytes(bytes(data))
    try:
        readers[name](path)  # a flipped bit in array data may still read: that is fine
    except ValueError as e:
        assert str(path) in str(e) or path.name in str(e), f"error names no file: {e}"


@fuzz
@given(field=st.sampled_from(["indices", "scores", "meta.dataset_size", "meta.budget"]),
       value=st.sampled_from([-1, 2.5, 10**20, "x", None, [1, 2], np.nan]))
def test_hand_edited_selection(tmp_path_factory, field, value):
    tmp = tmp_path_factory.mktemp("sel")
    path = tmp / "sel.npz"
    cx.select("random", budget=3, dataset_size=6, seed=0).save(path)
    arrays, meta = load_npz(path)
    if field.startswith("meta."):
        meta[field[5:]] = value
    else:
        try:
            arrays[field] = np.asarray(value if isinstance(value, list) else [value])
        except (TypeError, ValueError):
            return
        if arrays[field].dtype == object:
            return
    save_npz(path, arrays, meta)
    sel = outcome(lambda: cx.Selection.load(path), "sel.npz", str(path), field.split(".")[-1])
    if sel is not None:  # accepted only if it still means a valid selection of a data set
        idx = np.asarray(sel.indices)
        assert idx.dtype.kind == "i" and (idx >= 0).all() and len(np.unique(idx)) == len(idx)
        assert sel.dataset_size is None or (idx < sel.dataset_size).all()


# ------------------------------------------------------------------------------------- CLI


def run_cli(argv):
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            rc = cli_main(argv)
        except SystemExit as e:  # argparse: usage error, exit 2 with its message
            rc = e.code
    return rc, err.getvalue()


@fuzz
@given(command=st.sampled_from(["select", "evaluate", "train"]),
       args=st.lists(st.sampled_from(["--method", "--fraction", "--budget", "--seed", "--option", "--run", "--out",
                                      "--selection", "--epochs", "--data", "--device", "--by-class", "css", "nope",
                                      "0", "-1", "0.5", "1e30", "nan", "keep=False", "k=", "=1", "", "digits",
                                      "tpu", "/nonexistent"]), max_size=8))
def test_cli_arguments(tmp_path_factory, command, args):
    tmp = tmp_path_factory.mktemp("cli")
    argv = [command] + [str(tmp / "x") if a == "/nonexistent" else a for a in args]
    if command == "train":
        argv += ["--epochs", "0"] if "--epochs" not in args else []
    rc, err = run_cli(argv)
    assert rc in (0, 2), (argv, rc, err)
    if rc == 2:
        assert "Traceback" not in err and err.strip(), (argv, err)

