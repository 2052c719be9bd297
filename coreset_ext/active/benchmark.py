"""The active-learning benchmark: every method on the same realistic pools, round by round.

For each seed: a realistic pool of the training split (`make_realistic_pool`), the ID classes of
the test split as the test set, one `ContrastiveFeatures` shared by the methods (its training reads
no label, so every method sees the same features each round), and one `ActiveLearner` per method,
stepped in lockstep: query `budget`, the simulated oracle answers, update, and the accuracy of a
classifier of the labelled ID examples on the test set. Every learner saves its state under
OUT/seed<s>/<method>.npz after each step, so a rerun of the same command resumes where it stopped
(another setting is refused, naming it). Results: rounds.csv (every method, seed and round),
summary.csv, results.md (accuracy against labels spent; wasted picks) and active_learning.png
(accuracy vs labels, wasted picks vs rounds, all methods on one figure).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

from coreset_ext._validation import POSITIVE_INT, check
from coreset_ext.active.acquire import METHODS
from coreset_ext.active.features import ContrastiveFeatures, FeatureConfig, json_ready
from coreset_ext.active.learner import ActiveLearner
from coreset_ext.active.pool import make_realistic_pool
from coreset_ext.io import atomic_write_bytes, atomic_write_csv
from coreset_ext.train.data import load_dataset
from coreset_ext.train.evaluate import save_figure

logger = logging.getLogger(__name__)

ROW_FIELDS = ("method", "seed", "round", "labels_spent", "picked_id", "picked_ood", "picked_ambiguous", "accuracy")
SUMMARY_FIELDS = ("method", "round", "labels_spent", "accuracy_mean", "accuracy_std", "wasted_mean",
                  "wasted_total_mean", "ood_total_mean", "ambiguous_total_mean", "seeds")


def run_active_benchmark(out_dir: str | Path, *, data: str = "digits", data_dir: str | None = None,
                         id_classes=tuple(range(6)), ood_classes=tuple(range(6, 10)), ambiguous_fraction: float = 0.2,
                         ood_fraction: float = 0.3, methods=METHODS.values, seeds=(0, 1, 2), rounds: int = 8,
                         budget: int = 40, features: FeatureConfig | None = None, progress: bool = True,
                         log=logger.info) -> dict:
    """Runs (or resumes) the benchmark into `out_dir` and writes its tables and plot; returns
    {"rows", "summary", "markdown", "plot"}."""
    out_dir = Path(out_dir)
    rounds = check("rounds", rounds, POSITIVE_INT)
    budget = check("budget", budget, POSITIVE_INT)
    methods = [check("method", m, METHODS) for m in methods]
    if not methods or not seeds:
        raise ValueError("methods/seeds: give at least one of each")
    features = features or FeatureConfig()
    config = json_ready({"data": data, "data_dir": data_dir, "id_classes": list(id_classes),
                         "ood_classes": list(ood_classes), "ambiguous_fraction": ambiguous_fraction,
                         "ood_fraction": ood_fraction, "rounds": rounds, "budget": budget,
                         "features": features.__dict__})
    train = load_dataset(data, split="train", data_dir=data_dir)
    test = load_dataset(data, split="test", data_dir=data_dir)
    pools = {seed: make_realistic_pool(train, id_classes, ood_classes, ambiguous_fraction, ood_fraction, seed)
             for seed in seeds}  # every check before anything is written
    for pool in pools.values():
        if budget * rounds > len(pool.dataset):
            raise ValueError(f"budget: {rounds} rounds of {budget} need {budget * rounds} examples, but the pool "
                             f"holds {len(pool.dataset)}")
    _claim(out_dir, config)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(seeds) * rounds * len(methods), disable=not progress, desc="active", unit="query",
               dynamic_ncols=True)
    rows = []
    for seed, pool in pools.items():
        test_set = pool.test_set(test)
        log(f"seed {seed}: pool of {len(pool.dataset)} ({pool.counts}), {len(test_set)} ID test examples")
        shared = ContrastiveFeatures(pool.dataset, features, seed=seed)
        learners = {m: ActiveLearner(pool.dataset, method=m, seed=seed, features=shared,
                                     state_path=out_dir / f"seed{seed}" / f"{m}.npz") for m in methods}
        for r in range(rounds):
            for m, learner in learners.items():
                if learner.round == r:
                    picks = learner.query(budget)
                    learner.update(picks, *pool.oracle.label(picks))
                if "accuracy" not in learner.history[r]:
                    learner.evaluate(test_set)
                h = learner.history[r]
                bar.update(1)
                bar.set_postfix(seed=seed, round=r, method=m, acc=f"{h['accuracy']:.3f}")
        rows += [{"method": m, "seed": seed, **h} for m, learner in learners.items() for h in learner.history[:rounds]]
    bar.close()
    return write_active_results(rows, out_dir)


def _claim(out_dir: Path, config: dict) -> None:
    """Writes OUT/config.json, or checks that the one there has these settings (a resumed run)."""
    path = out_dir / "config.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            stored = None
        if not isinstance(stored, dict):
            raise ValueError(f"resume: {path} is not an active-learning benchmark's config.json; use another --out")
        changed = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in config.items() if stored.get(k) != v]
        if changed:
            raise ValueError(f"resume: {out_dir} holds a run with other settings ({'; '.join(changed)}); use another "
                             "--out, or delete it")
    atomic_write_bytes(path, json.dumps(config, indent=2).encode())


def summarize_active(rows: list[dict]) -> list[dict]:
    """Per (method, round): accuracy mean and sample std over seeds, wasted picks (OOD + ambiguous)
    of the round, and their running totals (all OOD, all ambiguous) up to it, means over seeds.
    Methods in first-appearance order, rounds ascending."""
    total: dict[tuple, dict] = {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"], r["round"])):
        key = (r["method"], r["seed"])
        run = total.setdefault(key, {"ood": 0, "ambiguous": 0})
        run["ood"] += r["picked_ood"]
        run["ambiguous"] += r["picked_ambiguous"]
        groups[(r["method"], r["round"])].append({**r, "ood_total": run["ood"], "ambiguous_total": run["ambiguous"]})
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    out = []
    for (m, rnd), runs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        accs = [r["accuracy"] for r in runs if not math.isnan(r["accuracy"])]
        mean = sum(accs) / len(accs) if accs else math.nan
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        avg = {key: sum(r[key] for r in runs) / len(runs) for key in
               ("labels_spent", "picked_ood", "picked_ambiguous", "ood_total", "ambiguous_total")}
        out.append({"method": m, "round": rnd, "labels_spent": round(avg["labels_spent"]), "accuracy_mean": mean,
                    "accuracy_std": std, "wasted_mean": avg["picked_ood"] + avg["picked_ambiguous"],
                    "wasted_total_mean": avg["ood_total"] + avg["ambiguous_total"],
                    "ood_total_mean": avg["ood_total"], "ambiguous_total_mean": avg["ambiguous_total"],
                    "seeds": len(runs)})
    return out


def active_markdown(summary: list[dict]) -> str:
    """Two tables: test accuracy (%, mean ± std over seeds) per method against labels spent, and
    the wasted picks (OOD + ambiguous) summed over the rounds so far, with the last round's split."""
    methods = list(dict.fromkeys(s["method"] for s in summary))
    spent = sorted({s["labels_spent"] for s in summary})
    cell = {(s["method"], s["labels_spent"]): s for s in summary}
    seeds = sorted({s["seeds"] for s in summary})
    seed_text = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    head = "| method | " + " | ".join(str(n) for n in spent) + " |\n| --- |" + " --- |" * len(spent)
    lines = [(f"Test accuracy on the ID classes (%, mean ± std over {seed_text} seeds) against labels spent "
              "(every query costs a label, OOD and ambiguous ones included)"), "", head]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            f"{100 * cell[(m, n)]['accuracy_mean']:.1f} ± {100 * cell[(m, n)]['accuracy_std']:.1f}"
            if (m, n) in cell else "" for n in spent) + " |")
    lines += ["", ("Wasted picks (OOD + ambiguous) summed over the rounds so far (mean over seeds); last column: "
                   "of which OOD / ambiguous"), "", head.replace(" |\n", " | OOD / ambiguous |\n", 1) + " --- |"]
    for m in methods:
        last = cell[(m, max(n for (mm, n) in cell if mm == m))]
        lines.append(f"| {m} | " + " | ".join(f"{cell[(m, n)]['wasted_total_mean']:.1f}" if (m, n) in cell else ""
                                                for n in spent)
                     + f" | {last['ood_total_mean']:.1f} / {last['ambiguous_total_mean']:.1f} |")
    return "\n".join(lines) + "\n"


