"""TrainingDynamics against an independent per-example Python loop in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coreset_ext import TrainingDynamics


def _sequence(n, c, steps, b, seed):
    """A fixed random sequence of (logits, targets, index, epoch), with duplicate indices inside
    some batches and logits scaled so that predictions flip between correct and wrong."""
    g = torch.Generator().manual_seed(seed)
    targets_of = torch.randint(0, c, (n,), generator=g)
    seq = []
    for s in range(steps):
        index = torch.randint(0, n, (b,), generator=g)
        logits = 2.0 * torch.randn(b, c, generator=g)
        seq.append((logits, targets_of[index], index, s // 3))
    return seq


def _loop(n, seq, el2n_epochs):
    """The definitions, one example at a time, in float64 Python arithmetic."""
    aum = [0.0] * n
    seen = [0] * n
    events = [0] * n
    ever = [False] * n
    last = [None] * n
    el2n = [0.0] * n
    el2n_n = [0] * n
    for logits, targets, index, epoch in seq:
        for row in range(len(index)):
            i, y = int(index[row]), int(targets[row])
            z = [float(v) for v in logits[row]]
            mx = max(z)
            e = [math.exp(v - mx) for v in z]
            p = [v / sum(e) for v in e]
            others = [p[c] for c in range(len(p)) if c != y]
            aum[i] += p[y] - max(others)
            seen[i] += 1
            correct = z[y] > max(z[c] for c in range(len(z)) if c != y)
            if last[i] is True and not correct:
                events[i] += 1
            last[i] = correct
            ever[i] |= correct
            if epoch < el2n_epochs:
                el2n[i] += math.sqrt(sum((p[c] - (1.0 if c == y else 0.0)) ** 2 for c in range(len(p))))
                el2n_n[i] += 1
    return aum, seen, events, ever, el2n, el2n_n


def _check(dyn, n, seq, el2n_epochs):
    aum, seen, events, ever, el2n, el2n_n = _loop(n, seq, el2n_epochs)
    got_aum, got_mean = dyn.aum().tolist(), dyn.aum("mean").tolist()
    got_f, got_raw = dyn.forgetting().tolist(), dyn.forgetting(never_learned=None).tolist()
    got_el2n = dyn.el2n().tolist()
    for i in range(n):
        if seen[i] == 0:
            assert math.isnan(got_aum[i]) and math.isnan(got_f[i]) and math.isnan(got_el2n[i])
            continue
        assert got_aum[i] == pytest.approx(aum[i], abs=1e-5)
        assert got_mean[i] == pytest.approx(aum[i] / seen[i], abs=1e-5)
        assert got_raw[i] == events[i]
        assert got_f[i] == (math.inf if not ever[i] else events[i])
        if el2n_n[i]:
            assert got_el2n[i] == pytest.approx(el2n[i] / el2n_n[i], abs=1e-5)
        else:
            assert math.isnan(got_el2n[i])
    assert dyn.counts().tolist() == seen
    assert dyn.never_learned().tolist() == [s > 0 and not e for s, e in zip(seen, ever)]


def test_dynamics_match_per_example_loop():
    n, el2n_epochs = 23, 2
    seq = _sequence(n, c=4, steps=12, b=9, seed=0)
    dyn = TrainingDynamics(n, el2n_epochs=el2n_epochs)
    for logits, targets, index, epoch in seq:
        dyn.update(logits, targets, index, epoch=epoch)
    _check(dyn, n, seq, el2n_epochs)
    # The sequence exercised what it is meant to: forgetting events, duplicates, never learned.
    _, seen, events, ever, _, _ = _loop(n, seq, el2n_epochs)
    assert sum(events) > 0 and any(s > 0 and not e for s, e in zip(seen, ever))
    assert any(len(set(ix.tolist())) < len(ix) for _, _, ix, _ in seq)


def test_save_load_resume(tmp_path):
    n = 17
    seq = _sequence(n, c=3, steps=10, b=6, seed=1)
    dyn = TrainingDynamics(n, el2n_epochs=1, fingerprint="abc")
    for logits, targets, index, epoch in seq[:5]:
        dyn.update(logits, targets, index, epoch=epoch)
    dyn.save(tmp_path / "dyn.npz")
    back = TrainingDynamics.load(tmp_path / "dyn.npz", num_samples=n, fingerprint="abc")
    assert back.steps == 5
    for logits, targets, index, epoch in seq[5:]:
        back.update(logits, targets, index, epoch=epoch)
    _check(back, n, seq, 1)
    with np.load(tmp_path / "dyn.npz", allow_pickle=False) as f:
        assert "last_correct" in f.files
    with pytest.raises(ValueError, match="num_samples"):
        TrainingDynamics.load(tmp_path / "dyn.npz", num_samples=n + 1)
    with pytest.raises(ValueError, match="num_samples"):
        TrainingDynamics(n + 1, el2n_epochs=1).load_state_dict(dyn.state_dict())
    with pytest.raises(ValueError, match="fingerprint"):
        TrainingDynamics.load(tmp_path / "dyn.npz", fingerprint="other")


def test_errors():
    dyn = TrainingDynamics(5)
    with pytest.raises(ValueError, match="no steps recorded"):
        dyn.aum()
    with pytest.raises(ValueError, match="no steps recorded"):
        dyn.forgetting()
    logits, t, ix = torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 4])
    with pytest.raises(ValueError, match="index out of range"):
        dyn.update(logits, t, torch.tensor([0, 1, 5]), epoch=0)
    with pytest.raises(ValueError, match="targets out of range"):
        dyn.update(logits, torch.tensor([0, 1, 4]), ix, epoch=0)
    with pytest.raises(ValueError, match="NaN"):
        dyn.update(torch.full((3, 4), float("nan")), t, ix, epoch=0)
    with pytest.raises(ValueError, match="must match"):
        dyn.update(logits, t[:2], ix, epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        dyn.update(logits, t, ix, epoch=-1)
    with pytest.raises(ValueError, match="num_samples"):
        TrainingDynamics(0)
    assert dyn.steps == 0  # nothing was recorded by the rejected calls


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("deterministic", [False, True])
def test_dynamics_cuda_match_loop(deterministic):
    n = 31
    seq = _sequence(n, c=5, steps=10, b=12, seed=2)
    dyn = TrainingDynamics(n, el2n_epochs=2, device="cuda", deterministic=deterministic)
    for logits, targets, index, epoch in seq:
        dyn.update(logits.cuda(), targets.cuda(), index.cuda(), epoch=epoch)
    _check(dyn.to("cpu"), n, seq, 2)
