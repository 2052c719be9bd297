"""Several processes (issue 20): gathered losses, tracker sync, sharded KMeans, DDP training.

Every multi-process test runs real processes on the gloo backend (torch.multiprocessing, spawn)
and compares what each rank computed with an independent single-process oracle on the
concatenated data (naive float64 formulas, a single-process tracker or KMeans, plain autograd).
Nothing can hang: the process group times out after GROUP_TIMEOUT seconds, and `_spawn` kills
the ranks and fails the test after JOIN_TIMEOUT. Each spawned run does several checks (starting a
process costs seconds on a shared CPU), and module-scoped fixtures share a run between tests.
The same code serves NCCL; `test_nccl_gather_loss` runs it on GPUs where there are two.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import coreset_ext as cx
from coreset_ext import distributed

GROUP_TIMEOUT = 30  # seconds a collective waits for a missing rank before it raises
JOIN_TIMEOUT = 120  # seconds a whole spawned run may take


# ---------------------------------------------------------------- harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, job, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
    try:
        result = job(rank, world, *args)
    except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test with it)
        result = {"crashed": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def _spawn(job, world: int, *args, backend: str = "gloo") -> list:
    """Runs job(rank, world, *args) on `world` processes; returns each rank's result."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, backend, job, args, out)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=JOIN_TIMEOUT)
        for p in procs:
            p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        assert not hung, f"rank(s) {hung} still running after {JOIN_TIMEOUT} s: a collective hung"
        results = []
        for r in range(world):
            path = os.path.join(out, f"{r}.pt")
            assert os.path.exists(path), f"rank {r} died without a result (exit code {procs[r].exitcode})"
            results.append(torch.load(path, weights_only=False))
    for r, res in enumerate(results):
        assert not (isinstance(res, dict) and "crashed" in res), f"rank {r} crashed:\n{res['crashed']}"
    return results


