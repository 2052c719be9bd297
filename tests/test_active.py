"""Active learning in realistic pools: the pool and its oracle, every method on a tiny pool, the
learner's saved state and resume, the contrastive method's use of OOD/ambiguous answers, bad input,
the benchmark's tables and the CLI command."""

import itertools
import math

import numpy as np
import pytest
import torch

import coreset_ext.active as al
from coreset_ext.active.acquire import RoundInputs, acquire, id_probability
from coreset_ext.active.benchmark import summarize_active
from coreset_ext.cli import main
from coreset_ext.cluster import KMeans
from coreset_ext.train.data import ArrayDataset, load_tensor_file, with_index

pytest.importorskip("sklearn")
TINY = al.FeatureConfig(epochs_first=1, epochs=1, width=8, batch_size=64)


def labelled_images(seed: int, n: int = 96, classes: int = 8) -> ArrayDataset:
    """Random 8x8 images whose class shifts their brightness pattern (fresh per seed)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    pattern = torch.rand(classes, 1, 8, 8, generator=g)
    x = (0.6 * pattern[y] + 0.4 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return ArrayDataset(x, y)


@pytest.fixture
def seed():
    return int(torch.randint(0, 2**31 - 1, ()))


def test_pool_kinds_oracle_and_what_the_learner_sees(seed):
    data = labelled_images(seed)
    pool = al.make_realistic_pool(data, id_classes=[0, 1, 2, 3], ood_classes=[5, 6], ambiguous_fraction=0.25,
                                  ood_fraction=0.25, seed=seed, ambiguous="mixed")
    n = len(pool.dataset)
    counts = pool.counts
    assert counts["ood"] == round(0.25 * n) and counts["ambiguous"] == round(0.25 * n) and sum(counts.values()) == n
    assert bool((pool.dataset.labels == -1).all())  # nothing of the truth reaches the learner's data
    labels, kinds = pool.oracle.label(torch.arange(n))
    x = pool.dataset.data.reshape(n, -1).double()
    src = data.data.reshape(len(data), -1).double()
    # ID and OOD examples are copies of examples of their classes; the oracle's class is the ID rank
    for i in torch.nonzero(kinds < 2).flatten().tolist():
        j = int(torch.cdist(x[i:i + 1], src).argmin())
        assert float(torch.dist(x[i], src[j])) < 1e-6
        cls = int(data.labels[j])
        assert (cls in (0, 1, 2, 3) and kinds[i] == 0 and labels[i] == cls) or \
               (cls in (5, 6) and kinds[i] == 1 and labels[i] == -1)
    # blends: lam * a + (1 - lam) * b of two ID examples of different classes, lam in [0.4, 0.6];
    # the rest of the ambiguous ones are noisy copies (no such pair), within the data's range
    id_src = torch.nonzero(data.labels < 4).flatten().tolist()
    blends = 0
    for i in torch.nonzero(kinds == 2).flatten().tolist():
        assert labels[i] == -1
        found = False
        for a, b in itertools.permutations(id_src, 2):
            d = src[a] - src[b]
            lam = float((x[i] - src[b]) @ d / (d @ d))
            if 0.4 - 1e-6 <= lam <= 0.6 + 1e-6 and float(torch.dist(x[i], lam * src[a] + (1 - lam) * src[b])) < 1e-4:
                found = data.labels[a] != data.labels[b]
                break
        blends += found
    assert blends == (counts["ambiguous"] + 1) // 2
    assert float(x.min()) >= 0 and float(x.max()) <= 1



def test_pool_of_unequal_classes_keeps_them_and_blends_across_them_where_it_can(seed, monkeypatch):
    """ID classes of 900 and 100 examples: the pool's ID part keeps both in the data's
    proportions (a pairing that took partners first had spent every example of the small class on
    blends), and the blends pair examples of different classes as often as the held-back
    examples allow (at most the small class's count among the blend sources)."""
    from coreset_ext.train.data import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.zeros(900), torch.ones(100), torch.full((300,), 2.0)]).long()
    data = ArrayDataset(torch.rand(1300, 1, 4, 4, generator=g), y)
    held = []
    original = al.pool._ambiguous_sources

    def spy(h, labels, n_blend):
        out = original(h, labels, n_blend)
        held.append((h, labels, out))
        return out

    monkeypatch.setattr(al.pool, "_ambiguous_sources", spy)
    pool = al.make_realistic_pool(data, id_classes=[0, 1], ood_classes=[2], ambiguous_fraction=0.2,
                                  ood_fraction=0.2, seed=seed)
    labels, kinds = pool.oracle.label(torch.arange(len(pool.dataset)))
    share = float((labels[kinds == 0] == 1).float().mean())
    assert 0.05 <= share <= 0.15
    (h, lab, (a, b, noise)), = held
    assert sorted(torch.cat([a, b, noise]).tolist()) == sorted(h.tolist())  # each held example once
    small = int((lab[torch.cat([a, b])] == 1).sum())
    assert int((lab[a] != lab[b]).sum()) == min(a.numel(), small)


