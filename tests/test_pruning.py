"""Budgets, SAS, facility location, double-end and CCS selection against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from coreset_ext.select import pruning


def _cos64(e):
    e = e.double()
    en = e / e.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return en @ en.T


# ------------------------------------------------------------------------------ budgets

@pytest.mark.parametrize("seed", range(20))
def test_class_budgets_exact(seed):
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, 12, (1,), generator=g))
    sizes = torch.randint(0, 40, (k,), generator=g)
    sizes[0] += 1  # never all empty
    fraction = float(torch.rand(1, generator=g)) * 0.98 + 0.01
    b = pruning.class_budgets(sizes, fraction)
    total = int(sizes.sum())
    n = min(total, max(1, math.floor(fraction * total + 0.5)))
    assert int(b.sum()) == n
    assert bool((b <= sizes).all()) and bool((b >= 0).all())
    exact = sizes.double() * fraction
    assert bool((b >= torch.floor(exact + 1e-9).long()).all())  # never below the floor share
    assert bool((b <= torch.floor(exact + 1e-9).long() + 1).all())  # at most one extra


def test_class_budgets_hand_made():
    assert pruning.class_budgets([10, 10, 10], 0.3).tolist() == [3, 3, 3]
    assert pruning.class_budgets([10, 5, 3], 0.5).tolist() == [5, 3, 1]  # 9 = 5 + 2 + 1, then 2.5 -> 3
    assert pruning.class_budgets([7, 0, 3], 0.5).tolist() == [4, 0, 1]  # 3.5, 1.5: tie -> lower class
    assert pruning.class_budgets([100, 100], 0.29).tolist() == [29, 29]  # 0.29 * 100 = 28.999...
    assert pruning.class_budgets([5, 3], 0.01).tolist() == [1, 0]  # tiny fraction: one example
    assert pruning.class_budgets([4, 4], 1.0).tolist() == [4, 4]
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="fraction"):
            pruning.class_budgets([3, 3], bad)
    with pytest.raises(ValueError, match="sizes"):
        pruning.class_budgets([0, 0], 0.5)


# ------------------------------------------------------------------------------ SAS

def _brute_sas(e, groups, fraction, clamp_min):
    s = _cos64(e).clamp_min(clamp_min)
    labels = sorted(set(groups.tolist()))
    sizes = [int((groups == g).sum()) for g in labels]
    budgets = pruning.class_budgets(sizes, fraction).tolist()
    picked = []
    for g, b in zip(labels, budgets):
        members = [i for i in range(len(groups)) if int(groups[i]) == g]
        r = {i: sum(float(s[i, j]) for j in members) for i in members}
        picked += sorted(members, key=lambda i: (-r[i], i))[:b]
    return sorted(picked)


@pytest.mark.parametrize("n,k,fraction,clamp", [(60, 3, 0.3, 0.0), (77, 5, 0.5, 0.2), (41, 1, 0.1, 0.0)])
def test_sas_rowsum_equals_bruteforce(n, k, fraction, clamp):
    g = torch.Generator().manual_seed(n)
    e = torch.randn(n, 6, generator=g)
    groups = torch.randint(0, k, (n,), generator=g) * 10 + 3  # labels need not be 0..K-1
    got = pruning.sas_indices(e, groups, fraction, clamp_min=clamp)
    assert got.tolist() == _brute_sas(e, groups, fraction, clamp)
    assert got.numel() == min(n, max(1, math.floor(fraction * n + 0.5)))


def test_sas_bad_input():
    e = torch.randn(10, 3)
    with pytest.raises(ValueError, match="groups"):
        pruning.sas_indices(e, torch.zeros(9, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="objective"):
        pruning.sas_indices(e, None, 0.5, objective="other")
    with pytest.raises(ValueError, match="fraction"):
        pruning.sas_indices(e, None, 0.0)
    with pytest.raises(ValueError, match="clamp_min"):
        pruning.sas_indices(e, None, 0.5, objective="facility_location", clamp_min=-0.5)


# ------------------------------------------------------------------------------ facility location

def _F(s, subset):
    return float(s[list(subset)].max(dim=0).values.sum()) if subset else 0.0


def _naive_greedy(s, budget):
    chosen = []
    for _ in range(budget):
        gains = [(_F(s, chosen + [i]) - _F(s, chosen), -i) for i in range(s.shape[0]) if i not in chosen]
        best = max(gains)
        chosen.append(-best[1])
    return chosen


@pytest.mark.parametrize("seed,n,budget,clamp", [(0, 8, 3, 0.0), (1, 9, 4, 0.0), (2, 7, 2, 0.3), (3, 10, 5, 0.0)])
def test_facility_location_vs_exhaustive_and_naive(seed, n, budget, clamp):
    e = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = _cos64(e).clamp_min(clamp)
    got = pruning.facility_location_greedy(e, budget, clamp_min=clamp, batch=2, col_chunk=3)
    assert got.tolist() == _naive_greedy(s, budget)
    best = max(_F(s, list(c)) for c in itertools.combinations(range(n), budget))
    assert _F(s, got.tolist()) >= (1 - 1 / math.e) * best - 1e-12


def test_sas_facility_location_per_class():
    g = torch.Generator().manual_seed(7)
    e = torch.randn(30, 4, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 3, (30,), generator=g)
    got = pruning.sas_indices(e, groups, 0.4, objective="facility_location")
    budgets = pruning.class_budgets(torch.bincount(groups), 0.4).tolist()
    want = []
    for k, b in enumerate(budgets):
        members = (groups == k).nonzero()[:, 0]
        want += members[_naive_greedy(_cos64(e[members]).clamp_min(0), b)].tolist()
    assert got.tolist() == sorted(want)


# ------------------------------------------------------------------------------ double-end, CCS

def test_double_end_hand_made():
    s = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.9, -0.3, 1.5, 0.0, 3.0, 0.7])
    # ascending: 1(-1.0) 5(-0.3) 7(0.0) 3(0.1) 0(0.5) 9(0.7) 4(0.9) 6(1.5) 2(2.0) 8(3.0)
    assert pruning.double_end_indices(s, 3, 0.2).tolist() == [0, 3, 7]
    assert pruning.double_end_indices(s, 4, 0.0).tolist() == [1, 3, 5, 7]
    assert pruning.double_end_indices(s, 0.5, 0.5).tolist() == [2, 4, 6, 8, 9]
    assert pruning.double_end_indices(s, 2, 0.15).tolist() == [5, 7]  # floor(1.5) = 1 dropped
    ties = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert pruning.double_end_indices(ties, 2, 0.2).tolist() == [0, 3]  # ties by lower index
    with pytest.raises(ValueError, match="beta"):
        pruning.double_end_indices(s, 6, 0.5)
    with pytest.raises(ValueError, match="beta"):
        pruning.double_end_indices(s, 0.6, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        pruning.double_end_indices(torch.tensor([0.0, float("nan")]), 1, 0.0)
    with pytest.raises(ValueError, match="keep"):
        pruning.double_end_indices(s, 0, 0.0)


def test_ccs_hand_made():
    # Scores 0..19 then a far cluster: with 4 strata over [0, 39] (width 9.75):
    # bin 0: 0..9 (10 examples), bin 1: 10..19 (10), bin 2: none, bin 3: 39 (1 example).
    s = torch.cat([torch.arange(20.0), torch.tensor([39.0])])
    got = pruning.ccs_indices(s, 9, strata=4, seed=0)
    # Smallest non-empty bin first: bin 3 gives min(1, 9 // 3) = 1; then bin 0: min(10, 8 // 2) = 4;
    # bin 1: 4.
    assert 20 in got.tolist()
    assert sum(i < 10 for i in got.tolist()) == 4 and sum(10 <= i < 20 for i in got.tolist()) == 4
    assert torch.equal(got, pruning.ccs_indices(s, 9, strata=4, seed=0))  # reproducible
    # Hard cut first: beta drops the 2 lowest (0, 1); keep everything else in full.
    got = pruning.ccs_indices(s, 19, 0.1, strata=4, seed=3)
    assert got.tolist() == list(range(2, 21))
    # Budget above a bin's fair share: a 2-member bin is taken whole, the rest spread.
    s2 = torch.tensor([0.0, 0.1, 5.0, 5.1, 5.2, 5.3, 9.9, 10.0])
    # Width 5: bin 0 holds 0.0, 0.1 (2); bin 1 holds 5.0 .. 10.0 (6). Bin 0 is taken whole
    # (min(2, 6 // 2)), bin 1 gives 4 of its 6, sampled: every seed keeps the same counts.
    for seed in range(5):
        got = pruning.ccs_indices(s2, 6, strata=2, seed=seed)
        assert got.numel() == 6 and got[:2].tolist() == [0, 1]
    with pytest.raises(ValueError, match="beta"):
        pruning.ccs_indices(s, 15, 0.5)
    with pytest.raises(ValueError, match="strata"):
        pruning.ccs_indices(s, 5, strata=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sas_cuda_agrees_with_cpu():
    g = torch.Generator().manual_seed(9)
    e = torch.randn(2000, 32, generator=g)
    groups = torch.randint(0, 5, (2000,), generator=g)
    cpu = pruning.sas_indices(e, groups, 0.3)
    gpu = pruning.sas_indices(e.cuda(), groups.cuda(), 0.3)
    assert gpu.numel() == cpu.numel() == 600
    # TF32 products may swap near-equal row sums at a class's budget edge: allow a few.
    assert len(set(gpu.tolist()) & set(cpu.tolist())) >= 0.98 * 600
    fl = pruning.sas_indices(e[:300].double().cuda(), groups[:300].cuda(), 0.2, objective="facility_location")
    assert fl.tolist() == pruning.sas_indices(e[:300].double(), groups[:300], 0.2, objective="facility_location").tolist()