def _shards(n: int, world: int, sizes: list[int] | None = None) -> list[slice]:
    sizes = sizes or [n // world + (r < n % world) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [slice(s, s + k) for s, k in zip(starts, sizes)]


def _error(fn) -> str:
    """The message of the ValueError fn raises ('' when it raises none)."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


# ---------------------------------------------------------------- oracles


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """Mean NT-Xent over [z1; z2] in float64 from the full similarity matrix."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n, b = z.shape[0], z1.shape[0]
    sim = (z @ z.T / t).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    pos = sim[torch.arange(n), (torch.arange(n) + b) % n]
    return (torch.logsumexp(sim, dim=1) - pos).mean()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------- losses


def _loss_job(rank, world, seed, sizes, d, t):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    index = torch.randperm(3 * n, generator=g)[:n]
    mine = _shards(n, world, sizes)[rank]
    a, b = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
    tracker = cx.ScoreTracker(3 * n)
    criterion = cx.nn.NTXentLoss(temperature=t, gather_distributed=True)
    loss, cos = criterion(a, b, index=index[mine], tracker=tracker, return_cos=True)
    loss.backward()
    local_counts = tracker.counts["css"].clone()
    tracker.sync()
    out = {"loss": loss.detach(), "g1": a.grad, "g2": b.grad, "cos": cos, "local_counts": local_counts,
           "sums": tracker.sums["css"].clone(), "counts": tracker.counts["css"].clone()}

    # DDP: a linear encoder; parameter gradients after DDP's average
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, 3)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp(z1[mine]).sum()  # DDP's first forward broadcasts rank 0's parameters (identical already)
    ddp.zero_grad()
    loss2 = criterion(ddp(z1[mine]), ddp(z2[mine]))
    loss2.backward()
    out["ddp_loss"] = loss2.detach()
    out["ddp_grads"] = [p.grad.clone() for p in model.parameters()]

    # bad input on one rank, then on all: every rank raises, and the group still works after
    errors = {}
    errors["width"] = _error(lambda: criterion(torch.randn(2, d + rank), torch.randn(2, d + rank)))
    errors["empty"] = _error(lambda: criterion(torch.randn(0 if rank == 1 else 2, d),
                                               torch.randn(0 if rank == 1 else 2, d)))
    bad_index = torch.arange(1 if rank == world - 1 else 2)
    errors["index"] = _error(lambda: criterion(torch.randn(2, d), torch.randn(2, d), index=bad_index,
                                               tracker=cx.ScoreTracker(8)))
    errors["dtype"] = _error(lambda: criterion(torch.randn(2, d, dtype=torch.float64 if rank else torch.float32),
                                               torch.randn(2, d, dtype=torch.float64 if rank else torch.float32)))
    # refused only after the gather on one rank, these left the others in the next collective
    # (scores' dtype: the backward's reduce-scatter; MoCo's q dtype: the global sum, which aborted
    # gloo) or diverged silently (queues of different sizes, each rank's ring its own)
    last = rank == world - 1
    errors["scores"] = _error(lambda: criterion(torch.randn(2, d), torch.randn(2, d), index=torch.arange(2),
                                                scores=torch.zeros(8, dtype=torch.float64 if last else torch.float32)))
    q_dtype = torch.float64 if last else torch.float32
    errors["moco_q"] = _error(lambda: cx.nn.MoCoLoss(dim=d, queue_size=8, gather_distributed=True)(
        torch.randn(2, d, dtype=q_dtype), torch.randn(2, d)))
    errors["moco_queue"] = _error(lambda: cx.nn.MoCoLoss(dim=d, queue_size=8 + last, gather_distributed=True)(
        torch.randn(2, d), torch.randn(2, d)))
    out["errors"] = errors
    out["after"] = criterion(torch.ones(1, d), torch.ones(1, d)).item()

    # MoCo: every rank enqueues the gathered keys; the queues agree after the first step
    torch.manual_seed(seed + rank)  # different initial queues: rank 0's is shared
    moco = cx.nn.MoCoLoss(dim=d, queue_size=2 * n + 1, gather_distributed=True)
    out["moco_queue0"] = moco.queue.clone()
    out["moco_losses"] = []
    for step in range(2):
        keys = torch.randn(n, d, generator=g)
        queries = torch.randn(n, d, generator=g)
        out["moco_losses"].append(moco(queries[mine], keys[mine]).detach())
    moco.flush_()
    out["moco_queue"] = moco.queue.clone()
    out["moco_ptr"] = int(moco.ptr)
    return out


def _job(rank, world, seed, sizes, d, t):
    """Everything one spawned run checks: the losses on both runs; the trackers and k-means on the
    3-rank run, training on the 2-rank one (a process start costs seconds on a shared CPU)."""
    out = _loss_job(rank, world, seed, sizes, d, t)
    if world == 3:
        out["tracker"] = _tracker_job(rank, world, seed, TRACKER_N)
    else:
        out["train"] = _train_part(seed)
    return out


RUNS: dict = {}
TRACKER_N = 12


def _run(world: int) -> dict:
    """The spawned run of `world` ranks (once per module)."""
    if world not in RUNS:
        sizes = {2: [3, 3], 3: [2, 4, 1]}[world]
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        d, t = 5, 0.3
        RUNS[world] = {"world": world, "sizes": sizes, "seed": seed, "d": d, "t": t, "n": TRACKER_N,
                       "ranks": _spawn(_job, world, seed, sizes, d, t)}
    return RUNS[world]


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks-uneven"])
def loss_run(request):
    return _run(request.param)


