"""The one sampling step of the score-based selectors (`pruning.sample_by_score`): every sampling
against a Python reference on fresh random scores with ties, the `auto` rule at its thresholds,
each method's default pinned to the sort it always made, the old options as aliases, the sampling
recorded in the Selection, and bad input named."""

from __future__ import annotations

import math

import pytest
import torch

import coreset_ext as cx
from coreset_ext import TrainingDynamics
from coreset_ext.select import pruning
from coreset_ext.select.elfs import BETA_GRID

SCORE_BASED = ("css", "prototypes", "elfs", "aum", "forgetting", "el2n", "ccs")
NOT_SCORE_BASED = ("random", "balanced_random", "kcenter", "sas")


# ------------------------------------------------------------------------------ references

def _order(values, secondary, descending):
    """All indices by value (then secondary) in one direction, ties by lower index: Python's sort."""
    sign = -1 if descending else 1
    sec = secondary if secondary is not None else [0.0] * len(values)
    return sorted(range(len(values)), key=lambda i: (sign * values[i], sign * sec[i], i))


def _ccs_reference(key, budget, beta, strata):
    """CCS written out on ascending-hardness `key` (list of floats): the dropped hardest, the
    stratum of every example, and how many the budget gives each stratum."""
    n = len(key)
    cut = math.floor(beta * n + 1e-9)
    order = sorted(range(n), key=lambda i: (key[i], i))
    pool = order[cut:]
    lo, hi = min(key[i] for i in pool), max(key[i] for i in pool)
    stratum = {i: (min(strata - 1, math.floor((key[i] - lo) / (hi - lo) * strata)) if hi > lo else 0) for i in pool}
    sizes = {}
    for i in pool:
        sizes[stratum[i]] = sizes.get(stratum[i], 0) + 1
    want, left = {}, budget
    for pos, b in enumerate(sorted(sizes, key=lambda b: (sizes[b], b))):  # smallest stratum first
        want[b] = min(sizes[b], left // (len(sizes) - pos))
        left -= want[b]
    assert left == 0
    return set(order[:cut]), stratum, want


def _assert_ccs(picked, key, budget, beta, strata):
    dropped, stratum, want = _ccs_reference(key, budget, beta, strata)
    picked = picked.tolist()
    assert len(set(picked)) == len(picked) == budget
    assert not set(picked) & dropped
    got = {}
    for i in picked:
        got[stratum[i]] = got.get(stratum[i], 0) + 1
    assert {b: c for b, c in want.items() if c} == got


def _tied_scores(gen, n, dtype=torch.float32):
    """Scores with many ties (a few levels) and a few distinct values."""
    s = torch.randint(0, max(2, n // 4), (n,), generator=gen).double() / 3
    s[torch.rand(n, generator=gen) < 0.3] += torch.rand(1, generator=gen).double()
    return s.to(dtype)


# ---------------------------------------------------------------------- sample_by_score itself

@pytest.mark.parametrize("trial", range(40))
def test_every_sampling_matches_the_python_reference(gen, trial):
    n = int(torch.randint(1, 70, (), generator=gen))
    dtype = (torch.float32, torch.float64, torch.float16, torch.bfloat16)[trial % 4]
    s = _tied_scores(gen, n, dtype)
    sec = _tied_scores(gen, n, torch.float64) if trial % 3 else None
    values = s.double().tolist()
    sec_list = sec.tolist() if sec is not None else None
    for hard in ("low", "high"):
        for sampling in ("lowest", "highest", "double_end", "ccs"):
            beta = 0.0 if sampling in ("lowest", "highest") else float(torch.rand((), generator=gen)) * 0.6
            cut = math.floor(beta * n + 1e-9)
            if cut >= n:
                continue
            budget = int(torch.randint(1, n - cut + 1, (), generator=gen))
            strata = int(torch.randint(1, 8, (), generator=gen))
            args = dict(hard=hard, beta=beta, strata=strata, seed=trial, secondary=sec)
            got = pruning.sample_by_score(s, budget, sampling, **args)
            ranked = pruning.sample_by_score(s, budget, sampling, ranked=True, **args)
            assert got.dtype == torch.int64 and got.tolist() == sorted(ranked.tolist())
            harder_high = hard == "high"
            if sampling == "ccs":
                key = [-v for v in values] if harder_high else values
                _assert_ccs(got, key, budget, beta, strata)
                hardest_first = _order(values, sec_list, harder_high)
                assert ranked.tolist() == [i for i in hardest_first if i in set(got.tolist())]
                continue
            descending = sampling == "highest" or (sampling == "double_end" and harder_high)
            want = _order(values, sec_list, descending)[cut : cut + budget]
            assert ranked.tolist() == want, (sampling, hard, beta, budget)


def test_double_end_at_beta_0_is_lowest_or_highest(gen):
    s = _tied_scores(gen, 50)
    for budget in (1, 17, 50):
        assert torch.equal(pruning.sample_by_score(s, budget, "double_end", hard="low", ranked=True),
                           pruning.sample_by_score(s, budget, "lowest", ranked=True))
        assert torch.equal(pruning.sample_by_score(s, budget, "double_end", hard="high", ranked=True),
                           pruning.sample_by_score(s, budget, "highest", ranked=True))


def test_hand_made():
    s = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.9, -0.3, 1.5, 0.0, 3.0, 0.7])
    # ascending: 1(-1.0) 5(-0.3) 7(0.0) 3(0.1) 0(0.5) 9(0.7) 4(0.9) 6(1.5) 2(2.0) 8(3.0)
    assert pruning.sample_by_score(s, 3, "lowest", ranked=True).tolist() == [1, 5, 7]
    assert pruning.sample_by_score(s, 3, "highest", ranked=True).tolist() == [8, 2, 6]
    assert pruning.sample_by_score(s, 3, "double_end", beta=0.2).tolist() == [0, 3, 7]
    assert pruning.sample_by_score(s, 3, "double_end", hard="high", beta=0.2, ranked=True).tolist() == [6, 4, 9]
    assert pruning.sample_by_score(s, 0.5, "lowest").tolist() == [0, 1, 3, 5, 7]  # a fraction of N
    ties = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert pruning.sample_by_score(ties, 3, "highest", ranked=True).tolist() == [0, 2, 4]  # ties: lower index
    sec = torch.tensor([0.0, 0.0, 5.0, 0.0, 2.0])  # oriented like the scores: higher is harder at hard="high"
    assert pruning.sample_by_score(ties, 2, "highest", secondary=sec, ranked=True).tolist() == [2, 4]
    assert pruning.sample_by_score(ties, 4, "lowest", secondary=sec, ranked=True).tolist() == [1, 3, 0, 4]


# ---------------------------------------------------------------------------------- auto

def test_auto_rule_at_its_threshold():
    assert pruning.AUTO_CCS_BELOW == pruning.Fraction(1, 2)
    for total in range(1, 202):
        for budget in range(1, total + 1):
            want = "ccs" if 2 * budget < total else "double_end"
            assert pruning.auto_sampling(budget, total) == want, (budget, total)
    # the edges, by hand: just below half, exactly half, just above
    assert [pruning.auto_sampling(b, 100) for b in (1, 49, 50, 51, 100)] == \
        ["ccs", "ccs", "double_end", "double_end", "double_end"]
    assert [pruning.auto_sampling(b, 101) for b in (50, 51)] == ["ccs", "double_end"]
    assert pruning.auto_sampling(1, 1) == "double_end" and pruning.auto_sampling(1, 2) == "double_end"
    assert pruning.auto_sampling(1, 3) == "ccs"


@pytest.mark.parametrize("hard", ["low", "high"])
def test_auto_is_the_concrete_sampling_it_names(gen, hard):
    n = 60
    s = _tied_scores(gen, n)
    for budget in (1, 29, 30, 31, 60):
        concrete = pruning.auto_sampling(budget, n)
        args = dict(hard=hard, strata=5, seed=3, ranked=True)
        assert torch.equal(pruning.sample_by_score(s, budget, "auto", **args),
                           pruning.sample_by_score(s, budget, concrete, **args))
        assert pruning.resolve_sampling("auto", budget, n) == concrete
        assert pruning.resolve_sampling("lowest", budget, n) == "lowest"


def test_auto_through_select_records_the_choice(gen):
    n = 80
    s = torch.rand(n, generator=gen)
    e = torch.randn(n, 4, generator=gen)
    for budget, concrete in ((39, "ccs"), (40, "double_end")):
        sel = cx.select("css", budget=budget, scores=s, sampling="auto", seed=2)
        assert sel.options == {"sampling": concrete}
        assert torch.equal(sel.indices, cx.select("css", budget=budget, scores=s, sampling=concrete, seed=2).indices)
        proto = cx.select("prototypes", budget=budget, embeddings=e, n_clusters=3, sampling="auto", seed=1)
        assert proto.options == {"n_clusters": 3, "sampling": concrete}
        same = cx.select("prototypes", budget=budget, embeddings=e, n_clusters=3, sampling=concrete, seed=1)
        assert torch.equal(proto.indices, same.indices)
    # fractions: budget_size(0.5, 97) = 49 >= 97 / 2
    assert cx.select("css", fraction=0.5, scores=torch.rand(97, generator=gen), sampling="auto").options == \
        {"sampling": "double_end"}
    assert cx.select("css", fraction=0.49, scores=torch.rand(100, generator=gen), sampling="auto").options == \
        {"sampling": "ccs"}


# ------------------------------------------------- the methods: defaults pinned, aliases, records

def _dynamics(gen, n=40, c=3, steps=12):
    """Random dynamics: few classes and steps, so forgetting counts tie a lot."""
    dyn = TrainingDynamics(n, el2n_epochs=2)
    y = torch.randint(0, c, (n,), generator=gen)
    for step in range(steps):
        index = torch.arange(n) if step < 2 else torch.randperm(n, generator=gen)[: n // 2]
        dyn.update(2.0 * torch.randn(index.numel(), c, generator=gen), y[index], index, epoch=0 if step < 2 else 2)
    return dyn


def test_css_default_is_the_stable_sort_it_always_was(gen):
    for n in (1, 7, 96):
        s = _tied_scores(gen, n)
        for budget in {1, max(1, n // 3), n}:
            sel = cx.select("css", budget=budget, scores=s)
            assert torch.equal(sel.indices, torch.sort(s, stable=True).indices[:budget])  # lowest first
            assert sel.options == {"sampling": "lowest"}
            high = cx.select("css", budget=budget, scores=s, order="highest")
            assert torch.equal(high.indices, torch.sort(s, descending=True, stable=True).indices[:budget])
            assert high.options == {"order": "highest", "sampling": "highest"}
    s64 = torch.tensor([1 + 1e-12, 1.0, 1 + 2e-12], dtype=torch.float64)  # float64: sorted unrounded
    assert cx.select("css", budget=2, scores=s64).indices.tolist() == [1, 0]


def test_prototypes_default_is_the_stable_sort_it_always_was(gen):
    e = torch.randn(70, 5, generator=gen)
    for budget in (1, 20, 70):
        sel = cx.select("prototypes", budget=budget, embeddings=e, n_clusters=4, seed=3)
        dist = sel.scores  # the distances it ranked by (their computation is not this test's)
        assert torch.equal(sel.indices, torch.sort(dist, descending=True, stable=True).indices[:budget])
        assert sel.options == {"n_clusters": 4, "sampling": "highest"}
        easy = cx.select("prototypes", budget=budget, embeddings=e, n_clusters=4, seed=3, keep="easiest")
        assert torch.equal(easy.indices, torch.sort(dist, stable=True).indices[:budget])
        assert easy.options["sampling"] == "lowest"


def test_dynamics_baselines_defaults_are_the_sorts_they_always_were(gen, tmp_path):
    n = 40
    dyn = _dynamics(gen, n)
    path = str(tmp_path / "dyn.npz")
    dyn.save(path)
    aum = dyn.aum().double().tolist()
    forget = dyn.forgetting().double().tolist()  # never learned: +inf, the most forgettable
    el2n = dyn.el2n().double().tolist()
    assert len(set(forget)) < n // 2  # ties exist: the AUM tie-break is exercised
    expected = {"aum": sorted(range(n), key=lambda i: (aum[i], i)),
                "forgetting": sorted(range(n), key=lambda i: (-forget[i], aum[i], i)),
                "el2n": sorted(range(n), key=lambda i: (-el2n[i], i))}
    defaults = {"aum": "lowest", "forgetting": "highest", "el2n": "highest"}
    for method, order in expected.items():
        for budget in (1, 13, 40):
            sel = cx.select(method, budget=budget, dataset_size=n, dynamics=path)
            assert sel.indices.tolist() == sorted(order[:budget]), (method, budget)
            assert sel.options == {"dynamics": path, "sampling": defaults[method]}
            # the same as double-end pruning with nothing dropped, the old code path
            de = cx.select(method, budget=budget, dataset_size=n, dynamics=path, sampling="double_end")
            assert torch.equal(de.indices, sel.indices)
        # the opposite end: the easiest, ties (forgetting) by the higher AUM, then the lower index
        easy_end, easiest_first = {
            "aum": ("highest", sorted(range(n), key=lambda i: (-aum[i], i))),
            "forgetting": ("lowest", sorted(range(n), key=lambda i: (forget[i], -aum[i], i))),
            "el2n": ("lowest", sorted(range(n), key=lambda i: (el2n[i], i)))}[method]
        easy = cx.select(method, budget=10, dataset_size=n, dynamics=path, sampling=easy_end)
        assert easy.indices.tolist() == sorted(easiest_first[:10]), method
    # the scores recorded are the ones ranked by: forgetting events and EL2N as they are (high = hard)
    rec = cx.select("forgetting", budget=5, dataset_size=n, dynamics=path).scores.double()
    finite = torch.isfinite(dyn.forgetting())
    assert torch.equal(rec[finite], dyn.forgetting()[finite].double())
    assert bool((rec[~finite] == dyn.forgetting(never_learned=None)[finite].max() + 1).all())
    assert torch.equal(cx.select("el2n", budget=5, dataset_size=n, dynamics=path).scores, dyn.el2n().float())


def test_elfs_and_ccs_defaults_are_what_they_always_were(gen, tmp_path):
    n = 40
    dyn = _dynamics(gen, n)
    path = str(tmp_path / "dyn.npz")
    dyn.save(path)
    aum = dyn.aum().double().tolist()
    order = sorted(range(n), key=lambda i: (aum[i], i))
    for beta, budget in ((0.0, 12), (0.1, 12), (0.3, 20)):
        cut = math.floor(beta * n + 1e-9)
        sel = cx.select("elfs", budget=budget, dataset_size=n, dynamics=path, beta=beta)
        assert sel.indices.tolist() == sorted(order[cut : cut + budget])
        assert sel.options["sampling"] == "double_end"
        c = cx.select("ccs", budget=budget, dataset_size=n, dynamics=path, beta=beta, strata=4, seed=5)
        _assert_ccs(c.indices, aum, budget, beta, 4)
        assert c.options["sampling"] == "ccs"
        alias = cx.select("elfs", budget=budget, dataset_size=n, dynamics=path, beta=beta, variant="ccs", strata=4,
                          seed=5)
        assert torch.equal(alias.indices, c.indices) and alias.options["sampling"] == "ccs"
    # beta chosen by coverage (the default): the subset of the grid's best beta, by a float64 brute force
    e = torch.randn(n, 6, generator=gen)
    en = e.double() / e.double().norm(dim=1, keepdim=True)
    budget = 15
    table = {}
    for beta in BETA_GRID:
        cut = math.floor(beta * n + 1e-9)
        if cut + budget <= n:
            subset = sorted(order[cut : cut + budget])
            table[beta] = (float((en @ en[subset].T).max(dim=1).values.mean()), subset)
    best = max(cov for cov, _ in table.values())
    sel = cx.select("elfs", budget=budget, embeddings=e, dynamics=path)
    assert sel.indices.tolist() in [subset for cov, subset in table.values() if cov >= best - 1e-6]
    assert sel.options == {"dynamics": path, "sampling": "double_end"}


def test_elfs_forgetting_samplings_keep_the_aum_tie_break(gen, tmp_path):
    n = 40
    dyn = _dynamics(gen, n)
    path = str(tmp_path / "dyn.npz")
    dyn.save(path)
    aum, forget = dyn.aum().double().tolist(), dyn.forgetting().double().tolist()
    hardest_first = sorted(range(n), key=lambda i: (-forget[i], aum[i], i))
    for beta, budget in ((0.0, 9), (0.2, 14)):
        cut = math.floor(beta * n + 1e-9)
        sel = cx.select("elfs", budget=budget, dataset_size=n, dynamics=path, beta=beta, score="forgetting")
        assert sel.indices.tolist() == sorted(hardest_first[cut : cut + budget])
    top = cx.select("elfs", budget=9, dataset_size=n, dynamics=path, score="forgetting", sampling="highest")
    assert top.indices.tolist() == sorted(hardest_first[:9]) and top.options["sampling"] == "highest"


@pytest.mark.parametrize("method,alias,value,sampling", [
    ("css", "order", "lowest", "lowest"), ("css", "order", "highest", "highest"),
    ("prototypes", "keep", "hardest", "highest"), ("prototypes", "keep", "easiest", "lowest"),
    ("elfs", "variant", "double_end", "double_end"), ("elfs", "variant", "ccs", "ccs"),
])
def test_old_options_are_aliases_of_sampling(gen, tmp_path, method, alias, value, sampling):
    n = 40
    inputs = {"css": {"scores": torch.rand(n, generator=gen)},
              "prototypes": {"embeddings": torch.randn(n, 4, generator=gen), "n_clusters": 3}}.get(method)
    if inputs is None:
        path = str(tmp_path / "dyn.npz")
        _dynamics(gen, n).save(path)
        inputs = {"dataset_size": n, "dynamics": path, "beta": 0.1}
    old = cx.select(method, budget=12, seed=1, **inputs, **{alias: value})
    new = cx.select(method, budget=12, seed=1, **inputs, sampling=sampling)
    both = cx.select(method, budget=12, seed=1, **inputs, **{alias: value}, sampling=sampling)  # consistent
    assert torch.equal(old.indices, new.indices) and torch.equal(old.indices, both.indices)
    assert old.options["sampling"] == new.options["sampling"] == sampling
    other = next(s for s in ("lowest", "highest", "double_end", "ccs", "auto") if s != sampling)
    with pytest.raises(ValueError, match=f"sampling='{other}' contradicts {alias}='{value}'"):
        cx.select(method, budget=12, seed=1, **inputs, **{alias: value}, sampling=other)


# ------------------------------------------------------------------------------- bad input

def _inputs(method, gen, tmp_path, n=30):
    if method in ("elfs", "aum", "forgetting", "el2n", "ccs"):
        path = str(tmp_path / "dyn.npz")
        _dynamics(gen, n).save(path)
        return {"dataset_size": n, "dynamics": path}
    return {"scores": torch.rand(n, generator=gen), "embeddings": torch.randn(n, 3, generator=gen),
            "labels": torch.randint(0, 3, (n,), generator=gen)}


@pytest.mark.parametrize("method", SCORE_BASED)
def test_bad_sampling_options_are_named(gen, tmp_path, method):
    inputs = _inputs(method, gen, tmp_path)
    for bad in ("middle", "Lowest", "", 1):
        with pytest.raises(ValueError, match="sampling must be one of 'lowest', 'highest', 'double_end', 'ccs', 'auto'"):
            cx.select(method, budget=5, **inputs, sampling=bad)
    for beta in (-0.1, 1.0, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match=r"beta must be a real number in \[0, 1\)"):
            cx.select(method, budget=5, **inputs, sampling="double_end", beta=beta)
    for strata in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="strata must be an int >= 1"):
            cx.select(method, budget=5, **inputs, sampling="ccs", beta=0.0, strata=strata)
    for sampling in ("lowest", "highest"):  # they drop nothing: a beta cannot be honoured
        with pytest.raises(ValueError, match=f"beta: sampling='{sampling}' keeps the {sampling} scores"):
            cx.select(method, budget=5, **inputs, sampling=sampling, beta=0.2)
    with pytest.raises(ValueError, match="beta"):  # no room: floor(0.5 * 30) + 20 > 30
        cx.select(method, budget=20, **inputs, sampling="double_end", beta=0.5)


@pytest.mark.parametrize("method", NOT_SCORE_BASED)
def test_methods_that_are_not_score_based_refuse_sampling(gen, tmp_path, method):
    inputs = _inputs(method, gen, tmp_path)
    for option in ("sampling", "beta", "strata"):
        with pytest.raises(ValueError, match=f"{option}: unknown option for method '{method}'"):
            cx.select(method, budget=5, **inputs, **{option: "lowest" if option == "sampling" else 0})


def test_sample_by_score_bad_input_is_named(gen):
    s = torch.rand(10, generator=gen)
    with pytest.raises(ValueError, match="hard must be one of 'low', 'high'"):
        pruning.sample_by_score(s, 3, hard="hardest")
    with pytest.raises(ValueError, match="budget"):
        pruning.sample_by_score(s, 0)
    with pytest.raises(ValueError, match="budget"):
        pruning.sample_by_score(s, 11)
    with pytest.raises(ValueError, match="secondary must have one score per example"):
        pruning.sample_by_score(s, 3, secondary=torch.rand(9, generator=gen))
    with pytest.raises(ValueError, match="scores contains NaN"):
        pruning.sample_by_score(torch.tensor([0.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="sampling: choose_beta chooses the beta of 'double_end' or 'ccs'"):
        from coreset_ext.select.elfs import choose_beta
        choose_beta(torch.randn(10, 3, generator=gen), s.double(), 3, sampling="lowest")


def test_sampling_from_the_command_line(tmp_path, capsys):
    import numpy as np

    from coreset_ext.cli import main
    from coreset_ext.select import Selection
    from coreset_ext.select.registry import parse_option
    from coreset_ext.train.data import load_dataset

    assert parse_option("css", "sampling", "auto") == "auto" and parse_option("aum", "beta", "0.1") == 0.1
    assert parse_option("prototypes", "strata", "5") == 5 and parse_option("ccs", "sampling", "none") is None
    n = len(load_dataset("digits", split="train"))
    np.save(tmp_path / "emb.npy", np.random.default_rng(4).standard_normal((n, 4)).astype(np.float32))
    argv = ["select", "--embeddings", str(tmp_path / "emb.npy"), "--method", "prototypes", "--budget", "30",
            "--option", "n_clusters=3", "--out", str(tmp_path / "s.npz")]
    assert main([*argv, "--option", "sampling=auto", "--option", "strata=5"]) == 0
    sel = Selection.load(tmp_path / "s.npz")
    assert sel.options == {"n_clusters": 3, "sampling": "ccs", "strata": 5}  # 30 of 1438: "auto" is CCS
    capsys.readouterr()
    assert main([*argv, "--option", "sampling=middle"]) == 2
    assert "sampling must be one of" in capsys.readouterr().err
    assert main([*argv, "--option", "keep=easiest", "--option", "sampling=highest"]) == 2
    assert "sampling='highest' contradicts keep='easiest'" in capsys.readouterr().err
