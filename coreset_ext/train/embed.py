"""Proxy embeddings for the selectors (SAS, ELFS), and `score`: CSS and embeddings of any encoder.

`score(encoder, data, views=m)` is what a user with a pre-trained encoder (CLIP, DINO, SimCLR...)
wants without training: each example's CSS (its mean positive-pair cosine over m pairs of views)
and its embedding.

SAS (METHODS.md, method 2) measures how alike two examples' augmentations are through a proxy
contrastive model: each example's embedding is the mean of its m views' L2-normalised
embeddings. With `augment=None` the one "view" is the clean example (the identity augmentation),
which is what the demo uses: the pipeline's frozen features, L2-normalised, at no extra cost.

Example:
    >>> import torch
    >>> from coreset_ext.train import load_dataset
    >>> from coreset_ext.train.models import build_model
    >>> from coreset_ext.train.embed import proxy_embeddings
    >>> ds = load_dataset("digits")
    >>> model = build_model("small_cnn", ds.sample_shape, width=8)
    >>> proxy_embeddings(model, ds, m=2, seed=0).shape
    torch.Size([1438, 16])
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from coreset_ext import ops
from coreset_ext._validation import Options, check, positive_int
from coreset_ext.io import read_npz, reading, save_npz
from coreset_ext.proxy import dynamics_for, pseudo_labels_for
from coreset_ext.reference import normalize
from coreset_ext.train.augment import Augment
from coreset_ext.train.data import ArrayDataset, as_data, read_pt
from coreset_ext.train.models import evaluating_on

__all__ = ["EMBEDDINGS_KIND", "load_embeddings", "proxy_embeddings", "save_embeddings", "score", "selector_inputs"]

AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
WHICH = Options("backbone", "projection")
EMBEDDINGS_KIND = "Embeddings"  # the `kind` of embeddings files (coreset_ext.io)


def _encode(model: nn.Module, x: torch.Tensor, which: str) -> torch.Tensor:
    out = model(x)
    if isinstance(out, tuple):  # a ContrastiveModel returns (backbone h, projection z)
        return out[0] if which == "backbone" else out[1]
    if which != "backbone":
        raise ValueError(f"which: {which!r} needs a model returning (h, z); this one returns one tensor")
    return out


@torch.no_grad()
def proxy_embeddings(model: nn.Module, dataset: ArrayDataset, m: int = 1, *, augment: AugmentFn | str | None = "auto",
                     which: str = "backbone", device: str | torch.device = "cpu", seed: int = 0,
                     batch_size: int = 1024) -> torch.Tensor:
    """Mean of the L2-normalised embeddings of m augmented views per example: float32 [N, D] on the CPU.

    Args:
        model: an encoder (x -> h) or a `ContrastiveModel` (x -> (h, z)); run in eval mode.
        dataset: the pool: an `ArrayDataset`, any map-style Dataset or a DataLoader (`data.as_data`).
        m: views per example (>= 1).
        augment: `(x, generator) -> view`; "auto" is `Augment.for_data(dataset)` (the trainer's
            default); None uses the clean example, once (m is then irrelevant).
        which: "backbone" (h, default) or "projection" (z) of a `ContrastiveModel`.
        device: where to run the model.
        seed: seeds the augmentations (same seed, same device -> identical embeddings).
        batch_size: examples per forward pass.
    """
    m = positive_int("m", m)  # views per example
    check("which", which, WHICH)
    dataset = as_data(dataset)
    if augment == "auto":
        augment = Augment.for_data(dataset.name, dataset.sample_shape)
    elif isinstance(augment, str):
        raise ValueError(f"augment must be 'auto', None or a callable (x, generator) -> view, got {augment!r}")
    views = 1 if augment is None else m
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    with evaluating_on(model, device):
        for s in range(0, len(dataset), batch_size):
            x = dataset.batch(torch.arange(s, min(s + batch_size, len(dataset))), device)
            acc = None
            for _ in range(views):
                v = x if augment is None else augment(x, gen)
                e = normalize(_encode(model, v, which).float())
                acc = e if acc is None else acc + e
            out.append((acc / views).cpu())
    return torch.cat(out)


METRICS = Options("css")


@torch.no_grad()
def score(encoder: nn.Module, data, *, views: int = 4, transform: Callable | None = None,
          augment: AugmentFn | None = None, metrics: tuple[str, ...] = ("css",), device: str | torch.device = "cpu",
          seed: int = 0, batch_size: int = 256, autocast: bool = False) -> dict[str, torch.Tensor]:
    """CSS and embeddings of a pre-trained `encoder` on `data`, without training.

    For every example, `views` pairs of views are encoded and the cosine of each pair's two
    embeddings averaged: its CSS (METHODS.md, method 1; low means the encoder finds its views
    unlike each other). The views come from `transform` (a per-example `x -> view`, e.g. a
    torchvision transform, called twice per pair), or from `augment` (`(batch, generator) -> views`),
    or, by default, the built-in augmentation of the data's modality, drawn from a generator seeded
    with `seed` on `device`: per batch, per pair, view 1 then view 2. A data set that yields two
    views per example ((view1, view2), y) gives one pair per example per call of its __getitem__.

    Args:
        encoder: any nn.Module mapping a batch to [batch, features] (a `ContrastiveModel`'s backbone
            output is used); run in eval mode, and left where it was.
        data: an `ArrayDataset`, any map-style Dataset (x, (x, y) or ((view1, view2), y)) or a DataLoader.
        metrics: which scores to compute ("css").
        autocast: encode under bf16 autocast on `device` (cosines are taken in float32).

    Returns:
        {"css": float32 [N], "embeddings": float32 [N, D] (the clean examples' encoder outputs)}, on the CPU.

    Example:
        >>> import torch, coreset_ext as cx
        >>> data = torch.utils.data.TensorDataset(torch.rand(32, 3, 8, 8), torch.arange(32) % 4)
        >>> encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 16))
        >>> out = cx.score(encoder, data, views=2, seed=0)
        >>> out["css"].shape, out["embeddings"].shape
        (torch.Size([32]), torch.Size([32, 16]))
    """
    views = positive_int("views", views)
    metrics = tuple(metrics)
    for m in metrics:
        check("metrics", m, METRICS)
    if transform is not None and augment is not None:
        raise ValueError("transform/augment: give one way to make views, not both")
    data = as_data(data, transform=transform)
    device = torch.device(device)
    if augment is None and not data.makes_views:
        augment = Augment.for_data(data.name, data.sample_shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    n = len(data)
    css, emb = torch.zeros(n), []

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return _encode(encoder, x, "backbone").float()

    with evaluating_on(encoder, device):
        for s in range(0, n, batch_size):
            index = torch.arange(s, min(s + batch_size, n))
            x = data.batch(index, device)
            emb.append(encode(x).cpu())
            if "css" not in metrics:
                continue
            total = torch.zeros(index.numel(), device=device)
            for _ in range(views):
                pair = data.views(index, device)
                if pair is None:
                    pair = (augment(x, gen), augment(x, gen))
                total += ops.pair_cosine(encode(pair[0]), encode(pair[1]))
            css[index] = (total / views).cpu()
    out = {"embeddings": torch.cat(emb)}
    if "css" in metrics:
        out["css"] = css
    return out


def save_embeddings(path: str | Path, arrays: dict[str, torch.Tensor], dataset: ArrayDataset, **meta) -> None:
    """Atomically writes `arrays` (e.g. {"train": [N, D] embeddings}) as an embeddings file of
    `dataset` (its name, size and fingerprint recorded), plus any further `meta` (JSON values)."""
    save_npz(path, {k: v.numpy() for k, v in arrays.items()},
             {"kind": EMBEDDINGS_KIND, "dataset": dataset.name, "dataset_size": len(dataset),
              "fingerprint": dataset.fingerprint, **meta})


def load_embeddings(path: str, *, key: str = "train", dataset_size: int | None = None) -> torch.Tensor:
    """A user's embeddings file as float32 [N, D]: .npy, .pt (a tensor), or .npz (array `key`, e.g.
    a run's embeddings.npz). With `dataset_size`, checks it has that many rows.

    Nothing is unpickled (.pt is read with weights_only); a file that cannot be read, or does not
    hold a finite 2-D float array with at least one row and column, is a ValueError naming it.
    """
    p = str(path)
    if p.endswith(".npy"):
        with reading(p, ".npy file"), open(p, "rb") as f:
            # np.load reads anything else as a zip or a pickle (and suggests allow_pickle=True)
            if f.read(6) != np.lib.format.MAGIC_PREFIX:
                raise ValueError("it does not start as a .npy file")
            f.seek(0)
            x = np.load(f, allow_pickle=False)
    elif p.endswith(".pt"):
        x = read_pt(p)
    elif p.endswith(".npz"):
        arrays = read_npz(p)  # ours (a run's embeddings.npz) or a plain one
        names = sorted(k for k in arrays if k != "__meta__")
        if key not in names:
            raise ValueError(f"key: {p} has no array {key!r} (it has {names})")
        x = arrays[key]
    else:
        raise ValueError(f"path: embeddings must be a .npy, .npz or .pt file, got {p}")
    is_array = isinstance(x, (np.ndarray, torch.Tensor))
    got = f"{x.dtype} array of shape {tuple(x.shape)}" if is_array else type(x).__name__
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        x = torch.from_numpy(x.astype(np.float32))
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"path: {p} must hold a 2-D float array [N, D], got {got}")
    if 0 in x.shape:
        raise ValueError(f"path: {p} must hold at least one embedding of at least one value, "
                         f"got shape {tuple(x.shape)}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):  # NaN rows evaluate to chance accuracy without a word
        raise ValueError(f"path: {p} holds NaN or Inf embeddings")
    if dataset_size is not None and x.shape[0] != dataset_size:
        raise ValueError(f"path: {p} has {x.shape[0]} rows but the data set has {dataset_size} examples")
    return x


def selector_inputs(model: nn.Module, train_ds: ArrayDataset, out_dir=None, *, m: int = 1,
                    augment: AugmentFn | str | None = None, n_clusters: int = 10, seeds: tuple[int, ...] = (0,),
                    device: str | torch.device = "cpu") -> dict:
    """Everything SAS, ELFS and the dynamics baselines need from a trained model, computed once.

    Returns {"embeddings": proxy embeddings [N, D] (`proxy_embeddings`, the clean examples by
    default), "dynamics": {("pseudo" | "labels", seed): TrainingDynamics}}. The dynamics are those
    `cx.select("elfs" | "aum" | "forgetting" | "el2n" | "ccs", embeddings=<these embeddings>,
    labels=..., seed=seed, n_clusters=n_clusters)` compute with their default proxy options: they
    land in the selectors' in-process cache, so those calls reuse them. With `out_dir`, writes
    proxy_embeddings.npz and dynamics_<kind>_seed<seed>.npz (loadable through the methods'
    `dynamics=` option) and adds their paths under "files".
    """
    train_ds = as_data(train_ds)
    emb = proxy_embeddings(model, train_ds, m, augment=augment, device=device)
    out = {"embeddings": emb, "dynamics": {}, "files": {}}
    for seed in seeds:
        out["dynamics"][("pseudo", seed)] = dynamics_for(emb, pseudo_labels_for(emb, n_clusters, seed=seed), seed=seed)
        if train_ds.has_labels and bool((train_ds.labels >= 0).all()):
            out["dynamics"][("labels", seed)] = dynamics_for(emb, train_ds.labels, seed=seed)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_embeddings(out_dir / "proxy_embeddings.npz", {"train": emb}, train_ds, which="proxy", m=m)
        out["files"]["embeddings"] = str(out_dir / "proxy_embeddings.npz")
        for (kind, seed), dyn in out["dynamics"].items():
            path = out_dir / f"dynamics_{kind}_seed{seed}.npz"
            dyn.fingerprint = train_ds.fingerprint
            dyn.save(path)
            out["files"][(kind, seed)] = str(path)
    return out
