"""The whole pipeline as functions: train (and score), embed, select, evaluate, report.

`run_pipeline` is what `coreset-ext demo` runs. The methods it compares are a list of
`MethodSpec`s, so a new selector adds one row to `DEFAULT_METHODS` (or to the list a caller
passes) and appears in the table and the plot.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coreset_ext import distributed
from coreset_ext._validation import FRACTION, Options, check
from coreset_ext.io import atomic_write_bytes, load_npz
from coreset_ext.scores import ScoreTracker
from coreset_ext.select import Selection, select
from coreset_ext.train.data import ArrayDataset, load_dataset
from coreset_ext.train.embed import EMBEDDINGS_KIND, save_embeddings
from coreset_ext.train.evaluate import (extract_features, linear_probe, ssl_probe_accuracy, subsets_to_evaluate,
                                        train_from_scratch, write_results)
from coreset_ext.train.trainer import TRAIN_SEED, TrainConfig, Trainer, resolve_device

logger = logging.getLogger(__name__)


@dataclass
class MethodSpec:
    """One row of the comparison: a label, a registered selection method, its options, which
    training run ("simclr" or "moco") supplies its scores and embeddings, and, when the row does not
    follow the pipeline's, its own evaluators and fractions."""

    label: str
    method: str
    options: dict = field(default_factory=dict)
    run: str = "simclr"
    evaluators: tuple[str, ...] | None = None  # None: the pipeline's; ("ssl",): SAS's protocol only
    fractions: tuple[float, ...] | None = None  # None: the pipeline's


PRUNING_KEEP = (0.1, 0.3, 0.5, 0.7)  # pruning rates 90/70/50/30% (ELFS's and CCS's tables)


DEFAULT_METHODS = [
    MethodSpec("random", "random", fractions=(0.1, 0.2, 0.3, 0.5, 0.7)),  # 70%: the pruning rows' reference
    MethodSpec("balanced_random", "balanced_random", {"by": "cluster", "n_clusters": 10}),
    MethodSpec("css_simclr", "css", run="simclr"),
    MethodSpec("css_moco", "css", run="moco"),
    # the same scores through the budget-aware sampling (ccs below half the pool: coverage, not
    # only the hardest), to show what it changes
    MethodSpec("css_simclr_auto", "css", {"sampling": "auto"}, run="simclr"),
    MethodSpec("css_moco_auto", "css", {"sampling": "auto"}, run="moco"),
    MethodSpec("prototypes", "prototypes", {"n_clusters": 10, "keep": "hardest"}),
    MethodSpec("kcenter", "kcenter"),
    # SAS and ELFS (issues 6, 7), at the pruning rates of their papers; the supervised dynamics
    # baselines (aum, forgetting, el2n, ccs) read the ground-truth labels: reference rows, not label-free.
    MethodSpec("sas", "sas", {"n_clusters": 10}, fractions=PRUNING_KEEP),
    MethodSpec("sas_fl", "sas", {"n_clusters": 10, "objective": "facility_location"}, fractions=PRUNING_KEEP),
    MethodSpec("elfs", "elfs", {"n_clusters": 10}, fractions=PRUNING_KEEP),
    MethodSpec("elfs_ccs", "elfs", {"n_clusters": 10, "variant": "ccs"}, fractions=PRUNING_KEEP),
    MethodSpec("ccs", "ccs", fractions=PRUNING_KEEP),
    MethodSpec("aum", "aum", fractions=PRUNING_KEEP),
    MethodSpec("forgetting", "forgetting", fractions=PRUNING_KEEP),
    MethodSpec("el2n", "el2n", fractions=PRUNING_KEEP),
    # SAS's own protocol (contrastive training on the subset, probe on the full labelled set), with
    # random subsets of the same sizes as its reference: evaluator "ssl", their own table and panel.
    MethodSpec("sas", "sas", {"n_clusters": 10}, evaluators=("ssl",), fractions=PRUNING_KEEP),
    MethodSpec("random", "random", evaluators=("ssl",), fractions=PRUNING_KEEP),
]


