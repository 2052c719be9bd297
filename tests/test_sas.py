"""The `sas` selector against brute force in float64, exact budgets, bad input, proxy embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import coreset_ext as cx
from coreset_ext.select.sas import latent_classes
from coreset_ext.train.data import ArrayDataset
from coreset_ext.train.embed import load_embeddings, proxy_embeddings
from coreset_ext.train.models import build_model


def _budgets(sizes, budget):
    """Per-class budgets written out independently: floor of the share, remainder by the largest
    fractional part (lower class on ties), never above the class size."""
    total = sum(sizes)
    exact = [s * budget / total for s in sizes]
    base = [min(s, math.floor(e + 1e-9)) for s, e in zip(sizes, exact)]
    rest = budget - sum(base)
    order = sorted((k for k in range(len(sizes)) if base[k] < sizes[k]), key=lambda k: (-(exact[k] - base[k]), k))
    for k in order[:rest]:
        base[k] += 1
    return base


def _unit_rows(e):
    x = e.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _class_budgets(g, budget):
    """(class, its budget, its members) for the group label of every row, g."""
    classes = sorted(set(g))
    sizes = [g.count(c) for c in classes]
    for c, b in zip(classes, _budgets(sizes, budget)):
        yield c, b, [i for i in range(len(g)) if g[i] == c]


def _check_rowsum(e, groups, selected, budget, clamp_min=0.0):
    """Brute force in float64: per class, r_i = sum_j max(cos(e_i, e_j), clamp_min) by a double
    loop; the selection must be the class's budget of largest r_i. The op accumulates in float32,
    so rows whose r_i is within 1e-5 * |class| of the cut may swap; everything else must match
    the brute-force top-b (lower index first on ties) exactly."""
    x, g = _unit_rows(e), groups.tolist()
    for c, b, members in _class_budgets(g, budget):
        r = {i: sum(max(float(x[i] @ x[j]), clamp_min) for j in members) for i in members}
        brute = set(sorted(members, key=lambda i: (-r[i], i))[:b])
        mine = {i for i in selected if g[i] == c}
        assert len(mine) == b
        tol = 1e-5 * len(members)
        cut = min((r[i] for i in brute), default=float("inf"))
        assert all(abs(r[i] - cut) <= tol for i in mine ^ brute), f"class {c}: {sorted(mine ^ brute)} differ"


def _check_facility(e, groups, selected, budget, clamp_min=0.0, tol=1e-9):
    """Brute force: per class, the selection has the class's budget and can be picked one at a time
    so that every pick has the largest marginal gain of F(S) = sum_j max_{i in S} s_ij among all
    the class's remaining rows (within `tol`: exact ties in real arithmetic are common here, e.g.
    two rows covering only each other, and may fall either way in floating point)."""
    x, g = _unit_rows(e), groups.tolist()
    for c, b, members in _class_budgets(g, budget):
        mine = [i for i in selected if g[i] == c]
        assert len(mine) == b
        s = {(i, j): max(float(x[i] @ x[j]), clamp_min) for i in members for j in members}
        cover = {j: 0.0 for j in members}
        left, picked = set(mine), set()
        for _ in range(b):
            gain = {i: sum(max(s[i, j] - cover[j], 0.0) for j in members) for i in members if i not in picked}
            best = max(gain.values())
            ok = [i for i in sorted(left) if gain[i] >= best - tol]
            assert ok, f"class {c}: no selected row has the greedy gain {best}"
            left.remove(ok[0])
            picked.add(ok[0])
            cover = {j: max(cover[j], s[ok[0], j]) for j in members}


@pytest.mark.parametrize("fraction", [0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("clamp_min", [0.0, -0.2])
def test_rowsum_matches_brute_force_with_labels(gen, fraction, clamp_min):
    n = 41
    e = torch.randn(n, 6, generator=gen) + 0.3
    labels = torch.randint(0, 4, (n,), generator=gen) * 3  # sparse label values: renumbered inside
    sel = cx.select("sas", fraction=fraction, embeddings=e, labels=labels, classes="labels", clamp_min=clamp_min)
    _check_rowsum(e, labels, sel.indices.tolist(), len(sel), clamp_min)
    assert len(sel) == max(1, math.floor(fraction * n + 0.5))
    assert sel.scores is None  # the CSS scores of the pipeline must not be recorded as SAS's


def test_rowsum_matches_brute_force_with_kmeans_classes(gen):
    e = torch.randn(50, 5, generator=gen)
    groups = latent_classes(e, 4, seed=3)
    sel = cx.select("sas", budget=17, embeddings=e, labels=torch.zeros(50, dtype=torch.long), seed=3,
                    n_clusters=4)
    _check_rowsum(e, groups, sel.indices.tolist(), 17)
    with pytest.raises(AssertionError):  # the check can fail: a random subset is not the top
        _check_rowsum(e, groups, cx.select("random", budget=17, dataset_size=50).indices.tolist(), 17)


def test_facility_location_matches_brute_force(gen):
    e = torch.randn(30, 4, generator=gen)
    labels = torch.randint(0, 3, (30,), generator=gen)
    for budget in (1, 11, 23):
        sel = cx.select("sas", budget=budget, embeddings=e, labels=labels, classes="labels",
                        objective="facility_location")
        _check_facility(e, labels, sel.indices.tolist(), budget)
    with pytest.raises(AssertionError):  # the check can fail: the rowsum selection is not greedy here
        rowsum = cx.select("sas", budget=11, embeddings=e, labels=labels, classes="labels")
        _check_facility(e, labels, rowsum.indices.tolist(), 11)


def test_latent_classes_reproducible(gen):
    e = torch.randn(80, 6, generator=gen)
    assert torch.equal(latent_classes(e, 5, seed=1), latent_classes(e, 5, seed=1))


def test_exact_budgets_over_many_fractions(gen):
    n = 97
    e = torch.randn(n, 4, generator=gen)
    labels = torch.randint(0, 7, (n,), generator=gen)
    for budget in [1, 2, 6, 7, 13, 50, 96, 97]:
        sel = cx.select("sas", budget=budget, embeddings=e, labels=labels, classes="labels")
        assert len(sel) == budget and torch.unique(sel.indices).numel() == budget
        counts = torch.bincount(labels[sel.indices], minlength=7).tolist()
        sizes = torch.bincount(labels, minlength=7).tolist()
        present = [k for k in range(7) if sizes[k] > 0]
        assert [counts[k] for k in present] == _budgets([sizes[k] for k in present], budget)


def test_tiny_fraction_still_selects_one(gen):
    # Documented rule: a fraction below one example per class still selects round(f N) >= 1.
    e = torch.randn(40, 3, generator=gen)
    sel = cx.select("sas", fraction=0.001, embeddings=e, labels=torch.arange(40) % 5, classes="labels")
    assert len(sel) == 1


def test_bad_inputs(gen):
    e = torch.randn(20, 3, generator=gen)
    with pytest.raises(ValueError, match="embeddings"):
        cx.select("sas", fraction=0.5, labels=torch.arange(20) % 2, classes="labels")
    with pytest.raises(ValueError, match="pool size"):
        cx.select("sas", fraction=0.5, embeddings=e, labels=torch.arange(19) % 2, classes="labels")
    with pytest.raises(ValueError, match="labels"):
        cx.select("sas", fraction=0.5, embeddings=e, labels=torch.full((20,), -1), classes="labels")
    with pytest.raises(ValueError, match="labels"):
        cx.select("sas", fraction=0.5, embeddings=e, classes="labels")
    with pytest.raises(ValueError, match="classes"):
        cx.select("sas", fraction=0.5, embeddings=e, classes="clusters")
    with pytest.raises(ValueError, match="n_clusters"):
        cx.select("sas", fraction=0.5, embeddings=e, n_clusters=21)
    with pytest.raises(ValueError, match="objective"):
        cx.select("sas", fraction=0.5, embeddings=e, objective="sum")
    with pytest.raises(ValueError, match="clamp_min"):
        cx.select("sas", fraction=0.5, embeddings=e, objective="facility_location", clamp_min=-0.5)
    bad = e.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cx.select("sas", fraction=0.5, embeddings=bad)


def _tiny_images(gen, n=10):
    return ArrayDataset(torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen),
                        name="digits/x")


def test_proxy_embeddings_shape_determinism_and_mean_of_views(gen):
    ds = _tiny_images(gen)
    torch.manual_seed(0)
    model = build_model("small_cnn", ds.sample_shape, width=4)

    def aug(x, g):  # a fixed, seeded augmentation: noise drawn from the generator
        return x + 0.3 * torch.randn(x.shape, generator=g)

    a = proxy_embeddings(model, ds, m=3, augment=aug, seed=5)
    b = proxy_embeddings(model, ds, m=3, augment=aug, seed=5)
    c = proxy_embeddings(model, ds, m=3, augment=aug, seed=6)
    assert a.shape == (10, model.encoder.out_dim) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The mean of the m normalised view embeddings, computed by hand in float64.
    model.eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        views = [model.encoder(aug(ds.batch(torch.arange(10)), g)).double() for _ in range(3)]
    ref = sum(v / v.norm(dim=1, keepdim=True) for v in views) / 3
    assert float((a.double() - ref).abs().max()) < 1e-5
    # No augmentation: the clean example's normalised features, m irrelevant.
    clean = proxy_embeddings(model, ds, m=4, augment=None)
    with torch.no_grad():
        f = model.encoder(ds.batch(torch.arange(10))).double()
    assert float((clean.double() - f / f.norm(dim=1, keepdim=True)).abs().max()) < 1e-5
    assert proxy_embeddings(model, ds, m=2, seed=0).shape == a.shape  # the default augmentation
    assert proxy_embeddings(model, ds, which="projection", augment=None).shape == (10, 64)
    with pytest.raises(ValueError, match="m must"):
        proxy_embeddings(model, ds, m=0)
    with pytest.raises(ValueError, match="which"):
        proxy_embeddings(model, ds, which="head")


def test_load_embeddings(tmp_path, gen):
    x = torch.randn(7, 3, generator=gen)
    np.save(tmp_path / "e.npy", x.numpy())
    torch.save(x, tmp_path / "e.pt")
    np.savez(tmp_path / "e.npz", train=x.numpy())
    for name in ("e.npy", "e.pt", "e.npz"):
        assert torch.equal(load_embeddings(str(tmp_path / name), dataset_size=7), x)
    with pytest.raises(ValueError, match="rows"):
        load_embeddings(str(tmp_path / "e.npy"), dataset_size=8)
    with pytest.raises(ValueError, match="key"):
        load_embeddings(str(tmp_path / "e.npz"), key="test")


def test_ssl_protocol_trains_on_the_subset_and_probes_on_the_full_set():
    from coreset_ext.select import Selection
    from coreset_ext.train import TrainConfig, Trainer, load_dataset
    from coreset_ext.train.evaluate import evaluate_ssl, extract_features, linear_probe, ssl_probe_accuracy

    tr, te = load_dataset("digits"), load_dataset("digits", split="test")
    opts = {"epochs": 1, "width": 4, "batch_size": 32, "device": "cpu"}
    idx = torch.randperm(len(tr), generator=torch.Generator().manual_seed(1))[:40]
    acc = ssl_probe_accuracy(tr, idx, te, seed=2, train_options=opts, probe_steps=50)
    # The same thing by hand: the trainer on the 40 examples only, the probe on all 1438.
    sub = ArrayDataset(tr.data[idx], tr.labels[idx], name=tr.name, num_classes=tr.num_classes)
    enc = Trainer(TrainConfig(seed=2, progress=False, **opts), sub).fit().model.encoder
    ref = linear_probe(extract_features(enc, tr), tr.labels, extract_features(enc, te), te.labels, seed=2, steps=50,
                       num_classes=10)
    assert acc == ref
    with pytest.raises(ValueError, match="index"):
        ssl_probe_accuracy(tr, torch.tensor([3]), te, train_options=opts)
    with pytest.raises(ValueError, match="index"):
        ssl_probe_accuracy(tr, torch.tensor([3, 3, 4]), te, train_options=opts)
    sel = Selection(indices=idx, method="sas", dataset_size=len(tr), fingerprint=tr.fingerprint)
    rows = evaluate_ssl([sel], seeds=(0,), train_options=opts)
    assert [(r["method"], r["budget"], r["evaluator"]) for r in rows] == [("sas", 40, "ssl"), ("random", 40, "ssl")]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_selector_inputs_feed_the_methods(tmp_path):
    from coreset_ext.train import load_dataset
    from coreset_ext.train.embed import selector_inputs

    ds = load_dataset("digits")
    ds = ArrayDataset(ds.data[:120], ds.labels[:120], name=ds.name, num_classes=10)
    torch.manual_seed(0)
    model = build_model("small_cnn", ds.sample_shape, width=4)
    out = selector_inputs(model, ds, tmp_path, n_clusters=5, seeds=(0,))
    e = out["embeddings"]
    assert e.shape == (120, model.encoder.out_dim)
    for kind in ("pseudo", "labels"):
        path = out["files"][(kind, 0)]
        method = "elfs" if kind == "pseudo" else "aum"
        opts = {"beta": 0.1} if method == "elfs" else {}  # aum takes neither beta nor n_clusters
        from_file = cx.select(method, fraction=0.3, embeddings=e, labels=ds.labels, dynamics=path, **opts)
        computed = cx.select(method, fraction=0.3, embeddings=e, labels=ds.labels,
                             **({"n_clusters": 5} if method == "elfs" else {}), **opts)
        assert torch.equal(from_file.indices, computed.indices)
