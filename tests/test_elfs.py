"""ELFS and the dynamics baselines: pseudo-labels, proxy dynamics, double-end/CCS through the
registered methods, supervised baselines on hand-made dynamics, beta by coverage, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import coreset_ext as cx
from coreset_ext import TrainingDynamics
from coreset_ext.select import pruning
from coreset_ext.select.elfs import choose_beta, coverage, hardness
from coreset_ext.proxy import train_proxy_classifier
from coreset_ext.pseudo_labels import deep_cluster_pseudo_labels, kmeans_pseudo_labels, pseudo_labels


def _blobs(gen, per=30, k=3, d=6):
    # Orthogonal centres far from the origin: separated in angle too, as the cosine metric needs.
    centres = 8.0 * torch.eye(d)[:k]
    x = torch.cat([centres[c] + torch.randn(per, d, generator=gen) for c in range(k)])
    return x, torch.arange(k).repeat_interleave(per)


def _purity(pred, truth):
    return sum(int(torch.bincount(truth[pred == c]).max()) for c in pred.unique()) / truth.numel()


def _hand_made(gen, n=24, c=3, steps=8, b=10):
    """Dynamics from a fixed random sequence of logits (duplicates inside batches included), with
    the per-example AUM, forgetting events, never-learned flags and EL2N by a Python loop."""
    dyn = TrainingDynamics(n, el2n_epochs=2)
    y_of = torch.randint(0, c, (n,), generator=gen)
    aum, ev, ever, last, el2n, el2n_n = [0.0] * n, [0] * n, [False] * n, [None] * n, [0.0] * n, [0] * n
    for s in range(steps):
        index = torch.cat([torch.randperm(n, generator=gen)[: b - 2], torch.randint(0, n, (2,), generator=gen)])
        if s < 2:
            index = torch.arange(n)  # every example seen in the EL2N epochs
        logits = 2.0 * torch.randn(index.numel(), c, generator=gen)
        epoch = 0 if s < 2 else 2
        dyn.update(logits, y_of[index], index, epoch=epoch)
        for row in range(index.numel()):
            i, y = int(index[row]), int(y_of[index[row]])
            z = logits[row].double()
            p = torch.softmax(z, 0)
            aum[i] += float(p[y] - max(p[k] for k in range(c) if k != y))
            correct = bool(z[y] > max(z[k] for k in range(c) if k != y))
            ev[i] += int(last[i] is True and not correct)
            last[i], ever[i] = correct, ever[i] or correct
            if epoch < 2:
                el2n[i] += float((p - torch.nn.functional.one_hot(torch.tensor(y), c).double()).norm())
                el2n_n[i] += 1
    el2n = [v / m for v, m in zip(el2n, el2n_n)]
    return dyn, aum, ev, ever, el2n


def test_pseudo_labels_reproducible_for_a_seed(gen):
    x, truth = _blobs(gen)
    for method, opts in (("kmeans", {}), ("deep_cluster", {"steps": 60, "heads": 4, "knn": 5})):
        a = pseudo_labels(x, 3, method=method, seed=7, **opts)
        b = pseudo_labels(x, 3, method=method, seed=7, **opts)
        assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (90,)
        assert int(a.min()) == 0 and int(a.max()) == a.unique().numel() - 1  # renumbered densely
    assert _purity(kmeans_pseudo_labels(x, 3, seed=0), truth) == 1.0
    assert _purity(deep_cluster_pseudo_labels(x, 3, seed=0, steps=150, knn=5), truth) == 1.0
    with pytest.raises(ValueError, match="n_clusters"):
        pseudo_labels(x, 1)
    with pytest.raises(ValueError, match="pseudo_labels"):
        pseudo_labels(x, 3, method="spectral")


def test_proxy_dynamics_deterministic_and_complete(gen):
    x, y = _blobs(gen, per=20)
    a = train_proxy_classifier(x, y, epochs=3, batch_size=16, seed=1)
    b = train_proxy_classifier(x, y, epochs=3, batch_size=16, seed=1)
    assert a.steps == 3 * math.ceil(60 / 16)
    assert torch.equal(a.aum(), b.aum()) and torch.equal(a.forgetting(), b.forgetting())
    assert torch.equal(a.counts(), torch.full((60,), 3.0))  # every example once per epoch
    with pytest.raises(ValueError, match="targets"):
        train_proxy_classifier(x, torch.zeros(60, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        train_proxy_classifier(x, y[:59])


def test_supervised_baselines_exact_on_hand_made_dynamics(tmp_path, gen):
    dyn, aum, ev, ever, el2n = _hand_made(gen)
    path = str(tmp_path / "dyn.npz")
    dyn.save(path)
    n = 24
    forget = [math.inf if not ever[i] else ev[i] for i in range(n)]
    assert any(forget.count(v) > 1 for v in forget)  # ties exist, so the tie rule is exercised
    expected = {
        "aum": sorted(range(n), key=lambda i: (aum[i], i)),
        "forgetting": sorted(range(n), key=lambda i: (-forget[i], aum[i], i)),
        "el2n": sorted(range(n), key=lambda i: (-el2n[i], i)),
    }
    for method, order in expected.items():
        for budget in (1, 5, 12, 23):
            sel = cx.select(method, budget=budget, dataset_size=n, dynamics=path)
            assert sel.indices.tolist() == sorted(order[:budget]), (method, budget)
            assert sel.scores is not None and sel.scores.shape == (n,)


def test_elfs_forgetting_breaks_ties_by_aum(tmp_path, gen):
    """Forgetting counts tie massively; double-end pruning orders within a count by AUM, as the
    supervised baseline does, instead of handing the ties to the lowest indices."""
    dyn, aum, ev, ever, _ = _hand_made(gen)
    path = str(tmp_path / "dyn.npz")
    dyn.save(path)
    n = 24
    forget = [math.inf if not ever[i] else ev[i] for i in range(n)]
    order = sorted(range(n), key=lambda i: (-forget[i], aum[i], i))
    for beta, budget in ((0.0, 5), (0.25, 10)):
        cut = math.floor(beta * n)
        sel = cx.select("elfs", budget=budget, dataset_size=n, dynamics=path, beta=beta, score="forgetting")
        assert sel.indices.tolist() == sorted(order[cut : cut + budget]), (beta, budget)


def test_double_end_and_ccs_through_the_registered_methods(tmp_path, gen):
    dyn, aum, *_ = _hand_made(gen)
    path = str(tmp_path / "dyn.npz")
    dyn.save(path)
    n = 24
    order = sorted(range(n), key=lambda i: (aum[i], i))
    for beta, budget in ((0.0, 5), (0.25, 10), (0.5, 12)):
        cut = math.floor(beta * n)
        sel = cx.select("elfs", budget=budget, dataset_size=n, dynamics=path, beta=beta)
        assert sel.indices.tolist() == sorted(order[cut : cut + budget])
        ccs = cx.select("elfs", budget=budget, dataset_size=n, dynamics=path, beta=beta, variant="ccs", strata=4,
                        seed=3)
        assert torch.equal(ccs.indices, pruning.ccs_indices(hardness(dyn), budget, beta, strata=4, seed=3))
        assert not set(ccs.indices.tolist()) & set(order[:cut])  # the hardest beta*N are dropped
        sup = cx.select("ccs", budget=budget, dataset_size=n, dynamics=path, beta=beta, strata=4, seed=3)
        assert torch.equal(sup.indices, ccs.indices)


def test_elfs_end_to_end_exact_budget_and_reproducible(gen):
    x, _ = _blobs(gen, per=40)
    opts = dict(n_clusters=3, proxy_epochs=3)
    for frac in (0.1, 0.3, 0.5, 0.7):
        a = cx.select("elfs", fraction=frac, embeddings=x, seed=2, **opts)
        b = cx.select("elfs", fraction=frac, embeddings=x, seed=2, **opts)
        assert len(a) == math.floor(frac * 120 + 0.5) and torch.equal(a.indices, b.indices)
    c = cx.select("elfs", fraction=0.3, embeddings=x, variant="ccs", pseudo_labels="deep_cluster",
                  deep_cluster={"steps": 30, "heads": 3, "knn": 5}, **opts)
    assert len(c) == 36


def test_choose_beta_maximises_coverage(gen):
    x = torch.randn(40, 5, generator=gen)
    s = torch.randn(40, generator=gen).double()
    beta, table = choose_beta(x, s, 15, grid=(0.0, 0.1, 0.3, 0.7))
    assert [b for b, _ in table] == [0.0, 0.1, 0.3]  # 0.7: floor(28) + 15 > 40, skipped
    xn = x.double() / x.double().norm(dim=1, keepdim=True)
    for b, cov in table:
        idx = pruning.double_end_indices(s, 15, b)
        brute = float((xn @ xn[idx].T).max(dim=1).values.mean())
        assert abs(cov - brute) < 1e-5
    assert beta == max(table, key=lambda t: (t[1], -t[0]))[0]
    assert abs(coverage(x, torch.arange(40)) - 1.0) < 1e-5


def test_bad_input(tmp_path, gen):
    dyn, *_ = _hand_made(gen)
    path = str(tmp_path / "dyn.npz")
    dyn.save(path)
    with pytest.raises(ValueError, match="beta"):  # beta + keep fraction > 1
        cx.select("elfs", fraction=0.6, dataset_size=24, dynamics=path, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        cx.select("ccs", fraction=0.9, dataset_size=24, dynamics=path, beta=0.2)
    with pytest.raises(ValueError, match="24"):  # dynamics of another size
        cx.select("aum", fraction=0.5, dataset_size=25, dynamics=path)
    with pytest.raises(ValueError, match="24"):
        cx.select("elfs", fraction=0.5, embeddings=torch.randn(30, 4, generator=gen), dynamics=path, beta=0.0)
    empty = str(tmp_path / "empty.npz")
    TrainingDynamics(24).save(empty)
    for method in ("elfs", "aum", "forgetting", "el2n", "ccs"):
        with pytest.raises(ValueError, match="no steps"):
            cx.select(method, fraction=0.5, dataset_size=24, dynamics=empty,
                      **({"beta": 0.1} if method in ("elfs", "ccs") else {}))  # the others take no beta
    with pytest.raises(ValueError, match="embeddings"):  # beta chosen by coverage needs embeddings
        cx.select("elfs", fraction=0.5, dataset_size=24, dynamics=path)
    with pytest.raises(ValueError, match="labels"):
        cx.select("aum", fraction=0.5, embeddings=torch.randn(24, 3, generator=gen))
    with pytest.raises(ValueError, match="labels"):
        cx.select("el2n", fraction=0.5, embeddings=torch.randn(24, 3, generator=gen), labels=torch.full((24,), -1))
    with pytest.raises(ValueError, match="variant"):
        cx.select("elfs", fraction=0.5, dataset_size=24, dynamics=path, beta=0.1, variant="triple_end")
    with pytest.raises(ValueError, match="dynamics"):
        cx.select("aum", fraction=0.5, dataset_size=24, dynamics=dyn)


@pytest.mark.parametrize("rows", [7, 4096])
def test_score_heads_chunked_equals_the_full_formula(gen, rows):
    # The head scoring streams row chunks; it must give what the [H, N, K] formula it replaced gave.
    from coreset_ext.pseudo_labels import _score_heads

    h, n, d, k, knn, beta = 3, 53, 5, 4, 6, 0.6
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(h, d, k, generator=gen, dtype=torch.float64)
    b = torch.randn(h, 1, k, generator=gen, dtype=torch.float64)
    nbr = torch.randint(0, n, (n, knn), generator=gen)

    def logp(r):
        return torch.log_softmax(torch.einsum("bd,hdk->hbk", r, w) / 0.1 + b, dim=-1)

    loss, labels = _score_heads(x, nbr, logp, beta, rows=rows)
    lp = logp(x)  # [H, N, K]: the old formula, written out
    prior = lp.exp().mean(dim=1, keepdim=True).clamp_min(1e-12).log()
    old = torch.stack([-torch.logsumexp(beta * (lp + lp[:, nbr[:, t]]) - prior, dim=-1).mean(dim=1)
                       for t in range(knn)]).mean(dim=0)
    torch.testing.assert_close(loss, old, rtol=1e-12, atol=1e-12)
    assert torch.equal(labels, lp.argmax(dim=2))


def test_pseudo_label_memo_tells_shapes_apart():
    from coreset_ext.proxy import pseudo_labels_for

    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    assert pseudo_labels_for(x, 2).shape == (40,)
    assert pseudo_labels_for(x.reshape(80, 2), 2).shape == (80,)  # same bytes, another pool


def test_bad_options_name_the_argument():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    for kw, name in [(dict(beta="a"), "beta"), (dict(lr=float("nan")), "lr"), (dict(prior_momentum=2), "prior_momentum")]:
        with pytest.raises(ValueError, match=name):
            deep_cluster_pseudo_labels(x, 3, **kw)
    with pytest.raises(ValueError, match="bogus"):
        pseudo_labels(x, 3, method="deep_cluster", bogus=1)
    y = torch.arange(50) % 2
    with pytest.raises(ValueError, match="hidden"):
        train_proxy_classifier(x, y, hidden=-1)
    # widths that would allocate terabytes of weights are refused before allocating
    with pytest.raises(ValueError, match="hidden"):
        train_proxy_classifier(x, y, hidden=10**12)
    with pytest.raises(ValueError, match="proxy_hidden|hidden"):
        cx.select("aum", budget=5, embeddings=x, labels=y, proxy_hidden=10**12, proxy_epochs=1)
    with pytest.raises(ValueError, match="targets"):
        train_proxy_classifier(x, y * 10**12)
    with pytest.raises(ValueError, match="features"):
        train_proxy_classifier(x[:0], y[:0])
    with pytest.raises(ValueError, match="beta_grid"):
        cx.select("elfs", budget=5, embeddings=x, n_clusters=2, beta_grid=5, proxy_epochs=1)