def write_active_results(rows: list[dict], out_dir: str | Path) -> dict:
    """rounds.csv, summary.csv, results.md and active_learning.png into `out_dir`."""
    out_dir = Path(out_dir)
    summary = summarize_active(rows)
    atomic_write_csv(out_dir / "rounds.csv", ROW_FIELDS, rows)
    atomic_write_csv(out_dir / "summary.csv", SUMMARY_FIELDS, summary)
    md = active_markdown(summary)
    atomic_write_bytes(out_dir / "results.md", md.encode())
    plot = out_dir / "active_learning.png"
    plot_active(summary, plot)
    return {"rows": rows, "summary": summary, "markdown": md, "plot": plot}


def plot_active(summary: list[dict], path: str | Path) -> None:
    """Left: accuracy against labels spent (error bars: std over seeds); right: wasted picks per
    round against the round; one line per method, the same colour on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(s["method"] for s in summary))
    cmap = plt.get_cmap("tab10")
    fig, (acc_ax, waste_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for i, m in enumerate(methods):
        pts = [s for s in summary if s["method"] == m]
        style = {"color": cmap(i % 10), "linestyle": "-" if m.startswith("contrastive") else "--", "marker": "o",
                 "markersize": 4, "label": m}
        acc_ax.errorbar([s["labels_spent"] for s in pts], [100 * s["accuracy_mean"] for s in pts],
                        yerr=[100 * s["accuracy_std"] for s in pts], capsize=3, **style)
        waste_ax.plot([s["round"] + 1 for s in pts], [s["wasted_mean"] for s in pts], **style)
    acc_ax.set(xlabel="labels spent", ylabel="test accuracy on the ID classes (%)",
               title="accuracy vs labels (mean ± std over seeds)")
    waste_ax.set(xlabel="round", ylabel="OOD + ambiguous picks in the round",
                 title="wasted picks per round (mean over seeds)")
    for ax in (acc_ax, waste_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
