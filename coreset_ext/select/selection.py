"""`Selection`: the result of a selector, savable without pickle and checkable against its data set."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from coreset_ext._validation import SEED, Interval, check
from coreset_ext.io import load_npz, save_npz


def check_indices(indices: torch.Tensor, n: int) -> None:
    """ValueError unless `indices` is a 1-D integer tensor of distinct values in [0, n).

    A negative index would silently pick from the end of the data set in `subset`, so it is an error.
    """
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype.is_floating_point \
            or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be a 1-D integer tensor, got {indices!r:.80}")
    bad = (indices < 0) | (indices >= n)
    if bool(bad.any()):
        raise ValueError(f"indices must be in [0, {n}) (the data set size); {int(bad.sum())} are not, "
                         f"e.g. {indices[bad][:5].tolist()}")
    dup = indices.numel() - torch.unique(indices).numel()
    if dup:
        raise ValueError(f"indices must be distinct; {dup} are repeats")


_DATASET_SIZE = Interval(int, 0, 2**63 - 1)  # indices are int64


def _file_indices(indices: np.ndarray, n: int) -> torch.Tensor:
    """A file's index array as int64. Any integer dtype is fine (uint16, uint64, ...); the range is
    checked in the file's own dtype first, so a uint64 above int64's range cannot wrap into a
    valid-looking index, and floats are refused rather than truncated to valid-looking integers."""
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise ValueError(f"indices must be a 1-D integer array, got {indices.dtype} of shape {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        bad = indices[(indices < 0) | (indices >= n)]
        raise ValueError(f"indices must be in [0, {n}) (the data set size); {bad.size} are not, "
                         f"e.g. {bad[:5].tolist()}")
    return torch.from_numpy(indices.astype(np.int64))


@dataclass
class Selection:
    """Which examples a method chose, and everything needed to check and reproduce that choice.

    Attributes:
        indices: int64 data set indices of the chosen examples (distinct, in [0, dataset_size);
            checked on construction), in the method's order.
        method: registered name of the method.
        options: the method's options (JSON-serialisable).
        dataset_size: size N of the pool the indices refer to.
        seed: the seed the method used.
        scores: the per-example scores the method ranked by (length N), or None.
        fingerprint: identifier of the data set (e.g. `ArrayDataset.fingerprint`), or None.

    Example:
        >>> import coreset_ext as cx
        >>> sel = cx.select("random", fraction=0.5, scores=[0.1, 0.2, 0.3, 0.4], seed=0)
        >>> len(sel), sel.dataset_size
        (2, 4)
    """

    indices: torch.Tensor
    method: str
    options: dict = field(default_factory=dict)
    dataset_size: int = 0
    seed: int = 0
    scores: torch.Tensor | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        check_indices(self.indices, self.dataset_size)
        self.indices = self.indices.long()  # int32 from a file, say

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def fraction(self) -> float:
        return len(self) / self.dataset_size

    def check_dataset(self, dataset) -> None:
        """ValueError unless `dataset` has the size (and, where both know it, the fingerprint) of
        the data set this selection was made for."""
        n = len(dataset)
        if n != self.dataset_size:
            raise ValueError(f"dataset: this selection was made for a data set of {self.dataset_size} examples, "
                             f"but the data set given has {n}")
        fp = getattr(dataset, "fingerprint", None)
        if self.fingerprint is not None and isinstance(fp, str) and fp != self.fingerprint:
            raise ValueError(f"dataset: this selection was made for data set {self.fingerprint}, "
                             f"but the data set given is {fp}")

    def subset(self, dataset) -> torch.utils.data.Subset:
        """`torch.utils.data.Subset(dataset, indices)` after checking size and fingerprint match."""
        self.check_dataset(dataset)
        return torch.utils.data.Subset(dataset, self.indices.tolist())

    def save(self, path: str | os.PathLike) -> None:
        """Atomically writes an .npz (indices, scores) with a JSON record of the rest; no pickle."""
        arrays = {"indices": self.indices.cpu().numpy().astype(np.int64)}
        if self.scores is not None:
            arrays["scores"] = self.scores.detach().cpu().numpy().astype(np.float32)
        meta = {"kind": "Selection", "method": self.method,
                "options": self.options, "dataset_size": self.dataset_size, "seed": self.seed,
                "fingerprint": self.fingerprint, "budget": len(self)}
        save_npz(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, dataset=None) -> "Selection":
        """Reads `save`'s file; with `dataset`, also checks it is the data set the selection was made for.

        Every field is checked before use (ValueError naming the file and the field): indices of
        any integer dtype in range, a whole dataset_size, a budget equal to the number of indices,
        scores of one float per example of the data set.
        """
        arrays, meta = load_npz(path, kind="Selection")
        try:
            sel = cls._from_file(arrays, meta)
        except ValueError as e:
            raise ValueError(f"path: {path} holds an invalid Selection: {e}") from None
        if dataset is not None:
            sel.check_dataset(dataset)
        return sel

    @classmethod
    def _from_file(cls, arrays: dict[str, np.ndarray], meta: dict) -> "Selection":
        for key in ("method", "dataset_size"):
            if key not in meta:
                raise ValueError(f"{key}: missing from the file's record")
        if "indices" not in arrays:
            raise ValueError(f"indices: missing from the file (it has {sorted(arrays)})")
        method = check("method", meta["method"], str)
        options = check("options", meta.get("options", {}), dict)
        n = check("dataset_size", meta["dataset_size"], _DATASET_SIZE)
        seed = check("seed", meta.get("seed", 0), SEED)
        fingerprint = check("fingerprint", meta.get("fingerprint"), None, str)
        scores = arrays.get("scores")
        if scores is not None:
            if scores.dtype.kind != "f" or scores.shape != (n,):
                raise ValueError(f"scores must be a 1-D float array of one score per example ({n}), "
                                 f"got {scores.dtype} of shape {scores.shape}")
            scores = torch.from_numpy(scores.astype(np.float32))
        # the constructor checks that the indices are distinct
        sel = cls(indices=_file_indices(arrays["indices"], n), method=method, options=options, dataset_size=n,
                  seed=seed, scores=scores, fingerprint=fingerprint)
        budget = meta.get("budget", len(sel))
        if type(budget) is not int or budget != len(sel):  # a bool is not a count
            raise ValueError(f"budget: the file records {budget!r} but holds {len(sel)} indices")
        return sel
