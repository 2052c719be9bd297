"""Coreset quality: train a classifier on the selected examples only, report test accuracy.

Two evaluators:
- "probe": a linear classifier on frozen features (from the trained encoder), full-batch,
  features standardised on the subset;
- "scratch": a small CNN (or MLP for embeddings) trained from scratch on the subset's images.
Each is repeated over seeds (initialisation and batch order; random subsets change with the seed
too), and `summarize` reports mean and standard deviation per (method, fraction), and each
method's paired difference from random (`paired_difference`: same fraction, same evaluation seed,
same encoder seed) with a 95% t interval over the pairs.

Example:
    >>> import torch
    >>> from coreset_ext.train.evaluate import linear_probe
    >>> x, y = torch.randn(100, 8), torch.randint(0, 3, (100,))
    >>> 0.0 <= linear_probe(x, y, x, y, seed=0) <= 1.0
    True
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from coreset_ext._validation import Interval, check
from coreset_ext.io import atomic_write_bytes, atomic_write_csv
from coreset_ext.select import Selection, needs_labels, select
from coreset_ext.train.data import ArrayDataset, as_data, load_dataset
from coreset_ext.train.models import build_encoder, evaluating_on
from coreset_ext.train.trainer import TrainConfig, Trainer, resolve_device

EVALUATORS = ("probe", "scratch")


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: ArrayDataset, *, device: str | torch.device = "cpu",
                     batch_size: int = 1024) -> torch.Tensor:
    """Encoder features of every example, in eval mode, without augmentation: float32 [N, D] on the
    CPU. The encoder runs on `device` and is moved back to where it was afterwards. `dataset` may
    be any map-style Dataset or a DataLoader (`data.as_data`)."""
    dataset = as_data(dataset)
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
    """Test accuracy of a small network trained from scratch on `train_ds[index]` only (fixed step
    count): the small CNN of the data's modality (2-D for images, 1-D for signals), or an MLP for
    vectors. The data sets may be any map-style Datasets or DataLoaders (`data.as_data`)."""
    train_ds, test_ds = as_data(train_ds), as_data(test_ds)
    torch.manual_seed(seed)
    k = max(train_ds.num_classes, test_ds.num_classes)
    if k < 1 or not train_ds.has_labels:
        raise ValueError("train_ds: the scratch evaluator needs labels (the data set yields none)")
    enc = build_encoder("auto", train_ds.sample_shape, width=width)
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
FIELDS = ("method", "fraction", "budget", "evaluator", "encoder_seed", "seed", "accuracy")
SUMMARY_FIELDS = ("evaluator", "method", "fraction", "mean", "std", "n", "diff", "diff_low", "diff_high", "pairs")
REFERENCE = "random"  # the row every method is compared with

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), df = 1..30 (scipy.stats.t.ppf(0.975, df),
# rounded to 6 decimals); beyond 30, `t_quantile` uses the Cornish-Fisher expansion around the normal.
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.13145, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.04523, 2.042272)
_Z975 = 1.959963984540054


def t_quantile(df: int) -> float:
    """t_{0.975}(df), the two-sided 95% quantile of Student's t with `df` degrees of freedom (df >= 1):
    a table up to 30 (6 decimals), the Cornish-Fisher expansion (4 terms; error < 1e-7) beyond. No scipy needed."""
    check("df", df, Interval(int, 1, None))
    if df <= len(_T975):
        return _T975[df - 1]
    z, n = _Z975, float(df)
    return (z + (z ** 3 + z) / (4 * n) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * n ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * n ** 3)
            + (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / (92160 * n ** 4))


def paired_difference(values: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences `values[i] - reference[i]` and its 95% t interval
    (mean ± t_{0.975}(n-1) · sd / sqrt(n), sd the sample standard deviation): (mean, low, high).
    Needs at least 2 pairs: one pair has no spread, so no interval.

    Example:
        >>> [round(v, 4) for v in paired_difference([0.9, 0.8, 0.85], [0.8, 0.75, 0.8])]
        [0.0667, -0.005, 0.1384]
    """
    if len(values) != len(reference):
        raise ValueError(f"reference: {len(reference)} values to pair with {len(values)}")
    n = len(values)
    if n < 2:
        raise ValueError(f"seeds: a 95% interval of the paired difference needs at least 2 pairs (seeds), got {n}")
    d = [float(a) - float(b) for a, b in zip(values, reference)]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


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


