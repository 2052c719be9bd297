"""Realistic unlabelled pools (METHODS.md, method 5): in-distribution (ID) examples, out-of-distribution
(OOD) ones from held-out classes, and ambiguous ones, each with a hidden kind only the oracle reads.

`make_realistic_pool` builds one from any labelled data set: digits, a tensor file, a Dataset
yielding (index, x, label), `with_index(d)`, or any Dataset `train.data.as_data` reads:
- ID: examples of `id_classes`, their labels renumbered 0..len(id_classes)-1 (the oracle's answer);
- OOD: examples of `ood_classes` (disjoint from the ID classes): the oracle answers "ood";
- ambiguous: made from ID examples held back from the pool (never in it themselves): a blend
  lam * a + (1 - lam) * b of two examples of different ID classes, lam ~ U(`blend_range`), or a
  noisy copy x + `noise_std` * s * N(0, 1), s the data's standard deviation, clamped to the
  data's value range. `ambiguous="mixed"` (default) makes half of each (blends take the odd one),
  "blend" or "noise" only one style. The oracle answers "ambiguous": no class.

The pool holds `ood_fraction` OOD and `ambiguous_fraction` ambiguous examples, the rest ID; its size
is the largest the data allow (ID examples in the pool plus the held-back sources of the ambiguous
ones, two per blend and one per noisy copy, fit among the ID-class examples; the OOD ones among
the OOD-class examples). Examples are shuffled, so an index says nothing of its kind.

What a learner sees is `pool.dataset`: an `ArrayDataset` of the examples with every label unknown
(-1). The kinds and classes live in `pool.oracle`, which only the simulated annotator reads.

Example:
    >>> from coreset_ext.train import load_dataset
    >>> pool = make_realistic_pool(load_dataset("digits"), id_classes=range(6), ood_classes=range(6, 10),
    ...                            ambiguous_fraction=0.2, ood_fraction=0.3, seed=0)
    >>> len(pool.dataset), pool.counts
    (1107, {'id': 554, 'ood': 332, 'ambiguous': 221})
    >>> labels, kinds = pool.oracle.label([0, 1, 2])
    >>> bool((pool.dataset.labels == -1).all())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from coreset_ext._validation import Interval, Options, check, check_indices, is_int
from coreset_ext.train.data import ArrayDataset, IndexedDataset, as_data

KINDS = ("id", "ood", "ambiguous")  # kind codes 0, 1, 2
ID, OOD, AMBIGUOUS = 0, 1, 2
AMBIGUOUS_STYLES = Options("mixed", "blend", "noise")
_SOURCES_PER = {"blend": 2.0, "noise": 1.0, "mixed": 1.5}  # held-back ID examples per ambiguous example
_CHUNK = 4096


def kind_codes(kinds, n: int, where: str = "kinds") -> torch.Tensor:
    """Kinds as int64 codes [n] (0 id, 1 ood, 2 ambiguous), from names or codes; a ValueError
    naming `where` for anything else."""
    values = list(kinds.tolist() if isinstance(kinds, torch.Tensor) else kinds)
    if len(values) != n:
        raise ValueError(f"{where}: {len(values)} kinds for {n} examples")
    out = []
    for v in values:
        if isinstance(v, str) and v in KINDS:
            out.append(KINDS.index(v))
        elif is_int(v) and 0 <= v < len(KINDS):
            out.append(int(v))
        else:
            raise ValueError(f"{where} must be 'id', 'ood' or 'ambiguous' (or 0, 1, 2), got {v!r}")
    return torch.tensor(out, dtype=torch.long)


class _WithoutIndex(torch.utils.data.Dataset):
    """A data set yielding (index, x, label) read as one yielding (x, label)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return tuple(self.dataset[i])[1:]


def _yields_index(dataset) -> bool:
    """Whether a plain Dataset's items are (index, x, label) triples (their first entry is the index)."""
    if isinstance(dataset, (ArrayDataset, IndexedDataset)) or not isinstance(dataset, torch.utils.data.Dataset):
        return False  # read as they are by as_data
    try:
        ends = [dataset[i] for i in (0, len(dataset) - 1)]
    except (TypeError, IndexError, KeyError):
        return False
    return all(isinstance(item, (tuple, list)) and len(item) == 3 and is_int(item[0]) and item[0] == i
               for item, i in zip(ends, (0, len(dataset) - 1)))


def _classes(name: str, classes) -> tuple[int, ...]:
    try:
        values = tuple(classes)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of class labels (ints), got {classes!r}") from None
    for c in values:
        check(name, c, Interval(int, 0, None))
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct, got {list(values)}")
    return tuple(int(c) for c in values)