def train_and_embed(config: TrainConfig, train_ds: ArrayDataset, test_ds: ArrayDataset, out_dir: str | Path, *,
                    resume: bool = True, source: dict | None = None) -> dict:
    """Trains with CSS scores into out_dir (config.json, metrics.csv, checkpoints/, scores.npz), then
    writes the frozen backbone features of both splits to out_dir/embeddings.npz. Returns scores and
    features. `source` (where the data came from) is recorded in config.json."""
    out_dir = Path(out_dir)
    result = Trainer(config, train_ds, out_dir, source=source).fit(resume=resume)
    if distributed.rank() > 0:  # under torchrun the embeddings (and what reads them) are rank 0's, once
        return {"scores": result.scores(), "history": result.history}
    device = resolve_device(config.device)
    enc = result.model.encoder
    feats = {"train": extract_features(enc, train_ds, device=device),
             "test": extract_features(enc, test_ds, device=device)}
    save_embeddings(out_dir / "embeddings.npz", {**feats, "train_labels": train_ds.labels,
                                                  "test_labels": test_ds.labels}, train_ds, which="backbone")
    return {"scores": result.scores(), "train": feats["train"], "test": feats["test"], "history": result.history}


def load_run(run_dir: str | Path) -> dict:
    """Reads a training run directory: its config, CSS scores and embeddings."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"run: {run_dir} is not a training run directory (no config.json)")
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except ValueError as e:  # not JSON, or not UTF-8: name the file, not just the position
        raise ValueError(f"run: {run_dir}/config.json is not valid JSON ({e})") from None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), str) \
            or not isinstance(data.get("size"), int):
        raise ValueError(f"run: {run_dir}/config.json is not a training run's config (no 'data' record with its "
                         "'size' and 'fingerprint')")
    out = {"config": config, "dir": run_dir}

    def arrays_of(name: str, kind: str, keys: tuple[str, ...]) -> dict:
        arrays, _ = load_npz(run_dir / name, kind=kind)
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise ValueError(f"run: {run_dir}/{name} lacks {missing}")
        return arrays

    if (run_dir / "scores.npz").is_file():
        arrays = arrays_of("scores.npz", ScoreTracker.kind, ("sum/css", "count/css"))
        out["scores"] = torch.from_numpy(arrays["sum/css"] / arrays["count/css"])
    if (run_dir / "embeddings.npz").is_file():
        arrays = arrays_of("embeddings.npz", EMBEDDINGS_KIND, ("train", "test"))
        for split in ("train", "test"):
            emb = torch.from_numpy(arrays[split])
            if emb.dim() != 2 or not emb.is_floating_point() or not bool(torch.isfinite(emb).all()):
                raise ValueError(f"run: {run_dir}/embeddings.npz '{split}' must be a finite 2-D float array, "
                                 f"got {emb.dtype} of shape {tuple(emb.shape)}")
            out[split] = emb
    return out


def evaluate_indices(index: torch.Tensor, *, evaluator: str, seed: int, train_ds: ArrayDataset,
                     test_ds: ArrayDataset, features: dict | None, device: str | torch.device = "cpu",
                     scratch_steps: int = 200, ssl_options: dict | None = None) -> float:
    """Test accuracy of `evaluator` trained on `index`: "probe" (linear, on frozen features), "scratch"
    (a small network on the images), or "ssl" (SAS's protocol: contrastive training on the subset,
    5 epochs unless `ssl_options` say otherwise, then a linear probe on the full labelled set)."""
    check("evaluator", evaluator, Options("probe", "scratch", "ssl"))
    if evaluator == "probe":
        if features is None:
            raise ValueError("features: the probe evaluator needs frozen features (a training run), got None")
        return linear_probe(features["train"][index], train_ds.labels[index], features["test"], test_ds.labels,
                            seed=seed, num_classes=max(train_ds.num_classes, test_ds.num_classes), device=device)
    if evaluator == "scratch":
        return train_from_scratch(train_ds, index, test_ds, seed=seed, steps=scratch_steps, device=device)
    return ssl_probe_accuracy(train_ds, index, test_ds, seed=seed, device=device,
                              train_options={"epochs": 5, **(ssl_options or {})})


def run_pipeline(out_dir: str | Path, *, data: str = "digits", data_dir: str | None = None,
                 trainers: tuple[str, ...] = ("simclr", "moco"), train_options: dict | None = None,
                 methods: list[MethodSpec] | None = None, fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5),
                 seeds: tuple[int, ...] = (0, 1, 2), evaluators: tuple[str, ...] = ("probe", "scratch"),
                 probe_run: str = "simclr", scratch_steps: int = 200, ssl_options: dict | None = None,
                 encoder_seeds: tuple[int, ...] | None = None, device: str = "auto", progress: bool = True,
                 log=logger.info) -> dict:
    """Trains each of `trainers` with CSS scores, selects every fraction with every method and seed,
    evaluates each subset, and writes config.json, the runs, selections/, results.{csv,md} and the plots.
    A `MethodSpec` with its own `fractions`/`evaluators` uses those instead of the pipeline's;
    `ssl_options` are the trainer options of the "ssl" evaluator (default: 5 epochs).

    `encoder_seeds` (default: one, `train_options`' seed or 0) retrains the contrastive encoders once
    per encoder seed, and so re-scores, re-selects and re-evaluates: the spread, and each method's
    paired difference from random (paired on encoder seed and seed), cover the whole pipeline. With
    one encoder seed the runs are OUT/train_<trainer> and selections/<label>_<pct>pct_seed<s>.npz;
    with several, OUT/train_<trainer>_enc<e> and selections/<label>_<pct>pct_enc<e>_seed<s>.npz.

    Returns {"rows": per-run results, "summary": ..., "markdown": the table, "plot": path,
    "difference_plot": path or None, "seconds": ...}.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    methods = list(DEFAULT_METHODS if methods is None else methods)
    train_options = dict(train_options or {})
    # every check before the first file is written: the settings, the data, each run's config
    for name, values in (("trainers", trainers), ("methods", methods), ("fractions", fractions), ("seeds", seeds),
                         ("evaluators", evaluators)):
        if not values:
            raise ValueError(f"{name}: give at least one, got none")
    if encoder_seeds is None:
        encoder_seeds = (train_options.get("seed", 0),)
    elif "seed" in train_options:
        raise ValueError(f"train_options: seed={train_options['seed']!r} contradicts encoder_seeds; give the seeds "
                         "as encoder_seeds only")
    encoder_seeds = tuple(encoder_seeds)
    if not encoder_seeds:
        raise ValueError("encoder_seeds: give at least one, got none")
    for e in encoder_seeds:
        check("encoder_seeds", e, TRAIN_SEED)
    if len(set(encoder_seeds)) != len(encoder_seeds):
        raise ValueError(f"encoder_seeds: must be distinct, got {list(encoder_seeds)}")
    train_options.pop("seed", None)
    for frac in [f for m in methods for f in m.fractions or ()] + list(fractions):
        check("fractions", frac, FRACTION)
    for ev in [e for m in methods for e in m.evaluators or ()] + list(evaluators):
        check("evaluator", ev, Options("probe", "scratch", "ssl"))
    dev = resolve_device(device)
    train_ds = load_dataset(data, split="train", data_dir=data_dir)
    test_ds = load_dataset(data, split="test", data_dir=data_dir)
    if not train_ds.has_labels or not test_ds.has_labels:
        raise ValueError(f"data: evaluation needs labels, but {data!r} has none")
    train_configs = {(e, t): TrainConfig(method=t, device=device, progress=progress, seed=e, **train_options)
                     for e in encoder_seeds for t in trainers}
    uses_probe = any("probe" in (m.evaluators or evaluators) for m in methods)
    needed = {m.run for m in methods} | ({probe_run} if uses_probe else set())
    missing = needed - set(trainers)
    if missing:
        raise ValueError(f"trainers: methods or the probe need runs {sorted(missing)}, but trainers are {list(trainers)}")
    config = {"data": data, "data_dir": data_dir, "trainers": list(trainers), "train_options": train_options,
              "methods": [m.__dict__ for m in methods], "fractions": list(fractions), "seeds": list(seeds),
              "evaluators": list(evaluators), "encoder_seeds": list(encoder_seeds), "probe_run": probe_run,
              "ssl_options": dict(ssl_options or {}),
              "scratch_steps": scratch_steps, "device": str(dev),
              "dataset_size": len(train_ds), "fingerprint": train_ds.fingerprint}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "config.json", json.dumps(config, indent=2).encode())

    several = len(encoder_seeds) > 1
    rows = []
    for e in encoder_seeds:
        tag = f"_enc{e}" if several else ""
        runs = {}
        for t in trainers:
            cfg = train_configs[(e, t)]
            ts = time.perf_counter()
            runs[t] = train_and_embed(cfg, train_ds, test_ds, out_dir / f"train_{t}{tag}",
                                      source={"data": data, "data_dir": data_dir})
            log(f"[{t}{tag}] trained {cfg.epochs} epochs in {time.perf_counter() - ts:.1f}s, "
                f"final loss {runs[t]['history'][-1]['loss']:.3f}" if runs[t]["history"] else f"[{t}{tag}] loaded")
        ts = time.perf_counter()
        for spec in methods:
            run = runs[spec.run]
            for frac in spec.fractions or fractions:
                for seed in seeds:
                    sel = select(spec.method, fraction=frac, scores=run["scores"], embeddings=run["train"],
                                 labels=train_ds.labels, seed=seed, fingerprint=train_ds.fingerprint, **spec.options)
                    sel.save(out_dir / "selections" / f"{spec.label}_{round(100 * frac)}pct{tag}_seed{seed}.npz")
                    for ev in spec.evaluators or evaluators:
                        acc = evaluate_indices(sel.indices, evaluator=ev, seed=seed, train_ds=train_ds,
                                               test_ds=test_ds, features=runs.get(probe_run), device=dev,
                                               scratch_steps=scratch_steps, ssl_options=ssl_options)
                        rows.append({"method": spec.label, "fraction": frac, "budget": len(sel), "evaluator": ev,
                                     "encoder_seed": e, "seed": seed, "accuracy": acc})
            log(f"[{spec.label}{tag}] selected and evaluated ({time.perf_counter() - ts:.1f}s so far)")
    report = write_results(rows, out_dir, title=data)
    report.update(rows=rows, seconds=time.perf_counter() - t0)
    return report