def test_gathered_nt_xent_equals_single_process(loss_run):
    g = torch.Generator().manual_seed(loss_run["seed"])
    n, d, t, world = sum(loss_run["sizes"]), loss_run["d"], loss_run["t"], loss_run["world"]
    z1 = torch.randn(n, d, generator=g).double().requires_grad_()
    z2 = torch.randn(n, d, generator=g).double().requires_grad_()
    ref = naive_nt_xent(z1, z2, t)
    ref.backward()
    for r, (res, mine) in enumerate(zip(loss_run["ranks"], _shards(n, world, loss_run["sizes"]))):
        assert abs(float(res["loss"]) - ref.item()) < 1e-5 * abs(ref.item()), f"rank {r}"
        # each rank's rows get the gradient of the sum of the ranks' (identical) losses
        assert _rel(res["g1"], world * z1.grad[mine]) < 1e-5, f"rank {r}"
        assert _rel(res["g2"], world * z2.grad[mine]) < 1e-5, f"rank {r}"
        cos = torch.nn.functional.cosine_similarity(z1[mine], z2[mine]).detach()
        assert _rel(res["cos"], cos) < 1e-6


def test_gathered_nt_xent_under_ddp_gives_the_single_process_gradient(loss_run):
    g = torch.Generator().manual_seed(loss_run["seed"])
    n, d, t = sum(loss_run["sizes"]), loss_run["d"], loss_run["t"]
    z1, z2 = torch.randn(n, d, generator=g).double(), torch.randn(n, d, generator=g).double()
    torch.manual_seed(loss_run["seed"])
    model = torch.nn.Linear(d, 3).double()
    loss = naive_nt_xent(model(z1), model(z2), t)
    loss.backward()
    uneven = len(set(loss_run["sizes"])) > 1
    for res in loss_run["ranks"]:
        assert abs(float(res["ddp_loss"]) - float(loss)) < 1e-5 * abs(float(loss))
        for got, p in zip(res["ddp_grads"], model.parameters()):
            # DDP averages the ranks' gradients: with every rank's rows getting world x dL/dz_r,
            # that average is dL/dθ whatever the ranks' batch sizes
            assert _rel(got, p.grad) < 1e-5, f"uneven={uneven}"


def test_gathered_scores_go_to_each_ranks_examples_and_sync(loss_run):
    g = torch.Generator().manual_seed(loss_run["seed"])
    n, d, world = sum(loss_run["sizes"]), loss_run["d"], loss_run["world"]
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    index = torch.randperm(3 * n, generator=g)[:n]
    single = cx.ScoreTracker(3 * n)
    cx.nn.NTXentLoss(temperature=loss_run["t"])(z1, z2, index=index, tracker=single)
    for res, mine in zip(loss_run["ranks"], _shards(n, world, loss_run["sizes"])):
        expected_local = torch.zeros(3 * n)
        expected_local[index[mine]] = 1
        assert torch.equal(res["local_counts"], expected_local)  # before sync: this rank's own
        assert torch.equal(res["counts"], single.counts["css"])  # after: everyone's
        assert torch.allclose(res["sums"], single.sums["css"], atol=1e-6)


def test_bad_input_on_any_rank_raises_on_every_rank(loss_run):
    world = loss_run["world"]
    for r, res in enumerate(loss_run["ranks"]):
        errors = res["errors"]
        assert "same shape after the rows" in errors["width"] and "rank 1" in errors["width"]
        assert "no rows on rank(s) [1]" in errors["empty"]
        if r == world - 1:  # the rank at fault raises its own error ...
            assert "index has 1 entries but the batch has 2 rows" in errors["index"]
        else:  # ... the others say which rank refused
            assert f"rank(s) [{world - 1}]" in errors["index"]
        assert "dtype" in errors["dtype"] or "float64" in errors["dtype"]
        mine = {"scores": "scores must be a 1-D float32 tensor", "moco_q": "q and k must have the same shape and dtype"}
        for case, message in mine.items():
            assert message in errors[case] if r == world - 1 else f"rank(s) [{world - 1}]" in errors[case], case
        assert "queue_size and dim must be the same on every rank" in errors["moco_queue"]
        assert math.isfinite(res["after"])  # the group is still in step after the errors