def test_pool_reads_tensor_files_and_any_indexed_dataset(tmp_path, seed):
    data = labelled_images(seed)
    path = tmp_path / "pool.npz"
    np.savez(path, images=data.data.numpy(), labels=data.labels.numpy())
    dataset = torch.utils.data.TensorDataset(data.data, data.labels)

    class Triples(torch.utils.data.Dataset):  # a user's data set yielding (index, x, label)
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return i, data.data[i], int(data.labels[i])

    pools = [al.make_realistic_pool(d, [0, 1, 2], [4, 5], 0.2, 0.2, seed=3)
             for d in (data, load_tensor_file(path), with_index(dataset), dataset, Triples())]
    for p in pools[1:]:
        assert torch.equal(p.dataset.data, pools[0].dataset.data)
        assert torch.equal(p.oracle.kinds, pools[0].oracle.kinds)
    test = pools[0].test_set(data)
    assert set(test.labels.tolist()) == {0, 1, 2} and len(test) == int((data.labels < 3).sum())


@pytest.mark.parametrize("kwargs,message", [
    ({"id_classes": [0, 1], "ood_classes": [1, 5]}, r"classes \[1\] are in both"),
    ({"id_classes": [], "ood_classes": [5]}, "give at least one in-distribution class"),
    ({"id_classes": [0, 1], "ood_classes": [5], "ambiguous_fraction": 0.5, "ood_fraction": 0.5}, "below 1"),
    ({"id_classes": [0, 1], "ood_classes": [42]}, r"no example of class\(es\) \[42\]"),
    ({"id_classes": [0], "ood_classes": [5]}, "blends need two ID classes"),
    ({"id_classes": [0, 1], "ood_classes": []}, "no OOD class is given"),
    ({"id_classes": [0, 0], "ood_classes": [5]}, "id_classes must be distinct"),
    # these were an unpacking error and a TypeError naming nothing, and a pool built from inf noise
    ({"id_classes": [0, 1], "ood_classes": [5], "blend_range": (0.1, 0.2, 0.3)}, r"blend_range must be \(low, high\)"),
    ({"id_classes": [0, 1], "ood_classes": [5], "blend_range": 0.5}, r"blend_range must be \(low, high\)"),
    ({"id_classes": [0, 1], "ood_classes": [5], "noise_std": math.inf}, "noise_std must be a finite real number"),
])
def test_pool_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        al.make_realistic_pool(labelled_images(0), **{"ambiguous_fraction": 0.2, "ood_fraction": 0.2, **kwargs})


def tiny_pool(seed: int):
    return al.make_realistic_pool(labelled_images(seed), [0, 1, 2, 3], [5, 6], 0.2, 0.3, seed=seed)


@pytest.mark.parametrize("method", al.METHODS.values)
def test_every_method_runs_rounds_on_a_tiny_pool(method, seed):
    pool = tiny_pool(seed % 1000)
    test = pool.test_set(labelled_images(seed % 1000))
    learner = al.ActiveLearner(pool.dataset, method=method, seed=1, features=TINY)
    seen = set()
    for r in range(2):
        picks = learner.query(6)
        assert picks.numel() == 6 and torch.unique(picks).numel() == 6 and not seen & set(picks.tolist())
        seen |= set(picks.tolist())
        learner.update(picks, *pool.oracle.label(picks))
        acc = learner.evaluate(test)
        assert math.isnan(acc) or 0.0 <= acc <= 1.0
    assert sum(learner.counts().values()) == 12 and learner.round == 2
    assert [h["labels_spent"] for h in learner.history] == [6, 12]