@dataclass
class Oracle:
    """The simulated annotator of a pool: for each example its hidden kind and, for ID examples,
    its class (0..len(id_classes)-1). `label` is the only way a learning loop should read them."""

    kinds: torch.Tensor = field(repr=False)
    classes: torch.Tensor = field(repr=False)  # -1 where the kind is not "id"

    def label(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, kinds) of the examples at `indices`: int64 [n] each; labels -1 for OOD and
        ambiguous examples (the annotator gives them no class, only the kind)."""
        idx = check_indices("indices", indices)
        n = self.kinds.numel()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"indices must be in [0, {n}) (the pool size), got {idx.min()}..{idx.max()}")
        return self.classes[idx].clone(), self.kinds[idx].clone()


@dataclass
class RealisticPool:
    """A pool made by `make_realistic_pool`: what the learner sees (`dataset`, labels all -1), the
    annotator (`oracle`), and how it was made."""

    dataset: ArrayDataset
    oracle: Oracle
    id_classes: tuple[int, ...]
    ood_classes: tuple[int, ...]
    settings: dict

    @property
    def counts(self) -> dict[str, int]:
        """How many examples of each kind the pool holds."""
        return {k: int((self.oracle.kinds == i).sum()) for i, k in enumerate(KINDS)}

    def test_set(self, dataset) -> ArrayDataset:
        """The examples of `dataset` (e.g. the test split) of the ID classes, labels renumbered as
        the oracle's (0..len(id_classes)-1): what a classifier of the ID task is scored on."""
        data = as_data(dataset)
        labels = data.labels
        keep = torch.isin(labels, torch.tensor(self.id_classes))
        if not bool(keep.any()):
            raise ValueError(f"dataset: no example of the ID classes {list(self.id_classes)} to test on")
        idx = torch.nonzero(keep).flatten()
        remap = {c: i for i, c in enumerate(self.id_classes)}
        x = torch.cat([data.batch(idx[s:s + _CHUNK]) for s in range(0, idx.numel(), _CHUNK)])
        y = torch.tensor([remap[int(c)] for c in labels[idx]], dtype=torch.long)
        return ArrayDataset(x, y, name=f"{data.name}/id", num_classes=len(self.id_classes))


def _pool_sizes(n_id: int, n_ood: int, ambiguous_fraction: float, ood_fraction: float,
                style: str) -> tuple[int, int, int]:
    """(ID, OOD, ambiguous) counts of the largest pool the data allow."""
    id_share = 1 - ambiguous_fraction - ood_fraction
    per_example = id_share + ambiguous_fraction * _SOURCES_PER[style]
    size = n_id / per_example
    if ood_fraction > 0:
        size = min(size, n_ood / ood_fraction)
    size = math.floor(size + 1e-9)
    while size > 0:
        n_amb, n_out = round(ambiguous_fraction * size), round(ood_fraction * size)
        blends = (n_amb + 1) // 2 if style == "mixed" else n_amb if style == "blend" else 0
        sources = 2 * blends + (n_amb - blends)
        if size - n_amb - n_out + sources <= n_id and n_out <= n_ood:
            return size - n_amb - n_out, n_out, n_amb
        size -= 1
    return 0, 0, 0


