"""`ActiveLearner`: the loop a user drives, one round at a time, with its state saved after each step.

    learner = ActiveLearner(pool.dataset, method="contrastive", state_path="runs/al/state.npz")
    for _ in range(8):
        picks = learner.query(40)                     # indices for the annotator
        labels, kinds = annotate(picks)               # your labels; kinds "id", "ood", "ambiguous"
        learner.update(picks, labels, kinds)

The state (every answer so far, the pending query, the contrastive features' weights, the
per-round record) is written atomically (`io.save_npz`: temp file, fsync, rename) after every
`query`, `update` and `evaluate`, so a crash at any moment loses nothing: a learner made again with
the same `state_path` carries on (a pending query is handed out again, identical), and one made
for another pool, method, seed or settings is refused, naming what differs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from coreset_ext._validation import POSITIVE_INT, Interval, check, check_indices, is_int
from coreset_ext.active.acquire import METHODS, USES_FEATURES, RoundInputs, acquire, check_acquire_options
from coreset_ext.active.features import (
    ContrastiveFeatures,
    FeatureConfig,
    fit_classifier,
    json_ready,
)
from coreset_ext.active.pool import ID, KINDS, kind_codes
from coreset_ext.io import load_npz, save_npz
from coreset_ext.train.data import as_data

STATE_KIND = "ActiveLearnerState"
LOOP_SEED = Interval(int, 0, 2**31 - 1)  # the features train with seed + round, the trainer's seeds are < 2**32


def round_seed(seed: int, rnd: int) -> int:
    """The seed of round `rnd` of a loop seeded `seed` (k-means, random draws)."""
    return seed * 1_000_003 + rnd


class ActiveLearner:
    """Queries a pool round by round with `method` (`acquire.METHODS`) and learns from the answers.

    Args:
        dataset: the unlabelled pool (`RealisticPool.dataset`, or any data set `as_data` reads).
        method: "contrastive" (default), "contrastive-ood-unaware", "random", "entropy", "margin",
            "kcenter" or "typiclust".
        seed: seeds the features' training and every round's choices.
        num_classes: ID classes (labels 0..num_classes-1); default the data set's `num_classes`.
        features: a `FeatureConfig`, or a `ContrastiveFeatures` of this pool to share (the
            benchmark shares one between methods; their training reads no label).
        state_path: where the state is saved after every step, and resumed from when it exists.
        **options: the contrastive methods' options (tau, prior_weight, k_neighbors).

    Example:
        >>> import torch
        >>> from coreset_ext.train.data import ArrayDataset
        >>> pool = ArrayDataset(torch.rand(40, 1, 8, 8), num_classes=2)
        >>> learner = ActiveLearner(pool, method="random", seed=0)
        >>> picks = learner.query(5)
        >>> learner.update(picks, [0, 1, -1, 0, 1], ["id", "id", "ood", "id", "id"])
        >>> learner.round, learner.counts()
        (1, {'id': 4, 'ood': 1, 'ambiguous': 0})
    """

    def __init__(self, dataset, *, method: str = "contrastive", seed: int = 0, num_classes: int | None = None,
                 features: FeatureConfig | ContrastiveFeatures | None = None, state_path: str | Path | None = None,
                 progress: bool = False, **options) -> None:
        self.data = as_data(dataset)
        self.method = check("method", method, METHODS)
        self.seed = check("seed", seed, LOOP_SEED)
        self.num_classes = check("num_classes", self.data.num_classes if num_classes is None else num_classes,
                                 POSITIVE_INT)
        check_acquire_options(method, options)  # now, not after the first round's training
        self.options = json_ready(options)
        check("features", features, None, FeatureConfig, ContrastiveFeatures)
        if isinstance(features, ContrastiveFeatures):
            if features.data.fingerprint != self.data.fingerprint:
                raise ValueError("features: they were made for another pool")
            self.features = features
        else:
            self.features = ContrastiveFeatures(self.data, features, seed=seed, progress=progress)
        self.queried, self.labels, self.kinds = (torch.zeros(0, dtype=torch.long) for _ in range(3))
        self.rounds = torch.zeros(0, dtype=torch.long)  # the round of each answer
        self.pending: torch.Tensor | None = None
        self.round = 0  # rounds whose answers are in
        self.history: list[dict] = []  # per round: labels spent, kinds, accuracy (`evaluate`)
        self.state_path = Path(state_path) if state_path is not None else None
        if self.state_path is not None and self.state_path.exists():
            self._load(self.state_path)

    # ------------------------------------------------------------------ the loop
    def query(self, budget: int) -> torch.Tensor:
        """The next `budget` examples to annotate (int64 indices, none queried before). Until they
        are answered (`update`), asking again with the same budget returns the same indices."""
        budget = check("budget", budget, POSITIVE_INT)
        if self.pending is not None:
            if budget == self.pending.numel():
                return self.pending.clone()
            raise ValueError(f"budget: round {self.round}'s {self.pending.numel()} queried examples await update(); "
                             f"answer them before querying {budget} more")
        left = len(self.data) - self.queried.numel()
        if budget > left:
            raise ValueError(f"budget: {budget} is larger than the {left} examples of the pool not yet queried "
                             f"(pool {len(self.data)}, queried {self.queried.numel()})")
        feats = self.features.at_round(self.round) if self.method in USES_FEATURES else None
        inputs = RoundInputs(len(self.data), feats, self.queried, self.labels, self.kinds, self.num_classes,
                             round_seed(self.seed, self.round))
        self.pending = acquire(self.method, budget, inputs, **self.options)
        self.save()
        return self.pending.clone()

    def update(self, indices, labels, kinds=None) -> None:
        """Records the annotator's answers for this round's queried `indices`: `labels` (a class in
        0..num_classes-1 for ID examples, -1 for the others) and `kinds` ("id", "ood", "ambiguous"
        or 0, 1, 2; None: all "id"). Indices never queried, answers missing, repeated or out of
        range are a ValueError naming them; nothing is recorded then."""
        idx = check_indices("indices", indices)
        if self.pending is None:
            raise ValueError(f"indices: {idx[:5].tolist()} were never queried (nothing awaits an answer); call "
                             "query() first: labels for never-queried indices are refused")
        stray = idx[~torch.isin(idx, self.pending)]
        if stray.numel():
            raise ValueError(f"indices: {stray[:5].tolist()} were never queried in this round; labels for never-queried "
                             "indices are refused")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("indices: each queried example is answered once; some are repeated")
        missing = self.pending[~torch.isin(self.pending, idx)]
        if missing.numel():
            raise ValueError(f"indices: queried examples {missing[:5].tolist()} have no answer; answer all "
                             f"{self.pending.numel()} of this round at once")
        k = kind_codes(["id"] * idx.numel() if kinds is None else kinds, idx.numel())
        y = check_indices("labels", labels, what="labels")  # integers, never truncated
        if y.numel() != idx.numel():
            raise ValueError(f"labels: {idx.numel()} labels are needed (one per index), got {y.numel()}")
        self._check_labels(idx, y, k)
        self.queried = torch.cat([self.queried, idx])
        self.labels = torch.cat([self.labels, y])
        self.kinds = torch.cat([self.kinds, k])
        self.rounds = torch.cat([self.rounds, torch.full_like(idx, self.round)])
        self.history.append({"round": self.round, "labels_spent": int(self.queried.numel()),
                             **{f"picked_{name}": int((k == i).sum()) for i, name in enumerate(KINDS)}})
        self.round += 1
        self.pending = None
        self.save()

    def _check_labels(self, idx: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> None:
        """ID examples have a class in 0..num_classes-1, the others label -1."""
        bad = (k == ID) & ((y < 0) | (y >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(f"labels: ID examples need a class in 0..{self.num_classes - 1}, got "
                             f"{y[bad][:5].tolist()} for indices {idx[bad][:5].tolist()}")
        if bool(((k != ID) & (y != -1)).any()):
            raise ValueError("labels: OOD and ambiguous examples take label -1 (they have no class)")

    def counts(self) -> dict[str, int]:
        """How many answers of each kind so far."""
        return {name: int((self.kinds == i).sum()) for i, name in enumerate(KINDS)}

    def evaluate(self, test_set) -> float:
        """Test accuracy on `test_set` (labels 0..num_classes-1) of a logistic-regression classifier
        of the labelled ID examples on the last round's features; recorded in the round's history.
        NaN before any ID example has a label."""
        if not self.history:
            raise ValueError("evaluate: no round has been answered yet")
        test = as_data(test_set)
        # each was scored as if sound: 0.0 for unlabelled or out-of-range labels, and examples of
        # another shape went through the encoder (its pooling takes any size)
        if test.sample_shape != self.data.sample_shape:
            raise ValueError(f"test_set: examples of shape {test.sample_shape}, the pool's are "
                             f"{self.data.sample_shape}")
        bad = (test.labels < 0) | (test.labels >= self.num_classes)
        if len(test) == 0 or bool(bad.any()):
            raise ValueError(f"test_set needs examples, each labelled with an ID class in 0..{self.num_classes - 1}; "
                             f"{int(bad.sum())} of {len(test)} are not (e.g. RealisticPool.test_set(split))")
        is_id = self.kinds == ID
        acc = math.nan
        if bool(is_id.any()):
            rnd = self.round - 1
            proba = fit_classifier(self.features.at_round(rnd)[self.queried[is_id]], self.labels[is_id],
                                   self.num_classes, seed=self.seed)
            pred = proba(self.features.at_round(rnd, test)).argmax(1)
            acc = float((pred == test.labels).double().mean())
        self.history[-1]["accuracy"] = acc
        self.save()
        return acc

    # ------------------------------------------------------------------ state
    def _record(self) -> dict:
        return {"kind": STATE_KIND, "method": self.method, "seed": self.seed, "options": self.options,
                "num_classes": self.num_classes, "pool": {"size": len(self.data), "fingerprint": self.data.fingerprint},
                "round": self.round, "history": self.history}

    def save(self, path: str | Path | None = None) -> None:
        """Writes the state atomically to `path` (default `state_path`; nothing when neither is set)."""
        path = Path(path) if path is not None else self.state_path
        if path is None:
            return
        arrays, features = self.features.state()
        arrays.update(queried=self.queried.numpy(), labels=self.labels.numpy(), kinds=self.kinds.numpy(),
                      rounds=self.rounds.numpy())
        if self.pending is not None:
            arrays["pending"] = self.pending.numpy()
        save_npz(path, arrays, {**self._record(), "features": features})

    def _load(self, path: Path) -> None:
        arrays, meta = load_npz(path, kind=STATE_KIND)
        pool = meta.get("pool") if isinstance(meta.get("pool"), dict) else {}
        if pool.get("fingerprint") != self.data.fingerprint or pool.get("size") != len(self.data):
            raise ValueError(f"resume: {path} belongs to another pool ({pool.get('size')} examples, fingerprint "
                             f"{pool.get('fingerprint')}); this pool has {len(self.data)}, fingerprint "
                             f"{self.data.fingerprint}. Use another state path for a new pool")
        mine, theirs = self._record(), meta
        changed = [f"{k}: {theirs.get(k)!r} in the state, {mine[k]!r} now" for k in ("method", "seed", "options",
                                                                                     "num_classes")
                   if json_ready(theirs.get(k)) != json_ready(mine[k])]
        if changed:
            raise ValueError(f"resume: {path} was made with other settings: {'; '.join(changed)}")
        try:
            record = meta["features"]
            if not isinstance(record, dict) or not is_int(record.get("rounds_trained")):
                raise ValueError(f"features must be a record with rounds_trained (an int), got {record!r:.80}")
            self._restore(arrays, meta)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"resume: {path} holds an unusable state ({e})") from None
        if record["rounds_trained"] >= self.features.rounds_trained:  # a shared featurizer may be ahead
            self.features.load_state(arrays, record, str(path))

    def _restore(self, arrays: dict, meta: dict) -> None:
        fields = {name: check_indices(name, arrays[name], what="values") for name in ("queried", "labels", "kinds",
                                                                                       "rounds")}
        n = fields["queried"].numel()
        if any(t.numel() != n for t in fields.values()):
            raise ValueError("queried, labels, kinds and rounds must be 1-D arrays of one length")
        pending = check_indices("pending", arrays["pending"]) if "pending" in arrays else None
        everything = torch.cat([fields["queried"]] + ([pending] if pending is not None else []))
        if everything.numel() and (int(everything.min()) < 0 or int(everything.max()) >= len(self.data)
                                   or torch.unique(everything).numel() != everything.numel()):
            raise ValueError("queried/pending must be distinct indices of the pool")
        if bool(((fields["kinds"] < 0) | (fields["kinds"] >= len(KINDS))).any()):
            raise ValueError("kinds must be codes 0, 1, 2")
        self._check_labels(fields["queried"], fields["labels"], fields["kinds"])
        rnd, history = meta["round"], meta["history"]
        if (not is_int(rnd) or rnd < 0 or not isinstance(history, list) or len(history) != rnd
                or not all(isinstance(h, dict) for h in history)):
            raise ValueError("round and history disagree")
        if bool(((fields["rounds"] < 0) | (fields["rounds"] >= rnd)).any()):
            raise ValueError(f"rounds must be in 0..{rnd - 1}, the rounds answered")
        self.queried, self.labels, self.kinds, self.rounds = (fields[k] for k in ("queried", "labels", "kinds",
                                                                                  "rounds"))
        self.pending, self.round, self.history = pending, rnd, meta["history"]