def test_resume_after_a_crash_loses_nothing(tmp_path, seed):
    pool = tiny_pool(seed % 1000)

    def run(learner, rounds):
        out = []
        for _ in range(rounds):
            picks = learner.query(5)
            out.append(picks.tolist())
            learner.update(picks, *pool.oracle.label(picks))
        return out

    whole = run(al.ActiveLearner(pool.dataset, seed=2, features=TINY), 3)
    state = tmp_path / "state.npz"
    first = al.ActiveLearner(pool.dataset, seed=2, features=TINY, state_path=state)
    part = run(first, 1)
    pending = first.query(5).tolist()  # "crash" with a query out for annotation
    again = al.ActiveLearner(pool.dataset, seed=2, features=TINY, state_path=state)
    assert again.round == 1 and again.query(5).tolist() == pending
    again.update(torch.tensor(pending), *pool.oracle.label(pending))
    part += [pending] + run(al.ActiveLearner(pool.dataset, seed=2, features=TINY, state_path=state), 1)
    assert part == whole


def test_bad_input_to_the_learner(tmp_path, seed):
    pool = tiny_pool(seed % 1000)
    n = len(pool.dataset)
    learner = al.ActiveLearner(pool.dataset, method="random", seed=0, state_path=tmp_path / "s.npz")
    with pytest.raises(ValueError, match=f"budget: {n + 1} is larger than the {n} examples"):
        learner.query(n + 1)
    with pytest.raises(ValueError, match="never queried"):
        learner.update([0], [0], ["id"])
    picks = learner.query(4)
    outside = int(torch.nonzero(~torch.isin(torch.arange(n), picks))[0])
    with pytest.raises(ValueError, match=rf"\[{outside}\] were never queried in this round"):
        learner.update(torch.cat([picks, torch.tensor([outside])]), [0] * 5, ["id"] * 5)
    with pytest.raises(ValueError, match="have no answer"):
        learner.update(picks[:3], [0] * 3)
    with pytest.raises(ValueError, match="labels: ID examples need a class in 0..3"):
        learner.update(picks, [0, 1, 2, 9], ["id"] * 4)
    with pytest.raises(ValueError, match="label -1"):
        learner.update(picks, [0, 1, 2, 3], ["id", "id", "id", "ood"])
    with pytest.raises(ValueError, match="kinds must be 'id', 'ood' or 'ambiguous'"):
        learner.update(picks, [0, 1, 2, -1], ["id", "id", "id", "alien"])
    with pytest.raises(ValueError, match="await update"):
        learner.query(5)
    # indices and labels are whole numbers, never truncated (picks + 0.4 was read as picks), and
    # what is not a list of numbers is a ValueError naming the argument (it was torch's TypeError)
    with pytest.raises(ValueError, match="indices must be a 1-D sequence of integer indices, got float64"):
        learner.update(picks.double() + 0.4, [0, 1, 2, -1], ["id", "id", "id", "ambiguous"])
    with pytest.raises(ValueError, match="indices must be a 1-D sequence of integer indices, got float64"):
        learner.update([float(i) + 0.4 for i in picks.tolist()], [0, 1, 2, -1], ["id", "id", "id", "ambiguous"])
    with pytest.raises(ValueError, match="indices must be a 1-D sequence of integer indices, got object"):
        learner.update([2**70] * 4, [0, 1, 2, -1], ["id", "id", "id", "ambiguous"])
    for labels, got in ((None, "object"), (["a"] * 4, "<U1"), ([0.0, 1.0, 2.0, -1.0], "float64")):
        with pytest.raises(ValueError, match=f"labels must be a 1-D sequence of integer labels, got {got}"):
            learner.update(picks, labels, ["id", "id", "id", "ambiguous"])
    with pytest.raises(ValueError, match="indices must be a 1-D sequence of integer indices, got float"):
        pool.oracle.label([0.5])  # was read as example 0
    learner.update(picks, [0, 1, 2, -1], ["id", "id", "id", "ambiguous"])
    other = tiny_pool(seed % 1000 + 1)
    with pytest.raises(ValueError, match="resume: .* belongs to another pool"):
        al.ActiveLearner(other.dataset, method="random", seed=0, state_path=tmp_path / "s.npz")
    with pytest.raises(ValueError, match="method: 'random' in the state, 'kcenter' now"):
        al.ActiveLearner(pool.dataset, method="kcenter", seed=0, state_path=tmp_path / "s.npz")
    with pytest.raises(ValueError, match="method must be one of"):
        al.ActiveLearner(pool.dataset, method="nope")
    with pytest.raises(ValueError, match="seed must be an int in"):
        al.ActiveLearner(pool.dataset, seed=-1)
    with pytest.raises(ValueError, match="options: method 'random' takes none"):
        al.ActiveLearner(pool.dataset, method="random", tau=0.2)
    with pytest.raises(ValueError, match="features must be None or a FeatureConfig or a ContrastiveFeatures"):
        al.ActiveLearner(pool.dataset, method="random", features="tiny")  # was an AttributeError
    # the contrastive methods' options are checked when the learner is made, not at the first
    # query after its features have trained (a misspelled one was a TypeError there)
    for options, message in (({"tau": -1.0}, "tau must be a real number > 0"), ({"taus": 0.2}, r"\['taus'\] unknown"),
                             ({"k_neighbors": True}, "k_neighbors must be an int >= 1")):
        with pytest.raises(ValueError, match=message):
            al.ActiveLearner(pool.dataset, method="contrastive", features=TINY, **options)