def test_moco_enqueues_the_gathered_keys(loss_run):
    g = torch.Generator().manual_seed(loss_run["seed"])
    n, d, world, t = sum(loss_run["sizes"]), loss_run["d"], loss_run["world"], 0.2
    torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randperm(3 * n, generator=g)
    ranks = loss_run["ranks"]
    queue = ranks[0]["moco_queue0"].double()  # rank 0's initial queue, which every rank takes
    assert not torch.equal(ranks[0]["moco_queue0"], ranks[1]["moco_queue0"])
    ptr = 0
    for step in range(2):
        keys, queries = torch.randn(n, d, generator=g).double(), torch.randn(n, d, generator=g).double()
        qn, kn, un = (torch.nn.functional.normalize(x, dim=1) for x in (queries, keys, queue))
        logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ un.T], dim=1) / t
        rows = torch.nn.functional.cross_entropy(logits, torch.zeros(n, dtype=torch.long), reduction="none")
        for r in range(world):
            assert abs(float(ranks[r]["moco_losses"][step]) - float(rows.mean())) < 1e-5  # the global mean
        slots = (ptr + torch.arange(n)) % queue.shape[0]
        queue = queue.clone()
        queue[slots] = keys
        ptr = (ptr + n) % queue.shape[0]
    for res in ranks:
        assert torch.allclose(res["moco_queue"].double(), queue, atol=1e-6)
        assert res["moco_ptr"] == ptr


def test_gather_distributed_without_a_process_group_is_an_error():
    assert not distributed.is_initialized()
    with pytest.raises(ValueError, match="gather_distributed=True needs an initialised torch.distributed"):
        cx.nn.NTXentLoss(gather_distributed=True)(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="gather_distributed=True needs an initialised torch.distributed"):
        cx.nn.MoCoLoss(dim=3, queue_size=8, gather_distributed=True)(torch.randn(4, 3), torch.randn(4, 3))
    assert distributed.world_size() == 1 and distributed.rank() == 0
    t = torch.randn(3)
    assert distributed.sum_in_rank_order(t) is t


def test_settings_that_would_fail_only_under_a_process_group_are_refused_without_one():
    # each passed silently here and failed once launched: "no" read as True, op="mean" a KeyError,
    # names that miss a tensor a negative-size RuntimeError, no tensor an IndexError
    for make in (lambda: cx.nn.NTXentLoss(gather_distributed="no"),
                 lambda: cx.nn.MoCoLoss(dim=3, queue_size=8, gather_distributed=1)):
        with pytest.raises(ValueError, match="gather_distributed must be a bool"):
            make()
    with pytest.raises(ValueError, match="op must be one of 'sum', 'max', got 'mean'"):
        distributed.all_reduce_(torch.ones(2), op="mean")
    with pytest.raises(ValueError, match=r"names: one per tensor, .* got 1 name\(s\) for 2 tensor\(s\)"):
        distributed.all_gather_rows(torch.ones(2, 3), torch.ones(2, 3), names=("a",))
    with pytest.raises(ValueError, match="at least one tensor"):
        distributed.all_gather_rows()


# ---------------------------------------------------------------- trackers


def _record_plan(seed: int, world: int, n: int, steps: int):
    """For each step and rank: (index, values), duplicates and examples shared between ranks included."""
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randint(0, n, (5,), generator=g), torch.randn(5, generator=g)) for _ in range(world)]
            for _ in range(steps)]


def _dynamics_plan(seed: int, world: int, n: int, epochs: int):
    """Per epoch and rank: (logits, targets, index) with each example on one rank per epoch."""
    g = torch.Generator().manual_seed(seed)
    plan = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        plan.append([(torch.randn(len(perm[s]), 3, generator=g), torch.randint(0, 3, (len(perm[s]),), generator=g),
                      perm[s]) for s in _shards(n, world)])
    return plan


