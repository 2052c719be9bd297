"""Fused contrastive losses (issue 3): nt_xent, info_nce_queue, pair_cosine, NTXentLoss, MoCoLoss.

Oracles: naive float64 formulas (full matrices, tiny sizes) check the chunked reference; autograd
through the reference in float64 checks every backward (the reference's analytic one and the
Triton kernels'). Triton tests run under TRITON_INTERPRET=1 on CPU tensors, or on CUDA. gradcheck,
opcheck and the other contracts every op keeps: tests/test_contracts.py.
"""

from __future__ import annotations

import contextlib
import math
import os
from unittest import mock

import pytest
import torch
from _utils import deterministic_algorithms, rel_err, views

import coreset_ext as cx
from coreset_ext import ops, reference

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = (os.environ.get("TRITON_INTERPRET") == "1" or HAS_CUDA) and \
    __import__("importlib").util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs Triton (CUDA, or TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
TRITON_DEV = "cuda" if HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


# ---- naive float64 formulas ------------------------------------------------------------------


def naive_nt_xent_rows(z1, z2, t, normalize=True):
    z = torch.cat([z1, z2])
    if normalize:
        z = z / z.norm(dim=1, keepdim=True).clamp_min(reference.EPS)
    n, b = z.shape[0], z1.shape[0]
    sim = z @ z.T / t
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    pos = sim[torch.arange(n), (torch.arange(n) + b) % n]
    return torch.logsumexp(sim, dim=1) - pos


def naive_info_nce_rows(q, k, queue, t, normalize=True):
    if normalize:
        q, k, queue = (x / x.norm(dim=1, keepdim=True).clamp_min(reference.EPS) for x in (q, k, queue))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / t
    return torch.nn.functional.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long), reduction="none")


def naive_cos(a, b):
    return (a * b).sum(1) / (a.norm(dim=1).clamp_min(reference.EPS) * b.norm(dim=1).clamp_min(reference.EPS))


