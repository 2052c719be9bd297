"""What contrastive learning with mined potential samples costs (issue 18), against the plain loss it extends.

Two groups, each case timing the mining loss as "coreset_ext" beside the plain loss in the same run,
so `speedup of ours` is plain / mining (below 1: the mining costs that much more):
- "potential_mining": the loss alone, fwd+bwd. SimCLR form (`ops.potential_mining(z1, z2)`)
  against "nt_xent" (`ops.nt_xent`), MoCo form (against a queue) against "info_nce_queue"; each
  with the op's default backend (on the CPU: the chunked reference for the mining, the compiled
  C++ kernels or the reference for the plain losses; Triton on a GPU).
- "train_step": one step of the trainer on digits (augmentations, encoder fwd+bwd, loss, AdamW),
  `Trainer.step`, method "mining" (base simclr / moco) against "simclr" / "moco" at the same batch.

Run: `python benchmarks/run.py --cpu -k mining` (or `python -m pytest benchmarks/bench_mining.py`).
"""

from __future__ import annotations

import pytest
import torch

try:
    from benchmarks.common import devices, measure
except ImportError:  # run from inside benchmarks/
    from common import devices, measure

from coreset_ext import ops

D = 64  # the trainer's projection width
QUEUE = 4096


def _loss(impl: str, form: str):
    """The fwd+bwd under test: impl "coreset_ext" the mining loss, otherwise the plain one."""
    if form == "simclr":
        return (lambda a, b, queue: ops.potential_mining(a, b)) if impl == "coreset_ext" else \
            (lambda a, b, queue: ops.nt_xent(a, b, 0.5))
    return (lambda a, b, queue: ops.potential_mining(a, b, queue, 0.2)) if impl == "coreset_ext" else \
        (lambda a, b, queue: ops.info_nce_queue(a, b, queue, 0.2))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("form,b", [("simclr", 64), ("simclr", 256), ("moco", 64), ("moco", 256)])
@pytest.mark.parametrize("impl", ["coreset_ext", "plain"])
def test_potential_mining(benchmark, device, form, b, impl):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(b, D, generator=g).to(device).requires_grad_(True)
    z2 = (z1.detach() + 0.5 * torch.randn(b, D, generator=g).to(device)).requires_grad_(form == "simclr")
    queue = torch.randn(QUEUE, D, generator=g).to(device) if form == "moco" else None
    loss_fn = _loss(impl, form)

    def step():
        loss_fn(z1, z2, queue).backward()

    name = impl if impl == "coreset_ext" else ("nt_xent" if form == "simclr" else "info_nce_queue")
    size = {"form": form, "B": b, "d": D} | ({"K": QUEUE} if form == "moco" else {})
    measure(benchmark, step, op="potential_mining", impl=name, size=size, device=device, dtype=torch.float32,
            pass_="fwd+bwd")


@pytest.mark.parametrize("device", ["cpu"])  # the trainer's CPU step (run.py --cpu selects by the id)
@pytest.mark.parametrize("base", ["simclr", "moco"])
@pytest.mark.parametrize("impl", ["coreset_ext", "plain"])
def test_train_step(benchmark, device, base, impl):
    from coreset_ext.train import TrainConfig, Trainer, load_dataset

    ds = load_dataset("digits")
    method = {"method": "mining", "base": base} if impl == "coreset_ext" else {"method": base}
    trainer = Trainer(TrainConfig(**method, epochs=1, batch_size=256, progress=False, device=device), ds)
    index = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:256]
    measure(benchmark, lambda: trainer.step(index), op="train_step", impl=impl if impl == "coreset_ext" else base,
            size={"data": "digits", "B": 256, "base": base}, device=device, dtype=torch.float32, pass_="fwd+bwd")
