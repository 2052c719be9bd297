"""A minimal SimCLR / MoCo v2 trainer that scores every example while it trains (CSS).

Each step: gather a batch by data set index, make two augmented views on the device, encode,
compute the contrastive loss and the positive-pair cosines in one call
(`losses.contrastive_step_loss`), step the optimiser, and scatter-add the cosines into a
`ScoreTracker` at the examples' indices. After training, `tracker.mean()["css"]` is each example's
contrastive similarity score (METHODS.md, method 1): low means hard to pull together.

Checkpoints are written atomically at the end of every `checkpoint_every` epochs and hold the
model(s), optimiser, MoCo queue, ScoreTracker and every RNG state, so a resumed run ends with the
same scores as one that was never interrupted (on the CPU; on a GPU, cuDNN picks convolution
algorithms that are not bit-reproducible unless `torch.use_deterministic_algorithms(True)`). A
run resumed on another kind of device continues with a fresh augmentation stream (with a
warning): generator states do not carry over between CPU and CUDA.

Example:
    >>> from coreset_ext.train import TrainConfig, Trainer, load_dataset
    >>> ds = load_dataset("digits")
    >>> result = Trainer(TrainConfig(method="simclr", epochs=1, progress=False), ds).fit()
    >>> result.scores().shape
    torch.Size([1438])
"""

from __future__ import annotations

import copy
import io
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from coreset_ext._validation import POSITIVE_INT, Interval, Options, check, check_temperature
from coreset_ext.io import atomic_write_bytes
from coreset_ext.reference import normalize, pair_cosine
from coreset_ext.scores import ScoreTracker
from coreset_ext.train.augment import Augment
from coreset_ext.train.data import ArrayDataset
from coreset_ext.train.losses import contrastive_step_loss
from coreset_ext.train.models import ContrastiveModel, build_model