def _tracker_job(rank, world, seed, n):
    tracker = cx.ScoreTracker(n, metrics=("a", "b"), nan="skip")
    for step, per_rank in enumerate(_record_plan(seed, world, n, 4)):
        index, values = per_rank[rank]
        tracker.record(index, a=values, b=values * 2)
        if step in (1, 3):  # sync twice: the second must add only what came after the first
            tracker.sync()
    out = {"sums": {m: v.clone() for m, v in tracker.sums.items()},
           "counts": {m: v.clone() for m, v in tracker.counts.items()}}
    dyn = cx.TrainingDynamics(n, el2n_epochs=1)
    for epoch, per_rank in enumerate(_dynamics_plan(seed, world, n, 3)):
        logits, targets, index = per_rank[rank]
        dyn.update(logits, targets, index, epoch=epoch)
        dyn.sync()
    out["dyn"] = {k: v.clone() for k, v in dyn.buffers.items()}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dyn.npz")
        # rank 0 alone writes: the others return at once
        dyn.save(path if rank == 0 else os.path.join(d, "never.npz"))
        torch.distributed.barrier()
        out["saved"] = sorted(os.listdir(d)) if rank == 0 else None
    # bad input: a rank whose record() left something out, a tracker of another size
    bad = cx.ScoreTracker(n)
    bad.record(torch.tensor([n + 5 if rank == 1 else 0]), css=torch.ones(1))
    out["err_left_out"] = _error(bad.sync)
    out["err_size"] = _error(cx.ScoreTracker(n + rank).sync)
    out["kmeans"] = _kmeans_part(rank, world, seed)
    return out


KMEANS_CASES = {  # name: (KMeans arguments, rows per rank, features)
    "kmeans++ on a sample": ({"n_clusters": 4, "init_sample_size": 50}, 40, 3),
    "random init, cosine": ({"n_clusters": 3, "init": "random", "metric": "cosine"}, 30, 4),
    "empty clusters re-seeded": ({"n_clusters": 4, "init": [[0.0, 0.0], [0.5, 0.5], [1e3, 1e3], [-1e3, 1e3]]}, 25, 2),
}


def _kmeans_data(seed: int, world: int, rows: int, d: int) -> torch.Tensor:
    """Three blobs, sorted by blob: the last rank holds the farthest one (the re-seeding case's
    farthest points are then on another rank than rank 0)."""
    g = torch.Generator().manual_seed(seed)
    blob = torch.randint(0, 3, (world * rows, 1), generator=g).sort(dim=0).values
    return torch.randn(world * rows, d, generator=g) + 4 * blob


def _kmeans_part(rank, world, seed):
    out = {}
    for name, (kwargs, rows, d) in KMEANS_CASES.items():
        x = _kmeans_data(seed, world, rows, d)[rank * rows : (rank + 1) * rows]
        km = cx.KMeans(**kwargs, random_state=seed % 1000, max_iter=20, distributed=True).fit(x)
        out[name] = (km.cluster_centers_, km.labels_, km.n_iter_, km.inertia_)
    km = cx.KMeans(n_clusters=2, distributed=True)
    out["err_width"] = _error(lambda: km.fit(torch.randn(6, 3 + (rank == 1))))
    out["err_empty"] = _error(lambda: km.fit(torch.randn(0 if rank == 2 else 6, 3)))
    out["err_nan"] = _error(lambda: km.fit(torch.full((6, 3), float("nan") if rank == 0 else 1.0)))
    out["err_k"] = _error(lambda: cx.KMeans(n_clusters=7, distributed=True).fit(torch.randn(2, 3)))
    # settings that differ by rank: collectives of different sizes (k) or counts (max_iter) aborted gloo
    out["err_settings_k"] = _error(lambda: cx.KMeans(n_clusters=2 + (rank == 1), distributed=True).fit(torch.randn(6, 3)))
    out["err_settings_iter"] = _error(
        lambda: cx.KMeans(n_clusters=2, max_iter=5 + 3 * rank, distributed=True).fit(torch.randn(6, 3)))
    return out


@pytest.fixture(scope="module")
def tracker_run():
    run = _run(3)
    return {**run, "ranks": [res["tracker"] for res in run["ranks"]]}


