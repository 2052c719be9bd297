"""Coreset quality: train a classifier on the selected examples only, report test accuracy.

Two evaluators:
- "probe": a linear classifier on frozen features (from the trained encoder), full-batch,
  features standardised on the subset;
- "scratch": a small CNN (or MLP for embeddings) trained from scratch on the subset's images.
Each is repeated over seeds (initialisation and batch order; random subsets change with the seed
too), and `summarize` reports mean and standard deviation per (method, fraction).

Example:
    >>> import torch
    >>> from coreset_ext.train.evaluate import linear_probe
    >>> x, y = torch.randn(100, 8), torch.randint(0, 3, (100,))
    >>> 0.0 <= linear_probe(x, y, x, y, seed=0) <= 1.0
    True
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from coreset_ext.io import atomic_write_bytes
from coreset_ext.select import Selection, needs_labels, select
from coreset_ext.train.data import ArrayDataset, load_dataset
from coreset_ext.train.models import build_encoder, evaluating_on
from coreset_ext.train.trainer import TrainConfig, Trainer, resolve_device

EVALUATORS = ("probe", "scratch")


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: ArrayDataset, *, device: str | torch.device = "cpu",
                     batch_size: int = 1024) -> torch.Tensor:
    """Encoder features of every example, in eval mode, without augmentation: float32 [N, D] on the
    CPU. The encoder runs on `device` and is moved back to where it was afterwards."""
    out = []
    with evaluating_on(encoder, device):
        for s in range(0, len(dataset), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(dataset)))
            out.append(encoder(dataset.batch(idx, device)).float().cpu())
    return torch.cat(out)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 seed: int = 0, steps: int = 200, lr: float = 0.05, weight_decay: float = 1e-3,
                 num_classes: int | None = None, device: str | torch.device = "cpu") -> float:
    """Test accuracy of a softmax-regression classifier trained full-batch (Adam) on (train_x, train_y)."""
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"train_y has {train_y.shape[0]} labels but train_x has {train_x.shape[0]} rows")
    k = num_classes or int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(1e-6)
    xtr = ((train_x - mean) / std).to(device)
    xte = ((test_x - mean) / std).to(device)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(train_x.shape[1], k, generator=g) * 0.01).to(device).requires_grad_(True)
    b = torch.zeros(k, device=device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    ytr = train_y.to(device)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(xtr @ w + b, ytr).backward()
        opt.step()
    with torch.no_grad():
        pred = (xte @ w + b).argmax(1).cpu()
    return float((pred == test_y).float().mean())


def train_from_scratch(train_ds: ArrayDataset, index: torch.Tensor, test_ds: ArrayDataset, *, seed: int = 0,
                       steps: int = 200, batch_size: int = 64, lr: float = 1e-2, width: int = 8,
                       device: str | torch.device = "cpu") -> float:
    """Test accuracy of a small network trained from scratch on `train_ds[index]` only (fixed step count)."""
    torch.manual_seed(seed)
    k = max(train_ds.num_classes, test_ds.num_classes)
    if train_ds.kind == "images":
        enc = build_encoder("small_cnn", train_ds.sample_shape, width=width)
    else:
        enc = build_encoder("mlp", train_ds.sample_shape)
    net = nn.Sequential(enc, nn.Linear(enc.out_dim, k)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    index = torch.as_tensor(index).long()
    y = train_ds.labels
    net.train()
    for _ in range(steps):
        b = index[torch.randint(0, index.numel(), (min(batch_size, index.numel()),), generator=g)]
        if b.numel() < 2:  # BatchNorm needs two examples
            b = b.repeat(2)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(train_ds.batch(b, device)), y[b].to(device)).backward()
        opt.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(test_ds), 1024):
            idx = torch.arange(s, min(s + 1024, len(test_ds)))
            correct += int((net(test_ds.batch(idx, device)).argmax(1).cpu() == test_ds.labels[idx]).sum())
    return correct / len(test_ds)


# ------------------------------------------------------------------------------- tables and plots
FIELDS = ("method", "fraction", "budget", "evaluator", "seed", "accuracy")


# What each evaluator's number means, printed above its table and on its plot panel.
EVALUATOR_NOTES = {
    "probe": "linear probe trained on the subset, on frozen features of the trained contrastive encoder",
    "scratch": "small network trained from scratch on the subset's images",
    "ssl": "SAS's protocol: contrastive training on the subset only, then a linear probe on the full "
           "labelled training set",
}


def _options_text(options: dict) -> str:
    return ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
                    for k, v in sorted(options.items()))


def selection_labels(selections: list[Selection]) -> list[str]:
    """Each selection's table row: its method, followed by its options in brackets when selections
    of that method with other options are evaluated too (`sas` and `sas[objective=facility_location]`),
    so different selections never share a row; selections of one method with the same options (and
    other seeds) share one."""
    variants: dict[str, set[str]] = defaultdict(set)
    for sel in selections:
        variants[sel.method].add(_options_text(sel.options))
    return [f"{sel.method}[{_options_text(sel.options)}]" if len(variants[sel.method]) > 1 and sel.options
            else sel.method for sel in selections]


def method_of(label: str) -> str:
    """The registered method of a table row's label (`selection_labels`), for `needs_labels`."""
    return label.split("[", 1)[0]


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample std of accuracy per (evaluator, method, fraction), over seeds; evaluators
    sorted, methods in the order they first appear in `rows`, fractions ascending."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["evaluator"], r["method"], float(r["fraction"]))].append(float(r["accuracy"]))
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    out = []
    for (ev, m, f), accs in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])):
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        out.append({"evaluator": ev, "method": m, "fraction": f, "mean": mean, "std": std, "n": len(accs)})
    return out


