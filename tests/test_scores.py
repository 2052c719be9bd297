"""ScoreTracker: sums and counts against a naive loop, NaN policy, atomic save/load."""

import os

import numpy as np
import pytest
import torch

import coreset_ext as cx
from coreset_ext import io as scores_mod


def naive_sums(n, steps):
    s = np.zeros(n)
    c = np.zeros(n)
    for index, vals in steps:
        for i, v in zip(index.tolist(), vals.double().tolist()):
            s[i] += v
            c[i] += 1
    return s, c


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_update_and_mean(device, gen):
    n = 37
    tracker = cx.ScoreTracker(n, metrics=("css", "loss"), device=device)
    steps = []
    for _ in range(5):
        index = torch.randint(0, n, (16,), generator=gen)
        vals = torch.randn(16, generator=gen)
        steps.append((index, vals))
        tracker.update(index.to(device), css=vals.to(device), loss=(2 * vals).to(device))
    s, c = naive_sums(n, steps)
    np.testing.assert_allclose(tracker.sums["css"].cpu().numpy(), s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tracker.sums["loss"].cpu().numpy(), 2 * s, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tracker.counts["css"].cpu().numpy(), c)
    mean = tracker.mean()["css"].cpu().numpy()
    seen = c > 0
    np.testing.assert_allclose(mean[seen], s[seen] / c[seen], rtol=1e-5, atol=1e-5)
    assert np.isnan(mean[~seen]).all()


def test_nan_policy(gen):
    t = cx.ScoreTracker(4)
    with pytest.raises(ValueError, match=r"css has a non-finite value nan at position 1 \(example 3\)"):
        t.update(torch.tensor([0, 3]), css=torch.tensor([1.0, float("nan")]))
    assert t.counts["css"].sum() == 0, "a rejected update must not write"
    t = cx.ScoreTracker(4, nan="skip")
    t.update(torch.tensor([0, 3, 3]), css=torch.tensor([1.0, float("inf"), 2.0]))
    assert t.sums["css"].tolist() == [1.0, 0.0, 0.0, 2.0]
    assert t.counts["css"].tolist() == [1.0, 0.0, 0.0, 1.0]


def test_bad_input():
    t = cx.ScoreTracker(4)
    with pytest.raises(ValueError, match="unknown metric"):
        t.update(torch.tensor([0]), aum=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="css has 2 values but index has 1"):
        t.update(torch.tensor([0]), css=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="index contains 4"):
        t.update(torch.tensor([4]), css=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="index contains -2"):
        t.update(torch.tensor([-2]), css=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="index must be a 1-D"):
        t.update(torch.tensor([[0]]), css=torch.tensor([1.0]))
    t2 = cx.ScoreTracker(4, metrics=("a", "b"))
    with pytest.raises(ValueError, match="b must be a 1-D float32, float16 or bfloat16 tensor"):
        t2.update(torch.tensor([0, 1]), a=torch.ones(2), b=torch.ones(2, dtype=torch.float64))
    assert t2.counts["a"].sum() == 0, "nothing is written when any metric is rejected"
    with pytest.raises(ValueError, match="index must be int32 or int64"):
        t2.update(torch.tensor([0.0]), a=torch.ones(1))
    with pytest.raises(ValueError, match="num_samples"):
        cx.ScoreTracker(0)
    with pytest.raises(ValueError, match="nan must be"):
        cx.ScoreTracker(3, nan="drop")


def test_save_load_round_trip(tmp_path, gen):
    t = cx.ScoreTracker(20, metrics=("css", "aum"), fingerprint="digits-abc")
    t.update(torch.randint(0, 20, (50,), generator=gen), css=torch.randn(50, generator=gen),
             aum=torch.randn(50, generator=gen))
    path = tmp_path / "scores.npz"
    t.save(path)
    u = cx.ScoreTracker.load(path)
    assert u.metrics == ("css", "aum") and u.num_samples == 20 and u.fingerprint == "digits-abc"
    for m in t.metrics:
        assert torch.equal(t.sums[m], u.sums[m]) and torch.equal(t.counts[m], u.counts[m])
    # the file is plain npz with JSON metadata: readable without pickle
    arrays, meta = scores_mod.load_npz(path)
    assert meta["num_samples"] == 20 and meta["metrics"] == ["css", "aum"] and "library_version" in meta
    v = cx.ScoreTracker(20, metrics=("css", "aum"))
    v.load_state_dict(t.state_dict())
    assert torch.equal(v.sums["aum"], t.sums["aum"])


def test_load_for_other_data_set_fails(tmp_path):
    t = cx.ScoreTracker(20, fingerprint="a")
    t.save(tmp_path / "s.npz")
    with pytest.raises(ValueError, match="num_samples: .* written for 20 examples, not 30"):
        cx.ScoreTracker.load(tmp_path / "s.npz", num_samples=30)
    with pytest.raises(ValueError, match="fingerprint"):
        cx.ScoreTracker.load(tmp_path / "s.npz", fingerprint="b")
    with pytest.raises(ValueError, match="num_samples: the state holds 20 examples but this tracker has 21"):
        cx.ScoreTracker(21).load_state_dict(t.state_dict())


def test_interrupted_save_leaves_old_file(tmp_path, monkeypatch, gen):
    path = tmp_path / "scores.npz"
    old = cx.ScoreTracker(10)
    old.update(torch.arange(10), css=torch.randn(10, generator=gen))
    old.save(path)
    new = cx.ScoreTracker(10)
    new.update(torch.arange(10), css=torch.randn(10, generator=gen) + 5)

    def crash(fd):  # the process dies after part of the new file was written, before the rename
        raise KeyboardInterrupt("simulated crash during save")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.undo()
    back = cx.ScoreTracker.load(path)
    assert torch.equal(back.sums["css"], old.sums["css"])
    assert [p.name for p in tmp_path.iterdir()] == ["scores.npz"], "no temporary file is left behind"


@pytest.mark.parametrize("key,array", [("sum/css", np.array([7.0], np.float32)),
                                       ("count/css", np.ones(6, np.float32)),
                                       ("sum/css", np.arange(5))])
def test_load_refuses_buffers_of_another_shape_or_kind(tmp_path, key, array):
    """A (1,) array would broadcast into every example through copy_: a silent wrong answer."""
    t = cx.ScoreTracker(5, ("css",))
    t.update(torch.tensor([0, 3]), css=torch.tensor([0.5, 0.25]))
    path = tmp_path / "t.npz"
    t.save(path)
    arrays, meta = scores_mod.load_npz(path)
    arrays[key] = array
    scores_mod.save_npz(path, arrays, meta)
    with pytest.raises(ValueError, match=key):
        cx.ScoreTracker.load(path)