def test_tracker_sync_equals_a_single_process_tracker(tracker_run):
    n, world = tracker_run["n"], tracker_run["world"]
    single = cx.ScoreTracker(n, metrics=("a", "b"))
    for per_rank in _record_plan(tracker_run["seed"], world, n, 4):
        for index, values in per_rank:
            single.update(index, a=values, b=values * 2)
    for res in tracker_run["ranks"]:
        for m in ("a", "b"):
            assert torch.equal(res["counts"][m], single.counts[m])
            assert torch.allclose(res["sums"][m], single.sums[m], atol=1e-5)


def test_dynamics_sync_per_epoch_equals_a_single_process(tracker_run):
    n, world = tracker_run["n"], tracker_run["world"]
    single = cx.TrainingDynamics(n, el2n_epochs=1)
    for epoch, per_rank in enumerate(_dynamics_plan(tracker_run["seed"], world, n, 3)):
        logits = torch.cat([p[0] for p in per_rank])
        single.update(logits, torch.cat([p[1] for p in per_rank]), torch.cat([p[2] for p in per_rank]), epoch=epoch)
    assert bool((single.buffers["forget_events"] > 0).any())  # the plan exercises forgetting
    for res in tracker_run["ranks"]:
        for key, value in single.buffers.items():
            if value.is_floating_point() and key not in ("seen", "forget_events", "correct_count", "el2n_count"):
                assert torch.allclose(res["dyn"][key], value, atol=1e-5), key
            else:
                assert torch.equal(res["dyn"][key], value), key


def test_tracker_sync_errors_and_rank0_save(tracker_run):
    ranks = tracker_run["ranks"]
    assert ranks[0]["saved"] == ["dyn.npz"]
    assert "out of range" in ranks[1]["err_left_out"]
    assert "rank(s) [1]" in ranks[0]["err_left_out"] and "rank(s) [1]" in ranks[2]["err_left_out"]
    for res in ranks:
        assert "differs between ranks" in res["err_size"]


# ---------------------------------------------------------------- k-means


@pytest.mark.parametrize("case", list(KMEANS_CASES))
def test_sharded_kmeans_equals_the_single_process_fit(tracker_run, case):
    kwargs, rows, d = KMEANS_CASES[case]
    world, seed = tracker_run["world"], tracker_run["seed"]
    x = _kmeans_data(seed, world, rows, d)
    # streamed in chunks of the shards' size, the single process adds the same sums in the same order
    streamed = cx.KMeans(**kwargs, random_state=seed % 1000, max_iter=20, batch_size=rows).fit(x)
    in_memory = cx.KMeans(**kwargs, random_state=seed % 1000, max_iter=20).fit(x)
    for r, res in enumerate(tracker_run["ranks"]):
        centers, labels, n_iter, inertia = res["kmeans"][case]
        assert torch.equal(centers, streamed.cluster_centers_), f"rank {r}"
        assert torch.equal(labels, streamed.labels_[r * rows : (r + 1) * rows])
        assert n_iter == streamed.n_iter_
        assert inertia == pytest.approx(streamed.inertia_, rel=1e-9)
        assert torch.allclose(centers, in_memory.cluster_centers_, atol=1e-5)


def test_sharded_kmeans_bad_input_raises_on_every_rank(tracker_run):
    for r, res in enumerate(tracker_run["ranks"]):
        errors = res["kmeans"]
        assert "same number of features" in errors["err_width"] and "rank 1" in errors["err_width"]
        assert ("0 sample(s)" in errors["err_empty"]) == (r == 2)
        assert r == 2 or "rank(s) [2]" in errors["err_empty"]
        assert ("NaN or Inf" in errors["err_nan"]) == (r == 0)
        assert "n_samples=6 should be >= n_clusters=7" in errors["err_k"]
        assert "settings" in errors["err_settings_k"] and f"rank {0 if r == 1 else 1}'s" in errors["err_settings_k"]
        assert "settings" in errors["err_settings_iter"]
    with pytest.raises(ValueError, match="distributed=True needs an initialised torch.distributed"):
        cx.KMeans(n_clusters=2, distributed=True).fit(torch.randn(5, 2))


# ---------------------------------------------------------------- training


