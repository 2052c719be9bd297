"""Host overhead (issue 14): what one fwd+bwd of our losses costs where compute is nothing.

At B = 2 .. 64 on the CPU the arithmetic takes microseconds, so the time of a fwd+bwd is the
Python, dispatch and autograd machinery around it: the cost a training loop pays per step before
any kernel runs. Each case times ours ("coreset_ext") beside the plain eager PyTorch loss it
replaces ("eager"), written here from torch.nn.functional and independent of coreset_ext.reference:
the textbook NT-Xent (cat, normalise, 2B x 2B logits, cross entropy), MoCo InfoNCE (positive
logit beside B x K queue logits, cross entropy against class 0), F.cosine_similarity, and for
the modules the same losses plus what the module does besides (MoCo's ring write of the keys).
The target of issue 14: ours no slower than eager at B = 2 (`speedup of ours` >= 1.0 in the
table; "aten_calls" in the last column counts the operators one step enters, which the load of
a shared machine cannot blur). The "+scores" rows also add the positive cosines into a
ScoreTracker (sums and counts): ours through `tracker=` (checked on the device, no host
synchronisation), eager's through `tracker.update` (checked on the host).

Run: `python benchmarks/run.py --cpu -k host` (or `python -m pytest benchmarks/bench_host.py`);
on a GPU machine `python benchmarks/run.py --gpu -k host` times the same rows on CUDA (Triton).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

try:
    from benchmarks.common import measure
except ImportError:  # run from inside benchmarks/
    from common import measure

import coreset_ext as cx

T_NTXENT, T_MOCO = 0.5, 0.2
QUEUE = 256
SIZES = [(b, d) for b in (2, 8, 64) for d in (16, 128)]
OPS = ("nt_xent", "info_nce_queue", "pair_cosine", "NTXentLoss", "MoCoLoss", "NTXentLoss+scores")


# ---- the eager losses ours replace (plain torch.nn.functional, no coreset_ext)


def eager_nt_xent(z1, z2, t=T_NTXENT):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, b = z.shape[0], z1.shape[0]
    logits = (z @ z.T / t).fill_diagonal_(float("-inf"))
    return F.cross_entropy(logits, (torch.arange(n, device=z.device) + b) % n)


def eager_info_nce(q, k, queue, t=T_MOCO):
    q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class EagerMoCo:
    """MoCo's loss and queue as its reference code has them: logits against a snapshot of the
    queue, then the keys written into the ring."""

    def __init__(self, dim, size, device):
        self.queue = F.normalize(torch.randn(size, dim, device=device), dim=1)
        self.ptr = 0

    def __call__(self, q, k):
        loss = eager_info_nce(q, k, self.queue.clone())
        size = self.queue.shape[0]
        keys = F.normalize(k.detach()[-size:], dim=1)  # a batch larger than the queue keeps its last keys
        b = keys.shape[0]
        if self.ptr + b <= size:  # the usual case: batches that divide the queue
            self.queue[self.ptr:self.ptr + b] = keys
        else:
            self.queue.index_copy_(0, (self.ptr + torch.arange(b, device=keys.device)) % size, keys)
        self.ptr = (self.ptr + b) % size
        return loss


# ---- one fwd+bwd of each implementation


def _step(op: str, impl: str, b: int, d: int, device: str = "cpu"):
    """A function running one fwd+bwd of `op` by `impl` on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(b, d, generator=g).to(device).requires_grad_()
    z2 = torch.randn(b, d, generator=g).to(device).requires_grad_()
    queue = F.normalize(torch.randn(QUEUE, d, generator=g), dim=1).to(device)
    index = torch.randperm(4 * b, generator=g)[:b].to(device)
    ours = impl == "coreset_ext"
    if op == "nt_xent":
        loss = (lambda: cx.ops.nt_xent(z1, z2, T_NTXENT)) if ours else (lambda: eager_nt_xent(z1, z2))
        inputs = (z1, z2)
    elif op == "info_nce_queue":
        loss = (lambda: cx.ops.info_nce_queue(z1, z2, queue, T_MOCO)) if ours else (
            lambda: eager_info_nce(z1, z2, queue))
        inputs = (z1,)
    elif op == "pair_cosine":
        loss = (lambda: cx.ops.pair_cosine(z1, z2).sum()) if ours else (
            lambda: F.cosine_similarity(z1, z2, dim=1).sum())
        inputs = (z1, z2)
    elif op == "NTXentLoss":
        module = cx.nn.NTXentLoss(T_NTXENT) if ours else eager_nt_xent
        loss, inputs = (lambda: module(z1, z2)), (z1, z2)
    elif op == "MoCoLoss":
        module = cx.nn.MoCoLoss(d, QUEUE, T_MOCO).to(device) if ours else EagerMoCo(d, QUEUE, device)
        loss, inputs = (lambda: module(z1, z2)), (z1,)
    elif op == "NTXentLoss+scores":
        tracker = cx.ScoreTracker(4 * b, device=device)
        if ours:
            module = cx.nn.NTXentLoss(T_NTXENT)
            loss = lambda: module(z1, z2, index=index, tracker=tracker)  # noqa: E731
        else:
            def loss():
                out = eager_nt_xent(z1, z2)
                with torch.no_grad():
                    tracker.update(index, css=F.cosine_similarity(z1, z2, dim=1))
                return out
        inputs = (z1, z2)
    else:
        raise AssertionError(op)
    return lambda: torch.autograd.grad(loss(), inputs)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread while timing: at these sizes more threads only add scheduling noise
    (the machine is shared), and the host's own work is single-threaded either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# On a GPU the same rows time the Triton path, synchronised per step: at these sizes what a step
# costs there is still the host's launching (issue 14 measured 1.57 ms at B = 1024 on an H200).
CASES = [pytest.param("cpu", b, d, id=f"cpu-B{b}-d{d}") for b, d in SIZES] + [
    pytest.param("cuda", b, 128, id=f"cuda-B{b}-d128", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")]) for b in (2, 64, 1024)]


@pytest.mark.parametrize("impl", ["coreset_ext", "eager"])
@pytest.mark.parametrize("device,b,d", CASES)
@pytest.mark.parametrize("op", OPS)
def test_host(benchmark, op, device, b, d, impl):
    fn = _step(op, impl, b, d, device)
    size = {"B": b, "d": d, **({"K": QUEUE} if op in ("info_nce_queue", "MoCoLoss") else {})}
    benchmark.extra_info["metric_aten_calls"] = aten_calls(fn)
    measure(benchmark, fn, op=f"host {op}", impl=impl, size=size, device=device, dtype=torch.float32,
            pass_="fwd+bwd", warmup=20)


def aten_calls(fn) -> int:
    """How many operators one call of `fn` enters from Python or the autograd engine (not those
    an operator calls inside itself, ours from C++ included): a count the machine's load cannot
    blur, beside the timing it explains (each entry costs microseconds at these sizes). Our
    compiled CPU kernels (`coreset_ext::*_cpu`) count as one call each, like an ATen operator;
    the Python custom ops count once plus what their Python implementation calls."""
    fn()
    with torch.profiler.profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith(("aten::", "coreset_ext::"))
               and (e.cpu_parent is None or not _is_operator_in_cpp(e.cpu_parent.name)))


def _is_operator_in_cpp(name: str) -> bool:
    """An operator whose own calls run in C++: ATen's, and our compiled CPU kernels (the Python
    custom ops `coreset_ext::<op>` are not: what they call, Python calls)."""
    return name.startswith("aten::") or (name.startswith("coreset_ext::") and name.endswith("_cpu"))