def evaluate_selections(selections: list[Selection], *, run_dir: str | Path | None, data: str = "digits",
                        data_dir: str | None = None, evaluators: tuple[str, ...] = ("probe",),
                        seeds: tuple[int, ...] = (0, 1, 2), random_baseline: bool = True,
                        device: str = "auto", scratch_steps: int = 200) -> list[dict]:
    """Evaluates saved selections (and, by default, random subsets of the same sizes) over seeds."""
    if "probe" in evaluators and run_dir is None:
        raise ValueError("run_dir: the probe evaluator needs a training run (its frozen features); give one "
                         "(--run), or another evaluator")
    dev = resolve_device(device)
    train_ds = load_dataset(data, split="train", data_dir=data_dir)
    test_ds = load_dataset(data, split="test", data_dir=data_dir)
    features = load_run(run_dir) if run_dir is not None else None
    if features is not None and "train" not in features:
        raise ValueError(f"run: {run_dir} has no embeddings.npz (did its training finish?)")
    if features is not None:
        trained_on = features["config"]["data"]["fingerprint"]
        if trained_on != train_ds.fingerprint:  # same size is not the same data
            raise ValueError(f"data: run {run_dir} was trained on data set {trained_on}, but the {data} training "
                             f"split given is {train_ds.fingerprint}")
        for split, ds in (("train", train_ds), ("test", test_ds)):
            if features[split].shape[0] != len(ds):
                raise ValueError(f"run: {run_dir}/embeddings.npz has {features[split].shape[0]} {split} rows, "
                                 f"the {data} {split} split {len(ds)}")
    rows = []
    for name, idx, seed in subsets_to_evaluate(selections, train_ds, seeds, random_baseline):
        for ev in evaluators:
            acc = evaluate_indices(idx, evaluator=ev, seed=seed, train_ds=train_ds, test_ds=test_ds,
                                   features=features, device=dev, scratch_steps=scratch_steps)
            rows.append({"method": name, "fraction": round(idx.numel() / len(train_ds), 4), "budget": idx.numel(),
                         "evaluator": ev, "seed": seed, "accuracy": acc})
    return rows