def _plain_model() -> torch.nn.Module:
    """A model without BatchNorm: with it each rank would normalise its slice by its own statistics
    (SyncBatchNorm is GPU-only), the one documented difference from a single process."""
    from coreset_ext.train.models import ContrastiveModel, ProjectionHead

    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 24), torch.nn.ReLU())
    return ContrastiveModel(encoder, ProjectionHead(24, 24, 8, norm=False))


def _train_runs(seed: int):
    """(method, the Trainer's result) for SimCLR and MoCo, one epoch of digits each."""
    from coreset_ext.train import TrainConfig, Trainer, load_dataset

    data = load_dataset("digits")
    for method in ("simclr", "moco"):
        # 241 over 2 ranks: slices of 121 and 120 (the world size need not divide the batch)
        cfg = TrainConfig(method=method, epochs=1, batch_size=241, proj_dim=8, queue_size=300, device="cpu",
                          progress=False, seed=seed % 1000, amp="off")
        torch.manual_seed(seed)
        yield method, Trainer(cfg, data, model=_plain_model()).fit()


def _train_part(seed: int) -> dict:
    from coreset_ext.train import TrainConfig, Trainer, load_dataset

    out = {method: {"loss": [h["loss"] for h in r.history], "css_mean": [h["css_mean"] for h in r.history],
                    "params": [p.detach().clone() for p in r.model.parameters()],
                    "sums": r.tracker.sums["css"].clone(), "counts": r.tracker.counts["css"].clone()}
           for method, r in _train_runs(seed)}
    # a user DataLoader: its DistributedSampler gives each rank its own examples, indices kept
    images = load_dataset("digits").batch(torch.arange(1438))
    data = cx.with_index(torch.utils.data.TensorDataset(images))
    cfg = TrainConfig(epochs=1, proj_dim=8, device="cpu", progress=False, amp="off")
    sampler = torch.utils.data.DistributedSampler(data, seed=seed % 1000)
    loader = torch.utils.data.DataLoader(data, batch_size=120, sampler=sampler)
    out["loader_counts"] = Trainer(cfg, loader, model=_plain_model()).fit().tracker.counts["css"].clone()
    plain = torch.utils.data.DataLoader(data, batch_size=120, shuffle=True)
    out["loader_error"] = _error(lambda: Trainer(cfg, plain, model=_plain_model()))
    return out


def test_ddp_training_equals_the_single_process_run():
    run = _run(2)
    for method, single in _train_runs(run["seed"]):
        for r, res in enumerate(run["ranks"]):
            got = res["train"][method]
            assert got["loss"] == pytest.approx([h["loss"] for h in single.history], rel=1e-5), (method, r)
            assert got["css_mean"] == pytest.approx([h["css_mean"] for h in single.history], rel=1e-5)
            for p, q in zip(got["params"], single.model.parameters()):
                assert torch.allclose(p, q.detach(), atol=1e-5), (method, r)
            assert torch.equal(got["counts"], single.tracker.counts["css"])  # every example once, synced
            assert torch.allclose(got["sums"], single.tracker.sums["css"], atol=1e-5)


def test_ddp_training_from_a_user_dataloader_with_a_distributed_sampler():
    for res in _run(2)["ranks"]:
        assert torch.equal(res["train"]["loader_counts"], torch.ones(1438))  # each example once, synced
        assert "DistributedSampler" in res["train"]["loader_error"]


def test_torchrun_train_command_writes_once_and_resumes(tmp_path):
    import subprocess
    import sys

    from coreset_ext.cli import main

    out = tmp_path / "run"
    flags = ["--data", "digits", "--batch-size", "200", "--width", "4", "--proj-dim", "8", "--proj-hidden", "16",
             "--device", "cpu", "--no-progress", "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "coreset_ext",
           "train", "--epochs", "1", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=JOIN_TIMEOUT, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained simclr") == 1  # rank 0 reports
    scores = cx.ScoreTracker.load(out / "scores.npz")
    assert torch.equal(scores.counts["css"], torch.ones(scores.num_samples))  # each example once, on one rank
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "embeddings.npz").is_file()
    # the checkpoint rank 0 wrote resumes on one process: the batch is global, so any number of ranks may
    assert main(["train", "--epochs", "2", *flags]) == 0
    assert torch.equal(cx.ScoreTracker.load(out / "scores.npz").counts["css"], torch.full((scores.num_samples,), 2.0))
    assert len((out / "metrics.csv").read_text().splitlines()) == 3


