"""Per-example score accumulation during training.

`ScoreTracker` keeps, for each named metric, a running sum and a count per example of the data
set, updated in place through `ops.score_scatter_add_` (duplicates summed; one host
synchronisation per update, for the checks). It saves atomically to a non-pickle `.npz` file holding the
buffers and a JSON metadata record.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from coreset_ext import ops

FORMAT_VERSION = 1
_NAN_POLICIES = ("error", "skip", "ignore")


def _library_version() -> str:
    from coreset_ext import __version__

    return __version__


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` so that a crash at any moment leaves either the old file or the new.

    The bytes go to a temporary file in the same directory, are fsynced, then renamed over `path`
    (rename is atomic on POSIX), and the directory entry is fsynced too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Atomically saves arrays plus a JSON metadata record (key `__meta__`) as an uncompressed npz."""
    import io

    buf = io.BytesIO()
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buf, **payload)
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Reads what `save_npz` wrote, without unpickling anything."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k != "__meta__"}
        if "__meta__" not in f.files:
            raise ValueError(f"{path} has no __meta__ record: not a coreset-ext file")
        meta = json.loads(bytes(f["__meta__"]).decode())
    return arrays, meta


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Atomically saves a `state_dict()` (tensors plus its "meta" record) with `save_npz`."""
    state = dict(state)
    meta = state.pop("meta")
    save_npz(path, {k: v.numpy() for k, v in state.items()}, meta)


def _copy_buffer(dst: torch.Tensor, state: dict, key: str) -> None:
    """dst <- state[key], refusing anything but an array of dst's exact shape: copy_ would
    broadcast a (1,) array into every example, or wrap an out-of-range integer."""
    if key not in state:
        raise ValueError(f"{key}: missing from the state (keys: {sorted(k for k in state if k != 'meta')})")
    src = torch.as_tensor(state[key])
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"{key}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
    if src.dtype.is_complex or src.dtype == torch.bool or src.is_floating_point() != dst.is_floating_point():
        raise ValueError(f"{key}: expected {dst.dtype} values, got {src.dtype}")
    if not dst.is_floating_point() and src.numel() and (
            int(src.min()) < torch.iinfo(dst.dtype).min or int(src.max()) > torch.iinfo(dst.dtype).max):
        raise ValueError(f"{key}: values outside the range of {dst.dtype}")
    dst.copy_(src)


def load_checked(
    path: str | os.PathLike, kind: str, *, num_samples: int | None, fingerprint: str | None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Reads what `save_state` wrote for an object of `kind`, checking the format version and,
    where given, that the file was written for `num_samples` examples of data set `fingerprint`."""
    arrays, meta = load_npz(path)
    if meta.get("kind") != kind:
        raise ValueError(f"{path} is not a {kind} file (kind={meta.get('kind')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta['format_version']}, newer than {FORMAT_VERSION}")
    if num_samples is not None and num_samples != meta["num_samples"]:
        raise ValueError(
            f"num_samples: {path} was written for {meta['num_samples']} examples, not {num_samples}"
        )
    if fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
        raise ValueError(f"fingerprint: {path} was written for {meta['fingerprint']!r}, not {fingerprint!r}")
    return arrays, meta


