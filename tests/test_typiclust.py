"""TypiClust against an independent reference (scikit-learn's KMeans and NearestNeighbors, the authors'
ordering rule written out plainly), and `already_selected` for every selector that takes it."""

import numpy as np
import pytest
import torch

import coreset_ext as cx
from coreset_ext.select import available_methods, honours_already_selected

pytest.importorskip("sklearn")
from sklearn.cluster import KMeans as SklearnKMeans
from sklearn.neighbors import NearestNeighbors


def blobs(rng: np.random.Generator, sizes: list[int], d: int = 5) -> np.ndarray:
    """Well separated Gaussian blobs on the unit sphere's directions (any k-means finds them), random
    centres and spreads each call."""
    centres = rng.normal(size=(len(sizes), d))
    centres = 8 * centres / np.linalg.norm(centres, axis=1, keepdims=True)
    return np.concatenate([c + rng.uniform(0.2, 0.6) * rng.normal(size=(s, d)) for c, s in zip(centres, sizes)])


def reference_typiclust(x: np.ndarray, budget: int, labelled: list[int], k_nn: int = 20, min_size: int = 5):
    """The authors' select_samples (pycls/al/typiclust.py), with sklearn in place of faiss."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    k = min(len(labelled) + budget, 500)
    labels = SklearnKMeans(k, n_init=10, random_state=0).fit(x).labels_.copy()
    ids, sizes = np.unique(labels, return_counts=True)
    taken = np.bincount(labels[labelled], minlength=len(ids)) if labelled else np.zeros(len(ids), int)
    rows = sorted((taken[i], -sizes[i], i) for i in range(len(ids)) if sizes[i] > min_size)
    labels[labelled] = -1
    picks = []
    for i in range(budget):
        members = np.flatnonzero(labels == rows[i % len(rows)][2])
        kk = max(1, min(k_nn, len(members) // 2))
        dist, _ = NearestNeighbors(n_neighbors=kk + 1).fit(x[members]).kneighbors(x[members])
        typicality = 1 / ((dist[:, 1:] ** 2).mean(1) + 1e-5)  # squared, as faiss IndexFlatL2 returns them
        picks.append(int(members[np.argmax(typicality)]))
        labels[picks[-1]] = -1
    return picks


@pytest.mark.parametrize("labelled_count", [0, 4])
def test_matches_the_reference_on_fresh_blobs(labelled_count):
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
    k = 7
    sizes = list(rng.choice(np.arange(12, 60), size=k, replace=False))  # distinct: no ties in the order
    x = blobs(rng, sizes)
    budget = k - labelled_count
    labelled = sorted(rng.choice(len(x), size=labelled_count, replace=False).tolist())
    sel = cx.select("typiclust", budget=budget, embeddings=torch.from_numpy(x).float(), seed=1,
                    already_selected=labelled)
    assert sel.indices.tolist() == reference_typiclust(x, budget, labelled)


def test_cycles_over_clusters_when_the_budget_exceeds_them():
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
    x = blobs(rng, [40, 31, 22])
    sel = cx.select("typiclust", budget=7, embeddings=torch.from_numpy(x).float(), n_clusters=3)
    owner = np.repeat([0, 1, 2], [40, 31, 22])  # each cluster visited in turn, largest first
    assert owner[sel.indices.numpy()].tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_tiny_pools_and_exhausted_clusters():
    x = torch.randn(9, 3)
    sel = cx.select("typiclust", budget=9, embeddings=x)  # every cluster at most 5 members, and all used up
    assert sorted(sel.indices.tolist()) == list(range(9))
    sel = cx.select("typiclust", budget=3, embeddings=x, already_selected=[0, 1, 2, 3, 4, 5])
    assert sorted(sel.indices.tolist()) == [6, 7, 8]


def test_already_selected_every_method():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    n = 60
    inputs = {"scores": torch.rand(n, generator=g), "embeddings": torch.randn(n, 4, generator=g),
              "labels": torch.randint(0, 3, (n,), generator=g)}
    done = torch.randperm(n, generator=g)[:20]
    takers = [m for m in available_methods() if honours_already_selected(m)]
    assert {"random", "kcenter", "typiclust"} <= set(takers)
    for method in available_methods():
        if method in takers:
            sel = cx.select(method, budget=15, already_selected=done, **inputs)
            assert len(sel) == 15 and not set(sel.indices.tolist()) & set(done.tolist())
        else:
            with pytest.raises(ValueError, match=f"already_selected: method '{method}' cannot honour it"):
                cx.select(method, budget=15, already_selected=done, **inputs)
    # an empty set asks nothing of a method
    assert len(cx.select("css", budget=5, scores=inputs["scores"], already_selected=[])) == 5
    with pytest.raises(ValueError, match="budget: 41 is larger than the 40 examples not already selected"):
        cx.select("random", budget=41, dataset_size=n, already_selected=done)
    for bad, message in (([0, 0], "distinct"), ([n], r"in \[0, 60\)"), ([-1], r"in \[0, 60\)"),
                         ([0.5], "integer indices"), ([[1]], "1-D"),
                         # these were TypeErrors from torch.as_tensor naming no argument
                         ([2**70], "already_selected must be a 1-D sequence of integer indices, got object"),
                         (["1"], "already_selected must be a 1-D sequence of integer indices"),
                         ({1, 2}, "already_selected must be a 1-D sequence of integer indices"),
                         ([[1, 2], [3]], "already_selected must be a 1-D sequence of integer indices")):
        with pytest.raises(ValueError, match=message):
            cx.select("random", budget=1, dataset_size=n, already_selected=bad)


def test_kcenter_given_centres_matches_a_naive_greedy():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    done = [3, 17, 40]
    sel = cx.select("kcenter", budget=6, embeddings=x, already_selected=done, normalize=False)
    centres, picks = list(done), []
    for _ in range(6):
        d = torch.cdist(x, x[centres]).min(1).values
        d[centres] = -1
        picks.append(int(d.argmax()))
        centres.append(picks[-1])
    assert sel.indices.tolist() == picks


@pytest.mark.parametrize("method", ["typiclust", "kcenter"])
def test_rows_too_large_for_float32_norms_are_refused(method):
    # rows of magnitude 1e20 overflowed their float32 norms: every row became 0 and the picks were
    # 0, 1, 2 whatever the data; the same rows scaled into range are served
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(40, 4, generator=g)
    with pytest.raises(ValueError, match="embeddings has entries of magnitude .* their squares overflow float32"):
        cx.select(method, budget=3, embeddings=x * 1e20, already_selected=[5])
    assert len(cx.select(method, budget=3, embeddings=x * 1e16, already_selected=[5])) == 3