def test_evaluate_refuses_a_test_set_it_cannot_score(seed):
    # each was scored as if sound: 0.0 for unlabelled or out-of-range labels, and 4x4 images went
    # through the 8x8 pool's encoder (1.0 on this one-class set)
    pool = tiny_pool(seed % 1000)
    learner = al.ActiveLearner(pool.dataset, method="random", seed=0, features=TINY)
    picks = learner.query(6)
    learner.update(picks, *pool.oracle.label(picks))
    x = torch.rand(10, 1, 8, 8)
    for test, message in ((ArrayDataset(x), "0..3; 10 of 10 are not"),
                          (ArrayDataset(x, torch.full((10,), 4)), "0..3; 10 of 10 are not"),
                          (ArrayDataset(x[:0], torch.zeros(0, dtype=torch.long)), "0 of 0 are not"),
                          (ArrayDataset(torch.rand(10, 1, 4, 4), torch.zeros(10, dtype=torch.long)),
                           r"examples of shape \(1, 4, 4\), the pool's are \(1, 8, 8\)")):
        with pytest.raises(ValueError, match=message):
            learner.evaluate(test)
    assert 0 <= learner.evaluate(pool.test_set(labelled_images(seed % 1000))) <= 1


def _edited_state(tmp_path, pool, edit):
    """A learner's saved state after one answered round, rewritten by `edit(arrays, meta)`."""
    from coreset_ext.io import load_npz, save_npz

    path = tmp_path / "edited.npz"
    path.unlink(missing_ok=True)
    learner = al.ActiveLearner(pool.dataset, method="random", seed=0, state_path=path)
    picks = learner.query(5)
    learner.update(picks, *pool.oracle.label(picks))
    arrays, meta = load_npz(path)
    edit(arrays, meta)
    save_npz(path, arrays, meta)
    return path


def _set(key, value, where="arrays"):
    return lambda arrays, meta: {"arrays": arrays, "meta": meta}[where].__setitem__(key, value)


