"""Contrastive learning with mined potential samples (METHODS.md section 4): the float64 reference
against a per-row loop written from the definition, its analytic backward against autograd,
gradcheck, each switch (k, weighting, thresholds, band edges) and the row whose band keeps no
negative; the public op (validation, backends, torch.compile) and, in the interpreter, the fused
Triton kernels; the module (SimCLR and MoCo forms, the queue, scores)."""

from __future__ import annotations

import math

import pytest
import torch
from _utils import rel_err, views

from coreset_ext import reference as R


def _naive_rows(q, k, queue, t, n_mined, weighting, weight_temperature, threshold, mined_weight, band):
    """The loss written out one anchor at a time, from METHODS.md section 4 and the choices the
    reference documents: plain Python over sets, float64."""
    unit = lambda x: x / max(float(x.norm()), R.EPS)
    if queue is None:
        z = [unit(r) for r in torch.cat([q, k])]
        n = len(z)
        anchors = z
        view = [z[(i + n // 2) % n] for i in range(n)]
        cands = [[(j, z[j]) for j in range(n) if j not in (i, (i + n // 2) % n)] for i in range(n)]
    else:
        anchors = [unit(r) for r in q]
        view = [unit(r) for r in k]
        qu = [(j, unit(r)) for j, r in enumerate(queue)]
        cands = [qu for _ in anchors]
    rows = []
    for i, a in enumerate(anchors):
        c = float(a @ view[i])
        ranked = sorted(cands[i], key=lambda jc: (-float(view[i] @ jc[1]), jc[0]))[:n_mined]
        m = torch.tensor([float(view[i] @ jc[1]) for jc in ranked], dtype=torch.float64)
        if weighting == "soft":
            w = [math.exp(v / weight_temperature) for v in m.tolist()]
            w = [x / sum(w) for x in w]
        elif weighting == "threshold":
            passed = [1.0 if v >= threshold else 0.0 for v in m.tolist()]
            w = [x / max(sum(passed), 1.0) for x in passed]
        else:
            w = [1.0] + [0.0] * (len(ranked) - 1)
        total = 1.0 + mined_weight * sum(w)
        alpha = {jc[0]: mined_weight * wj / total for jc, wj in zip(ranked, w)}
        lo, hi = -1 + band[0] * (1 + c), -1 + band[1] * (1 + c)
        terms = [c / t]
        target = c / t / total
        for j, cj in cands[i]:
            s = float(a @ cj)
            if alpha.get(j, 0.0) > 0 or lo <= s <= hi:
                terms.append(s / t)
            target += alpha.get(j, 0.0) * s / t
        top = max(terms)
        rows.append(top + math.log(sum(math.exp(x - top) for x in terms)) - target)
    return torch.tensor(rows, dtype=torch.float64)


OPTIONS = {"n_mined": R.MINING_K, "weighting": R.MINING_WEIGHTING, "weight_temperature": R.MINING_WEIGHT_TEMPERATURE,
           "threshold": R.MINING_THRESHOLD, "mined_weight": R.MINING_MINED_WEIGHT, "band": R.MINING_BAND}


def _inputs(b, d, gen, queue_size=None):
    z1, z2 = views(b, d, gen=gen)
    queue = None if queue_size is None else torch.randn(queue_size, d, generator=gen, dtype=torch.float64)
    return z1, z2, queue


# ---------------------------------------------------------------------------------- reference


def test_documented_defaults():
    # the defaults README and the docstrings state (a change here is a change of the method)
    assert (R.MINING_K, R.MINING_WEIGHTING, R.MINING_WEIGHT_TEMPERATURE, R.MINING_THRESHOLD,
            R.MINING_MINED_WEIGHT, R.MINING_BAND) == (4, "soft", 0.1, 0.9, 1.0, (0.25, 1.0))


@pytest.mark.parametrize("form", ["simclr", "moco"])
@pytest.mark.parametrize("change", [
    {}, {"n_mined": 1}, {"n_mined": 7}, {"weighting": "threshold", "threshold": 0.2},
    {"weighting": "threshold", "threshold": 0.99}, {"weighting": "top1"}, {"weight_temperature": 1.0},
    {"mined_weight": 0.3}, {"band": (0.0, 1.0)}, {"band": (0.6, 0.9)}, {"band": (0.0, 0.0)},
])
def test_reference_matches_the_definition(form, change, gen):
    z1, z2, queue = _inputs(6, 5, gen, 13 if form == "moco" else None)
    opts = {**OPTIONS, **change}
    want = _naive_rows(z1, z2, queue, 0.3, **opts)
    rows, cos = R.potential_mining_rows(z1, z2, queue, 0.3, chunk_size=4, **opts)
    assert rel_err(rows, want) < 1e-12
    assert rel_err(cos, R.pair_cosine(z1, z2)) < 1e-14


@pytest.mark.parametrize("form", ["simclr", "moco"])
def test_no_negative_kept_is_the_positives_alone(form, gen):
    # band (0, 0): lo = hi = -1, no candidate is kept. With mined_weight 0 the view is the only
    # term: the loss is exactly 0; with mined positives, log-sum-exp over them minus their mean.
    z1, z2, queue = _inputs(5, 4, gen, 9 if form == "moco" else None)
    rows, _ = R.potential_mining_rows(z1, z2, queue, 0.2, band=(0.0, 0.0), mined_weight=0.0)
    assert torch.equal(rows, torch.zeros_like(rows))
    rows, _ = R.potential_mining_rows(z1, z2, queue, 0.2, band=(0.0, 0.0), weighting="top1")
    assert torch.isfinite(rows).all() and (rows >= 0).all() and (rows > 0).any()
    assert rel_err(rows, _naive_rows(z1, z2, queue, 0.2, **{**OPTIONS, "weighting": "top1", "band": (0.0, 0.0)})) < 1e-12


def test_without_mining_and_band_it_is_nt_xent_and_info_nce(gen):
    # views nearly equal: every candidate lies below the positive, so band (0, 1) keeps them all,
    # and with mined_weight 0 the loss is NT-Xent (SimCLR) or MoCo's InfoNCE, an independent check
    z1 = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    z2 = z1 + 1e-3 * torch.randn(7, 6, generator=gen, dtype=torch.float64)
    rows, _ = R.potential_mining_rows(z1, z2, None, 0.5, mined_weight=0.0, band=(0.0, 1.0))
    assert rel_err(rows, R.nt_xent_rows(z1, z2, 0.5)[0]) < 1e-12
    queue = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    rows, _ = R.potential_mining_rows(z1, z2, queue, 0.2, mined_weight=0.0, band=(0.0, 1.0))
    assert rel_err(rows, R.info_nce_queue_rows(z1, z2, queue, 0.2)[0]) < 1e-12


@pytest.mark.parametrize("weighting", R.MINING_WEIGHTINGS)
def test_weights(weighting, gen):
    cos = torch.sort(torch.rand(5, 4, generator=gen, dtype=torch.float64), dim=1, descending=True).values
    alpha = R.mining_weights(cos, weighting, 0.1, 0.5, 2.0)
    view = 1 - alpha.sum(dim=1)
    assert (alpha >= 0).all() and (view > 0).all()
    if weighting == "threshold":
        passed = (cos >= 0.5).sum(dim=1)
        assert torch.equal((alpha > 0).sum(dim=1), passed)
        assert torch.allclose(view, torch.where(passed > 0, 1 / 3.0, 1.0).double())
    else:  # the mined share is 2 / 3 whatever the weights
        assert torch.allclose(view, torch.full_like(view, 1 / 3))
    if weighting == "top1":
        assert (alpha[:, 1:] == 0).all()
    if weighting == "soft":  # ordered like the cosines, sharper at lower temperature
        assert (alpha[:, :-1] >= alpha[:, 1:]).all()
        sharp = R.mining_weights(cos, weighting, 0.01, 0.5, 2.0)
        assert (sharp[:, 0] >= alpha[:, 0]).all()


def test_band_edges():
    c = torch.tensor([0.5, -0.2], dtype=torch.float64)
    lo, hi = R.mining_band(c, (0.25, 1.0))
    assert torch.allclose(hi, c) and torch.allclose(lo, torch.tensor([-0.625, -0.8], dtype=torch.float64))


@pytest.mark.parametrize("form", ["simclr", "moco"])
@pytest.mark.parametrize("weighting", R.MINING_WEIGHTINGS)
def test_analytic_backward_matches_autograd(form, weighting, gen):
    z1, z2, queue = _inputs(9, 6, gen, 17 if form == "moco" else None)
    z1.requires_grad_(True)
    z2.requires_grad_(form == "simclr")
    sel = R.mine_potential_samples(z1, z2, queue, n_mined=3, weighting=weighting, threshold=0.3)
    rows, _ = R.potential_mining_rows(z1, z2, queue, 0.25, selection=sel)
    g = torch.rand(rows.shape[0], generator=gen, dtype=torch.float64) + 0.1
    want = torch.autograd.grad((rows * g).sum(), [z1, z2] if form == "simclr" else [z1])
    loss, lse, _ = R.potential_mining_forward(z1.detach(), z2.detach(), queue, 0.25, sel)
    assert rel_err(loss, rows) < 1e-14
    got = R.potential_mining_rows_backward(g, z1.detach(), z2.detach(), queue, 0.25, sel, lse, chunk_size=4)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12
    assert (got[1] is None) == (form == "moco")


@pytest.mark.parametrize("form", ["simclr", "moco"])
def test_gradcheck(form, gen):
    z1, z2, queue = _inputs(4, 3, gen, 7 if form == "moco" else None)
    z1.requires_grad_(True)
    z2.requires_grad_(form == "simclr")
    sel = R.mine_potential_samples(z1, z2, queue, n_mined=2)
    # soft weights with the selection fixed (it is a constant of the loss), and top1 end to end
    # (its selection is locally constant, so the whole function is differentiable there)
    assert torch.autograd.gradcheck(lambda a, b: R.potential_mining_rows(a, b, queue, 0.5, selection=sel)[0],
                                    (z1, z2))
    assert torch.autograd.gradcheck(
        lambda a, b: R.potential_mining_rows(a, b, queue, 0.5, n_mined=2, weighting="top1")[0], (z1, z2))
