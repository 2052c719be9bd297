"""A minimal SimCLR / MoCo v2 trainer that scores every example while it trains (CSS).

Each step: gather a batch by data set index (or take the next batch of a DataLoader over
`with_index(dataset)`), make two views (the data set's own, a user `transform`'s, or the built-in
augmentations of the data's modality, on the device), encode and compute the loss under autocast
with the library's own loss module (`cx.nn.NTXentLoss`, or `cx.nn.MoCoLoss`, whose queue is the
run's one queue), which also returns the positive-pair cosines; step the optimiser, and add the
cosines into a `ScoreTracker` at the examples' indices. After training, `tracker.mean()["css"]` is
each example's contrastive similarity score (METHODS.md, method 1): low means hard to pull together.

A run directory holds config.json (the run's record; `coreset-ext train --config` replays it),
metrics.csv (one row per epoch: loss, lr, throughput, CSS mean), checkpoints/last.pt and, beside
it, checkpoints/encoder.safetensors (the encoder's weights alone), then scores.npz.

Checkpoints are written atomically at the end of every `checkpoint_every` epochs and hold the
model(s), optimiser, MoCo queue, ScoreTracker and every RNG state, so a resumed run ends with the
same scores as one that was never interrupted (on the CPU; on a GPU, cuDNN picks convolution
algorithms that are not bit-reproducible unless `torch.use_deterministic_algorithms(True)`). A
run resumed on another kind of device continues with a fresh augmentation stream (with a
warning): generator states do not carry over between CPU and CUDA. A run over a user's
DataLoader takes its batches in the loader's own order: resumed, it continues with the loader's
next order, not the one an uninterrupted run would have drawn.

Several processes (torch.distributed initialised, e.g. `torchrun --nproc_per_node N -m
coreset_ext train ...`): the model trains under DistributedDataParallel, `batch_size` is the
global batch, and every rank draws the same permutation and the same augmentations for the whole
global batch and keeps its slice (`tensor_split`: sizes differ by at most one where N does not
divide the batch), so the examples, their views and their data set indices are the
single-process run's; the loss is gathered (`NTXentLoss(gather_distributed=True)`, MoCo's queue
takes every rank's keys), so loss and gradients are the single-process ones as well, except that
BatchNorm normalises each rank's slice by its own statistics unless `sync_bn` (SyncBatchNorm,
GPUs only). Each rank records its examples' scores and the tracker is synced at the end of every
epoch; rank 0 alone writes config.json, metrics, checkpoints and scores (the run directory must
be one every rank reads: all of them resume from it). A user DataLoader must use a
`DistributedSampler` over `with_index(dataset)` (its batches are then per rank).

Resume means resume: a run directory is only continued with the settings it was trained with
(the device, `epochs` raised, and the progress bar may change; anything else is refused with one
error naming every changed field), checkpoints carry a sha256 checked on load, and nothing in the
directory is written or removed before those checks pass. `resume=False` starts afresh and then
replaces the old run.

Example:
    >>> from coreset_ext.train import TrainConfig, Trainer, load_dataset
    >>> ds = load_dataset("digits")
    >>> result = Trainer(TrainConfig(method="simclr", epochs=1, progress=False), ds).fit()
    >>> result.scores().shape
    torch.Size([1438])
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from coreset_ext import distributed
from coreset_ext import nn as cxnn
from coreset_ext._validation import NONNEGATIVE_INT, POSITIVE_INT, Interval, Options, check, check_temperature
from coreset_ext.io import atomic_write_bytes
from coreset_ext.reference import MINING_K, pair_cosine
from coreset_ext.scores import ScoreTracker
from coreset_ext.train.augment import Augment
from coreset_ext.train.data import IndexedDataset, as_data
from coreset_ext.train.models import ENCODERS, PREFIXES, ContrastiveModel, ProjectionHead, as_encoder, build_encoder

logger = logging.getLogger(__name__)

# 2: a sha256 of the state, and the run's record; 3: the loss module's state (MoCoLoss's queue)
CHECKPOINT_VERSION = 3
METHODS = Options("simclr", "moco", "mining")
BASES = Options("simclr", "moco")  # the forms of the mining loss (METHODS.md section 4)
CSS_ON = Options("projection", "backbone")
AMP = Options("bf16", "off")
LR_SCHEDULES = Options("constant", "cosine")
METRICS_FIELDS = ("epoch", "loss", "lr", "throughput", "css_mean", "seconds")

# Upper bounds on the sizes that allocate (weights, the MoCo queue), far above any sensible run,
# so a mistyped number is an error naming it rather than an attempt to allocate terabytes.
MAX_WIDTH = 1024  # small_cnn: 2w x 2w x 9 conv weights, 38M at 1024
MAX_HEAD = 8192  # proj_dim, proj_hidden
MAX_QUEUE = 2**20  # MoCo negatives: queue_size x proj_dim floats
MAX_BATCH = 2**24  # examples per step (a larger batch than the data set is the whole data set)
TRAIN_SEED = Interval(int, 0, 2**32, closed="left")  # the trainer seeds generators with seed + small offsets

# TrainConfig fields a run may be resumed with changed: they change where and how long it runs,
# or what it prints, never what one epoch trains (`epochs` may not drop below the epochs done).
RESUMABLE_CHANGES = ("epochs", "device", "amp", "checkpoint_every", "progress", "sync_bn")
# (a cosine schedule's length is `epochs`: raising it on resume changes the rates from then on)


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as JSON with the run).

    temperature None picks the method's usual value (SimCLR 0.5, MoCo v2 0.2).
    method "mining": contrastive learning with mined potential samples (`cx.nn.PotentialMiningLoss`,
    its default settings) in the form `base` names: "simclr" (default: the batch, one encoder) or
    "moco" (a momentum encoder and the queue); `base` is None for the other methods.
    amp: "bf16" (autocast, the CPU's too), "off", or None: bf16 on CUDA, off on the CPU (True and
    False read as "bf16" and "off").
    encoder: "auto" (small_cnn for images and signals, mlp for vectors), "small_cnn", "resnet18"
    (torchvision's, CIFAR stem), "mlp", "torchvision:<name>" or "timm:<name>"; `pretrained` a
    local state dict for it (.pt/.pth/.safetensors).
    lr_schedule: "constant", or "cosine" (to 0 at the last epoch) after `warmup_epochs` of linear warm-up.
    sync_bn: under torch.distributed, BatchNorm statistics over the global batch (SyncBatchNorm;
    GPUs only); without it each rank normalises its own slice.
    """

    method: str = "simclr"
    base: str | None = None
    encoder: str = "auto"
    width: int = 32
    epochs: int = 20
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-5
    temperature: float | None = None
    proj_dim: int = 64
    proj_hidden: int = 128
    queue_size: int = 1024
    momentum: float = 0.99
    css_on: str = "projection"
    seed: int = 0
    device: str = "auto"
    amp: str | None = None
    checkpoint_every: int = 1
    progress: bool = True
    lr_schedule: str = "constant"
    warmup_epochs: int = 0
    pretrained: str | None = None
    sync_bn: bool = False

    def __post_init__(self) -> None:
        check("method", self.method, METHODS)
        if self.method == "mining":
            self.base = check("base", "simclr" if self.base is None else self.base, BASES)
        elif self.base is not None:
            raise ValueError(f"base applies to method 'mining' only (its form), got base={self.base!r} with "
                             f"method={self.method!r}")
        check("css_on", self.css_on, CSS_ON)
        check("encoder", self.encoder, str)
        if not self.encoder.startswith(PREFIXES):
            check("encoder", self.encoder, ENCODERS)
        check("pretrained", self.pretrained, None, str)
        check("device", self.device, str)
        check("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        self.warmup_epochs = check("warmup_epochs", self.warmup_epochs, NONNEGATIVE_INT)
        for name in ("epochs", "checkpoint_every"):
            setattr(self, name, check(name, getattr(self, name), POSITIVE_INT))
        for name, high in (("width", MAX_WIDTH), ("proj_dim", MAX_HEAD), ("proj_hidden", MAX_HEAD),
                           ("queue_size", MAX_QUEUE)):
            setattr(self, name, check(name, getattr(self, name), Interval(int, 1, high)))
        if self.method == "mining" and self.base == "moco" and self.queue_size < MINING_K:
            # said here, not by the loss once the data are loaded (as "n_mined", a setting not given)
            raise ValueError(f"queue_size must be at least {MINING_K} for method 'mining' with base 'moco' (each "
                             f"query mines {MINING_K} keys of the queue), got {self.queue_size}")
        # a contrastive batch needs negatives: two examples at least
        self.batch_size = check("batch_size", self.batch_size, Interval(int, 2, MAX_BATCH))
        self.seed = check("seed", self.seed, TRAIN_SEED)
        for name in ("lr", "weight_decay"):  # NaN or Inf would train to NaN without a word
            value = check(name, getattr(self, name), Interval(float, 0, None))
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
            setattr(self, name, value)
        self.momentum = check("momentum", self.momentum, Interval(float, 0, 1))
        if isinstance(self.amp, bool):
            self.amp = "bf16" if self.amp else "off"
        check("amp", self.amp, None, AMP)
        check("progress", self.progress, bool)
        check("sync_bn", self.sync_bn, bool)
        if self.temperature is None:
            self.temperature = 0.5 if "simclr" in (self.method, self.base) else 0.2
        self.temperature = check_temperature(self.temperature)

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, epoch: float) -> float:
        """The learning rate at `epoch` (fractional: step / steps per epoch) under `lr_schedule`."""
        if self.lr_schedule == "constant":
            return self.lr
        if epoch < self.warmup_epochs:
            return self.lr * (epoch + 1e-3) / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-9)
        return 0.5 * self.lr * (1 + math.cos(math.pi * min((epoch - self.warmup_epochs) / span, 1.0)))


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N" or "mps", checked against
    this machine: a device that is not here is a ValueError naming it, not a failure mid-run."""
    if isinstance(device, torch.device):
        device = str(device)
    check("device", device, str)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists dozens of device types this trainer cannot use
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asks for CUDA, but this torch ({torch.__version__}) sees no CUDA "
                         "device here; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} does not exist; this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {device!r} asks for Apple's MPS, which is not available here; use 'cpu' or 'auto'")
    return dev


_STATE_KEYS = ("run", "epoch", "model", "key_model", "criterion", "optimizer", "tracker", "shuffle_rng",
               "aug_rng", "aug_rng_device", "torch_rng", "history")


def write_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically writes `state` (torch.save) wrapped with its sha256, which `read_checkpoint` checks."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    out = io.BytesIO()
    torch.save({"format_version": CHECKPOINT_VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": payload}, out)
    atomic_write_bytes(path, out.getvalue())


def read_checkpoint(path: str | Path) -> dict:
    """The state `write_checkpoint` wrote to `path`, after checking its sha256, its version and its
    keys: a truncated, empty, corrupt, edited or foreign file is a ValueError naming the file."""
    def unusable(why: str) -> ValueError:
        return ValueError(f"checkpoint: {path} {why}; delete it, or start afresh with --no-resume (resume=False)")

    # torch raises a dozen types for a bad file (RuntimeError, UnpicklingError, EOFError, OSError
    # "Errno 22"...), with messages that are empty, a page long, or advise unpickling it: name the type only
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise unusable(f"cannot be read: it is truncated, empty or not a checkpoint ({type(e).__name__})") from None
    if not isinstance(outer, dict) or not {"format_version", "sha256", "payload"} <= outer.keys():
        raise unusable("is not a checkpoint with a checksum (one written before coreset-ext's checkpoint version 2, "
                       "or not a coreset-ext checkpoint), so it cannot be verified")
    if not isinstance(outer["format_version"], int) or outer["format_version"] > CHECKPOINT_VERSION:
        raise unusable(f"has checkpoint version {outer['format_version']!r}, newer than this coreset-ext's "
                       f"{CHECKPOINT_VERSION}")
    if outer["format_version"] < CHECKPOINT_VERSION:
        raise unusable(f"has checkpoint version {outer['format_version']}, written before the trainer kept its "
                       f"MoCo queue in cx.nn.MoCoLoss (version {CHECKPOINT_VERSION})")
    payload = outer["payload"]
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != outer["sha256"]:
        raise unusable("fails its sha256 check (corrupted or edited)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- as above; unlikely once the checksum matched
        raise unusable(f"holds an unreadable state ({type(e).__name__})") from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise unusable(f"lacks {missing}")
    return state


def run_changes(stored: dict, new: dict, epochs_done: int = 0) -> list[str]:
    """What differs between two run records (`Trainer.run_record`) in a way a resume cannot honour:
    "field: <stored> in the run, <new> now" for every changed field, the data set and the
    augmentation included; `epochs` only when it drops below `epochs_done`."""
    def fields(record: dict) -> dict:
        record = json.loads(json.dumps(record))  # tuples become lists, as in config.json
        train, data = record.get("train") or {}, record.get("data") or {}
        out = {k: v for k, v in train.items() if k not in RESUMABLE_CHANGES}
        out.update({"data set size": f"{data.get('size')} examples", "data set": data.get("fingerprint")})
        augment = record.get("augment")  # None: a custom augmentation function
        out.update({f"augment.{k}": v for k, v in augment.items()} if isinstance(augment, dict) else {"augment": None})
        return out

    old, now = fields(stored), fields(new)
    changes = [f"{k}: {old.get(k)} in the run, {now.get(k)} now" for k in dict.fromkeys([*now, *old])
               if old.get(k) != now.get(k)]
    if new["train"]["epochs"] < epochs_done:
        changes.append(f"epochs: {epochs_done} already trained, {new['train']['epochs']} now (give "
                       f"{epochs_done} or more to continue)")
    return changes


@dataclass
class TrainResult:
    model: ContrastiveModel
    tracker: ScoreTracker
    config: TrainConfig
    history: list[dict] = field(default_factory=list)

    def scores(self) -> torch.Tensor:
        """Per-example mean positive cosine (the CSS score), on the CPU."""
        return self.tracker.mean()["css"].cpu()


AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class Trainer:
    """Trains `config.method` on `data` and tracks CSS scores; `out_dir` enables checkpoints.

    Args:
        config: the run's settings.
        data: an `ArrayDataset`, any map-style Dataset (yielding x, (x, y) or ((view1, view2), y)),
            or a DataLoader over `with_index(dataset)` (its batches, workers and order are used).
        out_dir: the run directory (config.json, metrics.csv, checkpoints/, scores.npz).
        augment: `(batch, generator) -> view` replacing the built-in augmentation of the data's
            modality (tests pass a fixed one).
        transform: a per-example `x -> view`, called twice per example per step (as a torchvision
            transform); the views it makes reach the model as they are.
        model: any nn.Module encoder (its output width is found by a dry forward; a projection
            head is added) or a `ContrastiveModel`; None builds `config.encoder`.
        source: where the data came from, recorded in config.json (the CLI stores --data and
            --data-dir, so the config can be replayed).
    """

    def __init__(self, config: TrainConfig, data, out_dir: str | Path | None = None, *,
                 augment: AugmentFn | None = None, transform: Callable | None = None,
                 model: nn.Module | None = None, source: dict | None = None) -> None:
        self.config = config
        self.data = as_data(data, transform=transform)
        self.dataset = self.data
        self.loader = getattr(self.data, "loader", None)
        if self.loader is not None and not isinstance(self.loader.dataset, IndexedDataset):
            raise ValueError("data: a DataLoader's batches must carry each example's data set index, so that scores "
                             "land on the right example: build it over cx.with_index(dataset)")
        if self.loader is not None and not self.loader.drop_last and self.loader.batch_size \
                and len(self.data) % self.loader.batch_size == 1:
            raise ValueError(f"data: the DataLoader's last batch would hold one example ({len(self.data)} examples, "
                             f"batch_size {self.loader.batch_size}), which has no negatives; use drop_last=True or "
                             "another batch_size")
        if self.loader is not None and transform is not None:
            raise ValueError("transform: a DataLoader's data set makes its own views; put the transform in it "
                             "(yield ((view1, view2), y)), or pass the data set instead of the loader")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.source = source
        self.device = resolve_device(config.device)
        n = len(self.data)
        if n < 2:  # a contrastive batch needs negatives, and BatchNorm two examples per batch
            raise ValueError(f"dataset: contrastive training needs at least 2 examples (a batch of one has no "
                             f"negatives, and BatchNorm needs two per batch), got {n}")
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if self.world > 1:
            self._join_ranks(n)
        self.amp = (self.device.type == "cuda") if config.amp is None else config.amp == "bf16"
        self.augment = augment
        if augment is None and not self.data.makes_views:
            self.augment = Augment.for_data(self.data.name, self.data.sample_shape)
        torch.manual_seed(config.seed)
        self.custom_model = None if model is None else type(model).__name__
        if model is None or not isinstance(model, ContrastiveModel):
            probe = self._probe_batch()
            enc = (build_encoder(config.encoder, tuple(probe.shape[1:]), width=config.width,
                                 pretrained=config.pretrained)
                   if model is None else as_encoder(model, probe))
            model = ContrastiveModel(enc, ProjectionHead(enc.out_dim, config.proj_hidden, config.proj_dim))
        self.model = model.to(self.device)
        if self.world > 1 and config.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # what the training step calls: DDP averages the ranks' gradients in the backward
        self.forward_model = self.model if self.world == 1 else nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.key_model = None
        if config.method == "mining" and self.world > 1:
            raise ValueError("method: 'mining' does not run under torch.distributed yet (its loss gathers nothing)")
        if "moco" in (config.method, config.base):
            self.key_model = copy.deepcopy(self.model).requires_grad_(False)
            g = torch.Generator().manual_seed(config.seed + 1)
            self.criterion = (cxnn.MoCoLoss(config.proj_dim, config.queue_size, config.temperature,
                                            gather_distributed=self.world > 1) if config.method == "moco" else
                              cxnn.PotentialMiningLoss(config.temperature, dim=config.proj_dim,
                                                       queue_size=config.queue_size))
            with torch.no_grad():  # the queue's first keys: seeded apart from the model's initialisation
                self.criterion.queue.copy_(torch.nn.functional.normalize(
                    torch.randn(config.queue_size, config.proj_dim, generator=g), dim=1))
        else:
            self.criterion = (cxnn.NTXentLoss(config.temperature, gather_distributed=self.world > 1)
                              if config.method == "simclr" else cxnn.PotentialMiningLoss(config.temperature))
        self.criterion.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.tracker = ScoreTracker(n, ("css",), device=self.device, fingerprint=self.data.fingerprint)
        self.shuffle_gen = torch.Generator().manual_seed(config.seed)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(config.seed + 2)
        self.epoch = 0
        self.history: list[dict] = []

    def _join_ranks(self, n: int) -> None:
        """Under torch.distributed: this rank's GPU (torchrun's LOCAL_RANK) and what a run on
        several processes needs (every rank checks the same settings, so all raise together)."""
        if self.device.type == "cuda" and self.device.index is None:
            local = int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count()))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        if self.loader is None and min(self.config.batch_size, n) < 2 * self.world:
            raise ValueError(f"batch_size: {self.config.batch_size} is the global batch, split over {self.world} "
                             f"processes that need 2 examples each: give {2 * self.world} or more")
        if self.loader is not None and not isinstance(self.loader.sampler, torch.utils.data.DistributedSampler):
            raise ValueError("data: under torch.distributed a DataLoader must sample with a DistributedSampler over "
                             "cx.with_index(dataset), so that each process takes its own examples")
        if self.config.sync_bn and self.device.type != "cuda":
            raise ValueError(f"sync_bn: SyncBatchNorm runs on GPUs only, and this run is on {self.device}")

    def _probe_batch(self) -> torch.Tensor:
        """Two examples as the model will see them (views where the data make them): for the dry
        forward that finds an encoder's output width and input shape."""
        index = torch.arange(2)
        views = self.data.views(index)
        if views is not None:
            return views[0]
        return self.data.batch(index)

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoints" / "last.pt" if self.out_dir is not None else None

    @property
    def config_path(self) -> Path | None:
        return self.out_dir / "config.json" if self.out_dir is not None else None

    def run_record(self) -> dict:
        """What this run trains: its config, its data set, its augmentation (when it is a built-in
        one; a custom function or transform is recorded as None) and, for a model passed in, its
        class. config.json and the checkpoint hold it."""
        aug = self.augment.to_dict() if hasattr(self.augment, "to_dict") else None
        record = {"train": self.config.to_dict(),
                  "data": {"name": self.data.name, "size": len(self.data), "fingerprint": self.data.fingerprint},
                  "augment": aug}
        if self.custom_model is not None:
            record["model"] = self.custom_model
        return record

    def state_dict(self) -> dict:
        return {
            "run": self.run_record(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "key_model": self.key_model.state_dict() if self.key_model is not None else None,
            "criterion": {k: v.cpu() for k, v in self.criterion.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "tracker": self.tracker.state_dict(),
            "shuffle_rng": self.shuffle_gen.get_state(),
            "aug_rng": self.aug_gen.get_state().cpu(),
            "aug_rng_device": self.aug_gen.device.type,
            "torch_rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
        }

    def save_checkpoint(self) -> None:
        write_checkpoint(self.checkpoint_path, self.state_dict())
        export_encoder(self.model.encoder, self.checkpoint_path.parent / "encoder.safetensors")

    def check_resumable(self, stored: dict, epochs_done: int, source: str | Path) -> None:
        """ValueError naming every field of `stored` (a run record read from `source`) that this
        run changes in a way a resume cannot honour (`run_changes`)."""
        changes = run_changes(stored, self.run_record(), epochs_done)
        if changes:
            raise ValueError(f"resume: {source} was trained with other settings: {'; '.join(changes)}. Resume "
                             "with the run's settings, or start afresh with --no-resume (resume=False), which "
                             "replaces that run")

    def load_checkpoint(self, path: str | Path) -> None:
        """Continues from the checkpoint at `path` (verified, and checked to be this run's)."""
        state = read_checkpoint(path)
        self.check_resumable(state["run"], int(state["epoch"]), path)
        try:
            self.model.load_state_dict(state["model"])
            if self.key_model is not None:
                self.key_model.load_state_dict(state["key_model"])
            self.criterion.load_state_dict(state["criterion"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.tracker.load_state_dict(state["tracker"])
            self.shuffle_gen.set_state(state["shuffle_rng"])
            torch.set_rng_state(state["torch_rng"])
            history = json.loads(state["history"])
        except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as e:
            # the record matched, so this is a custom model or a state written by hand
            raise ValueError(f"checkpoint: {path} does not fit this run's model and state ({type(e).__name__}: "
                             f"{e}); start afresh with --no-resume (resume=False)") from None
        if state["aug_rng_device"] == self.aug_gen.device.type:
            self.aug_gen.set_state(state["aug_rng"])
        else:
            self.aug_gen.manual_seed(self.config.seed + 2 + 1_000_003 * int(state["epoch"]))
            warnings.warn(f"{path} was written by a run on {state['aug_rng_device']}, resumed here on "
                          f"{self.aug_gen.device.type}: its augmentation random state does not carry over, so "
                          "the views differ from an uninterrupted run's from here on", stacklevel=2)
        self.epoch = int(state["epoch"])
        self.history = history
    def _open_run_dir(self, resume: bool) -> None:
        """Checks, then takes over `out_dir`: continues its checkpoint (resume) or starts afresh.

        Every check comes first (a checkpoint of another run, or config.json of one that has not
        checkpointed yet, refuses); only then is the directory changed: an old run's checkpoint is
        removed when starting afresh, and its scores and embeddings (which describe the run as it
        ended, and the pipeline writes embeddings.npz after `fit`) are removed before training
        changes the run, so a directory never pairs this config.json with another run's outputs.
        Under torch.distributed every rank reads the directory, then rank 0 alone writes.
        """
        problem = resuming = None
        try:
            resuming = self._read_run_dir(resume)
        except Exception as e:  # noqa: BLE001  (re-raised by agree, on every rank)
            problem = e
        distributed.agree(problem)  # every rank has read the directory (or every rank raises)
        if self.rank == 0:
            self._write_run_dir(resuming)
        distributed.agree(None)  # and no rank trains before rank 0 has written

    def _read_run_dir(self, resume: bool) -> bool:
        """The checks of `_open_run_dir`, and the checkpoint loaded when resuming: whether it was."""
        resuming = resume and self.checkpoint_path.exists()  # a folder there is an unreadable checkpoint
        if resuming:
            self.load_checkpoint(self.checkpoint_path)
        elif resume and self.config_path.is_file():  # a run stopped before its first checkpoint
            try:
                stored = json.loads(self.config_path.read_text())
                ok = isinstance(stored, dict) and isinstance(stored.get("train"), dict) \
                    and isinstance(stored.get("data"), dict)
            except (OSError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"resume: {self.config_path} is not a training run's config.json; use another "
                                 "output directory, or --no-resume (resume=False) to replace what is there")
            self.check_resumable(stored, 0, self.config_path)
        return resuming

    def _write_run_dir(self, resuming: bool) -> None:
        """`_open_run_dir`'s writes, once its checks passed."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = ["scores.npz", "embeddings.npz"] + ([] if resuming else ["checkpoints/last.pt",
                                                                       "checkpoints/encoder.safetensors", "metrics.csv"])
        for name in stale:
            (self.out_dir / name).unlink(missing_ok=True)
        extra = {"source": self.source} if self.source is not None else {}
        atomic_write_bytes(self.config_path, json.dumps(
            {**self.run_record(), **extra, "resolved": {"device": str(self.device), "amp": "bf16" if self.amp else "off"}},
            indent=2).encode())

    # ---------------------------------------------------------------- training
    def _batches(self):
        """This epoch's batches: (index, x, views), x the clean batch or None where views are given."""
        if self.loader is not None:
            if hasattr(self.loader.sampler, "set_epoch"):  # a DistributedSampler's order per epoch
                self.loader.sampler.set_epoch(self.epoch)
            for batch in self.loader:
                index, x = batch[0], batch[1]
                if isinstance(x, (list, tuple)):
                    yield index, None, tuple(v.float().to(self.device) for v in x)
                else:
                    yield index, self.data.canonical(x, "data").to(self.device), None
            return
        n, b = len(self.data), self.config.batch_size
        perm = torch.randperm(n, generator=self.shuffle_gen)
        batches = list(perm.split(b))
        # a 1-example batch has no negatives (and under torch.distributed every rank needs 2)
        if len(batches) > 1 and batches[-1].numel() < 2 * self.world:
            batches[-2] = torch.cat([batches[-2], batches.pop()])
        for index in batches:
            views = self.data.views(index, self.device)
            yield index, (self.data.batch(index, self.device) if views is None else None), views

    def _steps_per_epoch(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        n, b = len(self.data), self.config.batch_size
        return max(1, n // b + (1 if n % b >= 2 * self.world else 0)) if n > b else 1

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.config.momentum
        for pk, pq in zip(self.key_model.parameters(), self.model.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)
        for bk, bq in zip(self.key_model.buffers(), self.model.buffers()):
            bk.copy_(bq)

    def step(self, index: torch.Tensor, x: torch.Tensor | None = None,
             views: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[float, torch.Tensor]:
        """One optimisation step on the examples at `index` (their clean batch `x`, or their two
        `views`; read from the data when neither is given); returns (loss, positive cosines), the
        cosines recorded in the tracker."""
        cfg = self.config
        if views is None:
            if x is None:
                views = self.data.views(index, self.device)
                x = self.data.batch(index, self.device) if views is None else None
            if views is None:
                with torch.no_grad():
                    views = (self.augment(x, self.aug_gen), self.augment(x, self.aug_gen))
        v1, v2 = views
        index = index.to(self.device)
        if self.world > 1 and self.loader is None:  # this rank's slice of the global batch
            b = v1.shape[0]
            start = self.rank * (b // self.world) + min(self.rank, b % self.world)  # as tensor_split
            mine = slice(start, start + b // self.world + (self.rank < b % self.world))
            v1, v2, index = v1[mine], v2[mine], index[mine]
        if v1.shape[0] < 2:
            raise ValueError(f"data: a batch of {v1.shape[0]} example has no negatives; use batches of 2 or more")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            h1, p1 = self.forward_model(v1)
            if self.key_model is None:  # SimCLR, or the mining loss in its SimCLR form
                h2, p2 = self.forward_model(v2)
            else:
                self._momentum_update()
                with torch.no_grad():
                    h2, p2 = self.key_model(v2)
            # the positive cosines go into the tracker inside the loss (no host synchronisation)
            on_projection = cfg.css_on == "projection"
            loss, cos = self.criterion(p1, p2, index=index if on_projection else None,
                                       tracker=self.tracker if on_projection else None, return_cos=True)
        if not on_projection:
            cos = pair_cosine(h1.detach().float(), h2.detach().float())
            self.tracker.record(index, css=cos)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), cos

    def _set_lr(self, epoch: float) -> float:
        lr = self.config.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def write_metrics(self) -> None:
        """metrics.csv: one row per epoch trained (METRICS_FIELDS), rewritten atomically."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRICS_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(self.history)
        atomic_write_bytes(self.out_dir / "metrics.csv", buf.getvalue().encode())

    def fit(self, *, resume: bool = True, stop_after_epochs: int | None = None) -> TrainResult:
        """Trains to `config.epochs` (resuming from `out_dir`'s checkpoint when `resume` and one exists).

        `stop_after_epochs` stops early after that many epochs of this call (for tests and budgets).
        """
        cfg = self.config
        if self.out_dir is not None:
            self._open_run_dir(resume)
        from tqdm.auto import tqdm

        steps = self._steps_per_epoch()
        last = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, self.epoch + stop_after_epochs)
        bar = tqdm(total=cfg.epochs * steps, initial=self.epoch * steps, disable=not cfg.progress or self.rank > 0,
                   desc=f"{cfg.method}", unit="step", dynamic_ncols=True)
        self.model.train()
        while self.epoch < last:
            t0, seen, total = time.perf_counter(), 0, 0.0
            css = torch.zeros((), device=self.device)  # summed on the device: read once per epoch
            for k, (index, x, views) in enumerate(self._batches()):
                lr = self._set_lr(self.epoch + k / steps)
                loss, cos = self.step(index, x, views)
                seen += cos.numel()  # this rank's examples
                total += loss * cos.numel()
                css += cos.detach().float().sum()
                bar.update(1)
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{loss:.3f}",
                                ex_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
            self.epoch += 1
            if self.world > 1:  # every rank's examples: the epoch's figures and the scores
                totals = torch.tensor([total, float(css), seen], dtype=torch.float64, device=self.device)
                distributed.all_reduce_(totals)
                total, css, seen = totals.tolist()
                self.tracker.sync()
            seconds, css = time.perf_counter() - t0, float(css)
            self.history.append({"epoch": self.epoch, "loss": total / seen, "lr": lr,
                                 "throughput": seen / max(seconds, 1e-9), "css_mean": css / seen, "seconds": seconds})
            logger.debug("%s epoch %d/%d: loss %.4f, lr %.3g, %.0f examples/s, CSS mean %.4f", cfg.method, self.epoch,
                        cfg.epochs, total / seen, lr, self.history[-1]["throughput"], css / seen)
            if self.out_dir is not None and self.rank == 0:
                self.write_metrics()
                if self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs:
                    self.save_checkpoint()
        bar.close()
        if self.out_dir is not None and self.epoch == cfg.epochs:
            self.tracker.save(self.out_dir / "scores.npz")
        return TrainResult(self.model, self.tracker, cfg, self.history)


def export_encoder(encoder: nn.Module, path: str | Path) -> None:
    """Writes `encoder`'s weights (its state dict, on the CPU, contiguous) as a .safetensors file,
    atomically: what `build_encoder(..., pretrained=path)` or any safetensors reader loads."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write_bytes(path, save(state))


def train(config: TrainConfig, data, out_dir: str | Path | None = None, **kwargs) -> TrainResult:
    """Functional form: `Trainer(config, data, out_dir).fit(**kwargs)`."""
    return Trainer(config, data, out_dir).fit(**kwargs)
