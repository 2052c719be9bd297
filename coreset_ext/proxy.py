"""Proxy training for ELFS and the dynamics baselines: a classifier on frozen features, recording
`TrainingDynamics` (AUM, forgetting, EL2N) at every step.

ELFS (METHODS.md, method 3) trains a network on pseudo-labels and reads its training dynamics;
with ground-truth labels the same run gives the supervised baselines. Here the proxy is a linear
classifier (`hidden=0`, default) or a one-hidden-layer MLP on the frozen, standardised embeddings:
cheap enough to run inside a selector (a few hundred small steps), deterministic for a seed.

The proxy's two inputs that cost real time, pseudo-labels and dynamics, are memoised in-process
per (embeddings, targets, options, seed) by `pseudo_labels_for` and `dynamics_for`: a sweep over
fractions trains each proxy once, and `train.embed.selector_inputs` fills the same memo that the
selectors then read.

Example:
    >>> import torch
    >>> from coreset_ext.proxy import train_proxy_classifier
    >>> x, y = torch.randn(200, 16), torch.randint(0, 4, (200,))
    >>> dyn = train_proxy_classifier(x, y, epochs=3, seed=0)
    >>> dyn.aum().shape, dyn.steps
    (torch.Size([200]), 6)
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import torch
from torch import nn

from coreset_ext._validation import Interval, check, check_tensor, positive_int
from coreset_ext.ops.similarity import EMBEDDING_DTYPES
from coreset_ext.pseudo_labels import pseudo_labels
from coreset_ext.scores import TrainingDynamics

__all__ = ["dynamics_for", "pseudo_labels_for", "train_proxy_classifier"]

TARGET_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MAX_WIDTH = 2**16  # hidden units, and classes (the output layer's width)


def train_proxy_classifier(features: torch.Tensor, targets: torch.Tensor, *, epochs: int = 20, batch_size: int = 128,
                           lr: float = 1e-2, weight_decay: float = 5e-4, hidden: int = 0, el2n_epochs: int = 2,
                           seed: int = 0, device: str | torch.device = "cpu",
                           fingerprint: str | None = None) -> TrainingDynamics:
    """Trains a classifier on (features, targets) with Adam, mini-batches in a seeded random order,
    and returns the per-example dynamics it recorded (on the CPU).

    Args:
        features: [N, D] float (frozen embeddings; standardised per feature here).
        targets: [N] int labels in 0 .. C-1 (pseudo-labels or ground truth), C >= 2.
        epochs, batch_size, lr, weight_decay: the optimisation (every example seen once per epoch).
        hidden: 0 for a linear classifier, else the width of one hidden ReLU layer.
        el2n_epochs: EL2N is averaged over the steps of the first `el2n_epochs` epochs.
        seed: seeds the initialisation and the batch order.
    """
    check_tensor("features", features, dim=2, dtypes=EMBEDDING_DTYPES, what="[N, D]")
    check_tensor("targets", targets, dim=1, dtypes=TARGET_DTYPES, what="[N]")
    n = features.shape[0]
    if n == 0:
        raise ValueError("features: the proxy classifier needs at least one example, got 0 rows")
    # 0: a linear classifier; the bound stops a typo from allocating terabytes of weights
    hidden = check("hidden", hidden, Interval(int, 0, MAX_WIDTH))
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} labels but features has {n} rows")
    if bool((targets < 0).any()):
        raise ValueError("targets: every example needs a label >= 0 (unknown labels, -1, cannot train the proxy)")
    num_classes = int(targets.max()) + 1
    if num_classes < 2:
        raise ValueError(f"targets: the proxy classifier needs at least 2 classes, got {num_classes}")
    if num_classes > MAX_WIDTH:  # one output per class id up to the largest
        raise ValueError(f"targets: the largest label is {num_classes - 1}; the proxy classifier takes labels below "
                         f"{MAX_WIDTH} (renumber sparse class ids 0, 1, 2, ...)")
    epochs = positive_int("epochs", epochs)
    batch_size = positive_int("batch_size", batch_size)
    device = torch.device(device)
    x = features.float()
    x = ((x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-6)).to(device)
    y = targets.long().to(device)
    g = torch.Generator().manual_seed(seed)
    torch_state = torch.get_rng_state()
    # nn.Linear's initialisation draws from the global CPU generator; torch.manual_seed would also
    # reseed every GPU's generator, which the caller's own random draws there would then repeat
    torch.default_generator.manual_seed(seed)
    try:
        d = x.shape[1]
        net = (nn.Linear(d, num_classes) if hidden == 0
               else nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))).to(device)
    finally:
        torch.set_rng_state(torch_state)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    dyn = TrainingDynamics(n, el2n_epochs=el2n_epochs, device=device, fingerprint=fingerprint)
    for epoch in range(epochs):
        for index in torch.randperm(n, generator=g).split(batch_size):
            index = index.to(device)
            logits = net(x[index])
            loss = nn.functional.cross_entropy(logits, y[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # The dynamics of the logits this step trained on (before the update), as in ELFS.
            dyn.update(logits.detach(), y[index], index, epoch=epoch)
    return dyn.to("cpu")


# ---------------------------------------------------------------------------------- the memo
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 16


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _memo(key: tuple, make):
    key = json.dumps(key, sort_keys=True, default=str)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = make()
    _CACHE[key] = value
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def dynamics_for(embeddings: torch.Tensor, targets: torch.Tensor, *, seed: int = 0, epochs: int = 20,
                 hidden: int = 0, el2n_epochs: int = 2) -> TrainingDynamics:
    """`train_proxy_classifier`'s dynamics on (embeddings, targets), memoised in-process (read-only use)."""
    key = ("dyn", tuple(embeddings.shape), _digest(embeddings.float()), _digest(targets.long()), seed, epochs,
           hidden, el2n_epochs)
    # Trained where the embeddings live (the GPU at scale); the dynamics come back on the CPU.
    return _memo(key, lambda: train_proxy_classifier(embeddings, targets.to(embeddings.device), epochs=epochs,
                                                     hidden=hidden, el2n_epochs=el2n_epochs, seed=seed,
                                                     device=embeddings.device))


def pseudo_labels_for(embeddings: torch.Tensor, n_clusters: int = 10, *, method: str = "kmeans", seed: int = 0,
                      **options) -> torch.Tensor:
    """`pseudo_labels.pseudo_labels`, memoised in-process like `dynamics_for`."""
    e = embeddings.float()
    return _memo(("pl", tuple(e.shape), _digest(e), n_clusters, method, options, seed),
                 lambda: pseudo_labels(e, n_clusters, method=method, seed=seed, **options))