def _encoder_seed(row: dict):
    """A row's encoder seed: None when the row does not say (a single training run, `evaluate`)."""
    e = row.get("encoder_seed")
    return None if e is None or e == "" else int(e)


def paired_runs(rows: list[dict], reference: str = REFERENCE) -> dict[tuple, tuple[list[float], list[float]]]:
    """Pairs every method's runs with the reference's, per (evaluator, method, fraction): one pair per
    (encoder seed, evaluation seed) that both have, in that order. Runs of one method with one key
    (selections with other selection seeds, evaluated with the same seed) are averaged first, so each
    pair is one seed. Methods without a reference run at their fraction get no entry."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        acc[(r["evaluator"], r["method"], float(r["fraction"]), _encoder_seed(r), int(r["seed"]))].append(
            float(r["accuracy"]))
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    out: dict[tuple, tuple[list[float], list[float]]] = {}
    for (ev, m, f, e, s) in sorted(mean, key=lambda k: (k[0], k[1], k[2], -1 if k[3] is None else k[3], k[4])):
        ref = mean.get((ev, reference, f, e, s))
        if m == reference or ref is None:
            continue
        vals, refs = out.setdefault((ev, m, f), ([], []))
        vals.append(mean[(ev, m, f, e, s)])
        refs.append(ref)
    return out


def summarize(rows: list[dict], reference: str = REFERENCE) -> list[dict]:
    """Mean and sample std of accuracy per (evaluator, method, fraction), over every run (encoder seeds
    x seeds); evaluators sorted, methods in the order they first appear in `rows`, fractions
    ascending. Each method's paired difference from `reference` (`paired_runs`, `paired_difference`):
    `diff`, its 95% t interval `diff_low`..`diff_high` (None with fewer than 2 pairs), and `pairs`;
    all None where there is no reference run to pair with, and for the reference itself."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    encoder_seeds: dict[tuple, set] = defaultdict(set)
    for r in rows:
        key = (r["evaluator"], r["method"], float(r["fraction"]))
        groups[key].append(float(r["accuracy"]))
        encoder_seeds[key].add(_encoder_seed(r))
    pairs = paired_runs(rows, reference)
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    out = []
    for (ev, m, f), accs in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])):
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        row = {"evaluator": ev, "method": m, "fraction": f, "mean": mean, "std": std, "n": len(accs),
               "encoder_seeds": len(encoder_seeds[(ev, m, f)] - {None}) or 1,
               "diff": None, "diff_low": None, "diff_high": None, "pairs": 0}
        if (ev, m, f) in pairs:
            vals, refs = pairs[(ev, m, f)]
            row["pairs"] = len(vals)
            if len(vals) >= 2:
                row["diff"], row["diff_low"], row["diff_high"] = paired_difference(vals, refs)
            else:
                row["diff"] = vals[0] - refs[0]
        out.append(row)
    return out


def _runs_text(rows: list[dict]) -> str:
    """How many runs each cell averages, as the header says it: 'N seeds', or 'N runs (E encoder
    seeds x S seeds)' when the encoder was retrained per seed; a range when cells differ."""
    ns = sorted({s["n"] for s in rows})
    encs = sorted({s.get("encoder_seeds", 1) for s in rows})
    n_text = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    if encs == [1]:
        return f"{n_text} seeds"
    if len(ns) == 1 and len(encs) == 1 and ns[0] % encs[0] == 0:
        per = ns[0] // encs[0]
        return f"{n_text} runs ({encs[0]} encoder seeds × {per} seed{'s' if per > 1 else ''})"
    return f"{n_text} runs (encoder seeds × seeds)"


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}"