class ScoreTracker:
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
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        metrics = tuple(metrics)
        if not metrics or len(set(metrics)) != len(metrics) or not all(isinstance(m, str) and m for m in metrics):
            raise ValueError(f"metrics must be distinct non-empty names, got {metrics!r}")
        if nan not in _NAN_POLICIES:
            raise ValueError(f"nan must be one of {_NAN_POLICIES}, got {nan!r}")
        self.num_samples = num_samples
        self.metrics = metrics
        self.nan = nan
        self.fingerprint = fingerprint
        self.deterministic = deterministic
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.sums = {m: torch.zeros(num_samples, dtype=torch.float32, device=device) for m in metrics}
        self.counts = {m: torch.zeros(num_samples, dtype=torch.float32, device=device) for m in metrics}

    @property
    def device(self) -> torch.device:
        return self.sums[self.metrics[0]].device

    def update(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        """Adds each metric's values at the examples' indices (duplicates summed) and counts them."""
        unknown = set(values) - set(self.metrics)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; this tracker has {list(self.metrics)}")
        if not isinstance(index, torch.Tensor) or index.dim() != 1:
            raise ValueError(f"index must be a 1-D tensor, got {ops._describe(index)}")
        if index.device != self.device:
            raise ValueError(f"index is on {index.device} but the tracker's buffers are on {self.device}")
        if index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index must be int32 or int64, got {index.dtype}")
        for name, v in values.items():
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.dtype not in ops._SCATTER_VALUE_DTYPES:
                raise ValueError(f"{name} must be a 1-D float32, float16 or bfloat16 tensor, got {ops._describe(v)}")
            if v.shape[0] != index.shape[0]:
                raise ValueError(f"{name} has {v.shape[0]} values but index has {index.shape[0]} entries")
            if v.device != self.device:
                raise ValueError(f"{name} is on {v.device} but the tracker's buffers are on {self.device}")
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
            ops.score_scatter_add_(self.sums[name], idx, v, deterministic=self.deterministic, validate=False)
            ops.score_scatter_add_(self.counts[name], idx, torch.ones_like(v, dtype=torch.float32),
                                   deterministic=self.deterministic, validate=False)

    def mean(self) -> dict[str, torch.Tensor]:
        """Per-example mean of each metric over the times the example was seen (NaN if never)."""
        return {m: self.sums[m] / self.counts[m] for m in self.metrics}

    def reset(self) -> None:
        for m in self.metrics:
            self.sums[m].zero_()
            self.counts[m].zero_()

    def to(self, device: torch.device | str) -> "ScoreTracker":
        for m in self.metrics:
            self.sums[m] = self.sums[m].to(device)
            self.counts[m] = self.counts[m].to(device)
        return self

    def _meta(self) -> dict:
        return {
            "kind": "ScoreTracker",
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
            "num_samples": self.num_samples,
            "metrics": list(self.metrics),
            "fingerprint": self.fingerprint,
        }

    def state_dict(self) -> dict:
        state = {"meta": self._meta()}
        for m in self.metrics:
            state[f"sum/{m}"] = self.sums[m].detach().cpu().clone()
            state[f"count/{m}"] = self.counts[m].detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        meta = state["meta"]
        if meta["num_samples"] != self.num_samples:
            raise ValueError(
                f"num_samples: the state holds {meta['num_samples']} examples but this tracker has "
                f"{self.num_samples}"
            )
        if list(meta["metrics"]) != list(self.metrics):
            raise ValueError(f"metrics: the state holds {meta['metrics']} but this tracker has {list(self.metrics)}")
        if self.fingerprint is not None and meta.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError(
                f"fingerprint: the state was written for data set {meta['fingerprint']!r}, "
                f"this tracker is for {self.fingerprint!r}"
            )
        for m in self.metrics:
            _copy_buffer(self.sums[m], state, f"sum/{m}")
            _copy_buffer(self.counts[m], state, f"count/{m}")

    def save(self, path: str | os.PathLike) -> None:
        """Atomically writes the tracker to `path` (.npz: buffers plus JSON metadata, no pickle)."""
        save_state(path, self.state_dict())

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, num_samples: int | None = None, device: torch.device | str | None = None,
        fingerprint: str | None = None,
    ) -> "ScoreTracker":
        """Reads a tracker saved by `save`. `num_samples`/`fingerprint`, if given, must match the file."""
        arrays, meta = load_checked(path, "ScoreTracker", num_samples=num_samples, fingerprint=fingerprint)
        tracker = cls(meta["num_samples"], meta["metrics"], device=device, fingerprint=meta.get("fingerprint"))
        tracker.load_state_dict({"meta": meta, **arrays})
        return tracker


# --------------------------------------------------------------------------------------------
# TrainingDynamics: AUM, forgetting events and EL2N of a classifier, per example (ELFS)
# --------------------------------------------------------------------------------------------

_NEVER_SEEN, _WAS_WRONG, _WAS_RIGHT = -1, 0, 1


