"""Per-round contrastive features of an active-learning pool, and the classifier of the labelled ID
examples on them.

`ContrastiveFeatures` trains SimCLR (the library's trainer and its fused NT-Xent loss) on the whole
pool, labelled and unlabelled examples alike, `epochs_first` epochs before the first round and
`epochs` more before each later one, warm-started from the previous round's weights (a fresh
optimiser each round; the round's training seed is seed + round, so a resumed loop trains exactly
as an uninterrupted one on the CPU). Features are the encoder's backbone outputs, centred on the
pool's mean and L2-normalised.
The training sees no label, so the features of a round are the same whichever method acquires:
the benchmark shares one `ContrastiveFeatures` between the methods of a seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from coreset_ext import reference
from coreset_ext._validation import NONNEGATIVE_INT, POSITIVE_INT, check
from coreset_ext.train.data import as_data
from coreset_ext.train.evaluate import extract_features
from coreset_ext.train.models import build_model
from coreset_ext.train.trainer import TrainConfig, Trainer, resolve_device


@dataclass
class FeatureConfig:
    """How the per-round contrastive features are trained (SimCLR, small CNN for images)."""

    epochs_first: int = 15
    epochs: int = 3
    width: int = 32
    batch_size: int = 256
    lr: float = 2e-3
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs_first", "epochs", "width", "batch_size"):
            setattr(self, name, check(name, getattr(self, name), POSITIVE_INT))
        TrainConfig(width=self.width, batch_size=self.batch_size, lr=self.lr, device=self.device)  # its checks


class ContrastiveFeatures:
    """The pool's contrastive features at each round (see the module docstring).

    Example:
        >>> import torch
        >>> from coreset_ext.train.data import ArrayDataset
        >>> pool = ArrayDataset(torch.rand(64, 1, 8, 8))
        >>> feats = ContrastiveFeatures(pool, FeatureConfig(epochs_first=1, width=8), seed=0, progress=False)
        >>> f = feats.at_round(0)
        >>> f.shape[0], round(float(f[0].norm()), 4)
        (64, 1.0)
    """

    def __init__(self, dataset, config: FeatureConfig | None = None, *, seed: int = 0, progress: bool = False) -> None:
        self.data = as_data(dataset)
        self.config = config or FeatureConfig()
        self.seed = seed
        self.progress = progress
        torch.manual_seed(seed)
        self.model = build_model("auto", self.data.sample_shape, width=self.config.width)
        self.rounds_trained = 0  # rounds whose training is in the weights
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    def _train_to(self, rnd: int) -> None:
        cfg = self.config
        while self.rounds_trained <= rnd:
            r = self.rounds_trained
            train = TrainConfig(method="simclr", epochs=cfg.epochs_first if r == 0 else cfg.epochs, width=cfg.width,
                                batch_size=min(cfg.batch_size, len(self.data)), lr=cfg.lr, seed=self.seed + r,
                                device=cfg.device, progress=self.progress)
            self.model = Trainer(train, self.data, model=self.model).fit().model
            self.rounds_trained += 1
            self._cache.clear()

    def at_round(self, rnd: int, dataset=None) -> torch.Tensor:
        """L2-normalised backbone features [N, D] (float32, CPU) of the pool (or of `dataset`, e.g. a
        test set) after round `rnd`'s training; trains up to that round first. A round already
        passed (the weights have moved on) is a ValueError."""
        check("round", rnd, NONNEGATIVE_INT)
        if rnd < self.rounds_trained - 1:
            raise ValueError(f"round: the features have been trained through round {self.rounds_trained - 1}; "
                             f"round {rnd} is gone")
        self._train_to(rnd)
        data = self.data if dataset is None else as_data(dataset)
        key = (rnd, data.fingerprint)
        if key not in self._cache:
            device = resolve_device(self.config.device)
            raw = {d.fingerprint: extract_features(self.model.encoder, d, device=device) for d in (self.data, data)}
            # centred on the pool's mean first: backbone outputs (after a ReLU) share one orthant, and
            # their raw cosines crowd near 1
            mean = raw[self.data.fingerprint].mean(0)
            self._cache.update({(rnd, fp): reference.normalize(h - mean) for fp, h in raw.items()})
        return self._cache[key]

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, record) to save: the weights, and the rounds and settings they belong to."""
        arrays = {f"model/{k}": v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}
        return arrays, {"rounds_trained": self.rounds_trained, "seed": self.seed, "features": asdict(self.config)}

    def load_state(self, arrays: dict[str, np.ndarray], record: dict, where: str) -> None:
        """Restores `state()`'s output read from `where`; another seed or settings is a ValueError."""
        mine = {"seed": self.seed, "features": asdict(self.config)}
        theirs = {"seed": record.get("seed"), "features": record.get("features")}
        if json_ready(theirs) != json_ready(mine):
            raise ValueError(f"resume: {where} was trained with features {theirs}, not {mine}")
        try:
            weights = {k[len("model/"):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model/")}
            self.model.load_state_dict(weights)
        except (RuntimeError, TypeError) as e:  # TypeError: an array torch has no dtype for (strings)
            raise ValueError(f"resume: {where} holds weights of another model ({str(e).splitlines()[0]})") from None
        self.rounds_trained = int(record["rounds_trained"])
        self._cache.clear()


def json_ready(value):
    """`value` as JSON would give it back (tuples as lists), for comparing a saved record."""
    return json.loads(json.dumps(value))


def fit_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, seed: int = 0):
    """Multinomial logistic regression (scikit-learn, L2, C = 1) on unit-length features scaled by
    sqrt(D) (entries of order one, whatever the width; no statistics of a few labelled examples);
    returns `predict_proba(x) -> [n, num_classes]` (columns of classes never seen are 0). With one
    class seen it predicts that class."""
    from sklearn.linear_model import LogisticRegression

    scale = math.sqrt(features.shape[1])
    y = labels.numpy()
    seen = np.unique(y)
    model = None
    if seen.size > 1:
        model = LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit(features.double().numpy() * scale, y)

    def predict_proba(x: torch.Tensor) -> torch.Tensor:
        out = np.zeros((x.shape[0], num_classes))
        if model is None:
            out[:, seen[0]] = 1.0
        else:
            out[:, model.classes_] = model.predict_proba(x.double().numpy() * scale)
        return torch.from_numpy(out)

    return predict_proba