@pytest.mark.parametrize("b,d", [(1, 3), (5, 7), (13, 4)])
@pytest.mark.parametrize("t", [0.01, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_naive(b, d, t, normalize):
    z1, z2 = views(b, d, seed=b + d)
    # absolute floor: at t = 0.01 some losses are ~1e-13, where rounding is all that is left
    rows, cos = reference.nt_xent_rows(z1, z2, t, normalize_input=normalize, chunk_size=4)
    torch.testing.assert_close(rows, naive_nt_xent_rows(z1, z2, t, normalize), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cos, naive_cos(z1, z2), rtol=1e-12, atol=1e-12)
    queue = torch.randn(11, d, dtype=torch.float64)
    rows, cos = reference.info_nce_queue_rows(z1, z2, queue, t, normalize_input=normalize, chunk_size=4)
    torch.testing.assert_close(rows, naive_info_nce_rows(z1, z2, queue, t, normalize), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cos, naive_cos(z1, z2), rtol=1e-12, atol=1e-12)


def _autograd_nt_xent(z1, z2, t, normalize, g):
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    rows, _ = reference.nt_xent_rows(a, b, t, normalize_input=normalize, chunk_size=5)
    (rows * g).sum().backward()
    return rows.detach(), a.grad, b.grad


def _autograd_info_nce(q, k, queue, t, normalize, g):
    a = q.detach().clone().requires_grad_()
    rows, _ = reference.info_nce_queue_rows(a, k, queue, t, normalize_input=normalize, chunk_size=5)
    (rows * g).sum().backward()
    return rows.detach(), a.grad


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("t", [0.05, 0.7])
def test_reference_backward_matches_autograd(normalize, t):
    z1, z2 = views(9, 6, seed=3)
    z1[2] = 0  # an all-zero row: the norm clamp's pass-through branch
    g = torch.rand(18, dtype=torch.float64) + 0.1
    _, r1, r2 = _autograd_nt_xent(z1, z2, t, normalize, g)
    g1, g2 = reference.nt_xent_rows_backward(g, z1, z2, t, normalize_input=normalize, chunk_size=4)
    assert rel_err(torch.cat([g1, g2]), torch.cat([r1, r2])) < 1e-10
    queue = torch.randn(7, 6, dtype=torch.float64)
    _, rq = _autograd_info_nce(z1, z2, queue, t, normalize, g[:9])
    gq = reference.info_nce_queue_rows_backward(g[:9], z1, z2, queue, t, normalize_input=normalize, chunk_size=4)
    assert rel_err(gq, rq) < 1e-10
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    (reference.pair_cosine(a, b) * g[:9]).sum().backward()
    ga, gb = reference.pair_cosine_backward(g[:9], z1, z2)
    assert rel_err(ga, a.grad) < 1e-10 and rel_err(gb, b.grad) < 1e-10


# ---- the CPU ops -----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_op_matches_reference_fp32(reduction):
    z1, z2 = views(37, 20, seed=7)
    ref = reference.reduce_loss(naive_nt_xent_rows(z1, z2, 0.2), reduction)
    out = ops.nt_xent(z1.float(), z2.float(), 0.2, reduction=reduction)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


def test_compile_fullgraph_ntxent_module():
    torch._dynamo.reset()
    crit = cx.nn.NTXentLoss(temperature=0.3)
    z1, z2 = views(6, 8, dtype=torch.float32, seed=4)
    scores_c, scores_e = torch.zeros(10), torch.zeros(10)
    index = torch.tensor([1, 1, 4, 9, 0, 1])
    a = z1.clone().requires_grad_()
    compiled = torch.compile(lambda x, y: crit(x, y, index=index, scores=scores_c), fullgraph=True)
    loss_c = compiled(a, z2)
    loss_c.backward()
    b = z1.clone().requires_grad_()
    loss_e = crit(b, z2, index=index, scores=scores_e)
    loss_e.backward()
    assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(scores_c, scores_e) and scores_e[1] != 0


def test_compile_fullgraph_moco_and_pair_cosine():
    torch._dynamo.reset()
    crit = cx.nn.MoCoLoss(dim=8, queue_size=16)
    q, k = views(4, 8, dtype=torch.float32, seed=5)
    q.requires_grad_()
    f = torch.compile(lambda a, b: crit(a, b) + ops.pair_cosine(a, b).sum(), fullgraph=True)
    f(q, k).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert int(crit.ptr) == 4
    crit.flush_()  # the keys go in at the next forward; flush_ writes them now
    assert torch.equal(crit.queue[:4], k)


def test_scores_and_return_cos_cpu():
    z1, z2 = views(6, 5, dtype=torch.float32, seed=6)
    scores = torch.zeros(4)
    index = torch.tensor([3, 0, 3, 3, 1, 0], dtype=torch.int32)
    loss, cos = ops.nt_xent(z1, z2, index=index, scores=scores, return_cos=True)
    expect = torch.zeros(4, dtype=torch.float64).index_add_(0, index.long(), naive_cos(z1.double(), z2.double()))
    assert rel_err(scores, expect) < 1e-6
    assert rel_err(cos, naive_cos(z1.double(), z2.double())) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_rows_no_nan(dtype):
    z1, z2 = views(4, 8, dtype=dtype, seed=8)
    z1[1] = 0
    z2[1] = 0
    z2[3] = 0
    loss, cos = ops.nt_xent(z1, z2, 0.1, reduction="none", return_cos=True)
    assert torch.isfinite(loss).all() and torch.isfinite(cos).all()
    assert cos[1] == 0 and cos[3] == 0
    assert torch.isfinite(ops.info_nce_queue(z1, z2, torch.zeros(3, 8, dtype=dtype))).all()
    if dtype == torch.float32:
        a = z1.clone().requires_grad_()
        ops.nt_xent(a, z2, 0.1).backward()
        assert torch.isfinite(a.grad).all()


# ---- modules ---------------------------------------------------------------------------------


def test_moco_ring_buffer():
    torch.manual_seed(0)
    crit = cx.nn.MoCoLoss(dim=4, queue_size=10, temperature=0.2)
    assert torch.allclose(crit.queue.norm(dim=1), torch.ones(10))
    expected = crit.queue.clone()
    ptr = 0
    for step, b in enumerate([4, 4, 4, 3, 23]):
        q, k = torch.randn(b, 4, requires_grad=True), torch.randn(b, 4)
        before = crit.queue.clone()
        loss = crit(q, k)
        # the loss uses the queue as it was before this batch's keys went in
        assert torch.allclose(loss, ops.info_nce_queue(q, k, before, 0.2))
        for row in k:  # sequential ring writes, the obvious way
            expected[ptr] = row
            ptr = (ptr + 1) % 10
        assert int(crit.ptr) == ptr
        loss.backward()
        crit.flush_()
        assert torch.equal(crit.queue, expected), step
        assert k.grad is None and not crit.queue.requires_grad


def test_moco_queue_keeps_no_nan_key(gen):
    """A key holding NaN or Inf leaves its slot's old key in place (the ring still advances), so
    later losses stay finite; finite keys of the same batch go in as usual."""
    crit = cx.nn.MoCoLoss(dim=5, queue_size=7, temperature=0.2)
    before = crit.queue.clone()
    k = torch.randn(4, 5, generator=gen)
    k[1, 3], k[2, 0] = float("nan"), float("inf")
    crit.enqueue_(k)
    assert torch.isfinite(crit.queue).all() and int(crit.ptr) == 4
    assert torch.equal(crit.queue[[1, 2]], before[[1, 2]])
    assert torch.equal(crit.queue[[0, 3]], k[[0, 3]]) and torch.equal(crit.queue[4:], before[4:])
    q = torch.randn(3, 5, generator=gen)
    assert torch.isfinite(crit(q, torch.randn(3, 5, generator=gen)))


def test_modules_match_functions_and_validate():
    z1, z2 = views(5, 6, dtype=torch.float32, seed=9)
    crit = cx.nn.NTXentLoss(temperature=0.25, reduction="sum")
    assert torch.equal(crit(z1, z2), ops.nt_xent(z1, z2, 0.25, reduction="sum"))
    with pytest.raises(ValueError, match="temperature"):
        cx.nn.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        cx.nn.NTXentLoss(reduction="avg")
    with pytest.raises(ValueError, match="queue_size"):
        cx.nn.MoCoLoss(dim=4, queue_size=0)
    with pytest.raises(ValueError, match="dim"):
        cx.nn.MoCoLoss(dim=0)


def test_bad_inputs():
    z1, z2 = views(4, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="z1 and z2"):
        ops.nt_xent(z1, z2[:3])
    with pytest.raises(ValueError, match="z1"):
        ops.nt_xent(z1[:0], z2[:0])
    with pytest.raises(ValueError, match="z2"):
        ops.nt_xent(z1, z2[0])
    for t in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            ops.nt_xent(z1, z2, t)
        with pytest.raises(ValueError, match="temperature"):
            ops.info_nce_queue(z1, z2, z1, t)
    with pytest.raises(ValueError, match="reduction"):
        ops.nt_xent(z1, z2, reduction="avg")
    with pytest.raises(ValueError, match="index"):
        ops.nt_xent(z1, z2, index=torch.tensor([0, 1, 2]), scores=torch.zeros(5))
    with pytest.raises(ValueError, match="index"):
        ops.nt_xent(z1, z2, index=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="index contains 9"):
        ops.info_nce_queue(z1, z2, z1, index=torch.tensor([0, 1, 2, 9]), scores=torch.zeros(5), validate=True)
    out_of_range = torch.zeros(5)
    ops.info_nce_queue(z1, z2, z1, index=torch.tensor([0, 1, 2, 9]), scores=out_of_range)
    with pytest.raises(ValueError, match="index contains 9"):  # checked on the device, reported here
        ops.check_scatter_errors(out_of_range)
    with pytest.raises(ValueError, match="queue"):
        ops.info_nce_queue(z1, z2, torch.randn(5, 7))
    with pytest.raises(ValueError, match="q and k"):
        ops.info_nce_queue(z1, z2[:2], z1)
    with pytest.raises(ValueError, match="a and b"):
        ops.pair_cosine(z1, z2[:, :5])
    with pytest.raises(ValueError, match="z1"):
        ops.nt_xent(z1.long(), z2.long())
    for t in (1e-5, 1e-40):
        with pytest.raises(ValueError, match="temperature"):
            ops.nt_xent(z1, z2, t)
    assert torch.isfinite(ops.nt_xent(z1, z2, ops.MIN_TEMPERATURE))
    bad = z1.clone()
    bad[1, 2] = float("nan")
    buffer = torch.zeros(4)
    with pytest.raises(ValueError, match="NaN"):
        ops.nt_xent(bad, z2, index=torch.arange(4), scores=buffer, validate=True)
    assert torch.equal(buffer, torch.zeros(4)), "a NaN cosine must not reach the score buffer"
    ops.nt_xent(bad, z2, index=torch.arange(4), scores=buffer)  # checked on the device: reported later
    assert buffer[1] == 0 and torch.isfinite(buffer).all() and buffer[0] != 0
    with pytest.raises(ValueError, match="NaN"):
        ops.check_scatter_errors(buffer)
    tracker = cx.ScoreTracker(4)
    with pytest.raises(ValueError, match="tracker"):
        ops.nt_xent(z1, z2, index=torch.arange(4), tracker=tracker.sums["css"])
    with pytest.raises(ValueError, match="not both"):
        ops.nt_xent(z1, z2, index=torch.arange(4), tracker=tracker, scores=buffer)
    wide = torch.randn(4, 513)
    with pytest.raises(ValueError, match="d = 513"):
        ops.nt_xent(wide, wide, backend="triton")
    with pytest.raises(ValueError, match="d = 513"):
        ops.info_nce_queue(wide, wide, wide, backend="triton")
    if HAS_CUDA:
        with pytest.raises(ValueError, match="device"):
            ops.nt_xent(z1, z2.cuda())
        with pytest.raises(ValueError, match="device"):
            ops.info_nce_queue(z1, z2, z1.cuda())
    else:
        with pytest.raises(ValueError, match="device"):
            ops.nt_xent(z1, z2.to("meta"))


# ---- the CPU backend's one-pass forwards ---------------------------------------------------


@pytest.mark.parametrize("b,chunk", [(1, 1024), (6, 1024), (6, 4), (13, 5)])
@pytest.mark.parametrize("normalize", [True, False])
def test_one_pass_forwards_match_naive(b, chunk, normalize, gen):
    """reference.nt_xent_forward / info_nce_queue_forward (what the CPU backend runs: one dense
    block up to chunk_size rows, chunked beyond) against the naive float64 formulas: losses,
    log-sum-exps (loss + positive logit) and cosines."""
    d, t = 7, 0.3
    z1, z2 = views(b, d, gen=gen)
    rows, lse, cos = reference.nt_xent_forward(z1, z2, t, normalize_input=normalize, chunk_size=chunk)
    want = naive_nt_xent_rows(z1, z2, t, normalize)
    zz = torch.cat([z1, z2])
    zn = zz / zz.norm(dim=1, keepdim=True).clamp_min(reference.EPS) if normalize else zz
    pos = (zn * zn.roll(b, dims=0)).sum(1) / t
    assert rel_err(rows, want) < 1e-10 and rel_err(lse, want + pos) < 1e-10
    assert rel_err(cos, naive_cos(z1, z2)) < 1e-12
    queue = torch.randn(11, d, generator=gen, dtype=torch.float64)
    rows, lse, cos = reference.info_nce_queue_forward(z1, z2, queue, t, normalize_input=normalize, chunk_size=chunk)
    want = naive_info_nce_rows(z1, z2, queue, t, normalize)
    qn, kn = (x / x.norm(dim=1, keepdim=True).clamp_min(reference.EPS) if normalize else x for x in (z1, z2))
    assert rel_err(rows, want) < 1e-10 and rel_err(lse, want + (qn * kn).sum(1) / t) < 1e-10
    assert rel_err(cos, naive_cos(z1, z2)) < 1e-12


# ---- scores through the tracker, without a host synchronisation ----------------------------


def _fused_and_returned(kind, gen, steps=4, n=23, b=9, d=6):
    """Runs `steps` training steps of `kind` twice on the same fresh inputs: once recording the
    positive cosines through tracker= (fused), once adding the returned cosines with
    tracker.update; returns both trackers."""
    fused, plain = cx.ScoreTracker(n), cx.ScoreTracker(n)
    moco = {t: cx.nn.MoCoLoss(d, queue_size=16) for t in ("fused", "plain")}
    moco["plain"].load_state_dict(moco["fused"].state_dict())
    for _ in range(steps):
        z1, z2 = views(b, d, gen=gen, dtype=torch.float32)
        index = torch.randint(0, n, (b,), generator=gen)  # duplicates within and across steps
        queue = torch.randn(16, d, generator=gen)
        for name, tracker in (("fused", fused), ("plain", plain)):
            a = z1.clone().requires_grad_()
            kw = dict(index=index, tracker=tracker) if name == "fused" else dict(return_cos=True)
            if kind == "nt_xent":
                out = ops.nt_xent(a, z2, 0.5, **kw)
            elif kind == "info_nce_queue":
                out = ops.info_nce_queue(a, z2, queue, 0.2, **kw)
            elif kind == "NTXentLoss":
                out = cx.nn.NTXentLoss(0.5)(a, z2, **kw)
            else:
                out = moco[name](a, z2, **kw)
            if name == "plain":
                out, cos = out
                tracker.update(index, css=cos)
            out.backward()
    return fused, plain


@pytest.mark.parametrize("kind", ["nt_xent", "info_nce_queue", "NTXentLoss", "MoCoLoss"])
def test_tracker_mean_after_fused_path_equals_update(kind, gen):
    fused, plain = _fused_and_returned(kind, gen)
    assert torch.equal(fused.counts["css"], plain.counts["css"]) and fused.counts["css"].sum() == 4 * 9
    torch.testing.assert_close(fused.mean()["css"], plain.mean()["css"], rtol=1e-6, atol=1e-6, equal_nan=True)


SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu")


@contextlib.contextmanager
def _no_host_sync():
    """While active, any call that reads a tensor's values on the host (what synchronises with a
    GPU) fails the test: Tensor.item, tolist, bool(t), int(t), nonzero, ..."""
    def forbid(name):
        def call(*args, **kwargs):
            raise AssertionError(f"host synchronisation: {name} called during a training step")
        return call

    with pytest.MonkeyPatch.context() as mp:
        for name in SYNCS:
            mp.setattr(torch.Tensor, name, forbid(f"Tensor.{name}"))
        mp.setattr(torch, "nonzero", forbid("torch.nonzero"))
        yield


def _training_steps(tracker, moco, gen, bad=None):
    """Two SimCLR and two MoCo steps with scores (loss, backward, record); `bad` spoils one input."""
    for _ in range(2):
        z1, z2 = views(6, 5, gen=gen, dtype=torch.float32)
        index = torch.randint(0, tracker.num_samples, (6,), generator=gen)
        if bad == "index":
            index[2] = tracker.num_samples + 3
        if bad == "nan":
            z1[4, 0] = float("nan")
        a = z1.clone().requires_grad_()
        cx.nn.NTXentLoss(0.5)(a, z2, index=index, tracker=tracker).backward()
        moco(a, z2, index=index, tracker=tracker).backward()


def test_no_host_sync_in_a_training_step(gen):
    """Loss, positive cosines and score recording (tracker= and the raw op) read nothing on the
    host: the step never waits for the device."""
    tracker, moco = cx.ScoreTracker(50), cx.nn.MoCoLoss(5, queue_size=32)
    scores = torch.zeros(50)
    index, values = torch.tensor([3, 60, 3]), torch.tensor([1.0, 2.0, float("nan")])
    z = torch.randn(3, 4, generator=gen)
    with _no_host_sync():
        _training_steps(tracker, moco, gen)
        ops.score_scatter_add_(scores, index, values)
        ops.nt_xent(z, z + 1, index=torch.tensor([0, 1, 2]), scores=scores)
    assert tracker.counts["css"].sum() == 2 * 2 * 6  # every entry counted, once per loss
    with pytest.raises(ValueError, match="index contains 60"):  # found on the device, reported now
        ops.check_scatter_errors(scores)


@pytest.mark.parametrize("bad", ["index", "nan"])
def test_device_checks_are_reported_by_the_next_host_side_call(bad, gen):
    """A bad index or a NaN cosine recorded without a synchronisation is left out of sums and
    counts and raised by the tracker's next host-side call (mean, check, state_dict, update)."""
    tracker, moco = cx.ScoreTracker(50), cx.nn.MoCoLoss(5, queue_size=32)
    match = "index contains 53" if bad == "index" else "css contains NaN"
    for rounds, host_side_call in enumerate((tracker.mean, tracker.check, tracker.state_dict,
                                             lambda: tracker.update(torch.tensor([0]), css=torch.tensor([1.0]))), 1):
        _training_steps(tracker, moco, gen, bad=bad)
        sums, counts = tracker.sums["css"], tracker.counts["css"]
        assert torch.isfinite(sums).all() and counts.sum() == rounds * 2 * 2 * 5  # 1 entry of 6 left out per loss
        with pytest.raises(ValueError, match=match):
            host_side_call()
    tracker.check()  # reported once: nothing new since
    tracker.mean()


def test_nan_skip_and_ignore_through_record(gen):
    idx, v = torch.tensor([0, 1, 1]), torch.tensor([1.0, float("nan"), 2.0])
    skip, ignore = cx.ScoreTracker(3, nan="skip"), cx.ScoreTracker(3, nan="ignore")
    skip.record(idx, css=v)
    ignore.record(idx, css=v)
    assert skip.sums["css"].tolist() == [1.0, 2.0, 0.0] and skip.counts["css"].tolist() == [1.0, 1.0, 0.0]
    skip.check()  # skipped on request: not an error
    assert ignore.counts["css"].tolist() == [1.0, 2.0, 0.0] and math.isnan(ignore.sums["css"][1])


# ---- MoCo: deferred enqueue ------------------------------------------------------------------


class ReferenceMoCo:
    """MoCo's queue as its reference code keeps it: each step's logits against the queue before
    the step, then that step's keys written at the ring position (a Python list, one row at a
    time)."""

    def __init__(self, queue):
        self.rows = list(queue.double())
        self.ptr = 0

    def loss_and_grad(self, q, k, t):
        a = q.double().clone().requires_grad_()
        loss = naive_info_nce_rows(a, k.double(), torch.stack(self.rows), t).mean()
        loss.backward()
        for row in k:  # a batch larger than the queue overwrites its own first keys
            self.rows[self.ptr] = row.double()
            self.ptr = (self.ptr + 1) % len(self.rows)
        return loss.detach(), a.grad


def test_moco_deferred_enqueue_matches_reference_queue(gen):
    size, d, t = 12, 5, 0.2
    crit = cx.nn.MoCoLoss(d, queue_size=size, temperature=t)
    ref = ReferenceMoCo(crit.queue.clone())
    for b in (5, 4, 7, 3, 9, 15):  # wraps around the ring; the last batch is larger than it
        q, k = torch.randn(b, d, generator=gen, requires_grad=True), torch.randn(b, d, generator=gen)
        loss = crit(q, k)
        loss.backward()
        want, want_grad = ref.loss_and_grad(q.detach(), k, t)
        assert rel_err(loss, want) < 1e-6 and rel_err(q.grad, want_grad) < 1e-5
    assert int(crit.ptr) == ref.ptr
    crit.flush_()
    assert rel_err(crit.queue, torch.stack(ref.rows)) == 0
    assert "queue" in crit.state_dict() and crit._pending is None


def test_moco_backward_after_the_next_forward_is_refused(gen):
    """The queue is saved for the backward, not copied: a backward after the next forward wrote
    into it is an error from autograd's version counter, never a gradient against other keys."""
    crit = cx.nn.MoCoLoss(4, queue_size=8)
    q = torch.randn(3, 4, generator=gen, requires_grad=True)
    first = crit(q, torch.randn(3, 4, generator=gen))
    crit(q, torch.randn(3, 4, generator=gen))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()


# ---- autocast --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])])
def test_modules_under_autocast(device, gen):
    """Under torch.autocast(bf16) a projection head gives bf16 rows; both modules take them and
    return float32 losses equal to the same loss of those bf16 rows outside autocast, scores and
    gradients included (issue 17's `Index put requires the source and destination dtypes match`)."""
    head = torch.nn.Linear(12, 8).to(device)
    x1, x2 = (torch.randn(10, 12, generator=gen).to(device) for _ in range(2))
    index = torch.arange(10, device=device)
    for make in (lambda: cx.nn.NTXentLoss(0.3), lambda: cx.nn.MoCoLoss(8, queue_size=32)):
        crit, tracker = make().to(device), cx.ScoreTracker(10, device=device)
        state = {k: v.clone() for k, v in crit.state_dict().items()}
        with torch.autocast(device, dtype=torch.bfloat16):
            z1, z2 = head(x1), head(x2)
            assert z1.dtype == torch.bfloat16
            loss = crit(z1, z2.detach(), index=index, tracker=tracker)
        assert loss.dtype == torch.float32
        (g,) = torch.autograd.grad(loss, z1)
        assert g.dtype == torch.bfloat16
        crit.load_state_dict(state)
        a = z1.detach().requires_grad_()
        plain = crit(a, z2.detach(), return_cos=True)
        plain[0].backward()
        assert rel_err(loss, plain[0]) < 1e-6 and rel_err(g, a.grad) < 1e-2
        assert rel_err(tracker.mean()["css"], plain[1]) < 1e-6


@pytest.mark.cuda
@needs_cuda
def test_gpu_training_step_never_synchronises():
    """Loss, backward and score recording (both modules, tracker=) under
    torch.cuda.set_sync_debug_mode("error"): any host synchronisation raises."""
    tracker, moco, ntxent = cx.ScoreTracker(1000, device="cuda"), cx.nn.MoCoLoss(128, 4096).cuda(), cx.nn.NTXentLoss()
    z1 = torch.randn(256, 128, device="cuda", requires_grad=True)
    z2, index = torch.randn(256, 128, device="cuda"), torch.randint(0, 1000, (256,), device="cuda")
    for crit in (ntxent, moco, ntxent, moco):  # the first call of each warms up (compiles, allocates)
        crit(z1, z2, index=index, tracker=tracker).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for crit in (ntxent, moco):
            crit(z1, z2, index=index, tracker=tracker).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(tracker.counts["css"].sum()) == 6 * 256
    tracker.check()


@pytest.mark.cuda
@needs_cuda
def test_gpu_step_captured_in_a_cuda_graph():
    """A whole step (NT-Xent loss, backward, positive cosines into the tracker's sums and counts)
    is captured in a CUDA graph and replayed: the same loss and gradient as eager, and the
    tracker's mean equal to tracker.update with the eager cosines."""
    n, b, d = 500, 128, 64
    static_z1 = torch.randn(b, d, device="cuda", requires_grad=True)
    static_z2, static_index = torch.randn(b, d, device="cuda"), torch.randint(0, n, (b,), device="cuda")
    crit, graphed, eager = cx.nn.NTXentLoss(0.3), cx.ScoreTracker(n, device="cuda"), cx.ScoreTracker(n, device="cuda")

    def step():
        static_z1.grad = None
        loss = crit(static_z1, static_z2, index=static_index, tracker=graphed)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture (kernel compilation, allocations)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graphed.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    graphed.reset()
    for _ in range(3):
        z1, z2 = torch.randn(b, d, device="cuda"), torch.randn(b, d, device="cuda")
        index = torch.randint(0, n, (b,), device="cuda")
        static_z1.data.copy_(z1)
        static_z2.copy_(z2)
        static_index.copy_(index)
        graph.replay()
        a = z1.clone().requires_grad_()
        loss, cos = crit(a, z2, return_cos=True)
        loss.backward()
        eager.update(index, css=cos)
        torch.testing.assert_close(static_loss, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(static_z1.grad, a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(graphed.mean()["css"], eager.mean()["css"], rtol=1e-5, atol=1e-6, equal_nan=True)


# ---- the C++ CPU backend (csrc/cpu/contrastive_cpu.cpp) --------------------------------------

needs_cpp = pytest.mark.skipif(not cx._backend.has_extension(), reason="coreset_ext._C is not built")
CPP_LOSS_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# per row (stricter than one norm over all rows), in the inputs' dtype: its rounding (fp16 2^-11,
# bf16 2^-8) and fp32 accumulation over up to 1200 logits
CPP_GRAD_TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}
# (B, d): B = 1; odd sizes in the loop path; ATen's exp beyond 2^11 logits per block; at::mm beyond
# 2^17 multiply-adds per block; and more
# than 1024 logit rows (two blocks)
CPP_SIZES = [(1, 1), (1, 6), (2, 16), (7, 3), (30, 4), (33, 65), (50, 40), (600, 9)]


def _cpp_inputs(b, d, dtype, gen, normalize):
    """Two views with the awkward rows: a zero row (the norm clamp's branch), a positive pair that
    is one vector, a duplicated negative. fp16 gets no zero row: the gradient through it is
    g / EPS, beyond float16's range (an inf in either backend)."""
    z1, z2 = views(b, d, gen=gen)
    if not normalize:
        z1, z2 = z1 / (2 * math.sqrt(d)), z2 / (2 * math.sqrt(d))
    if b >= 4:
        if dtype != torch.float16:
            z1[0] = 0
        z2[1] = z1[1]
        z1[3] = z1[2]
    return z1.to(dtype), z2.to(dtype)


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _row_err(out, ref):
    return max(rel_err(o, r) for o, r in zip(out, ref))


@needs_cpp
def test_cpp_is_the_cpu_backend():
    for op in ("nt_xent", "info_nce_queue", "pair_cosine"):
        assert cx._backend.resolve(op, "cpu") == "cpp"


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("b,d", CPP_SIZES)
def test_cpp_losses_match_float64_reference(b, d, normalize, dtype, gen):
    """Each loss and its gradients from the C++ kernels against autograd through the float64
    reference, on the same (dtype-rounded) inputs."""
    z1, z2 = _cpp_inputs(b, d, dtype, gen, normalize)
    x1, x2 = z1.double(), z2.double()
    t = 0.3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.rand(2 * b, generator=gen, dtype=torch.float64) + 0.1

    a, c = _leaf(z1), _leaf(z2)
    rows, cos = ops.nt_xent(a, c, t, normalize=normalize, reduction="none", return_cos=True, backend="cpp")
    (rows * g.to(acc)).sum().backward()
    ref_rows, r1, r2 = _autograd_nt_xent(x1, x2, t, normalize, g)
    assert rows.dtype == cos.dtype == acc and a.grad.dtype == c.grad.dtype == dtype
    assert rel_err(rows, ref_rows) < CPP_LOSS_TOL[dtype]
    assert rel_err(cos, naive_cos(x1, x2)) < CPP_LOSS_TOL[dtype]
    assert _row_err(torch.cat([a.grad, c.grad]), torch.cat([r1, r2])) < CPP_GRAD_TOL[dtype]

    queue = torch.randn(2 * b + 5, d, generator=gen, dtype=torch.float64).to(dtype)
    q = _leaf(z1)
    rows, cos = ops.info_nce_queue(q, z2, queue, 0.2, normalize=normalize, reduction="none", return_cos=True,
                                   backend="cpp")
    (rows * g[:b].to(acc)).sum().backward()
    ref_rows, rq = _autograd_info_nce(x1, x2, queue.double(), 0.2, normalize, g[:b])
    assert rows.dtype == acc and q.grad.dtype == dtype
    assert rel_err(rows, ref_rows) < CPP_LOSS_TOL[dtype]
    assert rel_err(cos, naive_cos(x1, x2)) < CPP_LOSS_TOL[dtype]
    assert _row_err(q.grad, rq) < CPP_GRAD_TOL[dtype]

    a, c, ra, rc = _leaf(z1), _leaf(z2), _leaf(x1), _leaf(x2)
    cos = ops.pair_cosine(a, c, backend="cpp")
    (cos * g[:b].to(acc)).sum().backward()
    (reference.pair_cosine(ra, rc) * g[:b]).sum().backward()
    assert cos.dtype == acc and a.grad.dtype == dtype
    assert rel_err(cos, naive_cos(x1, x2)) < CPP_LOSS_TOL[dtype]
    assert _row_err(torch.cat([a.grad, c.grad]), torch.cat([ra.grad, rc.grad])) < CPP_GRAD_TOL[dtype]


@needs_cpp
def test_cpp_kernels_refuse_bad_shapes():
    """Called directly (torch.ops), the kernels name the argument rather than read out of bounds."""
    z = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="z2 must have the same shape"):
        torch.ops.coreset_ext.nt_xent_cpu(z, torch.randn(5, 3), 0.5, True, reference.EPS)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.coreset_ext.nt_xent_backward_cpu(torch.ones(8), z, z, torch.ones(7), 0.5, True, reference.EPS)
    with pytest.raises(RuntimeError, match="queue q's dimension"):
        torch.ops.coreset_ext.info_nce_queue_cpu(z, z, torch.randn(6, 2), 0.5, True, reference.EPS)
    with pytest.raises(RuntimeError, match="a must be a non-empty"):
        torch.ops.coreset_ext.pair_cosine_cpu(torch.randn(3), torch.randn(3), reference.EPS)


# ---- Triton kernels (interpreter on CPU, or CUDA) -------------------------------------------


def _check_nt_xent_triton(b, d, t, normalize=True, dtype=torch.float32, tol=1e-4, seed=0, correlated=True):
    z1, z2 = views(b, d, seed=seed, correlated=correlated)
    if not normalize:
        z1, z2 = z1 / (2 * math.sqrt(d)), z2 / (2 * math.sqrt(d))
    g = torch.rand(2 * b, dtype=torch.float64) + 0.1
    ref_rows, r1, r2 = _autograd_nt_xent(z1, z2, t, normalize, g)
    a = z1.to(TRITON_DEV, dtype).requires_grad_()
    c = z2.to(TRITON_DEV, dtype).requires_grad_()
    rows, cos = ops.nt_xent(a, c, t, normalize=normalize, reduction="none", return_cos=True, backend="triton")
    (rows * g.to(TRITON_DEV, torch.float32)).sum().backward()
    assert rows.dtype == torch.float32 and rows.shape == (2 * b,)
    assert rel_err(rows.cpu(), ref_rows) < tol
    assert rel_err(cos.cpu(), naive_cos(z1, z2)) < tol
    assert rel_err(torch.cat([a.grad, c.grad]).cpu(), torch.cat([r1, r2])) < tol


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("b", [1, 3, 37, 130])
@pytest.mark.parametrize("d", [3, 64, 100])
def test_triton_nt_xent_sizes(b, d, poison):
    _check_nt_xent_triton(b, d, 0.5, seed=b * d)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("t", [0.01, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_nt_xent_temperatures(t, normalize, poison):
    # Independent views: with correlated ones at t = 0.01 every loss is ~1e-10, a difference of
    # two logits near 100 that no fp32 computation resolves.
    _check_nt_xent_triton(37, 64, t, normalize=normalize, seed=11, correlated=False)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("b", [1, 3])
def test_triton_nt_xent_fixed_bound_edge(b, poison):
    """At the smallest temperature that takes the fixed bound, with every positive pair opposite
    (cosine -1: the smallest term the bound must keep a normal float) and large loss weights, and
    just below that temperature."""
    from coreset_ext.triton_kernels.contrastive import FIXED_BOUND_MIN_T

    for t in (FIXED_BOUND_MIN_T, FIXED_BOUND_MIN_T * 0.99):
        z1 = torch.randn(b, 8, generator=torch.Generator().manual_seed(b), dtype=torch.float64)
        z2 = -z1 * 3.0
        # row weights as a loss scaler makes them (2^20): the backward's per-row factors g / l
        # must not overflow where the positive's cosine is -1 and l is tiny
        g = (torch.rand(2 * b, dtype=torch.float64) + 0.1) * 2.0**20
        ref_rows, r1, r2 = _autograd_nt_xent(z1, z2, t, True, g)
        a = z1.to(TRITON_DEV, torch.float32).requires_grad_()
        c = z2.to(TRITON_DEV, torch.float32).requires_grad_()
        rows = ops.nt_xent(a, c, t, reduction="none", backend="triton")
        (rows * g.to(TRITON_DEV, torch.float32)).sum().backward()
        assert torch.isfinite(rows).all() and rel_err(rows.cpu(), ref_rows) < 1e-4
        assert rel_err(torch.cat([a.grad, c.grad]).cpu(), torch.cat([r1, r2])) < 1e-4


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("splits", [3, 7])
@pytest.mark.parametrize("t,normalize", [(0.5, True), (0.01, True), (0.3, False)])
def test_triton_nt_xent_column_splits(splits, t, normalize, monkeypatch, poison):
    """Columns split across programs (what small batches get on a GPU): per-split partials merged
    by the combine kernel, gradients summed in the fp32 buffer; 7 splits of 74 columns leave some
    splits empty."""
    from coreset_ext.triton_kernels import contrastive

    monkeypatch.setattr(contrastive, "column_splits", lambda n, block_m, device: splits)
    _check_nt_xent_triton(37, 64, t, normalize=normalize, seed=splits, correlated=t > 0.1)
    _check_nt_xent_triton(130, 20, t, normalize=normalize, seed=splits + 1, correlated=t > 0.1)


@pytest.mark.triton
@needs_triton
def test_triton_nt_xent_split_skipped_when_deterministic(monkeypatch, poison):
    """Under deterministic algorithms the backward does not split (float atomics), and two runs
    give bit-identical gradients."""
    from coreset_ext.triton_kernels import contrastive

    monkeypatch.setattr(contrastive, "column_splits", lambda n, block_m, device: 3)
    monkeypatch.setattr(contrastive, "_info_nce_bwd_combine_kernel", None)  # the split backward's
    z1, z2 = views(21, 16, seed=4)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            a = z1.to(TRITON_DEV, torch.float32).requires_grad_()
            ops.nt_xent(a, z2.to(TRITON_DEV, torch.float32), 0.2, backend="triton").backward()
            grads.append(a.grad)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.triton
@needs_triton
def test_triton_nt_xent_fp16_and_noncontiguous(poison):
    z1, z2 = views(19, 40, seed=12)
    g = torch.rand(38, dtype=torch.float64)
    ref_rows, r1, r2 = _autograd_nt_xent(z1, z2, 0.2, True, g)
    wide = torch.cat([z1, z2], dim=1).to(TRITON_DEV, torch.float16).requires_grad_()
    a = wide[:, :40]  # rows with stride 80
    c = z2.to(TRITON_DEV, torch.float16).T.contiguous().T.requires_grad_()  # column-major
    assert not a.is_contiguous() and not c.is_contiguous()
    rows = ops.nt_xent(a, c, 0.2, reduction="none", backend="triton")
    (rows * g.to(TRITON_DEV, torch.float32)).sum().backward()
    # error budget: fp16 rounding of the inputs (~5e-4 relative) dominates
    assert rel_err(rows.cpu(), ref_rows) < 3e-3
    assert rel_err(torch.cat([wide.grad[:, :40], c.grad]).cpu(), torch.cat([r1, r2])) < 5e-3
    assert (wide.grad[:, 40:] == 0).all()


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_reductions(reduction, poison):
    z1, z2 = views(9, 16, seed=13)
    a = z1.to(TRITON_DEV, torch.float32).requires_grad_()
    out = ops.nt_xent(a, z2.to(TRITON_DEV, torch.float32), 0.3, reduction=reduction, backend="triton")
    ref_a = z1.clone().requires_grad_()
    ref = reference.reduce_loss(naive_nt_xent_rows(ref_a, z2, 0.3), reduction)
    assert out.shape == ref.shape and rel_err(out.cpu(), ref.detach()) < 1e-5
    out.sum().backward()
    ref.sum().backward()
    assert rel_err(a.grad.cpu(), ref_a.grad) < 1e-5


@pytest.mark.triton
@needs_triton
def test_triton_scores_duplicates(poison):
    z1, z2 = views(37, 16, dtype=torch.float32, seed=14, device=TRITON_DEV)
    index = torch.randint(0, 5, (37,), generator=torch.Generator().manual_seed(0)).to(TRITON_DEV)
    scores = torch.rand(5, device=TRITON_DEV)
    before = scores.clone()
    ops.nt_xent(z1, z2, index=index, scores=scores, backend="triton")
    expect = before.double().cpu().index_add_(0, index.cpu(), naive_cos(z1.double().cpu(), z2.double().cpu()))
    assert rel_err(scores.cpu(), expect) < 1e-5
    scores_q = before.clone()
    ops.info_nce_queue(z1, z2, z1[:7], index=index, scores=scores_q, backend="triton")
    assert rel_err(scores_q.cpu(), expect) < 1e-5


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("b,kq,d", [(1, 5, 3), (3, 130, 64), (37, 100, 100), (70, 257, 16)])
@pytest.mark.parametrize("t", [0.01, 0.2])
def test_triton_info_nce_queue(b, kq, d, t, poison):
    q, k = views(b, d, seed=b + kq)
    queue = torch.randn(kq, d, dtype=torch.float64, generator=torch.Generator().manual_seed(kq))
    g = torch.rand(b, dtype=torch.float64) + 0.1
    ref_rows, ref_gq = _autograd_info_nce(q, k, queue, t, True, g)
    a = q.to(TRITON_DEV, torch.float32).requires_grad_()
    rows, cos = ops.info_nce_queue(a, k.to(TRITON_DEV, torch.float32), queue.to(TRITON_DEV, torch.float32), t,
                                   reduction="none", return_cos=True, backend="triton")
    (rows * g.to(TRITON_DEV, torch.float32)).sum().backward()
    assert rel_err(rows.cpu(), ref_rows) < 1e-4
    assert rel_err(cos.cpu(), naive_cos(q, k)) < 1e-5
    assert rel_err(a.grad.cpu(), ref_gq) < 1e-4


def _gpu_fixed_tiles():
    """Every distinct (d, tiles) the wrappers choose on a GPU, for each architecture and precision."""
    from coreset_ext.triton_kernels import contrastive

    out = set()
    cuda = torch.device("cuda")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for arch in contrastive.TILE_TABLE:
            for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                for d in (100, 256):  # block_d 128 and 256, ragged
                    with mock.patch.object(contrastive, "interpreting", lambda: False), \
                            mock.patch.object(contrastive, "_arch", lambda device: arch):
                        out.update((d, contrastive.tiles(d, cuda, dtype, backward)) for backward in (False, True))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return sorted(out)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("d,tiles", _gpu_fixed_tiles())
def test_triton_gpu_fixed_tiles(d, tiles, monkeypatch, poison):
    """The kernels with each tile shape they get on a GPU (64-row wgmma tiles on Hopper, ...), run
    by the interpreter in fp32 with ragged edges, column splits and queue splits."""
    from coreset_ext.triton_kernels import contrastive

    monkeypatch.setattr(contrastive, "tiles", lambda d_, device, dtype, backward=False: tiles)
    monkeypatch.setattr(contrastive, "column_splits", lambda n, block_m, device: 2)
    _check_nt_xent_triton(45, d, 0.3, seed=d)
    test_triton_info_nce_queue(3, 130, d, 0.2, poison)


@pytest.mark.triton
@needs_triton
def test_triton_info_nce_queue_unnormalized(poison):
    q, k = views(9, 20, seed=21)
    q, k = q / 9, k / 9
    queue = torch.randn(40, 20, dtype=torch.float64) / 9
    g = torch.rand(9, dtype=torch.float64)
    ref_rows, ref_gq = _autograd_info_nce(q, k, queue, 0.1, False, g)
    a = q.to(TRITON_DEV, torch.float32).requires_grad_()
    rows = ops.info_nce_queue(a, k.to(TRITON_DEV, torch.float32), queue.to(TRITON_DEV, torch.float32), 0.1,
                              normalize=False, reduction="none", backend="triton")
    (rows * g.to(TRITON_DEV, torch.float32)).sum().backward()
    assert rel_err(rows.cpu(), ref_rows) < 1e-4 and rel_err(a.grad.cpu(), ref_gq) < 1e-4


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("b,d", [(1, 3), (37, 100), (130, 64)])
def test_triton_pair_cosine(b, d, poison):
    x, y = views(b, d, seed=b)
    x[0] = 0  # zero row: no NaN, gradient passes through the clamp
    g = torch.rand(b, dtype=torch.float64)
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    ref = reference.pair_cosine(xa, ya)
    (ref * g).sum().backward()
    a = x.to(TRITON_DEV, torch.float32).requires_grad_()
    c = y.to(TRITON_DEV, torch.float32).requires_grad_()
    out = ops.pair_cosine(a, c, backend="triton")
    (out * g.to(TRITON_DEV, torch.float32)).sum().backward()
    assert rel_err(out.cpu(), ref.detach()) < 1e-5
    assert rel_err(a.grad.cpu(), xa.grad) < 1e-5 and rel_err(c.grad.cpu(), ya.grad) < 1e-5


@pytest.mark.triton
@needs_triton
def test_triton_zero_rows(poison):
    for dtype in (torch.float32, torch.float16):
        z1, z2 = views(5, 16, dtype=dtype, seed=3, device=TRITON_DEV)
        z1[2] = 0
        z2[4] = 0
        a = z1.clone().requires_grad_()
        loss, cos = ops.nt_xent(a, z2, 0.1, reduction="none", return_cos=True, backend="triton")
        assert torch.isfinite(loss).all() and torch.isfinite(cos).all() and cos[2] == 0 and cos[4] == 0
        ref = reference.nt_xent_rows(z1.double().cpu(), z2.double().cpu(), 0.1)[0]
        assert rel_err(loss.cpu(), ref) < (1e-5 if dtype == torch.float32 else 3e-3)
        loss.sum().backward()
        assert not torch.isnan(a.grad).any()


# ---- GPU -------------------------------------------------------------------------------------


def _gpu_check(b, d, dtype, t=0.2, correlated=True):
    """Our error vs float64 must be within the DESIGN.md budget: fp32 < 1e-4; bf16 (and fp32 with
    TF32 allowed) within twice the error of the plain-PyTorch reference run in that setting (plus
    1e-4: fp32 rounding where that error is zero, e.g. B = 1 whose loss is exactly 0)."""
    g = torch.Generator(device="cuda").manual_seed(b)
    z1 = torch.randn(b, d, device="cuda", dtype=torch.float64, generator=g)
    z2 = torch.randn(b, d, device="cuda", dtype=torch.float64, generator=g)
    if correlated:
        z2 = z1 + 0.7 * z2
    a64, c64 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref_rows, _ = reference.nt_xent_rows(a64, c64, t)
    ref_rows.mean().backward()
    ref_grad = torch.cat([a64.grad, c64.grad])
    a, c = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
    rows = ops.nt_xent(a, c, t, reduction="none")
    rows.mean().backward()
    ours_l, ours_g = rel_err(rows, ref_rows.detach()), rel_err(torch.cat([a.grad, c.grad]), ref_grad)
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        assert ours_l < 1e-4 and ours_g < 1e-4, (ours_l, ours_g)
        return
    # bf16, or fp32 with TF32 allowed: the baseline is the plain-PyTorch reference in that setting
    ab, cb = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
    base_rows, _ = reference.nt_xent_rows(ab, cb, t)
    base_rows.float().mean().backward()
    base_l = rel_err(base_rows.detach(), ref_rows.detach())
    base_g = rel_err(torch.cat([ab.grad, cb.grad]), ref_grad)
    assert ours_l <= 2 * base_l + 1e-4 and ours_g <= 2 * base_g + 1e-4, (ours_l, base_l, ours_g, base_g)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("b", [1, 130, 1024, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_nt_xent(b, dtype):
    _gpu_check(b, 128, dtype)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("t", [0.01, 1.0])
def test_gpu_nt_xent_temperature_bf16(t):
    # independent views: correlated ones at t = 0.01 have losses ~1e-20 (see the interpreter test)
    _gpu_check(4096, 128, torch.bfloat16, t=t, correlated=False)
    _gpu_check(4096, 128, torch.float32, t=t, correlated=False)


@pytest.mark.cuda
@needs_cuda
def test_gpu_nt_xent_deterministic_split_batch():
    """B = 4096 splits the columns on an H100-sized GPU; under deterministic algorithms the
    backward must not (float atomics), so two runs give bit-identical gradients, which also match
    the split run within fp32 rounding."""
    g = torch.Generator(device="cuda").manual_seed(7)
    z1 = torch.randn(4096, 128, device="cuda", generator=g)
    z2 = z1 + 0.7 * torch.randn(4096, 128, device="cuda", generator=g)

    def grad():
        a = z1.clone().requires_grad_()
        ops.nt_xent(a, z2, 0.2).backward()
        return a.grad

    split = grad()
    with deterministic_algorithms():
        first, second = grad(), grad()
    assert torch.equal(first, second)
    assert rel_err(split, first) < 1e-5


@pytest.mark.cuda
@needs_cuda
def test_gpu_nt_xent_65536():
    b, d = 65536, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    z1 = torch.randn(b, d, device="cuda", generator=g)
    z2 = z1 + 0.7 * torch.randn(b, d, device="cuda", generator=g)
    with torch.no_grad():
        ref = reference.nt_xent_rows(z1.double(), z2.double(), 0.2, chunk_size=2048)[0]
    a = z1.to(torch.bfloat16).requires_grad_()
    scores = torch.zeros(b, device="cuda")
    rows = ops.nt_xent(a, z2.to(torch.bfloat16), 0.2, reduction="none",
                       index=torch.arange(b, device="cuda"), scores=scores)
    rows.mean().backward()
    assert torch.isfinite(a.grad).all()
    assert rel_err(rows, ref) < 2e-2
    assert rel_err(scores, reference.pair_cosine(z1.double(), z2.double())) < 1e-2


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("b", [256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_info_nce_queue(b, dtype):
    kq, d, t = 65536, 128, 0.2
    g = torch.Generator(device="cuda").manual_seed(b)
    q = torch.randn(b, d, device="cuda", dtype=torch.float64, generator=g)
    k = q + torch.randn(b, d, device="cuda", dtype=torch.float64, generator=g)
    queue = torch.randn(kq, d, device="cuda", dtype=torch.float64, generator=g)
    q64 = q.clone().requires_grad_()
    ref_rows, _ = reference.info_nce_queue_rows(q64, k, queue, t)
    ref_rows.mean().backward()
    a = q.to(dtype).requires_grad_()
    rows = ops.info_nce_queue(a, k.to(dtype), queue.to(dtype), t, reduction="none")
    rows.mean().backward()
    ours_l, ours_g = rel_err(rows, ref_rows.detach()), rel_err(a.grad, q64.grad)
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        assert ours_l < 1e-4 and ours_g < 1e-4, (ours_l, ours_g)
    else:
        qb = q.to(dtype).requires_grad_()
        base, _ = reference.info_nce_queue_rows(qb, k.to(dtype), queue.to(dtype), t)
        base.float().mean().backward()
        assert ours_l <= 2 * rel_err(base.detach(), ref_rows.detach()) + 1e-4
        assert ours_g <= 2 * rel_err(qb.grad, q64.grad) + 1e-4


@pytest.fixture
def tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("b", [1024, 16384])
def test_gpu_nt_xent_tf32(b, tf32):
    """fp32 with TF32 allowed: the kernels multiply on the tensor cores, within twice the error of
    the plain-PyTorch reference under the same setting."""
    _gpu_check(b, 128, torch.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("precision", ["bf16", "tf32", "fp32"])
def test_gpu_nt_xent_fixed_tiles(d, precision, monkeypatch):
    """The wrappers' own tiles (what d > 128 and CORESET_EXT_NO_AUTOTUNE=1 take; 64-row wgmma
    tiles on Hopper), at a size that splits the columns."""
    monkeypatch.setenv("CORESET_EXT_NO_AUTOTUNE", "1")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", precision == "tf32")
    _gpu_check(4096, d, torch.bfloat16 if precision == "bf16" else torch.float32)


@pytest.mark.cuda
@needs_cuda
def test_gpu_info_nce_queue_tf32(tf32):
    test_gpu_info_nce_queue(4096, torch.float32)


@pytest.mark.cuda
@needs_cuda
def test_gpu_compile_and_moco_module():
    torch._dynamo.reset()
    crit = cx.nn.NTXentLoss(0.2)
    z1 = torch.randn(300, 128, device="cuda", requires_grad=True)
    z2 = torch.randn(300, 128, device="cuda")
    loss = torch.compile(crit, fullgraph=True)(z1, z2)
    assert torch.allclose(loss, crit(z1, z2), rtol=1e-5)
    moco = cx.nn.MoCoLoss(128, queue_size=1000).cuda()
    q = torch.randn(256, 128, device="cuda", requires_grad=True)
    for _ in range(5):
        moco(q, torch.randn(256, 128, device="cuda")).backward()
    assert int(moco.ptr) == (5 * 256) % 1000


@pytest.mark.triton
@needs_triton
def test_triton_dominant_positive_fp16(poison):
    """When the positive dominates the softmax (p -> 1), its gradient terms nearly cancel; the
    kernel adds them in fp32 so low-precision inputs keep the gradient accurate. B = 1 is the
    limit: the positive is the only other row, loss and gradient are exactly zero."""
    z1, z2 = views(1, 64, seed=30)
    a = z1.to(TRITON_DEV, torch.float16).requires_grad_()
    loss = ops.nt_xent(a, z2.to(TRITON_DEV, torch.float16), 0.05, backend="triton")
    loss.backward()
    assert abs(loss.item()) < 1e-4 and a.grad.abs().max().item() < 1e-4
    z1, z2 = views(16, 64, seed=31)
    z2 = z1 + 0.05 * z2  # near-identical views: p_pos ~ 1 at t = 0.1
    g = torch.ones(32, dtype=torch.float64)
    _, r1, _ = _autograd_nt_xent(z1, z2, 0.1, True, g)
    a = z1.to(TRITON_DEV, torch.float16).requires_grad_()
    ops.nt_xent(a, z2.to(TRITON_DEV, torch.float16), 0.1, reduction="sum", backend="triton").backward()
    # measured in the interpreter: 7e-4 (fp16 input rounding); 9e-2 when the positive went through
    # the fp16 tile product
    assert rel_err(a.grad.cpu(), r1) < 5e-3


# The Triton checks above, on the GPU (make gpu-check runs cuda-marked tests without the
# interpreter, where the triton-marked ones are excluded).


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("b,d", [(1, 3), (3, 64), (37, 100), (130, 64), (1000, 256)])
def test_gpu_triton_odd_sizes(b, d):
    _check_nt_xent_triton(b, d, 0.5, seed=b)
    _check_nt_xent_triton(b, d, 0.01, normalize=False, seed=b, correlated=False)


@pytest.mark.cuda
@needs_cuda
def test_gpu_triton_small_paths(poison):
    test_triton_nt_xent_fp16_and_noncontiguous(poison)
    test_triton_scores_duplicates(poison)
    test_triton_zero_rows(poison)
    test_triton_dominant_positive_fp16(poison)
    for b, kq, d in [(1, 5, 3), (37, 100, 100), (70, 257, 16)]:
        test_triton_info_nce_queue(b, kq, d, 0.01, poison)
    for b, d in [(1, 3), (37, 100), (130, 64)]:
        test_triton_pair_cosine(b, d, poison)


@pytest.mark.triton
@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run the autotuned kernels for real")
@pytest.mark.parametrize("splits", [{}, {128: 3, 64: 3, 32: 3}, {128: 4, 64: 2}])
def test_triton_autotuned_launch(splits, monkeypatch, poison):
    """The autotuned NT-Xent launches (GPU, d <= 128) through the interpreter: every config runs,
    and the one picked last in the list (32 rows) produces the checked result. With column splits,
    every trial launch of the backward adds into its buffer, which the autotuner must zero each
    time; and taller trial tiles split more (as on a GPU), leaving partials in splits that the
    winner does not launch, which the forward's combine must not read."""
    from coreset_ext.triton_kernels import contrastive

    monkeypatch.setattr(contrastive, "autotune", lambda x: True)
    monkeypatch.setattr(contrastive, "symmetric", lambda normalize, temperature, d, dtype: False)  # never tuned
    monkeypatch.setattr(contrastive, "column_splits", lambda n, block_m, device: splits.get(block_m, 1))
    for tuned in (contrastive._info_nce_fwd_tuned, contrastive._info_nce_bwd_tuned):
        timings = iter(range(100, 0, -1))  # each config "faster" than the previous one

        def fake_bench(kernel_call, quantiles, timings=timings):
            kernel_call()
            t = float(next(timings))
            return [t, t, t]

        monkeypatch.setattr(tuned, "_do_bench", fake_bench)
        monkeypatch.setattr(tuned, "cache", {})
    _check_nt_xent_triton(70, 64, 0.3, seed=5)
    for tuned in (contrastive._info_nce_fwd_tuned, contrastive._info_nce_bwd_tuned):
        assert tuned.best_config.kwargs == contrastive.CONFIGS[-1].kwargs


def test_positive_cosines_are_not_differentiable(gen):
    """cos is a score, not a loss term: autograd must refuse it, not return zero gradients."""
    z1 = torch.randn(6, 8, generator=gen, requires_grad=True)
    z2 = torch.randn(6, 8, generator=gen, requires_grad=True)
    loss, cos = ops.nt_xent(z1, z2, 0.5, return_cos=True)
    assert not cos.requires_grad and loss.requires_grad
    q = torch.randn(4, 8, generator=gen, requires_grad=True)
    loss, cos = ops.info_nce_queue(q, torch.randn(4, 8, generator=gen), torch.randn(16, 8, generator=gen), 0.2,
                                   return_cos=True)
    assert not cos.requires_grad and loss.requires_grad
