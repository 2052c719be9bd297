"""The `coreset-ext` command (also `python -m coreset_ext`)."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from coreset_ext import _backend

    print(_backend.report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coreset-ext",
        description="Data-efficient contrastive learning: train, score, select and evaluate coresets.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="build information and the backend serving each op here")
    p.set_defaults(func=_cmd_info)
    _add_main_job_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"coreset-ext {args.command}: error: {e}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------
# main job (issue 5): train, select, evaluate, demo
# --------------------------------------------------------------------------------------------

_FRACTIONS = "0.1,0.2,0.3,0.5"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _options(pairs: list[str]) -> dict:
    import json

    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"--option: expected KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", choices=["digits", "cifar10", "cifar100", "folder", "tensor"],
                   help="data source (digits ships with scikit-learn)")
    p.add_argument("--data-dir", default=None,
                   help="directory (cifar10/100 in torchvision's python format, image folder) or .pt/.npz file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")


def _train_config(args: argparse.Namespace, method: str):
    from coreset_ext.train import TrainConfig

    return TrainConfig(method=method, encoder=args.encoder, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, temperature=args.temperature, css_on=args.css_on, seed=args.seed,
                       device=args.device, progress=not args.no_progress, queue_size=args.queue_size,
                       width=args.width)


def _cmd_train(args: argparse.Namespace) -> int:
    from coreset_ext.train.data import load_dataset
    from coreset_ext.train.pipeline import train_and_embed

    cfg = _train_config(args, args.method)
    train_ds = load_dataset(args.data, split="train", data_dir=args.data_dir)
    test_ds = load_dataset(args.data, split="test", data_dir=args.data_dir)
    out = train_and_embed(cfg, train_ds, test_ds, args.out, resume=not args.no_resume)
    s = out["scores"]
    print(f"trained {cfg.method} on {train_ds.name} ({len(train_ds)} examples) for {cfg.epochs} epochs; "
          f"CSS mean {float(s.nanmean()):.4f}; wrote {args.out}/scores.npz, embeddings.npz, checkpoints/last.pt")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from coreset_ext.select import select
    from coreset_ext.train.pipeline import load_run

    if (args.fraction is None) == (args.budget is None):
        raise ValueError(f"--fraction/--budget: give exactly one, got {args.fraction!r} and {args.budget!r}")
    run = load_run(args.run)
    labels = None
    if args.by_class:
        from coreset_ext.train.data import load_dataset

        labels = load_dataset(args.data, split="train", data_dir=args.data_dir).labels
    opts = _options(args.option)
    sel = select(args.method, fraction=args.fraction, budget=args.budget, scores=run.get("scores"),
                 embeddings=run.get("train"), labels=labels, seed=args.seed,
                 fingerprint=run["config"]["data"]["fingerprint"], **opts)
    sel.save(args.out)
    print(f"selected {len(sel)} of {sel.dataset_size} examples with {args.method}; wrote {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from coreset_ext.select import Selection
    from coreset_ext.train.evaluate import write_results
    from coreset_ext.train.pipeline import evaluate_selections

    sels = [Selection.load(p) for p in args.selection]
    rows = evaluate_selections(sels, run_dir=args.run, data=args.data, data_dir=args.data_dir,
                               evaluators=tuple(args.evaluator), seeds=tuple(range(args.seeds)),
                               random_baseline=not args.no_random, device=args.device)
    report = write_results(rows, args.out, title=args.data)
    print(report["markdown"])
    print(f"wrote {args.out}/results.csv, summary.csv, results.md, accuracy_vs_fraction.png")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from coreset_ext.train.pipeline import run_pipeline

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # small ops on a shared CPU: one thread avoids oversubscription
    t0 = time.perf_counter()
    opts = {"epochs": args.epochs}
    report = run_pipeline(args.out, data=args.data, data_dir=args.data_dir, train_options=opts,
                          fractions=args.fractions, seeds=tuple(range(args.seeds)), evaluators=tuple(args.evaluator),
                          device=args.device, progress=not args.no_progress)
    print()
    print(report["markdown"])
    print(f"pipeline wall time: {time.perf_counter() - t0:.1f}s; wrote {args.out}/config.json, train_*/, "
          f"selections/, results.csv, summary.csv, results.md, {report['plot'].name}")
    return 0


def _add_main_job_commands(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("train", formatter_class=fmt,
                       help="train SimCLR or MoCo v2 and score every example (CSS) while training",
                       description="Train a contrastive model on the training split, accumulating each example's "
                                   "positive-pair cosine (CSS score). Writes OUT/config.json, OUT/checkpoints/last.pt, "
                                   "OUT/scores.npz and OUT/embeddings.npz; resumes from OUT's checkpoint if present.")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--method", default="simclr", choices=["simclr", "moco"])
    p.add_argument("--encoder", default="small_cnn", choices=["small_cnn", "resnet18", "mlp"])
    p.add_argument("--width", type=int, default=32, help="small_cnn channel width")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=None, help="None: 0.5 for SimCLR, 0.2 for MoCo")
    p.add_argument("--queue-size", type=int, default=1024, help="MoCo negatives queue")
    p.add_argument("--css-on", default="projection", choices=["projection", "backbone"],
                   help="embedding whose positive-pair cosine is the CSS score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT has a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    from coreset_ext.select import available_methods

    p = sub.add_parser("select", formatter_class=fmt, help="select a coreset from a training run's scores/embeddings",
                       description="Select examples with a registered method using RUN's CSS scores and backbone "
                                   "embeddings; write a Selection file (.npz, no pickle).")
    _add_data_args(p)
    p.add_argument("--run", required=True, help="training run directory (from `coreset-ext train`)")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(available_methods())}")
    p.add_argument("--fraction", type=float, default=None, help="subset size as a fraction of the pool, in (0, 1]")
    p.add_argument("--budget", type=int, default=None, help="subset size as a number of examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--by-class", action="store_true", help="pass the labels (balanced_random per class)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. keep=easiest or n_clusters=20 (repeatable)")
    p.add_argument("--out", required=True, help="selection file to write (.npz)")
    p.set_defaults(func=_cmd_select)

    p = sub.add_parser("evaluate", formatter_class=fmt,
                       help="test accuracy of classifiers trained on selections vs random subsets of the same size",
                       description="Train a classifier on each selection only (linear probe on RUN's frozen "
                                   "features, or a small network from scratch), over seeds, with random subsets "
                                   "of the same sizes as the reference. Writes the table (Markdown, CSV) and a plot.")
    _add_data_args(p)
    p.add_argument("--selection", nargs="+", required=True, help="selection files")
    p.add_argument("--run", default=None, help="training run directory (needed by the probe evaluator)")
    p.add_argument("--evaluator", nargs="+", default=["probe"], choices=["probe", "scratch"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-random", action="store_true", help="skip the random baseline")
    p.add_argument("--out", required=True, help="directory for results.{csv,md} and the plot")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("demo", formatter_class=fmt,
                       help="the whole pipeline on digits: SimCLR+MoCo with CSS, every selector, table and plot",
                       description="Train SimCLR and MoCo with CSS scores, select 10/20/30/50%% with every method, "
                                   "evaluate each subset over seeds (linear probe and from-scratch network), and "
                                   "write the table and the plot into OUT.")
    _add_data_args(p)
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--fractions", type=_floats, default=_floats(_FRACTIONS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--evaluator", nargs="+", default=["probe", "scratch"], choices=["probe", "scratch"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


if __name__ == "__main__":
    sys.exit(main())
