"""Selection API: exact sizes, no duplicates, reproducible per seed, independent oracles, save/load."""

import numpy as np
import pytest
import torch

import coreset_ext as cx
from coreset_ext.select import Selection, available_methods, register_method
from coreset_ext.train.data import ArrayDataset

N, D = 97, 6


@pytest.fixture
def pool():
    g = torch.Generator().manual_seed(7)
    return {"scores": torch.rand(N, generator=g), "embeddings": torch.randn(N, D, generator=g),
            "labels": torch.randint(0, 4, (N,), generator=g)}


def _needs_kmeans(method, options):
    return method == "prototypes" or (method == "balanced_random" and options.get("by") == "cluster")


CASES = [("random", {}), ("balanced_random", {"by": "class"}), ("balanced_random", {"by": "cluster", "n_clusters": 5}),
         ("css", {}), ("prototypes", {"n_clusters": 5}), ("kcenter", {})]


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.33, 1.0])
def test_sizes_exact_distinct_and_reproducible(pool, method, options, fraction):
    if _needs_kmeans(method, options):
        pytest.importorskip("coreset_ext.cluster")
    a = cx.select(method, fraction=fraction, seed=3, **pool, **options)
    b = cx.select(method, fraction=fraction, seed=3, **pool, **options)
    budget = max(1, int(np.floor(fraction * N + 0.5)))
    assert len(a) == budget and a.indices.unique().numel() == budget
    assert int(a.indices.min()) >= 0 and int(a.indices.max()) < N
    assert torch.equal(a.indices, b.indices)
    # the score-based methods also record the sampling they used (their default here)
    recorded = {"css": {"sampling": "lowest"}, "prototypes": {"sampling": "highest"}}.get(method, {})
    assert a.method == method and a.dataset_size == N and a.options == {**options, **recorded}


def test_random_changes_with_seed(pool):
    a, b = cx.select("random", budget=30, seed=0, **pool), cx.select("random", budget=30, seed=1, **pool)
    assert not torch.equal(a.indices.sort().values, b.indices.sort().values)


def test_css_keeps_the_lowest_scores(pool):
    sel = cx.select("css", fraction=0.25, scores=pool["scores"])
    expect = np.argsort(pool["scores"].numpy().astype(np.float64), kind="stable")[: len(sel)]
    assert sorted(sel.indices.tolist()) == sorted(expect.tolist())
    high = cx.select("css", fraction=0.25, scores=pool["scores"], order="highest")
    assert float(pool["scores"][high.indices].min()) >= float(pool["scores"][sel.indices].max())
    with pytest.raises(ValueError, match="no finite score"):
        cx.select("css", budget=3, scores=torch.tensor([0.1, float("nan"), 0.3, 0.2]))


def test_kcenter_matches_a_naive_float64_greedy(pool):
    sel = cx.select("kcenter", budget=20, embeddings=pool["embeddings"], seed=5, chunk_size=16)
    x = pool["embeddings"].double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    picks = [int(sel.indices[0])]  # the seeded start; every later pick is the farthest point
    for _ in range(19):
        d = ((x[:, None, :] - x[None, picks, :]) ** 2).sum(-1).min(1)
        d[picks] = -1
        picks.append(int(d.argmax()))
    assert sel.indices.tolist() == picks


def test_balanced_random_spreads_over_classes():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 4)
    sel = cx.select("balanced_random", budget=30, labels=labels, seed=0)
    counts = torch.bincount(labels[sel.indices], minlength=3).tolist()
    assert counts == [13, 13, 4]  # class 2 is exhausted; its unused share goes to the others
    prop = cx.select("balanced_random", budget=42, labels=labels, seed=0, allocation="proportional")
    assert torch.bincount(labels[prop.indices], minlength=3).tolist() == [25, 15, 2]


