"""Evidence for the mining loss (issue 18): linear-probe accuracy on digits of contrastive learning
with mined potential samples against plain SimCLR and MoCo, same epochs and settings, each encoder
trained afresh per seed.

    python benchmarks/mining_digits.py                   # 20 epochs, seeds 0 1 2 (~15 min on 2 CPU cores)
    python benchmarks/mining_digits.py --epochs 2 --seeds 0 --out /tmp/mining

For every (method, seed): the trainer (`coreset_ext.train`, its defaults: small_cnn, batch 256,
AdamW 2e-3, the built-in augmentations) trains on the 1,438-image training split, then a linear
probe on the frozen backbone's features of the training split is scored on the 359 test images
(`evaluate.ssl_probe_accuracy`, the protocol of the demo). Writes OUT/mining-digits-e<epochs>.json
(every run) and OUT/mining-digits-e<epochs>.md (the table: mean, sample standard deviation, min and max over seeds,
and each mining form's mean difference from its base with a 95% t interval over the paired seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from coreset_ext.train import load_dataset
from coreset_ext.train.evaluate import paired_difference, ssl_probe_accuracy

# (label, trainer options): each mining form next to the plain method it extends
METHODS = (
    ("SimCLR (NT-Xent)", {"method": "simclr"}),
    ("mining, SimCLR form", {"method": "mining", "base": "simclr"}),
    ("MoCo v2 (InfoNCE, queue)", {"method": "moco"}),
    ("mining, MoCo form", {"method": "mining", "base": "moco"}),
)
BASE_OF = {"mining, SimCLR form": "SimCLR (NT-Xent)", "mining, MoCo form": "MoCo v2 (InfoNCE, queue)"}


def run(epochs: int, seeds: list[int]) -> list[dict]:
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    rows = []
    jobs = [(label, opts, seed) for seed in seeds for label, opts in METHODS]
    for label, opts, seed in tqdm(jobs, desc="trainings", unit="run"):
        start = time.perf_counter()
        acc = ssl_probe_accuracy(train, torch.arange(len(train)), test, seed=seed,
                                 train_options={**opts, "epochs": epochs, "device": "cpu"})
        rows.append({"method": label, "seed": seed, "epochs": epochs, "accuracy": acc,
                     "seconds": round(time.perf_counter() - start, 1)})
    return rows


def table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r["accuracy"]
    header = ("| method | linear-probe accuracy, mean | std | min | max | seeds | difference from its base, "
              "mean [95% CI] |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, _ in METHODS:
        acc = by.get(label)
        if not acc:
            continue
        values = list(acc.values())
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        diff = ""
        base = by.get(BASE_OF.get(label), {})
        seeds = sorted(set(acc) & set(base))
        if len(seeds) >= 2:  # an interval needs two pairs
            mean, lo, hi = paired_difference([acc[s] for s in seeds], [base[s] for s in seeds])
            diff = f"{100 * mean:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        lines.append(f"| {label} | {100 * statistics.mean(values):.1f}% | {100 * std:.1f} | {100 * min(values):.1f}% | "
                     f"{100 * max(values):.1f}% | {len(values)} | {diff} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine more threads wait on each other)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.epochs, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"mining-digits-e{args.epochs}"
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = (f"Linear-probe accuracy on digits (test split, 359 images) after {args.epochs} epochs of contrastive "
            f"training on the 1,438 training images, seeds {' '.join(map(str, args.seeds))} (encoder retrained per "
            f"seed), CPU. Produced by `python benchmarks/mining_digits.py --epochs {args.epochs} --seeds "
            f"{' '.join(map(str, args.seeds))}`.\n\n{table(rows)}\n")
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
