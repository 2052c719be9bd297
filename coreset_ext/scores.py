"""Per-example score accumulation during training: `ScoreTracker` and `TrainingDynamics`.

Both keep per-example buffers on the device where the values are produced, updated in place
through `ops.score_scatter_add_` (duplicates summed). `update` checks everything before anything
is written, at one host synchronisation; `ScoreTracker.record` (what the fused losses call with
`tracker=`) checks on the device instead, without a synchronisation, and the tracker's next
host-side call reports what it left out. What they share lives in `PerExampleState`: the
data set they describe (its size and fingerprint), moving between devices, `state_dict`, and
atomic, pickle-free saving through `coreset_ext.io` (.npz of the buffers plus a JSON record).

Several processes (torch.distributed, e.g. DDP under torchrun): each rank records its own
examples at their data set indices, and `sync()` (every rank, at the same point: the end of an
epoch, before reading or saving) adds every rank's contributions since the last sync into every
rank's buffers, so all ranks then hold the totals a single process would have; `save` writes on
rank 0 only.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from typing import ClassVar, TypeVar

import torch

from coreset_ext import distributed
from coreset_ext._validation import (NONNEGATIVE_INT, Options, check, check_same_device, check_tensor, describe,
                                     nonnegative_int, positive_int)
from coreset_ext.io import load_npz, save_npz
from coreset_ext.ops.scatter import INDEX_DTYPES, SCATTER_VALUE_DTYPES, DeviceErrors

__all__ = ["PerExampleState", "ScoreTracker", "TrainingDynamics"]

NAN_POLICIES = Options("error", "skip", "ignore")
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

State = TypeVar("State", bound="PerExampleState")


def _checked_buffer(dst: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    """state[key] as a CPU tensor of dst's dtype, refusing anything but an array of dst's exact
    shape: copy_ would broadcast a (1,) array into every example, or wrap an out-of-range integer."""
    if key not in state:
        raise ValueError(f"{key}: missing from the state (keys: {sorted(k for k in state if k != 'meta')})")
    src = torch.as_tensor(state[key]).detach().cpu()
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"{key}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
    if src.dtype.is_complex or src.dtype == torch.bool or src.is_floating_point() != dst.is_floating_point():
        raise ValueError(f"{key}: expected {dst.dtype} values, got {src.dtype}")
    if not dst.is_floating_point() and src.numel() and (
            int(src.min()) < torch.iinfo(dst.dtype).min or int(src.max()) > torch.iinfo(dst.dtype).max):
        raise ValueError(f"{key}: values outside the range of {dst.dtype}")
    return src.to(dst.dtype)


def _check_counts(key: str, counts: torch.Tensor) -> None:
    """A buffer that counts things holds whole numbers >= 0 (float32 buffers, so check it)."""
    bad = ~torch.isfinite(counts) | (counts < 0) | (counts != counts.round())
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{key} must hold whole counts >= 0, got {counts[i].item()} at example {i}")


def _check_meta(meta: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ValueError(f"{missing[0]}: missing from the state's record")


class PerExampleState:
    """Per-example buffers of one data set on one device, and their saving and loading.

    A subclass allocates its tensors in `self.buffers` (one entry per example along dim 0), keyed
    by the name each is saved under, and names in `MATCHING` the settings (metadata keys) a saved
    state must share with the object it is loaded into. The file's `kind` is the class's `kind`.
    """

    kind: ClassVar[str]
    noun: ClassVar[str]  # how error messages call an instance ("this tracker has ...")
    MATCHING: ClassVar[tuple[str, ...]] = ()
    NOT_ADDITIVE: ClassVar[tuple[str, ...]] = ()  # buffers that sync() does not add across ranks

    def __init__(self, num_samples: int, *, fingerprint: str | None = None,
                 deterministic: bool | None = None) -> None:
        self.num_samples = positive_int("num_samples", num_samples)
        self.fingerprint = fingerprint
        self.deterministic = deterministic
        self.buffers: dict[str, torch.Tensor] = {}
        self._at_sync: dict[str, torch.Tensor] | None = None  # the additive buffers after the last sync()

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers.values())).device

    def to(self: State, device: torch.device | str) -> State:
        """Moves every buffer to `device`; returns self."""
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        if self._at_sync is not None:
            self._at_sync = {k: v.to(device) for k, v in self._at_sync.items()}
        return self

    def _check_device(self, **tensors: torch.Tensor) -> None:
        """Every tensor on the buffers' device (ValueError naming the first that is not)."""
        check_same_device(**{f"this {self.noun}": next(iter(self.buffers.values())), **tensors})

    def _add(self, buffer: str, index: torch.Tensor, values: torch.Tensor) -> None:
        # The caller checked the index range once for all its buffers, and the rest of what the
        # public op checks holds by construction (float32 contiguous buffers, 1-D values on their
        # device): the op itself, without the public function's per-call Python checks.
        deterministic = self.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        torch.ops.coreset_ext.score_scatter_add_(self.buffers[buffer], index, values, bool(deterministic))

    def _meta(self) -> dict:
        """The JSON record saved with the buffers; subclasses add their settings."""
        return {"kind": self.kind, "num_samples": self.num_samples, "fingerprint": self.fingerprint}

    def state_dict(self) -> dict:
        """{"meta": the JSON record, <buffer name>: a CPU copy of the buffer, ...}."""
        self.check()
        return {"meta": self._meta(), **{k: v.detach().cpu().clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Copies a `state_dict()` into the buffers, after checking it describes the same data set
        (size and, where both know it, fingerprint) with the same settings."""
        if not isinstance(state.get("meta"), dict):
            raise ValueError("meta: the state has no metadata record")
        meta, mine = state["meta"], self._meta()
        _check_meta(meta, ("num_samples", *self.MATCHING))
        if meta.get("kind", self.kind) != self.kind:
            raise ValueError(f"the state is not {self.kind} (kind={meta.get('kind')!r})")
        if meta["num_samples"] != self.num_samples:
            raise ValueError(f"num_samples: the state holds {meta['num_samples']} examples but this {self.noun} has "
                             f"{self.num_samples}")
        for key in self.MATCHING:
            if meta[key] != mine[key]:
                raise ValueError(f"{key}: the state holds {meta[key]!r} but this {self.noun} has {mine[key]!r}")
        if self.fingerprint is not None and meta.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError(f"fingerprint: the state was written for data set {meta['fingerprint']!r}, "
                             f"this {self.noun} is for {self.fingerprint!r}")
        # everything is checked before anything is written: a bad state leaves this object as it was
        new = {key: _checked_buffer(buffer, state, key) for key, buffer in self.buffers.items()}
        self._check_buffers(new, meta)
        for key, buffer in self.buffers.items():
            buffer.copy_(new[key])
        # a loaded state counts as synced: under torch.distributed every rank loads the same one
        self._at_sync = {k: v.clone() for k, v in self.buffers.items() if k not in self.NOT_ADDITIVE}

    def check(self) -> None:
        """Raises for what sync-free updates left out since the last check (none by default)."""

    def _check_buffers(self, buffers: dict[str, torch.Tensor], meta: dict) -> None:
        """ValueError naming the buffer unless a loaded state's buffers are consistent (counts whole
        and >= 0, ...); subclasses say what their buffers can hold."""

    def sync(self, *, group=None) -> None:
        """Adds every rank's contributions since the last sync into every rank's buffers.

        Call it on every rank of `group` at the same point. Before anything moves, one all-gather
        checks that every rank describes the same data set with the same settings and has nothing
        left out by `record` (the error `check` would raise): otherwise every rank raises (the
        rank at fault its own error), none waits. Then one all-reduce of the sums (in float64) of
        what each additive buffer gained since the last sync; the first sync keeps a copy of
        those buffers (one more float32 array per buffer) to tell new contributions from synced
        ones. Without a process group it only runs `check`.
        Communication: one all-reduce of N float64 values per additive buffer.

        Example (one process: nothing to combine, so it only checks; under torchrun every rank
        calls it, e.g. at the end of each epoch):
            >>> import torch, coreset_ext as cx
            >>> tracker = cx.ScoreTracker(4)
            >>> tracker.record(torch.tensor([1, 1]), css=torch.tensor([0.5, 0.25]))
            >>> tracker.sync()
            >>> tracker.sums["css"].tolist(), tracker.counts["css"].tolist()
            ([0.0, 0.75, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0])
        """
        problem = None
        try:
            self.check()
        except ValueError as e:
            problem = e
        settings = repr((self.kind, sorted(self.buffers), [self._meta().get(k) for k in self.MATCHING]))
        table = distributed.agree(problem, [self.num_samples, zlib.crc32(settings.encode())], group=group).tolist()
        odd = next((r for r, row in enumerate(table) if row != table[0]), None)
        if odd is not None:
            raise ValueError(f"this {self.noun} differs between ranks (rank 0: {table[0][0]} examples, rank {odd}: "
                             f"{table[odd][0]}; or other settings): every rank must describe the same data set")
        if not distributed.is_initialized():
            return
        additive = [k for k in self.buffers if k not in self.NOT_ADDITIVE]
        before = self._at_sync or {k: torch.zeros_like(self.buffers[k]) for k in additive}
        gained = torch.stack([self.buffers[k].double() - before[k].double() for k in additive])
        self._sync_not_additive({k: gained[i] for i, k in enumerate(additive)}, group)
        distributed.all_reduce_(gained, group=group)
        for i, k in enumerate(additive):
            self.buffers[k].copy_(before[k].double() + gained[i])
        self._at_sync = {k: self.buffers[k].clone() for k in additive}

    def _sync_not_additive(self, gained: dict[str, torch.Tensor], group) -> None:
        """Combines the buffers named in NOT_ADDITIVE across ranks; `gained` holds what each
        additive buffer gained on this rank since the last sync (before the all-reduce)."""

    def save(self, path: str | os.PathLike) -> None:
        """Atomically writes the buffers to `path` (.npz: buffers plus JSON metadata, no pickle).
        Under torch.distributed only rank 0 writes (call `sync()` on every rank first, so that
        its buffers hold every rank's contributions); the other ranks return at once."""
        if distributed.rank() != 0:
            return
        state = self.state_dict()
        meta = state.pop("meta")
        save_npz(path, {k: v.numpy() for k, v in state.items()}, meta)

    @classmethod
    def _empty_from(cls: type[State], meta: dict, device: torch.device | str | None) -> State:
        """A zeroed object with the settings recorded in a file's `meta`."""
        raise NotImplementedError

    @classmethod
    def load(
        cls: type[State], path: str | os.PathLike, *, num_samples: int | None = None,
        device: torch.device | str | None = None, fingerprint: str | None = None,
    ) -> State:
        """Reads what `save` wrote. `num_samples`/`fingerprint`, if given, must match the file.

        Every field is checked before use (ValueError naming the file and the field): the record's
        settings, each buffer's shape, dtype and range, and what the buffers can hold together.
        """
        arrays, meta = load_npz(path, kind=cls.kind)
        try:
            _check_meta(meta, ("num_samples",))
            n = positive_int("num_samples", meta["num_samples"])
            check("fingerprint", meta.get("fingerprint"), None, str)
            # before allocating n examples' buffers: a hand-edited 10**12 must not reach torch.zeros
            for key, array in arrays.items():
                if array.shape != (n,):
                    raise ValueError(f"{key}: expected shape ({n},) (num_samples), got {array.shape}")
        except ValueError as e:
            raise ValueError(f"path: {path} holds an invalid {cls.kind}: {e}") from None
        if num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples: {path} was written for {n} examples, not {num_samples}")
        if fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
            raise ValueError(f"fingerprint: {path} was written for {meta['fingerprint']!r}, not {fingerprint!r}")
        try:
            obj = cls._empty_from(meta, device)
            obj.load_state_dict({"meta": meta, **arrays})
        except ValueError as e:
            raise ValueError(f"path: {path} holds an invalid {cls.kind}: {e}") from None
        return obj


class ScoreTracker(PerExampleState):
    """Running per-example sums and counts of named scores, on any device.

    Args:
        num_samples: size of the data set; valid indices are 0 .. num_samples - 1.
        metrics: names of the scores to track (default: ("css",), the positive-pair cosine).
        device: where the buffers live (put them where the values are produced).
        nan: what to do with NaN/Inf values: "error" (default; raises ValueError), "skip" (drops
            those entries), or "ignore" (adds them as they are). Each update checks the index range
            and the values before writing anything, at one host synchronisation.
        fingerprint: optional string identifying the data set, stored with saves and checked on load.
        deterministic: passed to the scatter op (None: follow torch's deterministic-algorithms flag).

    `sums[m]` and `counts[m]` are the float32 buffers of metric m (saved as "sum/m", "count/m").

    Two ways in: `update(index, **values)` checks on the host and raises at once (one host
    synchronisation); `record(index, **values)` never synchronises (what a fused loss calls with
    `tracker=`, so a training step can run ahead of the host or be captured in a CUDA graph):
    it leaves out every entry that `update` would refuse and the next host-side call (`check`,
    `mean`, `update`, `state_dict`, `save`) raises the ValueError naming the problem.

    Example:
        >>> import torch, coreset_ext as cx
        >>> tracker = cx.ScoreTracker(10, metrics=("css",))
        >>> for step in range(3):
        ...     index = torch.randint(0, 10, (4,))   # data set indices of this batch
        ...     cos = torch.rand(4)                  # e.g. the positive-pair cosines of the loss
        ...     tracker.update(index, css=cos)
        >>> tracker.mean()["css"].shape
        torch.Size([10])
    """

    kind = "ScoreTracker"
    noun = "tracker"
    MATCHING = ("metrics",)

    def __init__(
        self,
        num_samples: int,
        metrics: Iterable[str] = ("css",),
        *,
        device: torch.device | str | None = None,
        nan: str = "error",
        fingerprint: str | None = None,
        deterministic: bool | None = None,
    ) -> None:
        super().__init__(num_samples, fingerprint=fingerprint, deterministic=deterministic)
        metrics = tuple(metrics)
        if not metrics or len(set(metrics)) != len(metrics) or not all(isinstance(m, str) and m for m in metrics):
            raise ValueError(f"metrics must be distinct non-empty names, got {metrics!r}")
        self.metrics = metrics
        self.nan = check("nan", nan, NAN_POLICIES)
        device = torch.device(device) if device is not None else torch.device("cpu")
        for m in metrics:
            self.buffers[f"sum/{m}"] = torch.zeros(self.num_samples, dtype=torch.float32, device=device)
            self.buffers[f"count/{m}"] = torch.zeros(self.num_samples, dtype=torch.float32, device=device)
        self._errors = DeviceErrors(self.num_samples, metrics, device)  # what record() left out

    def to(self, device: torch.device | str) -> "ScoreTracker":
        super().to(device)
        self._errors.to(device)
        return self

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """Each metric's per-example sum [N] float32 (the buffer itself: ops may add into it)."""
        return {m: self.buffers[f"sum/{m}"] for m in self.metrics}

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        """How many values each example received, per metric [N] float32 (the buffer itself)."""
        return {m: self.buffers[f"count/{m}"] for m in self.metrics}

    def update(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        """Adds each metric's values at the examples' indices (duplicates summed) and counts them,
        after checking them all (one host synchronisation; see `record` for none)."""
        self._check_args(index, values)
        self.check()
        if index.numel() == 0:
            return
        # Everything is checked before anything is written, at one host synchronisation: the index
        # range and, unless nan="ignore", each metric's count of non-finite values.
        stats = list(torch.aminmax(index))
        if self.nan != "ignore":
            stats += [(~torch.isfinite(v)).sum() for v in values.values()]
        lo, hi, *nonfinite = torch.stack([t.long() for t in stats]).tolist()
        if lo < 0 or hi >= self.num_samples:
            bad = lo if lo < 0 else hi
            raise ValueError(f"index contains {bad}, out of range for {self.num_samples} examples")
        if self.nan == "error":
            for (name, v), count in zip(values.items(), nonfinite):
                if count:
                    pos = int((~torch.isfinite(v)).nonzero()[0, 0])
                    raise ValueError(
                        f"{name} has a non-finite value {v[pos].item()} at position {pos} "
                        f"(example {int(index[pos])}); pass nan='skip' to drop such entries"
                    )
        for i, (name, v) in enumerate(values.items()):
            idx, v = index, v.detach()
            if self.nan == "skip" and nonfinite[i]:
                finite = torch.isfinite(v)
                idx, v = index[finite], v[finite]
            self._add(f"sum/{name}", idx, v)
            self._add(f"count/{name}", idx, torch.ones_like(v, dtype=torch.float32))

    def record(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        """`update` without a host synchronisation: the checks run on the device.

        An entry with an index outside [0, num_samples), or (nan="error") a non-finite value, is
        left out of both sums and counts, and the next host-side call (`check`, `mean`, `update`,
        `state_dict`, `save`) raises the ValueError `update` would have raised. With nan="skip"
        non-finite values are left out silently; nan="ignore" adds them. Argument errors (shapes,
        dtypes, devices, metric names) raise here, as they cost no synchronisation.

        This is the protocol the fused losses use: `cx.ops.nt_xent(..., index=i, tracker=t)` calls
        `t.record(i, css=cos)`.

        Example:
            >>> import torch, coreset_ext as cx
            >>> tracker = cx.ScoreTracker(4)
            >>> tracker.record(torch.tensor([0, 7]), css=torch.tensor([0.5, 0.25]))
            >>> tracker.counts["css"]
            tensor([1., 0., 0., 0.])
            >>> tracker.mean()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: index contains 7, out of range for 4 examples; those entries were left out ...
        """
        self._check_args(index, values)
        if index.numel() == 0:
            return
        values = {name: v.detach() for name, v in values.items()}
        safe, screened, oks = self._errors.screen(index, values, check_values=self.nan != "ignore")
        for name in values:
            self._add(f"sum/{name}", safe, screened[name])
            self._add(f"count/{name}", safe, oks[name].to(torch.float32))
        if self.nan == "skip":
            self._errors.flags[2:].zero_()  # non-finite values are dropped by request, not errors

    def check(self) -> None:
        """Raises the ValueError for anything `record` left out since the last check (an index out
        of range; with nan="error", a non-finite value), then forgets it. One host synchronisation;
        `mean`, `update`, `state_dict` and `save` call it."""
        self._errors.raise_if_any(f"{self.num_samples} examples")

    def _check_args(self, index: torch.Tensor, values: dict) -> None:
        """The checks on names, shapes, dtypes and devices (no synchronisation)."""
        unknown = set(values) - set(self.metrics)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; this tracker has {list(self.metrics)}")
        if not isinstance(index, torch.Tensor) or index.dim() != 1:
            raise ValueError(f"index must be a 1-D tensor, got {describe(index)}")
        if index.dtype not in INDEX_DTYPES:
            raise ValueError(f"index must be int32 or int64, got {index.dtype}")
        for name, v in values.items():
            check_tensor(name, v, dim=1, dtypes=SCATTER_VALUE_DTYPES)
            if v.shape[0] != index.shape[0]:
                raise ValueError(f"{name} has {v.shape[0]} values but index has {index.shape[0]} entries")
        self._check_device(index=index, **values)

    def mean(self) -> dict[str, torch.Tensor]:
        """Per-example mean of each metric over the times the example was seen (NaN if never)."""
        self.check()
        return {m: self.buffers[f"sum/{m}"] / self.buffers[f"count/{m}"] for m in self.metrics}

    def reset(self) -> None:
        for buffer in self.buffers.values():
            buffer.zero_()
        self._at_sync = None

    def _meta(self) -> dict:
        return {**super()._meta(), "metrics": list(self.metrics)}

    def _check_buffers(self, buffers: dict[str, torch.Tensor], meta: dict) -> None:
        # sums are not checked: nan="ignore" adds NaN as it is, and the low-level `scores=` of the
        # fused losses adds into a sums buffer without counting
        for m in self.metrics:
            _check_counts(f"count/{m}", buffers[f"count/{m}"])

    @classmethod
    def _empty_from(cls, meta: dict, device: torch.device | str | None) -> "ScoreTracker":
        _check_meta(meta, ("metrics",))
        metrics = check("metrics", meta["metrics"], list)  # a string would read as its letters
        return cls(meta["num_samples"], metrics, device=device, fingerprint=meta.get("fingerprint"))


# --------------------------------------------------------------------------------------------
# TrainingDynamics: AUM, forgetting events and EL2N of a classifier, per example (ELFS)
# --------------------------------------------------------------------------------------------

_NEVER_SEEN, _WAS_WRONG, _WAS_RIGHT = -1, 0, 1


class TrainingDynamics(PerExampleState):
    """Per-example training dynamics of a classifier, accumulated on the device step by step.

    Each `update(logits, targets, index, epoch=e)` takes a batch's logits [B, C], its (pseudo-)
    labels [B] and the examples' data set indices [B], with p = softmax(logits) in float32:

    - AUM: margin_i = p(y_i) - max_{c != y_i} p(c), summed over the steps that saw i (`aum()`).
    - Forgetting: i is correct when its logit for y_i is strictly above every other logit
      (a tie counts as wrong). A forgetting event is a correct -> incorrect transition between
      two consecutive sightings of i; the last correctness is kept per example, starting at
      "never seen". Examples seen but never correct are "never learned" (`forgetting()`).
    - EL2N: ||p - onehot(y_i)||_2, accumulated only while `epoch < el2n_epochs`, averaged.

    Everything is a scatter-add through `ops.score_scatter_add_` (duplicates summed) or a
    gather/scatter of the per-example state: no Python loop over examples. An example that
    appears twice in one batch is taken as seen twice, in batch order. Saves atomically to .npz
    like `ScoreTracker`.

    Example:
        >>> import torch, coreset_ext as cx
        >>> dyn = cx.TrainingDynamics(10, el2n_epochs=1)
        >>> for epoch in range(2):
        ...     index = torch.randperm(10)[:4]
        ...     dyn.update(torch.randn(4, 3), torch.randint(0, 3, (4,)), index, epoch=epoch)
        >>> dyn.aum().shape, dyn.steps
        (torch.Size([10]), 2)
    """

    kind = "TrainingDynamics"
    noun = "TrainingDynamics"
    MATCHING = ("el2n_epochs",)
    NOT_ADDITIVE = ("last_correct",)
    _SUMS = ("aum_sum", "seen", "forget_events", "correct_count", "el2n_sum", "el2n_count")

    def __init__(
        self, num_samples: int, *, el2n_epochs: int = 10, device: torch.device | str | None = None,
        fingerprint: str | None = None, deterministic: bool | None = None,
    ) -> None:
        super().__init__(num_samples, fingerprint=fingerprint, deterministic=deterministic)
        self.el2n_epochs = nonnegative_int("el2n_epochs", el2n_epochs)
        self.steps = 0
        device = torch.device(device) if device is not None else torch.device("cpu")
        for k in self._SUMS:
            self.buffers[k] = torch.zeros(self.num_samples, dtype=torch.float32, device=device)
        self.buffers["last_correct"] = torch.full((self.num_samples,), _NEVER_SEEN, dtype=torch.int8, device=device)

    @property
    def last_correct(self) -> torch.Tensor:
        """Per example [N] int8: -1 never seen, else whether its last sighting was correct (0 or 1)."""
        return self.buffers["last_correct"]

    def update(self, logits: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, *, epoch: int) -> None:
        """Records one step: logits [B, C], targets [B] in [0, C), index [B] in [0, num_samples)."""
        check_tensor("logits", logits, dim=2, dtypes=LOGIT_DTYPES, what="[B, C]")
        b, c = logits.shape
        if c < 2:
            raise ValueError(f"logits needs at least 2 classes (columns), got {c}")
        check_tensor("targets", targets, dim=1, dtypes=INDEX_DTYPES)
        check_tensor("index", index, dim=1, dtypes=INDEX_DTYPES)
        if targets.shape[0] != b or index.shape[0] != b:
            raise ValueError(f"logits has {b} rows, targets {targets.shape[0]} and index {index.shape[0]}: they must match")
        self._check_device(logits=logits, targets=targets, index=index)
        nonnegative_int("epoch", epoch)
        if b == 0:
            self.steps += 1
            return
        # One host synchronisation checks every value of the batch.
        bad = torch.stack([(targets < 0).any() | (targets >= c).any(), ~torch.isfinite(logits).all(),
                           (index < 0).any() | (index >= self.num_samples).any()])
        if bool(bad.any()):
            which = ["targets out of range [0, %d)" % c, "logits has NaN or Inf",
                     "index out of range [0, %d)" % self.num_samples]
            raise ValueError("; ".join(w for w, f in zip(which, bad.tolist()) if f))
        index = index.long()
        targets = targets.long()
        logits = logits.detach().float()
        p = torch.softmax(logits, dim=1)
        p_y = p.gather(1, targets[:, None])[:, 0]
        p_other = p.scatter(1, targets[:, None], float("-inf")).amax(dim=1)
        logit_y = logits.gather(1, targets[:, None])[:, 0]
        correct = logit_y > logits.scatter(1, targets[:, None], float("-inf")).amax(dim=1)
        ones = torch.ones(b, dtype=torch.float32, device=self.device)
        self._add("aum_sum", index, p_y - p_other)
        self._add("seen", index, ones)
        self._add("correct_count", index, correct.float())
        if epoch < self.el2n_epochs:
            onehot = torch.nn.functional.one_hot(targets, c).float()
            self._add("el2n_sum", index, (p - onehot).norm(dim=1))
            self._add("el2n_count", index, ones)
        # Forgetting: each sighting's previous state is the stored one for the first occurrence
        # of an example in this batch, else its previous occurrence in the batch.
        order = torch.sort(index, stable=True).indices
        idx_s, cor_s = index[order], correct[order].to(torch.int8)
        first = torch.ones(b, dtype=torch.bool, device=self.device)
        first[1:] = idx_s[1:] != idx_s[:-1]
        prev = torch.where(first, self.last_correct[idx_s], torch.roll(cor_s, 1))
        self._add("forget_events", idx_s, ((prev == _WAS_RIGHT) & (cor_s == _WAS_WRONG)).float())
        last = torch.ones(b, dtype=torch.bool, device=self.device)
        last[:-1] = idx_s[:-1] != idx_s[1:]
        self.last_correct[idx_s[last]] = cor_s[last]  # unique indices: a deterministic write
        self.steps += 1

    def _sync_not_additive(self, gained: dict[str, torch.Tensor], group) -> None:
        # The last sighting of an example is on the rank that saw it since the last sync (with a
        # DistributedSampler and a sync per epoch, exactly one); should several have, the highest
        # rank's wins. Every rank counted its forgetting events against the state of the last
        # sync, so they are exact when each example is seen by one rank between two syncs.
        seen_here = gained["seen"] > 0
        me = distributed.rank(group) + 1
        winner = torch.where(seen_here, me, 0).to(torch.int64)
        distributed.all_reduce_(winner, op="max", group=group)
        value = torch.where(winner == me, self.last_correct.to(torch.int64) + 2, 0)
        distributed.all_reduce_(value, group=group)
        self.last_correct.copy_(torch.where(winner > 0, value - 2, self.last_correct.to(torch.int64)))

    def _require_steps(self) -> None:
        if self.steps == 0:
            raise ValueError("no steps recorded: call update() during training before reading the dynamics")

    def _unseen_nan(self, values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return torch.where(count > 0, values, torch.full_like(values, float("nan")))

    def aum(self, reduction: str = "sum") -> torch.Tensor:
        """Per-example AUM [N]: the margins summed over steps ("sum", default) or their mean
        ("mean"); NaN for examples never seen. Low AUM = hard (likely mislabelled)."""
        self._require_steps()
        check("reduction", reduction, Options("sum", "mean"))
        s, n = self.buffers["aum_sum"], self.buffers["seen"]
        return self._unseen_nan(s if reduction == "sum" else s / n.clamp_min(1), n)

    def forgetting(self, *, never_learned: float | None = float("inf")) -> torch.Tensor:
        """Per-example forgetting events [N]; NaN for examples never seen. Examples seen but never
        correct get `never_learned` (default +inf: the most forgettable, as in Toneva et al.);
        None leaves their count (0)."""
        self._require_steps()
        events, n = self.buffers["forget_events"].clone(), self.buffers["seen"]
        if never_learned is not None:
            events = torch.where(self.never_learned(), torch.full_like(events, float(never_learned)), events)
        return self._unseen_nan(events, n)

    def never_learned(self) -> torch.Tensor:
        """Bool [N]: examples seen at least once and never classified correctly."""
        self._require_steps()
        return (self.buffers["seen"] > 0) & (self.buffers["correct_count"] == 0)

    def el2n(self) -> torch.Tensor:
        """Per-example mean EL2N [N] over the steps with epoch < el2n_epochs; NaN where none."""
        self._require_steps()
        s, n = self.buffers["el2n_sum"], self.buffers["el2n_count"]
        return self._unseen_nan(s / n.clamp_min(1), n)

    def counts(self) -> torch.Tensor:
        """How many times each example was seen [N] (float32)."""
        return self.buffers["seen"].clone()

    def _meta(self) -> dict:
        return {**super()._meta(), "el2n_epochs": self.el2n_epochs, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.steps = int(state["meta"]["steps"])  # checked with the buffers

    def _check_buffers(self, buffers: dict[str, torch.Tensor], meta: dict) -> None:
        _check_meta(meta, ("steps",))
        steps = check("steps", meta["steps"], NONNEGATIVE_INT)
        for key in ("seen", "forget_events", "correct_count", "el2n_count"):
            _check_counts(key, buffers[key])
        seen, last, el2n = buffers["seen"], buffers["last_correct"], buffers["el2n_sum"]
        slack = 1e-3 * seen + 1e-3  # float32 sums of bounded terms round
        once = "at most seen (one per sighting)"
        # ~(a <= b) rather than a > b: NaN fails every rule
        rules = [("correct_count", buffers["correct_count"] > seen, once),
                 ("forget_events", buffers["forget_events"] > seen, once),
                 ("el2n_count", buffers["el2n_count"] > seen, once),
                 ("aum_sum", ~(buffers["aum_sum"].abs() <= seen + slack),
                  "finite and within [-seen, seen] (each margin lies in [-1, 1])"),
                 ("el2n_sum", ~((el2n >= 0) & (el2n <= 2**0.5 * buffers["el2n_count"] + slack)),
                  "finite and within [0, sqrt(2) * el2n_count] (each EL2N lies in [0, sqrt(2)])"),
                 ("last_correct", (last < _NEVER_SEEN) | (last > _WAS_RIGHT), "-1, 0 or 1"),
                 ("last_correct", (last == _NEVER_SEEN) != (seen == 0), "-1 exactly for the examples never seen")]
        for key, bad, what in rules:
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{key} must be {what}, got {buffers[key][i].item()} at example {i}")
        if steps == 0 and bool((seen > 0).any()):
            raise ValueError(f"steps must be >= 1 when examples were seen, got {steps}")

    @classmethod
    def _empty_from(cls, meta: dict, device: torch.device | str | None) -> "TrainingDynamics":
        _check_meta(meta, ("el2n_epochs",))
        return cls(meta["num_samples"], el2n_epochs=meta["el2n_epochs"], device=device,
                   fingerprint=meta.get("fingerprint"))