def difference_cell(s: dict) -> str:
    """'+2.1 [+0.8, +3.4]': the paired difference from random in percentage points and its 95%
    interval; the difference alone with one pair; empty without a reference run."""
    if s.get("diff") is None:
        return ""
    if s.get("diff_low") is None:
        return _pp(s["diff"])
    return f"{_pp(s['diff'])} [{_pp(s['diff_low'])}, {_pp(s['diff_high'])}]"


def markdown_table(summary: list[dict], reference: str = REFERENCE) -> str:
    """One table per evaluator: methods as rows, fractions as columns, 'mean ± std' accuracy in %;
    then, where the evaluator has `reference` rows, a second table of each method's paired difference
    from it with its 95% t interval ('+2.1 [+0.8, +3.4]', percentage points)."""
    parts = []
    for ev in sorted({s["evaluator"] for s in summary}):
        rows = [s for s in summary if s["evaluator"] == ev]
        fracs = sorted({s["fraction"] for s in rows})
        methods = list(dict.fromkeys(s["method"] for s in rows))
        cell = {(s["method"], s["fraction"]): f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" for s in rows}
        note = f"; {EVALUATOR_NOTES[ev]}" if ev in EVALUATOR_NOTES else ""
        lines = [f"Evaluator: {ev} (test accuracy %, mean ± std over {_runs_text(rows)}{note})", "",
                 "| method | " + " | ".join(f"{f:.0%}" for f in fracs) + " |",
                 "| --- |" + " --- |" * len(fracs)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(cell.get((m, f), "") for f in fracs) + " |")
        diffs = [s for s in rows if s.get("diff") is not None]
        if diffs:
            pairs = sorted({s["pairs"] for s in diffs})
            p_text = str(pairs[0]) if len(pairs) == 1 else f"{pairs[0]}-{pairs[-1]}"
            paired_on = "a pair shares the fraction" + (", the encoder seed and the seed" if any(
                s.get("encoder_seeds", 1) > 1 for s in rows) else " and the seed")
            interval = "95% t interval" if pairs[-1] >= 2 else "no interval: one pair"
            dcell = {(s["method"], s["fraction"]): difference_cell(s) for s in diffs}
            lines += ["", f"Paired difference from {reference} ({ev}; percentage points, method − {reference}, "
                          f"mean [{interval}] over {p_text} pairs: {paired_on})", "",
                      "| method | " + " | ".join(f"{f:.0%}" for f in fracs) + " |",
                      "| --- |" + " --- |" * len(fracs)]
            for m in methods:
                if m != reference and any((m, f) in dcell for f in fracs):
                    lines.append(f"| {m} | " + " | ".join(dcell.get((m, f), "") for f in fracs) + " |")
        supervised = [m for m in methods if needs_labels(method_of(m))]
        if supervised:
            lines += ["", f"({', '.join(supervised)}: supervised baselines, they read the ground-truth labels.)"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_results(rows: list[dict], out_dir: str | Path, *, title: str = "accuracy vs subset fraction") -> dict:
    """Writes results.csv (every run), summary.csv, results.md and accuracy_vs_fraction.png into out_dir,
    and, where random rows give the methods a paired difference, difference_vs_fraction.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    atomic_write_csv(out_dir / "results.csv", FIELDS, rows)
    atomic_write_csv(out_dir / "summary.csv", SUMMARY_FIELDS, summary)
    md = markdown_table(summary)
    atomic_write_bytes(out_dir / "results.md", md.encode())
    plot = out_dir / "accuracy_vs_fraction.png"
    plot_summary(summary, plot, title=title)
    out = {"summary": summary, "markdown": md, "plot": plot, "difference_plot": None}
    if any(s["diff"] is not None for s in summary):
        out["difference_plot"] = out_dir / "difference_vs_fraction.png"
        plot_differences(summary, out["difference_plot"], title=title)
    return out


def plot_summary(summary: list[dict], path: str | Path, *, title: str = "") -> None:
    """Accuracy against subset fraction, one line per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluators = sorted({s["evaluator"] for s in summary})
    style = _method_styles(summary)
    fig, axes = plt.subplots(1, len(evaluators), figsize=(6.5 * len(evaluators), 5), squeeze=False)
    for ax, ev in zip(axes[0], evaluators):
        rows = [s for s in summary if s["evaluator"] == ev]
        for m in dict.fromkeys(s["method"] for s in rows):
            pts = sorted((s["fraction"], s["mean"], s["std"]) for s in rows if s["method"] == m)
            ax.errorbar([100 * p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                        marker="o", markersize=4, capsize=3, label=m, **style[m])
        ax.set_ylabel("test accuracy (%)")
        _finish_panel(ax, ev, title)
    save_figure(fig, path)


def plot_differences(summary: list[dict], path: str | Path, *, title: str = "", reference: str = REFERENCE) -> None:
    """Each method's paired difference from `reference` (percentage points) against subset fraction,
    error bars = its 95% t interval (none with one pair); one panel per evaluator with differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = _method_styles(summary)  # the colours of the accuracy plot
    summary = [s for s in summary if s.get("diff") is not None]
    evaluators = sorted({s["evaluator"] for s in summary})
    if not evaluators:
        raise ValueError(f"summary: no method has a paired difference from {reference} to plot")
    fig, axes = plt.subplots(1, len(evaluators), figsize=(6.5 * len(evaluators), 5), squeeze=False)
    for ax, ev in zip(axes[0], evaluators):
        rows = [s for s in summary if s["evaluator"] == ev]
        ax.axhline(0.0, color="black", linestyle="--", linewidth=1, label=f"{reference} (0)")
        for m in dict.fromkeys(s["method"] for s in rows):
            pts = sorted((s["fraction"], s["diff"], s["diff_low"], s["diff_high"]) for s in rows if s["method"] == m)
            lo = [100 * (p[1] - p[2]) if p[2] is not None else 0.0 for p in pts]
            hi = [100 * (p[3] - p[1]) if p[3] is not None else 0.0 for p in pts]
            ax.errorbar([100 * p[0] for p in pts], [100 * p[1] for p in pts], yerr=[lo, hi],
                        marker="o", markersize=4, capsize=3, label=m, **style[m])
        ax.set_ylabel(f"accuracy − {reference} (points, paired; 95% t interval)")
        _finish_panel(ax, ev, title)
    save_figure(fig, path)


def _method_styles(summary: list[dict]) -> dict:
    import matplotlib.pyplot as plt

    # One colour per method on every panel (tab20 has room for 19 besides random's black);
    # random, the reference, is black and dashed; supervised baselines (reading the labels) are dotted.
    others = [m for m in dict.fromkeys(s["method"] for s in summary) if m != "random"]
    cmap = plt.get_cmap("tab20")
    style = {m: {"color": cmap(i % 20), "linestyle": ":" if needs_labels(method_of(m)) else "-"}
             for i, m in enumerate(others)}
    style["random"] = {"color": "black", "linestyle": "--"}
    return style


def _finish_panel(ax, ev: str, title: str) -> None:
    ax.set_xlabel("subset size (% of the training pool)")
    note = "\n" + textwrap.fill(EVALUATOR_NOTES[ev], 70) if ev in EVALUATOR_NOTES else ""
    ax.set_title(f"{title} [{ev}]{note}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig, path: str | Path) -> None:
    """Writes a matplotlib figure as a PNG (110 dpi, tight layout) atomically and closes it."""
    import matplotlib.pyplot as plt

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
    train_ds, test_ds = as_data(train_ds), as_data(test_ds)
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
    encoder = Trainer(TrainConfig(**opts), train_ds.subset(index)).fit().model.encoder
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