def markdown_table(summary: list[dict]) -> str:
    """One table per evaluator: methods as rows, fractions as columns, 'mean ± std' accuracy in %."""
    parts = []
    for ev in sorted({s["evaluator"] for s in summary}):
        rows = [s for s in summary if s["evaluator"] == ev]
        fracs = sorted({s["fraction"] for s in rows})
        methods = list(dict.fromkeys(s["method"] for s in rows))
        cell = {(s["method"], s["fraction"]): f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" for s in rows}
        n = max(s["n"] for s in rows)
        note = f"; {EVALUATOR_NOTES[ev]}" if ev in EVALUATOR_NOTES else ""
        lines = [f"Evaluator: {ev} (test accuracy %, mean ± std over {n} seeds{note})", "",
                 "| method | " + " | ".join(f"{f:.0%}" for f in fracs) + " |",
                 "| --- |" + " --- |" * len(fracs)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(cell.get((m, f), "") for f in fracs) + " |")
        supervised = [m for m in methods if needs_labels(method_of(m))]
        if supervised:
            lines += ["", f"({', '.join(supervised)}: supervised baselines, they read the ground-truth labels.)"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_results(rows: list[dict], out_dir: str | Path, *, title: str = "accuracy vs subset fraction") -> dict:
    """Writes results.csv (every run), summary.csv, results.md and accuracy_vs_fraction.png into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    for name, fields, data in (("results.csv", FIELDS, rows),
                               ("summary.csv", ("evaluator", "method", "fraction", "mean", "std", "n"), summary)):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(data)
        atomic_write_bytes(out_dir / name, buf.getvalue().encode())
    md = markdown_table(summary)
    atomic_write_bytes(out_dir / "results.md", md.encode())
    plot = out_dir / "accuracy_vs_fraction.png"
    plot_summary(summary, plot, title=title)
    return {"summary": summary, "markdown": md, "plot": plot}


def plot_summary(summary: list[dict], path: str | Path, *, title: str = "") -> None:
    """Accuracy against subset fraction, one line per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluators = sorted({s["evaluator"] for s in summary})
    # One colour per method on every panel (tab20 has room for 19 besides random's black);
    # random, the reference, is black and dashed; supervised baselines (reading the labels) are dotted.
    others = [m for m in dict.fromkeys(s["method"] for s in summary) if m != "random"]
    cmap = plt.get_cmap("tab20")
    style = {m: {"color": cmap(i % 20), "linestyle": ":" if needs_labels(method_of(m)) else "-"}
             for i, m in enumerate(others)}
    style["random"] = {"color": "black", "linestyle": "--"}
    fig, axes = plt.subplots(1, len(evaluators), figsize=(6.5 * len(evaluators), 5), squeeze=False)
    for ax, ev in zip(axes[0], evaluators):
        rows = [s for s in summary if s["evaluator"] == ev]
        for m in dict.fromkeys(s["method"] for s in rows):
            pts = sorted((s["fraction"], s["mean"], s["std"]) for s in rows if s["method"] == m)
            ax.errorbar([100 * p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                        marker="o", markersize=4, capsize=3, label=m, **style[m])
        ax.set_xlabel("subset size (% of the training pool)")
        ax.set_ylabel("test accuracy (%)")
        note = "\n" + textwrap.fill(EVALUATOR_NOTES[ev], 70) if ev in EVALUATOR_NOTES else ""
        ax.set_title(f"{title} [{ev}]{note}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------ SSL data efficiency (SAS; issue 6)
def ssl_probe_accuracy(train_ds: ArrayDataset, index: torch.Tensor, test_ds: ArrayDataset, *, seed: int = 0,
                       train_options: dict | None = None, probe_steps: int = 200,
                       device: str | torch.device = "auto") -> float:
    """SAS's protocol for one subset: contrastive training (the trainer, SimCLR unless `train_options`
    say otherwise) on `train_ds[index]` only, then a linear probe on the frozen backbone features of
    the FULL labelled training set, scored on `test_ds`. `seed` seeds the training and the probe.

    Example:
        >>> from coreset_ext.train import load_dataset
        >>> tr, te = load_dataset("digits"), load_dataset("digits", split="test")
        >>> acc = ssl_probe_accuracy(tr, torch.arange(64), te, train_options={"epochs": 1, "width": 8})
        >>> 0.0 <= acc <= 1.0
        True
    """
    index = torch.as_tensor(index).long().cpu()
    if index.dim() != 1 or index.numel() < 2:
        raise ValueError(f"index: contrastive training needs at least 2 examples, got {index.numel()}")
    if bool((index < 0).any()) or bool((index >= len(train_ds)).any()) or torch.unique(index).numel() != index.numel():
        raise ValueError(f"index: must hold distinct indices in [0, {len(train_ds)})")
    if not train_ds.has_labels or not test_ds.has_labels:
        raise ValueError("train_ds/test_ds: the linear probe needs labelled training and test sets")
    opts = {"progress": False, **(train_options or {}), "seed": seed}
    if "device" not in opts:
        opts["device"] = str(device)
    dev = resolve_device(opts["device"])
    subset = ArrayDataset(train_ds.data[index], train_ds.labels[index], name=train_ds.name,
                          num_classes=train_ds.num_classes)
    encoder = Trainer(TrainConfig(**opts), subset).fit().model.encoder
    feats_tr = extract_features(encoder, train_ds, device=dev)
    feats_te = extract_features(encoder, test_ds, device=dev)
    return linear_probe(feats_tr, train_ds.labels, feats_te, test_ds.labels, seed=seed, steps=probe_steps,
                        num_classes=max(train_ds.num_classes, test_ds.num_classes), device=dev)


def subsets_to_evaluate(selections: list[Selection], train_ds: ArrayDataset, seeds: tuple[int, ...],
                        random_baseline: bool = True) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(label, indices, seed) for every Selection and seed (labels from `selection_labels`), then,
    with `random_baseline`, for random subsets of each selection size (label "random", a fresh one
    per seed). Every selection is checked against `train_ds`, and the table rows against each
    other, before the first is handed out."""
    for sel in selections:
        sel.check_dataset(train_ds)
    labels = selection_labels(selections)
    seen: dict[tuple, int] = {}
    for i, (label, sel) in enumerate(zip(labels, selections)):
        # one row averages a method's selections over their seeds: two with one seed would be
        # reported as two seeds of one selection
        first = seen.setdefault((label, len(sel), sel.seed), i)
        if first != i:
            raise ValueError(f"selections: #{first + 1} and #{i + 1} (in the order given) are both {label} with "
                             f"seed {sel.seed} and {len(sel)} examples, so they would be averaged into one row as "
                             "if they were two seeds; evaluate them separately")
        if random_baseline and label == "random":
            raise ValueError(f"selections: #{i + 1} is a random selection, whose row would merge with the random "
                             "baseline's; evaluate it without the baseline (--no-random, random_baseline=False)")
    jobs = list(zip(labels, selections))
    if random_baseline:
        jobs += [("random", budget) for budget in sorted({len(s) for s in selections})]
    for name, item in jobs:
        for seed in seeds:
            if isinstance(item, Selection):
                yield name, item.indices, seed
            else:
                yield name, select("random", budget=item, dataset_size=len(train_ds), seed=seed).indices, seed


def evaluate_ssl(selections: list[Selection], *, data: str = "digits", data_dir: str | None = None,
                 seeds: tuple[int, ...] = (0, 1, 2), random_baseline: bool = True, train_options: dict | None = None,
                 device: str = "auto") -> list[dict]:
    """`ssl_probe_accuracy` for every Selection (and, by default, random subsets of the same sizes, a
    fresh one per seed) over seeds: rows with evaluator "ssl", ready for `write_results`."""
    train_ds = load_dataset(data, split="train", data_dir=data_dir)
    test_ds = load_dataset(data, split="test", data_dir=data_dir)
    rows = []
    for name, idx, seed in subsets_to_evaluate(selections, train_ds, seeds, random_baseline):
        acc = ssl_probe_accuracy(train_ds, idx, test_ds, seed=seed, train_options=train_options, device=device)
        rows.append({"method": name, "fraction": round(idx.numel() / len(train_ds), 4), "budget": idx.numel(),
                     "evaluator": "ssl", "seed": seed, "accuracy": acc})
    return rows
