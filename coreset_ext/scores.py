"""Per-example score accumulation during training.

`ScoreTracker` keeps, for each named metric, a running sum and a count per example of the data
set, updated in place through `ops.score_scatter_add_` (duplicates summed, fused-friendly, no host
synchronisation when `nan="ignore"`). It saves atomically to a non-pickle `.npz` file holding the
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


class ScoreTracker:
    """Running per-example sums and counts of named scores, on any device.

    Args:
        num_samples: size of the data set; valid indices are 0 .. num_samples - 1.
        metrics: names of the scores to track (default: ("css",), the positive-pair cosine).
        device: where the buffers live (put them where the values are produced).
        nan: what to do with NaN/Inf values: "error" (default; raises ValueError, costs one host
            synchronisation per update), "skip" (drops those entries; also synchronises), or
            "ignore" (adds them as they are; no synchronisation).
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
        for name, v in values.items():
            if not isinstance(v, torch.Tensor) or v.dim() != 1:
                raise ValueError(f"{name} must be a 1-D tensor, got {ops._describe(v)}")
            if v.shape[0] != index.shape[0]:
                raise ValueError(f"{name} has {v.shape[0]} values but index has {index.shape[0]} entries")
            idx = index
            if self.nan != "ignore":
                finite = torch.isfinite(v)
                if not bool(finite.all()):
                    if self.nan == "error":
                        bad = int((~finite).nonzero()[0, 0])
                        raise ValueError(
                            f"{name} has a non-finite value {v[bad].item()} at position {bad} "
                            f"(example {int(index[bad])}); pass nan='skip' to drop such entries"
                        )
                    idx, v = index[finite], v[finite]
            v = v.detach()
            ops.score_scatter_add_(self.sums[name], idx, v, deterministic=self.deterministic)
            ops.score_scatter_add_(self.counts[name], idx, torch.ones_like(v, dtype=torch.float32),
                                   deterministic=self.deterministic)

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
            self.sums[m].copy_(torch.as_tensor(state[f"sum/{m}"]))
            self.counts[m].copy_(torch.as_tensor(state[f"count/{m}"]))

    def save(self, path: str | os.PathLike) -> None:
        """Atomically writes the tracker to `path` (.npz: buffers plus JSON metadata, no pickle)."""
        state = self.state_dict()
        meta = state.pop("meta")
        save_npz(path, {k: v.numpy() for k, v in state.items()}, meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, num_samples: int | None = None, device: torch.device | str | None = None,
        fingerprint: str | None = None,
    ) -> "ScoreTracker":
        """Reads a tracker saved by `save`. `num_samples`/`fingerprint`, if given, must match the file."""
        arrays, meta = load_npz(path)
        if meta.get("kind") != "ScoreTracker":
            raise ValueError(f"{path} is not a ScoreTracker file (kind={meta.get('kind')!r})")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {meta['format_version']}, newer than {FORMAT_VERSION}")
        if num_samples is not None and num_samples != meta["num_samples"]:
            raise ValueError(
                f"num_samples: {path} was written for {meta['num_samples']} examples, not {num_samples}"
            )
        if fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
            raise ValueError(f"fingerprint: {path} was written for {meta['fingerprint']!r}, not {fingerprint!r}")
        tracker = cls(meta["num_samples"], meta["metrics"], device=device, fingerprint=meta.get("fingerprint"))
        tracker.load_state_dict({"meta": meta, **arrays})
        return tracker