CHECKPOINT_VERSION = 1
METHODS = Options("simclr", "moco")
CSS_ON = Options("projection", "backbone")


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as JSON with the run).

    temperature None picks the method's usual value (SimCLR 0.5, MoCo v2 0.2).
    amp None means bf16 autocast on CUDA, off on the CPU.
    """

    method: str = "simclr"
    encoder: str = "small_cnn"
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
    amp: bool | None = None
    checkpoint_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        check("method", self.method, METHODS)
        check("css_on", self.css_on, CSS_ON)
        for name in ("epochs", "queue_size", "checkpoint_every"):
            setattr(self, name, check(name, getattr(self, name), POSITIVE_INT))
        # a contrastive batch needs negatives: two examples at least
        self.batch_size = check("batch_size", self.batch_size, Interval(int, 2, None))
        if self.temperature is None:
            self.temperature = 0.5 if self.method == "simclr" else 0.2
        self.temperature = check_temperature(self.temperature)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class TrainResult:
    model: ContrastiveModel
    tracker: ScoreTracker
    config: TrainConfig
    history: list[dict] = field(default_factory=list)

    def scores(self) -> torch.Tensor:
        """Per-example mean positive cosine (the CSS score), on the CPU."""
        return self.tracker.mean()["css"].cpu()


class Trainer:
    """Trains `config.method` on `dataset` and tracks CSS scores; `out_dir` enables checkpoints.

    `augment(x, generator) -> view` may replace the default augmentation (tests pass a fixed one).
    """

    def __init__(self, config: TrainConfig, dataset: ArrayDataset, out_dir: str | Path | None = None, *,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 model: ContrastiveModel | None = None) -> None:
        self.config = config
        self.dataset = dataset
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = resolve_device(config.device)
        self.amp = (self.device.type == "cuda") if config.amp is None else bool(config.amp)
        torch.manual_seed(config.seed)
        self.model = (model or build_model(config.encoder, dataset.sample_shape, proj_dim=config.proj_dim,
                                           proj_hidden=config.proj_hidden, width=config.width)).to(self.device)
        self.key_model = None
        self.queue = None
        self.queue_ptr = 0
        if config.method == "moco":
            self.key_model = copy.deepcopy(self.model).requires_grad_(False)
            g = torch.Generator().manual_seed(config.seed + 1)
            self.queue = normalize(torch.randn(config.queue_size, config.proj_dim, generator=g)).to(self.device)
        self.augment = augment or Augment.for_data(dataset.name, dataset.sample_shape)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.tracker = ScoreTracker(len(dataset), ("css",), device=self.device, fingerprint=dataset.fingerprint)
        self.shuffle_gen = torch.Generator().manual_seed(config.seed)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(config.seed + 2)
        self.epoch = 0
        self.history: list[dict] = []

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoints" / "last.pt" if self.out_dir is not None else None

    def state_dict(self) -> dict:
        return {
            "format_version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "dataset_size": len(self.dataset),
            "fingerprint": self.dataset.fingerprint,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "key_model": self.key_model.state_dict() if self.key_model is not None else None,
            "queue": self.queue.cpu() if self.queue is not None else None,
            "queue_ptr": self.queue_ptr,
            "optimizer": self.optimizer.state_dict(),
            "tracker": self.tracker.state_dict(),
            "shuffle_rng": self.shuffle_gen.get_state(),
            "aug_rng": self.aug_gen.get_state().cpu(),
            "aug_rng_device": self.aug_gen.device.type,
            "torch_rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
        }

    def save_checkpoint(self) -> None:
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        atomic_write_bytes(self.checkpoint_path, buf.getvalue())

    def load_checkpoint(self, path: str | Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["format_version"] > CHECKPOINT_VERSION:
            raise ValueError(f"{path} has checkpoint version {state['format_version']}, newer than {CHECKPOINT_VERSION}")
        if state["dataset_size"] != len(self.dataset):
            raise ValueError(f"dataset size: the checkpoint {path} was written for {state['dataset_size']} examples, "
                             f"but this data set has {len(self.dataset)}")
        if state["fingerprint"] != self.dataset.fingerprint:
            raise ValueError(f"fingerprint: the checkpoint {path} was written for data set {state['fingerprint']}, "
                             f"but this data set is {self.dataset.fingerprint}")
        if state["config"]["method"] != self.config.method:
            raise ValueError(f"method: the checkpoint {path} trained {state['config']['method']!r}, "
                             f"this run asks for {self.config.method!r}")
        self.model.load_state_dict(state["model"])
        if self.key_model is not None:
            self.key_model.load_state_dict(state["key_model"])
            self.queue = state["queue"].to(self.device)
            self.queue_ptr = int(state["queue_ptr"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.shuffle_gen.set_state(state["shuffle_rng"])
        saved_on = state.get("aug_rng_device")  # absent from older checkpoints: judge by the state's size
        if saved_on == self.aug_gen.device.type or (
                saved_on is None and state["aug_rng"].numel() == self.aug_gen.get_state().numel()):
            self.aug_gen.set_state(state["aug_rng"])
        else:
            self.aug_gen.manual_seed(self.config.seed + 2 + 1_000_003 * int(state["epoch"]))
            warnings.warn(f"{path} was written by a run on {saved_on or 'another device'}, resumed here on "
                          f"{self.aug_gen.device.type}: its augmentation random state does not carry over, so "
                          "the views differ from an uninterrupted run's from here on", stacklevel=2)
        torch.set_rng_state(state["torch_rng"])
        self.epoch = int(state["epoch"])
        self.history = json.loads(state["history"])

    # ---------------------------------------------------------------- training
    def _batches(self) -> list[torch.Tensor]:
        n, b = len(self.dataset), self.config.batch_size
        perm = torch.randperm(n, generator=self.shuffle_gen)
        batches = list(perm.split(b))
        if len(batches) > 1 and batches[-1].numel() < 2:  # a 1-example batch has no negatives
            batches[-2] = torch.cat([batches[-2], batches.pop()])
        return batches

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.config.momentum
        for pk, pq in zip(self.key_model.parameters(), self.model.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)
        for bk, bq in zip(self.key_model.buffers(), self.model.buffers()):
            bk.copy_(bq)

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor) -> None:
        k = normalize(k.float())
        size = self.queue.shape[0]
        pos = (self.queue_ptr + torch.arange(k.shape[0], device=k.device)) % size
        self.queue[pos[-size:]] = k[-size:]
        self.queue_ptr = int((self.queue_ptr + k.shape[0]) % size)

    def step(self, index: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One optimisation step on the examples at `index`; returns (loss, positive cosines)."""
        cfg = self.config
        x = self.dataset.batch(index, self.device)
        with torch.no_grad():
            v1 = self.augment(x, self.aug_gen)
            v2 = self.augment(x, self.aug_gen)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            h1, p1 = self.model(v1)
            if cfg.method == "simclr":
                h2, p2 = self.model(v2)
            else:
                self._momentum_update()
                with torch.no_grad():
                    h2, p2 = self.key_model(v2)
        loss, cos = contrastive_step_loss(cfg.method, p1, p2, cfg.temperature, self.queue)
        if cfg.css_on == "backbone":
            cos = pair_cosine(h1.detach().float(), h2.detach().float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.tracker.update(index.to(self.device), css=cos.detach().float())
        if cfg.method == "moco":
            self._enqueue(p2)
        return float(loss.detach()), cos

    def fit(self, *, resume: bool = True, stop_after_epochs: int | None = None) -> TrainResult:
        """Trains to `config.epochs` (resuming from `out_dir`'s checkpoint when `resume` and one exists).

        `stop_after_epochs` stops early after that many epochs of this call (for tests and budgets).
        """
        cfg = self.config
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.out_dir / "config.json", json.dumps(
                {"train": cfg.to_dict(), "resolved": {"device": str(self.device), "amp": self.amp},
                 "data": {"name": self.dataset.name, "size": len(self.dataset),
                                                  "fingerprint": self.dataset.fingerprint}}, indent=2).encode())
            if resume and self.checkpoint_path.exists():
                self.load_checkpoint(self.checkpoint_path)
        from tqdm.auto import tqdm

        n = len(self.dataset)
        steps = -(-n // cfg.batch_size)
        last = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, self.epoch + stop_after_epochs)
        bar = tqdm(total=cfg.epochs * steps, initial=self.epoch * steps, disable=not cfg.progress,
                   desc=f"{cfg.method}", unit="step", dynamic_ncols=True)
        self.model.train()
        while self.epoch < last:
            t0, seen, total = time.perf_counter(), 0, 0.0
            batches = self._batches()
            for index in batches:
                loss, _ = self.step(index)
                seen += index.numel()
                total += loss * index.numel()
                bar.update(1)
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{loss:.3f}",
                                img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
            self.epoch += 1
            self.history.append({"epoch": self.epoch, "loss": total / seen,
                                 "seconds": time.perf_counter() - t0})
            if self.out_dir is not None and (self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs):
                self.save_checkpoint()
        bar.close()
        if self.out_dir is not None and self.epoch == cfg.epochs:
            self.tracker.save(self.out_dir / "scores.npz")
        return TrainResult(self.model, self.tracker, cfg, self.history)


def train(config: TrainConfig, dataset: ArrayDataset, out_dir: str | Path | None = None, **kwargs) -> TrainResult:
    """Functional form: `Trainer(config, dataset, out_dir).fit(**kwargs)`."""
    return Trainer(config, dataset, out_dir).fit(**kwargs)