@pytest.mark.parametrize("seed", range(5))
def test_balanced_random_equal_shares_brute_force(seed):
    """Equal allocation: every group gets min(size, L) or L + 1 (lowest group indices first)
    for the one level L that spends the budget: checked against a one-at-a-time round robin."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 12, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
    labels = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    for budget in range(1, int(sizes.sum()) + 1):
        want = [0] * sizes.numel()
        while sum(want) < budget:  # hand out one at a time to the least-filled open group
            c = min((w, c) for c, w in enumerate(want) if w < sizes[c])[1]
            want[c] += 1
        sel = cx.select("balanced_random", budget=budget, labels=labels, seed=seed)
        assert torch.bincount(labels[sel.indices], minlength=sizes.numel()).tolist() == want, (sizes, budget)


def test_fraction_rounds_half_up_like_budget_size():
    from coreset_ext.select.pruning import budget_size

    for n in (7, 50, 333, 1000):
        for f in (0.01, 0.15, 0.29, 0.5, 0.57, 1.0):
            assert cx.select("random", fraction=f, dataset_size=n).indices.numel() == budget_size(f, n)


def test_css_sorts_float64_scores_unrounded():
    sel = cx.select("css", budget=1, scores=torch.tensor([1 + 1e-9, 1.0], dtype=torch.float64))
    assert sel.indices.tolist() == [1]
    sel = cx.select("css", budget=1, scores=torch.tensor([1e39, 2e39], dtype=torch.float64))
    assert sel.indices.tolist() == [0]


def test_prototypes_keeps_the_farthest_from_the_nearest_centroid(pool):
    cluster = pytest.importorskip("coreset_ext.cluster")
    sel = cx.select("prototypes", budget=15, embeddings=pool["embeddings"], seed=2, n_clusters=4)
    x = pool["embeddings"].double()
    x = x / x.norm(dim=1, keepdim=True)
    centers = torch.as_tensor(cluster.KMeans(4, seed=2).fit(x.float()).cluster_centers_).double()
    dist = torch.cdist(x, centers).pow(2).min(1).values.numpy()
    expect = np.argsort(-dist, kind="stable")[:15]
    assert sorted(sel.indices.tolist()) == sorted(expect.tolist())
    easy = cx.select("prototypes", budget=15, embeddings=pool["embeddings"], seed=2, n_clusters=4, keep="easiest")
    assert sorted(easy.indices.tolist()) == sorted(np.argsort(dist, kind="stable")[:15].tolist())


def test_bad_input_is_a_clear_error(pool):
    with pytest.raises(ValueError, match="unknown method 'nope'.*css.*kcenter.*random"):
        cx.select("nope", fraction=0.1, **pool)
    for bad in (0, 0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction must be in"):
            cx.select("random", fraction=bad, **pool)
    with pytest.raises(ValueError, match=f"budget: {N + 1} is larger than the data set size {N}"):
        cx.select("random", budget=N + 1, **pool)
    with pytest.raises(ValueError, match="exactly one"):
        cx.select("random", fraction=0.1, budget=3, **pool)
    with pytest.raises(ValueError, match="disagree"):
        cx.select("random", fraction=0.1, scores=torch.rand(5), labels=torch.zeros(6))
    with pytest.raises(ValueError, match="embeddings: method 'kcenter' needs embeddings"):
        cx.select("kcenter", fraction=0.1, scores=pool["scores"])


def test_save_load_round_trip_and_subset(tmp_path, pool):
    ds = ArrayDataset(torch.rand(N, 1, 4, 4), pool["labels"], name="toy")
    sel = cx.select("css", fraction=0.3, scores=pool["scores"], seed=4, fingerprint=ds.fingerprint, order="lowest")
    sel.save(tmp_path / "s.npz")
    back = Selection.load(tmp_path / "s.npz", dataset=ds)
    assert torch.equal(back.indices, sel.indices) and torch.equal(back.scores, sel.scores)
    assert (back.method, back.options, back.dataset_size, back.seed, back.fingerprint) == \
        ("css", {"order": "lowest", "sampling": "lowest"}, N, 4, ds.fingerprint)
    sub = back.subset(ds)
    assert len(sub) == len(sel) and sub[0][0] == int(sel.indices[0])
    other = ArrayDataset(torch.rand(N + 3, 1, 4, 4), name="other")
    with pytest.raises(ValueError, match=f"{N} examples.*{N + 3}"):
        Selection.load(tmp_path / "s.npz", dataset=other)
    same_size = ArrayDataset(torch.rand(N, 1, 4, 4), name="other")
    with pytest.raises(ValueError, match=f"{ds.fingerprint}.*{same_size.fingerprint}"):
        sel.subset(same_size)
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="coreset-ext file"):
        Selection.load(tmp_path / "x.npz")


def test_registry_accepts_new_methods(pool):
    @register_method("every_other_test")
    def every_other(budget, *, n, **_):
        return torch.arange(0, n, 2)[:budget]

    try:
        assert "every_other_test" in available_methods()
        assert cx.select("every_other_test", budget=4, **pool).indices.tolist() == [0, 2, 4, 6]
    finally:
        from coreset_ext.select import registry

        registry._METHODS.pop("every_other_test")


def test_kcenter_rejects_non_finite_embeddings_and_bad_chunk_size(pool):
    for value in (float("nan"), float("inf")):
        bad = pool["embeddings"].clone()
        bad[int(torch.randint(0, N, ()))] = value
        with pytest.raises(ValueError, match="embeddings contains NaN or Inf"):
            cx.select("kcenter", budget=5, embeddings=bad, seed=0)
    for chunk_size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            cx.select("kcenter", budget=5, embeddings=pool["embeddings"], seed=0, chunk_size=chunk_size)


# --- reviewer fixes: option names, index range, JSON options, integer labels, numeric arguments ---

# Every built-in method with one of its real options: the misspelled name must be rejected and the
# real one listed. (Hand-written, not read from the signatures the check itself uses.)
REAL_OPTIONS = {"random": None, "balanced_random": "allocation", "css": "order", "prototypes": "keep",
                "kcenter": "chunk_size", "sas": "objective", "elfs": "variant", "aum": "proxy_epochs",
                "forgetting": "proxy_epochs", "el2n": "proxy_epochs", "ccs": "strata"}


@pytest.mark.parametrize("method", sorted(REAL_OPTIONS))
def test_misspelled_option_is_an_error_listing_the_real_ones(method):
    g = torch.Generator().manual_seed(11)
    inputs = {"scores": torch.rand(40, generator=g), "embeddings": torch.randn(40, 3, generator=g),
              "labels": torch.randint(0, 3, (40,), generator=g)}
    real = REAL_OPTIONS[method]
    wrong = real[:-1] + "x" if real else "ordr"
    with pytest.raises(ValueError, match=f"{wrong}: unknown option for method '{method}'") as err:
        cx.select(method, fraction=0.5, seed=1, **inputs, **{wrong: "highest"})
    assert (real in str(err.value)) if real else str(err.value).endswith("options are: none")
    assert "seed" not in str(err.value).split("options are:")[1]  # inputs are not options


def test_misspelled_option_is_an_error_in_the_cli(tmp_path, capsys):
    from coreset_ext.cli import main
    from coreset_ext.train.data import load_dataset

    n = len(load_dataset("digits", split="train"))
    np.save(tmp_path / "emb.npy", np.random.default_rng(3).standard_normal((n, 4)).astype(np.float32))
    argv = ["select", "--embeddings", str(tmp_path / "emb.npy"), "--method", "kcenter", "--budget", "3",
            "--out", str(tmp_path / "s.npz")]
    capsys.readouterr()
    assert main([*argv, "--option", "chunk_sise=16"]) == 2
    err = capsys.readouterr().err
    assert "chunk_sise: unknown option for method 'kcenter'" in err and "chunk_size" in err
    assert not (tmp_path / "s.npz").exists()
    assert main([*argv, "--option", "chunk_size=16"]) == 0


def test_a_catch_all_method_gets_the_inputs_but_no_unknown_options():
    seen = {}

    @register_method("catch_all_test")
    def catch_all(budget, *, n, **inputs):
        seen.update(inputs)
        return torch.arange(budget)

    try:
        s = torch.rand(9, generator=torch.Generator().manual_seed(5))
        cx.select("catch_all_test", budget=2, scores=s, seed=4)
        assert torch.equal(seen["scores"], s) and seen["seed"] == 4 and seen["labels"] is None
        with pytest.raises(ValueError, match="tresh: unknown option.*none"):
            cx.select("catch_all_test", budget=2, scores=s, tresh=0.5)
    finally:
        from coreset_ext.select import registry

        registry._METHODS.pop("catch_all_test")


@pytest.mark.parametrize("bad", [[-1, 2], [0, 5], [3, 3], [1, 9]])
def test_out_of_range_or_repeated_method_indices_are_rejected(bad):
    @register_method("bad_indices_test")
    def bad_indices(budget, *, n):
        return torch.tensor(bad)

    try:
        with pytest.raises(RuntimeError, match="'bad_indices_test' returned bad indices"):
            cx.select("bad_indices_test", budget=2, dataset_size=5)
    finally:
        from coreset_ext.select import registry

        registry._METHODS.pop("bad_indices_test")
    with pytest.raises(ValueError, match="indices must be"):
        Selection(torch.tensor(bad), "random", dataset_size=5)


def test_load_rejects_indices_outside_the_data_set(tmp_path):
    from coreset_ext.io import save_npz

    idx = torch.randperm(20, generator=torch.Generator().manual_seed(8))[:6]
    good = Selection(idx, "random", dataset_size=20)
    good.save(tmp_path / "ok.npz")
    assert torch.equal(Selection.load(tmp_path / "ok.npz").indices, idx)
    meta = {"kind": "Selection", "format_version": 1, "method": "random", "options": {}, "seed": 0,
            "fingerprint": None, "budget": 6}
    for name, indices, size in (("neg", [-1, 2], 5), ("big", [4, 5], 5), ("dup", [1, 1], 5)):
        save_npz(tmp_path / f"{name}.npz", {"indices": np.array(indices, dtype=np.int64)}, {**meta, "dataset_size": size})
        with pytest.raises(ValueError, match=f"{name}.npz holds an invalid Selection: indices must be"):
            Selection.load(tmp_path / f"{name}.npz")


def test_numpy_scalar_options_and_seed_are_saved_as_python_numbers(tmp_path):
    e = torch.randn(30, 4, generator=torch.Generator().manual_seed(13))
    sel = cx.select("kcenter", budget=7, embeddings=e, seed=np.int64(2), chunk_size=np.int64(8),
                    normalize=np.bool_(True))
    plain = cx.select("kcenter", budget=7, embeddings=e, seed=2, chunk_size=8, normalize=True)
    assert torch.equal(sel.indices, plain.indices)
    assert sel.options == {"chunk_size": 8, "normalize": True} and type(sel.options["chunk_size"]) is int
    assert type(sel.seed) is int
    sel.save(tmp_path / "k.npz")
    back = Selection.load(tmp_path / "k.npz")
    assert back.options == {"chunk_size": 8, "normalize": True} and back.seed == 2
    with pytest.raises(ValueError, match="order: option values must be JSON-serialisable.*set"):
        cx.select("css", budget=3, scores=torch.rand(10), order={"lowest"})


def test_labels_must_be_integers_and_non_negative_where_read():
    g = torch.Generator().manual_seed(21)
    e, y = torch.randn(30, 3, generator=g), torch.randint(0, 3, (30,), generator=g)
    for bad in (y.double() + 0.5, (y.float() + 0.5).tolist(), y == 1):
        with pytest.raises(ValueError, match="labels must have an integer dtype"):
            cx.select("balanced_random", budget=6, labels=bad)
    as_int32 = cx.select("balanced_random", budget=6, labels=y.numpy().astype(np.int32), seed=3)
    assert torch.equal(as_int32.indices, cx.select("balanced_random", budget=6, labels=y, seed=3).indices)
    y_neg = y.clone()
    y_neg[torch.randint(0, 30, (2,), generator=g)] = -1
    for method, opts in (("balanced_random", {}), ("sas", {"classes": "labels"}), ("el2n", {})):
        with pytest.raises(ValueError, match=f"labels must be >= 0 for {method}"):
            cx.select(method, budget=6, embeddings=e, labels=y_neg, **opts)


def test_numeric_arguments_accept_numpy_scalars_and_reject_the_rest(pool):
    n = len(pool["scores"])
    for frac in (np.float32(0.1), np.float64(0.37)):
        sel = cx.select("css", fraction=frac, scores=pool["scores"])
        assert len(sel) == max(1, int(np.floor(float(frac) * n + 0.5)))
    assert len(cx.select("random", budget=np.int32(5), dataset_size=n, seed=np.int16(3))) == 5
    for kwargs, name in (({"fraction": True}, "fraction"), ({"fraction": "0.1"}, "fraction"),
                         ({"budget": True}, "budget"), ({"budget": 5.0}, "budget"),
                         ({"budget": 5, "seed": None}, "seed"), ({"budget": 5, "seed": 1.5}, "seed"),
                         ({"budget": 5, "seed": False}, "seed")):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            cx.select("random", dataset_size=n, **kwargs)


def test_prototypes_refuses_rows_too_large_for_float32_norms(pool):
    # rows of magnitude 1e20 normalised to 0 (their float32 norms overflow): one point, any picks
    x = pool["embeddings"]
    with pytest.raises(ValueError, match="embeddings has entries of magnitude .* their squares overflow float32"):
        cx.select("prototypes", budget=5, embeddings=x * 1e20, n_clusters=3)
    assert len(cx.select("prototypes", budget=5, embeddings=x * 1e15, n_clusters=3)) == 5