def test_distributed_training_settings_are_checked():
    from coreset_ext.train import TrainConfig

    with pytest.raises(ValueError, match="sync_bn"):
        TrainConfig(sync_bn="yes")


# ---------------------------------------------------------------- NCCL (the same code on GPUs)


def _nccl_job(rank, world, seed):
    dev = torch.device("cuda", rank)
    g = torch.Generator().manual_seed(seed)
    n, d = 6 * world, 16
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    x = _kmeans_data(seed, world, 30, 4)
    mine = _shards(n, world)[rank]
    a, b = z1[mine].to(dev).requires_grad_(), z2[mine].to(dev).requires_grad_()
    tracker = cx.ScoreTracker(n, device=dev)
    loss = cx.nn.NTXentLoss(0.3, gather_distributed=True)(a, b, index=torch.arange(n, device=dev)[mine],
                                                           tracker=tracker)
    loss.backward()
    tracker.sync()
    km = cx.KMeans(3, random_state=0, max_iter=20, distributed=True).fit(x[rank * 30 : (rank + 1) * 30].to(dev))
    return {"loss": loss.item(), "g1": a.grad.cpu(), "g2": b.grad.cpu(), "counts": tracker.counts["css"].cpu(),
            "centers": km.cluster_centers_.cpu(), "labels": km.labels_.cpu()}


@pytest.mark.cuda
def test_nccl_gather_loss_tracker_and_kmeans():
    world = min(2, torch.cuda.device_count())
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    ranks = _spawn(_nccl_job, world, seed, backend="nccl")
    g = torch.Generator().manual_seed(seed)
    n, d = 6 * world, 16
    z1 = torch.randn(n, d, generator=g).double().requires_grad_()
    z2 = torch.randn(n, d, generator=g).double().requires_grad_()
    ref = naive_nt_xent(z1, z2, 0.3)
    ref.backward()
    x = _kmeans_data(seed, world, 30, 4).cuda()
    single = cx.KMeans(3, random_state=0, max_iter=20, batch_size=30).fit(x)
    for r, (res, mine) in enumerate(zip(ranks, _shards(n, world))):
        assert abs(res["loss"] - ref.item()) < 1e-4 * abs(ref.item())
        assert _rel(res["g1"], world * z1.grad[mine]) < 1e-4 and _rel(res["g2"], world * z2.grad[mine]) < 1e-4
        assert torch.equal(res["counts"], torch.ones(n))
        assert torch.allclose(res["centers"], single.cluster_centers_.cpu(), atol=1e-5)
        assert torch.equal(res["labels"], single.labels_.cpu()[r * 30 : (r + 1) * 30])


def _sync_bn_job(rank, world, seed):
    from coreset_ext.train import TrainConfig, Trainer, load_dataset

    cfg = TrainConfig(epochs=1, batch_size=256, width=8, proj_dim=16, device="cuda", progress=False, seed=seed % 1000,
                      sync_bn=True)
    trainer = Trainer(cfg, load_dataset("digits"))
    result = trainer.fit()
    return {"counts": result.tracker.counts["css"].cpu(), "loss": result.history[-1]["loss"],
            "sync_bn": any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules())}


@pytest.mark.cuda
def test_nccl_training_with_sync_batchnorm():
    world = min(2, torch.cuda.device_count())
    ranks = _spawn(_sync_bn_job, world, int(torch.randint(0, 2**31 - 1, ()).item()), backend="nccl")
    for res in ranks:
        assert res["sync_bn"] and math.isfinite(res["loss"]) and res["loss"] == ranks[0]["loss"]
        assert torch.equal(res["counts"], torch.ones(1438))