@pytest.mark.parametrize("edit,message", [
    # each was resumed as if sound (labels truncated or out of range, round True) or failed with a
    # KeyError, AttributeError or TypeError naming nothing
    (_set("labels", np.full(5, 0.5)), "labels must be a 1-D sequence of integer values, got float64"),
    (_set("queried", np.arange(5) + 0.5), "queried must be a 1-D sequence of integer values, got float64"),
    (_set("labels", np.full(5, 9)), r"labels: ID examples need a class in 0..3|take label -1"),
    (_set("kinds", np.full(5, 1)), "OOD and ambiguous examples take label -1"),
    (_set("round", True, "meta"), "round and history disagree"),
    (_set("history", [5], "meta"), "round and history disagree"),
    (_set("rounds", np.full(5, 3)), r"rounds must be in 0..0"),
    (lambda arrays, meta: meta.pop("features"), r"unusable state \('features'\)"),
    (_set("features", None, "meta"), "features must be a record with rounds_trained"),
    (_set("pool", "elsewhere", "meta"), "belongs to another pool"),
    (lambda arrays, meta: arrays.__setitem__(next(k for k in arrays if k.startswith("model/")), np.array(["x"])),
     "holds weights of another model"),
])
def test_a_corrupt_state_is_refused_naming_what(tmp_path, seed, edit, message):
    pool = tiny_pool(seed % 1000)
    path = _edited_state(tmp_path, pool, edit)
    with pytest.raises(ValueError, match=message):
        al.ActiveLearner(pool.dataset, method="random", seed=0, state_path=path)


def test_id_probability_matches_a_plain_loop(gen):
    f = torch.nn.functional.normalize(torch.randn(30, 5, generator=gen, dtype=torch.float64), dim=1)
    queried = torch.randperm(30, generator=gen)[:9]
    is_id = torch.rand(9, generator=gen) < 0.5
    got = id_probability(f, queried, is_id, tau=0.2, prior_weight=0.5)
    prior = (int(is_id.sum()) + 1) / (9 + 2)
    for i in range(30):
        w = [math.exp((float(f[i] @ f[j]) - 1) / 0.2) for j in queried.tolist()]
        want = (sum(wj for wj, y in zip(w, is_id.tolist()) if y) + 0.5 * prior) / (sum(w) + 0.5)
        assert abs(float(got[i]) - want) < 1e-12


def test_the_contrastive_method_avoids_what_the_oracle_marked(gen):
    # three blobs on the sphere: two in-distribution, one where every answer so far was OOD
    centres = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=1) * 5
    x = torch.cat([c + 0.3 * torch.randn(60, 8, generator=gen) for c in centres])
    f = torch.nn.functional.normalize(x, dim=1)
    blob = torch.arange(180) // 60
    queried = torch.cat([torch.arange(0, 3), torch.arange(60, 63), torch.arange(120, 126)])
    kinds = (blob[queried] == 2).long()  # 1 = ood
    labels = torch.where(kinds == 0, blob[queried], torch.tensor(-1))
    inputs = RoundInputs(180, f, queried, labels, kinds, 2, seed=0)
    aware = acquire("contrastive", 20, inputs)
    unaware = acquire("contrastive-ood-unaware", 20, inputs)
    assert int((blob[aware] == 2).sum()) == 0
    assert int((blob[unaware] == 2).sum()) > 0
    assert not torch.isin(aware, queried).any()


def test_uncertainty_picks_the_boundary(gen):
    # two classes on a line; the unlabelled points nearest the middle are the least certain
    t = torch.linspace(-1, 1, 41, dtype=torch.float64)
    f = torch.nn.functional.normalize(torch.stack([t, torch.ones_like(t)], 1), dim=1)
    queried = torch.tensor([0, 1, 2, 38, 39, 40])
    inputs = RoundInputs(41, f, queried, torch.tensor([0, 0, 0, 1, 1, 1]), torch.zeros(6, dtype=torch.long), 2, 0)
    for method in ("entropy", "margin"):
        picks = acquire(method, 3, inputs)
        assert set(picks.tolist()) <= {19, 20, 21}, method


def test_summary_of_rounds():
    rows = [{"method": "a", "seed": s, "round": r, "labels_spent": 10 * (r + 1), "picked_id": 6, "picked_ood": 3 + s,
             "picked_ambiguous": 1, "accuracy": 0.5 + 0.1 * r + 0.02 * s} for s in (0, 1) for r in (0, 1)]
    out = summarize_active(rows)
    assert [(s["round"], s["labels_spent"]) for s in out] == [(0, 10), (1, 20)]
    assert out[1]["accuracy_mean"] == pytest.approx(0.61) and out[1]["accuracy_std"] == pytest.approx(0.02 / 2 ** 0.5)
    assert out[1]["wasted_mean"] == pytest.approx(4.5) and out[1]["wasted_total_mean"] == pytest.approx(9.0)