class TrainingDynamics:
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

    _SUMS = ("aum_sum", "seen", "forget_events", "correct_count", "el2n_sum", "el2n_count")

    def __init__(
        self, num_samples: int, *, el2n_epochs: int = 10, device: torch.device | str | None = None,
        fingerprint: str | None = None, deterministic: bool | None = None,
    ) -> None:
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(el2n_epochs, int) or isinstance(el2n_epochs, bool) or el2n_epochs < 0:
            raise ValueError(f"el2n_epochs must be a non-negative int, got {el2n_epochs!r}")
        self.num_samples = num_samples
        self.el2n_epochs = el2n_epochs
        self.fingerprint = fingerprint
        self.deterministic = deterministic
        self.steps = 0
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.buffers = {k: torch.zeros(num_samples, dtype=torch.float32, device=device) for k in self._SUMS}
        self.last_correct = torch.full((num_samples,), _NEVER_SEEN, dtype=torch.int8, device=device)

    @property
    def device(self) -> torch.device:
        return self.last_correct.device

    def _add(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        # update() checked the index range once for all six buffers
        ops.score_scatter_add_(self.buffers[name], index, values.float(), deterministic=self.deterministic,
                               validate=False)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, *, epoch: int) -> None:
        """Records one step: logits [B, C], targets [B] in [0, C), index [B] in [0, num_samples)."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
            raise ValueError(f"logits must be a 2-D float tensor [B, C], got {ops._describe(logits)}")
        b, c = logits.shape
        if c < 2:
            raise ValueError(f"logits needs at least 2 classes (columns), got {c}")
        if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"targets must be a 1-D int32 or int64 tensor, got {ops._describe(targets)}")
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index must be a 1-D int32 or int64 tensor, got {ops._describe(index)}")
        if targets.shape[0] != b or index.shape[0] != b:
            raise ValueError(f"logits has {b} rows, targets {targets.shape[0]} and index {index.shape[0]}: they must match")
        for name, t in (("logits", logits), ("targets", targets), ("index", index)):
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the dynamics' buffers are on {self.device}")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
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

    def _require_steps(self) -> None:
        if self.steps == 0:
            raise ValueError("no steps recorded: call update() during training before reading the dynamics")

    def _unseen_nan(self, values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return torch.where(count > 0, values, torch.full_like(values, float("nan")))

    def aum(self, reduction: str = "sum") -> torch.Tensor:
        """Per-example AUM [N]: the margins summed over steps ("sum", default) or their mean
        ("mean"); NaN for examples never seen. Low AUM = hard (likely mislabelled)."""
        self._require_steps()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
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

    def to(self, device: torch.device | str) -> "TrainingDynamics":
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        self.last_correct = self.last_correct.to(device)
        return self

    def _meta(self) -> dict:
        return {
            "kind": "TrainingDynamics",
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
            "num_samples": self.num_samples,
            "el2n_epochs": self.el2n_epochs,
            "steps": self.steps,
            "fingerprint": self.fingerprint,
        }

    def state_dict(self) -> dict:
        state = {"meta": self._meta(), "last_correct": self.last_correct.detach().cpu().clone()}
        for k in self._SUMS:
            state[k] = self.buffers[k].detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        meta = state["meta"]
        if meta.get("kind") != "TrainingDynamics":
            raise ValueError(f"the state is not TrainingDynamics (kind={meta.get('kind')!r})")
        if meta["num_samples"] != self.num_samples:
            raise ValueError(
                f"num_samples: the state holds dynamics of {meta['num_samples']} examples but this one has "
                f"{self.num_samples}"
            )
        if meta["el2n_epochs"] != self.el2n_epochs:
            raise ValueError(f"el2n_epochs: the state used {meta['el2n_epochs']}, this one {self.el2n_epochs}")
        if self.fingerprint is not None and meta.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError(
                f"fingerprint: the state was written for data set {meta['fingerprint']!r}, "
                f"these dynamics are for {self.fingerprint!r}"
            )
        for k in self._SUMS:
            _copy_buffer(self.buffers[k], state, k)
        _copy_buffer(self.last_correct, state, "last_correct")
        self.steps = int(meta["steps"])

    def save(self, path: str | os.PathLike) -> None:
        """Atomically writes the dynamics to `path` (.npz: buffers plus JSON metadata, no pickle)."""
        save_state(path, self.state_dict())

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, num_samples: int | None = None, device: torch.device | str | None = None,
        fingerprint: str | None = None,
    ) -> "TrainingDynamics":
        """Reads dynamics saved by `save`. `num_samples`/`fingerprint`, if given, must match the file."""
        arrays, meta = load_checked(path, "TrainingDynamics", num_samples=num_samples, fingerprint=fingerprint)
        dyn = cls(meta["num_samples"], el2n_epochs=meta["el2n_epochs"], device=device,
                  fingerprint=meta.get("fingerprint"))
        dyn.load_state_dict({"meta": meta, **arrays})
        return dyn