def make_realistic_pool(dataset, id_classes, ood_classes, ambiguous_fraction: float = 0.2,
                        ood_fraction: float = 0.3, seed: int = 0, *, ambiguous: str = "mixed",
                        blend_range: tuple[float, float] = (0.4, 0.6), noise_std: float = 1.0) -> RealisticPool:
    """A realistic unlabelled pool from a labelled `dataset` (see the module docstring).

    Raises ValueError naming the argument: empty `id_classes`, classes in both sets, a class with
    no example, fractions outside [0, 1) or summing to 1 or more, OOD examples asked for without
    OOD classes, blends with fewer than two ID classes, a data set without labels.
    """
    id_classes = _classes("id_classes", id_classes)
    ood_classes = _classes("ood_classes", ood_classes)
    if not id_classes:
        raise ValueError("id_classes: give at least one in-distribution class, got none")
    both = sorted(set(id_classes) & set(ood_classes))
    if both:
        raise ValueError(f"id_classes/ood_classes: classes {both} are in both; a class is either in-distribution "
                         "or out-of-distribution")
    check("ambiguous", ambiguous, AMBIGUOUS_STYLES)
    for name, value in (("ambiguous_fraction", ambiguous_fraction), ("ood_fraction", ood_fraction)):
        check(name, value, Interval(float, 0, 1, closed="left"))
    if ambiguous_fraction + ood_fraction >= 1:
        raise ValueError(f"ambiguous_fraction + ood_fraction must be below 1 (the rest is in-distribution), got "
                         f"{ambiguous_fraction} + {ood_fraction}")
    if ood_fraction > 0 and not ood_classes:
        raise ValueError(f"ood_classes: ood_fraction={ood_fraction} asks for OOD examples, but no OOD class is given")
    if ambiguous_fraction > 0 and ambiguous != "noise" and len(id_classes) < 2:
        raise ValueError(f"id_classes: blends need two ID classes, got {list(id_classes)}; use ambiguous='noise'")
    if not (isinstance(blend_range, (tuple, list)) and len(blend_range) == 2):
        raise ValueError(f"blend_range must be (low, high) in [0, 1], got {blend_range!r}")
    lo, hi = (check("blend_range", v, Interval(float, 0, 1)) for v in blend_range)
    if lo > hi:
        raise ValueError(f"blend_range must be (low, high) with low <= high, got {blend_range!r}")
    if not math.isfinite(check("noise_std", noise_std, Interval(float, 0, None))):  # inf: copies at the ends
        raise ValueError(f"noise_std must be a finite real number >= 0, got {noise_std!r}")
    check("seed", seed, Interval(int, 0, 2**63 - 1))

    data = as_data(_WithoutIndex(dataset) if _yields_index(dataset) else dataset)
    labels = data.labels
    if not data.has_labels:
        raise ValueError("dataset: a realistic pool is made from a labelled data set (it has no labels)")
    for name, classes in (("id_classes", id_classes), ("ood_classes", ood_classes)):
        missing = [c for c in classes if not bool((labels == c).any())]
        if missing:
            raise ValueError(f"{name}: no example of class(es) {missing} in the data set")
    g = torch.Generator().manual_seed(seed)
    id_pool = torch.nonzero(torch.isin(labels, torch.tensor(id_classes))).flatten()
    id_pool = id_pool[torch.randperm(id_pool.numel(), generator=g)]
    ood_pool = torch.nonzero(torch.isin(labels, torch.tensor(ood_classes or (-2,)))).flatten()
    ood_pool = ood_pool[torch.randperm(ood_pool.numel(), generator=g)]
    n_in, n_out, n_amb = _pool_sizes(id_pool.numel(), ood_pool.numel(), float(ambiguous_fraction),
                                     float(ood_fraction), ambiguous)
    if n_in < 1:
        raise ValueError("dataset: too few examples of the ID classes for a pool with these fractions")
    n_blend = (n_amb + 1) // 2 if ambiguous == "mixed" else n_amb if ambiguous == "blend" else 0
    a, b, noise_sources = _ambiguous_sources(id_pool[n_in:n_in + 2 * n_blend + (n_amb - n_blend)], labels, n_blend)
    chosen = torch.cat([id_pool[:n_in], ood_pool[:n_out]])

    def batch(idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() == 0:
            return torch.empty(0, *data.sample_shape)
        return torch.cat([data.batch(idx[s:s + _CHUNK]) for s in range(0, idx.numel(), _CHUNK)])

    x = batch(chosen)
    lam = (lo + (hi - lo) * torch.rand(n_blend, generator=g)).view(-1, *[1] * len(data.sample_shape))
    blends = lam * batch(a) + (1 - lam) * batch(b)
    noisy = batch(noise_sources)
    if noisy.numel():
        scale = float(x.std()) if x.numel() > 1 else 1.0
        noisy = (noisy + noise_std * scale * torch.randn(noisy.shape, generator=g)).clamp(float(x.min()),
                                                                                         float(x.max()))
    x = torch.cat([x, blends, noisy])
    remap = {c: i for i, c in enumerate(id_classes)}
    classes = torch.tensor([remap[int(c)] for c in labels[chosen[:n_in]]] + [-1] * (n_out + n_amb), dtype=torch.long)
    kinds = torch.tensor([ID] * n_in + [OOD] * n_out + [AMBIGUOUS] * n_amb, dtype=torch.long)
    order = torch.randperm(x.shape[0], generator=g)
    pool_data = ArrayDataset(x[order].contiguous(), None, name=f"realistic:{data.name}",
                             num_classes=len(id_classes))
    settings = {"ambiguous_fraction": float(ambiguous_fraction), "ood_fraction": float(ood_fraction), "seed": seed,
                "ambiguous": ambiguous, "blend_range": [lo, hi], "noise_std": float(noise_std), "source": data.name}
    return RealisticPool(pool_data, Oracle(kinds[order], classes[order]), id_classes, ood_classes, settings)


def _ambiguous_sources(held: torch.Tensor, labels: torch.Tensor, n_blend: int):
    """(a, b, noise): the held-back ID examples split into n_blend blend pairs (a[i], b[i]) and the
    sources of the noisy copies. The pool's own ID examples are a random sample, chosen before
    this (their classes keep the data's proportions); only the roles within `held` are chosen here.
    The noisy copies take their sources from the most frequent classes of `held` first, so that
    the blend sources left are as even across classes as they can be; those are sorted by class
    and source i is paired with source i + n_blend, which pairs every source with one of another
    class whenever no class holds more than half of them (a random split into pairs did not:
    2.3% of seeds of a 4-class test made a same-class, so not ambiguous, blend)."""
    order = held.tolist()
    lab = labels[held].tolist()
    by_class: dict[int, list[int]] = {}
    for pos, c in enumerate(lab):
        by_class.setdefault(int(c), []).append(pos)
    noise_positions = []
    for _ in range(len(order) - 2 * n_blend):
        c = max(by_class, key=lambda c: (len(by_class[c]), -c))  # the most frequent; ties: lower class
        noise_positions.append(by_class[c].pop())
    blend = [order[pos] for _, pos in sorted((c, pos) for c, positions in by_class.items() for pos in positions)]
    noise = [order[pos] for pos in sorted(noise_positions)]  # in held order
    return (torch.tensor(blend[:n_blend], dtype=torch.long), torch.tensor(blend[n_blend:], dtype=torch.long),
            torch.tensor(noise, dtype=torch.long))