def test_cli_active_writes_tables_and_resumes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["active", "--help"])
    assert e.value.code == 0 and "usage: coreset-ext active" in capsys.readouterr().out
    argv = ["active", "--out", str(tmp_path / "al"), "--rounds", "2", "--budget", "8", "--seeds", "1",
            "--method", "contrastive", "random", "--epochs-first", "1", "--epochs", "1", "--width", "8",
            "--no-progress"]
    assert main(argv) == 0
    out = tmp_path / "al"
    for name in ("rounds.csv", "summary.csv", "results.md", "active_learning.png", "seed0/contrastive.npz"):
        assert (out / name).is_file(), name
    assert len((out / "rounds.csv").read_text().splitlines()) == 1 + 2 * 2
    first = (out / "rounds.csv").read_text()
    assert main(argv) == 0 and (out / "rounds.csv").read_text() == first  # resumed: nothing redone, same rows
    capsys.readouterr()
    assert main(argv[:-1] + ["--budget", "9", "--no-progress"]) == 2
    assert "resume:" in capsys.readouterr().err
    assert main(["active", "--out", str(tmp_path / "b"), "--budget", "5000", "--seeds", "1", "--no-progress"]) == 2
    assert "budget:" in capsys.readouterr().err
    assert main(["active", "--out", str(tmp_path / "c"), "--id-classes", "0-5", "--ood-classes", "5-9",
                 "--no-progress"]) == 2
    assert "in both" in capsys.readouterr().err


def reference_contrastive(f, queried, is_id, budget, clusters, aware, tau=0.1, prior_weight=1.0, k_nn=20):
    """The documented greedy (acquire's module docstring) written with plain loops in float64."""
    x = f.double().numpy()
    n, q = len(x), queried.tolist()
    prior = (int(is_id.sum()) + 1) / (len(q) + 2)
    p = np.ones(n)
    if aware:
        for i in range(n):
            w = [math.exp((x[i] @ x[j] - 1) / tau) for j in q]
            p[i] = (sum(wj for wj, y in zip(w, is_id.tolist()) if y) + prior_weight * prior) / (sum(w) + prior_weight)
    free = [i for i in range(n) if i not in q]
    covered = {c: sum(1 for j in q if clusters[j] == c) for c in set(clusters)}
    picks = []
    for _ in range(budget):
        gains = {c: sum(p[i] for i in free if clusters[i] == c) / (1 + covered[c])
                 for c in sorted({clusters[i] for i in free})}
        c = max(gains, key=lambda c: (gains[c], -c))
        members = [i for i in free if clusters[i] == c]
        kk = min(max(1, min(k_nn, len(members) // 2)), len(members) - 1)
        best, best_score = None, -1.0
        for i in members:
            d2 = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in members if j != i)[:kk]
            t = 1 / (sum(d2) / kk + 1e-5) if kk else 1e5
            if t * p[i] > best_score:
                best, best_score = i, t * p[i]
        picks.append(best)
        free.remove(best)
        covered[c] += 1
    return picks


@pytest.mark.parametrize("aware", [True, False])
def test_contrastive_acquire_matches_the_documented_rule(gen, aware):
    f = torch.nn.functional.normalize(torch.randn(70, 6, generator=gen), dim=1)
    queried = torch.randperm(70, generator=gen)[:10]
    kinds = (torch.rand(10, generator=gen) < 0.4).long() * 2  # ambiguous or id
    labels = torch.where(kinds == 0, torch.randint(0, 3, (10,), generator=gen), torch.tensor(-1))
    inputs = RoundInputs(70, f, queried, labels, kinds, 3, seed=5)
    got = acquire("contrastive" if aware else "contrastive-ood-unaware", 8, inputs)
    clusters = KMeans(18, seed=5).fit(f).labels_.tolist()  # the clustering is KMeans' own (tested elsewhere)
    assert got.tolist() == reference_contrastive(f, queried, kinds == 0, 8, clusters, aware)
