"""The trainer's one loss path: cx.nn.NTXentLoss / cx.nn.MoCoLoss on the model's bf16 outputs
under CPU autocast (no fp32 cast, one queue), against a float64 reference on fresh random inputs."""

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

import coreset_ext as cx
from coreset_ext.train import TrainConfig, Trainer, load_dataset
from coreset_ext.train.data import ArrayDataset


def _views(x, generator):
    """Fixed views: the trainer calls this twice per batch (view 1, then view 2)."""
    _views.calls += 1
    return x if _views.calls % 2 else 0.5 * x.flip(-1) + 0.1


def _reference_loss(method, p1, p2, temperature, queue):
    """Mean NT-Xent over [p1; p2], or MoCo InfoNCE of queries p1, keys p2 and `queue`, in float64."""
    p1, p2 = p1.double(), p2.double()
    q, k = torch.nn.functional.normalize(p1, dim=1), torch.nn.functional.normalize(p2, dim=1)
    b = p1.shape[0]
    if method == "simclr":
        z = torch.cat([q, k])
        sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
        return torch.nn.functional.cross_entropy(sim, target), (q * k).sum(1)
    negatives = torch.nn.functional.normalize(queue.double(), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / temperature
    return torch.nn.functional.cross_entropy(logits, torch.zeros(b, dtype=torch.long)), (q * k).sum(1)


@pytest.mark.parametrize("method", ["simclr", "moco"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_step_under_cpu_autocast_matches_a_float64_reference(method, seed):
    g = torch.Generator().manual_seed(100 + seed)  # fresh random inputs
    x = torch.randn(12, 20, generator=g)
    cfg = TrainConfig(method=method, amp="bf16", lr=0.0, weight_decay=0.0, batch_size=12, queue_size=16,
                      proj_dim=8, proj_hidden=16, device="cpu", progress=False, seed=seed)
    trainer = Trainer(cfg, TensorDataset(x), augment=_views)
    assert isinstance(trainer.criterion, cx.nn.NTXentLoss if method == "simclr" else cx.nn.MoCoLoss)
    seen = []
    trainer.criterion.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0].dtype, args[1].dtype)),
                                                with_kwargs=True)
    model = copy.deepcopy(trainer.model)  # the step's model before the step (lr 0: also after)
    queue = trainer.criterion.queue.clone() if method == "moco" else None
    _views.calls = 0
    loss, _ = trainer.step(torch.arange(12))
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the bf16 projections reach the loss, no fp32 cast
    v1, v2 = x, 0.5 * x.flip(-1) + 0.1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # lr 0 and a key model equal to the query model: both branches compute the same function
        p1, p2 = model(v1)[1], model(v2)[1]
    expect_loss, expect_cos = _reference_loss(method, p1, p2, cfg.temperature, queue)
    assert abs(loss - float(expect_loss)) < 1e-4
    torch.testing.assert_close(trainer.tracker.sums["css"].double(), expect_cos, rtol=1e-4, atol=1e-4)
    if method == "moco":  # the step's keys are the queue's next entries: one queue, MoCoLoss's
        trainer.criterion.flush_()
        torch.testing.assert_close(trainer.criterion.queue[:12].double(), p2.double(), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_training_under_cpu_autocast_runs_and_checkpoints_the_queue(tmp_path, method):
    full = load_dataset("digits")
    ds = ArrayDataset(full.data[:48].clone(), full.labels[:48].clone(), name="digits/slice")
    cfg = dict(method=method, amp="bf16", epochs=2, batch_size=16, width=4, proj_dim=8, proj_hidden=16,
               queue_size=32, device="cpu", progress=False)
    result = Trainer(TrainConfig(**cfg), ds, tmp_path / "a").fit()
    assert bool(torch.isfinite(result.scores()).all()) and all(h["loss"] == h["loss"] for h in result.history)
    # interrupted and resumed under autocast: the same scores (the queue travels in the checkpoint)
    Trainer(TrainConfig(**cfg), ds, tmp_path / "b").fit(stop_after_epochs=1)
    resumed = Trainer(TrainConfig(**cfg), ds, tmp_path / "b").fit()
    assert torch.equal(result.tracker.sums["css"], resumed.tracker.sums["css"])


def test_amp_settings_are_checked_and_bools_read_as_before():
    assert TrainConfig(amp=True).amp == "bf16" and TrainConfig(amp=False).amp == "off" and TrainConfig().amp is None
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
