"""The `coreset-ext` command (also `python -m coreset_ext`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import zipfile
from dataclasses import fields
from pathlib import Path

import torch

from coreset_ext import _backend, distributed
from coreset_ext.select import Selection, available_methods, needs_labels, select, supervised_methods
from coreset_ext.select.registry import method_options, parse_option
from coreset_ext.train import TrainConfig
from coreset_ext.train.data import SOURCES, load_dataset
from coreset_ext.train.embed import load_embeddings
from coreset_ext.train.evaluate import EVALUATORS, evaluate_ssl, write_results
from coreset_ext.train.models import ENCODERS, PREFIXES
from coreset_ext.train.pipeline import (DEFAULT_METHODS, MethodSpec, evaluate_selections, load_run, run_pipeline,
                                        train_and_embed)
from coreset_ext.train.trainer import AMP, BASES, CSS_ON, LR_SCHEDULES, METHODS


def _cmd_info(args: argparse.Namespace) -> int:
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
    parser.train_parser = _add_main_job_commands(sub)
    _add_active_command(sub)
    return parser


class _StdoutHandler(logging.StreamHandler):
    """Writes each record to whatever sys.stdout is at the time (a caller may swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


_LOGGERS = ("coreset_ext", "coreset_ext.train.trainer")  # the library's, and the trainer's per-epoch lines


@contextlib.contextmanager
def _showing_library_logs():
    """For one command: the library's log records (`coreset_ext.*`, INFO and up) printed as plain
    lines; afterwards the loggers are as they were (main may run inside a caller's process)."""
    log = logging.getLogger("coreset_ext")
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        if getattr(args, "config", None) is not None:  # the file's values become defaults; flags given win
            parser.train_parser.set_defaults(**read_train_config(args.config))
            args = parser.parse_args(argv)
        with _showing_library_logs():
            return args.func(args)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        # bad input or an unreadable file (missing, truncated, a folder): one clear line, no traceback;
        # some of these carry no message (EOFError()), so the line names the exception too
        print(f"coreset-ext {args.command}: error: {str(e) or type(e).__name__}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------
# main job (issue 5): train, select, evaluate, demo
# --------------------------------------------------------------------------------------------

_FRACTIONS = "0.1,0.2,0.3,0.5"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 4096:  # torch would try to start every one of a huge number
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 4096], got {text!r}")
    return value


def _path(text: str) -> str:
    if not text.strip():  # an empty path is the current directory: never what was meant
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return text


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1], got {text!r}")
    return values


def _options(method: str, pairs: list[str] | None) -> dict:
    """--option KEY=VALUE pairs, each value read as the type the method's option declares."""
    out = {}
    for p in pairs or []:
        key, eq, text = p.partition("=")
        if not eq or not key:
            raise ValueError(f"--option: expected KEY=VALUE, got {p!r}")
        if key in out:
            raise ValueError(f"--option: {key} given twice")
        out[key] = parse_option(method, key, text)
    return out


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", choices=SOURCES.values,
                   help="data source (digits ships with scikit-learn)")
    p.add_argument("--data-dir", default=None, type=_path,
                   help="directory (cifar10/100 in torchvision's python format, image folder) or .pt/.npz file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")


def _add_evaluation_args(p: argparse.ArgumentParser, evaluators: list[str], evaluator_help: str | None) -> None:
    """What `evaluate` and `demo` both ask: the evaluators, the seeds, the ssl protocol's training."""
    p.add_argument("--evaluator", nargs="+", default=evaluators, choices=EVALUATORS, help=evaluator_help)
    p.add_argument("--seeds", type=_positive_int, default=3)
    p.add_argument("--ssl-epochs", type=_positive_int, default=5,
                   help="contrastive epochs per subset in the ssl protocol")


# TrainConfig fields a config file may set (every field but `progress`, which a flag sets), and the
# two data options; the file's values become the train command's defaults.
_CONFIG_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "progress") + ("data", "data_dir")


def read_train_config(path: str) -> dict:
    """The train command's settings from a .json/.yaml/.yml file: a run's config.json (its "train"
    record, and the data of its "source"), or a flat mapping of TrainConfig fields plus `data` and
    `data_dir`. Unknown keys and unreadable files are a ValueError naming the file."""
    p = Path(path)
    if p.suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"--config: {p} must be a .json, .yaml or .yml file")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            content = json.loads(text)
        else:
            import yaml

            content = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 -- json and yaml each raise their own error types
        raise ValueError(f"--config: {p} cannot be parsed ({type(e).__name__}: {e})") from None
    if not isinstance(content, dict):
        raise ValueError(f"--config: {p} must hold a mapping of settings, got {type(content).__name__}")
    if isinstance(content.get("train"), dict):  # a run's config.json
        source = content.get("source") if isinstance(content.get("source"), dict) else {}
        content = {**content["train"], **{k: source[k] for k in ("data", "data_dir") if k in source}}
        content.pop("progress", None)
    unknown = sorted(set(content) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"--config: {p} has unknown settings {unknown}; known: {', '.join(_CONFIG_KEYS)}")
    if content.get("amp") is None and "amp" in content:
        content["amp"] = "auto"
    return content


def _train_config(args: argparse.Namespace, method: str) -> TrainConfig:
    return TrainConfig(method=method, base=args.base, encoder=args.encoder, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, temperature=args.temperature, css_on=args.css_on,
                       seed=args.seed, device=args.device, progress=not args.no_progress, queue_size=args.queue_size,
                       width=args.width, proj_dim=args.proj_dim, proj_hidden=args.proj_hidden,
                       momentum=args.momentum, amp=None if args.amp == "auto" else args.amp,
                       checkpoint_every=args.checkpoint_every, lr_schedule=args.lr_schedule,
                       warmup_epochs=args.warmup_epochs, pretrained=args.pretrained,
                       sync_bn=getattr(args, "sync_bn", False))


def _cmd_train(args: argparse.Namespace) -> int:
    logging.getLogger("coreset_ext.train.trainer").setLevel(logging.DEBUG)  # a line per epoch (debug elsewhere)
    cfg = _train_config(args, args.method)
    train_ds = load_dataset(args.data, split="train", data_dir=args.data_dir)
    test_ds = load_dataset(args.data, split="test", data_dir=args.data_dir)
    started = distributed.init_from_env(cfg.device)  # under torchrun: one process per GPU, DDP
    try:
        out = train_and_embed(cfg, train_ds, test_ds, args.out, resume=not args.no_resume,
                              source={"data": args.data, "data_dir": args.data_dir})
    finally:
        if started:
            torch.distributed.destroy_process_group()
    if "train" not in out:
        return 0  # a rank other than 0 under torchrun: rank 0 wrote the embeddings and reports
    s = out["scores"]
    print(f"trained {cfg.method} on {train_ds.name} ({len(train_ds)} examples) for {cfg.epochs} epochs; "
          f"CSS mean {float(s.nanmean()):.4f}; wrote {args.out}/config.json, metrics.csv, scores.npz, "
          "embeddings.npz, checkpoints/last.pt, checkpoints/encoder.safetensors")
    return 0


def _encoder(text: str) -> str:
    if text.startswith(PREFIXES) and text.partition(":")[2] or text in ENCODERS.values:
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(ENCODERS.values)}, torchvision:<name> or "
                                     f"timm:<name>, got {text!r}")


def _cmd_select(args: argparse.Namespace) -> int:
    if (args.fraction is None) == (args.budget is None):
        raise ValueError(f"--fraction/--budget: give exactly one, got {args.fraction!r} and {args.budget!r}")
    if args.run is None and args.embeddings is None:
        raise ValueError("--run/--embeddings: give a training run directory, an embeddings file, or both")
    opts = _options(args.method, args.option)
    if args.by_class:  # it sets the method's per-class mode, so only a method with one honours it
        if "by" not in method_options(args.method):
            raise ValueError(f"--by-class: method {args.method!r} has no per-class mode (an option 'by'); "
                             "sas reads classes with --option classes=labels")
        if opts.setdefault("by", "class") != "class":
            raise ValueError(f"--by-class: contradicts --option by={opts['by']}")
    reads_labels = needs_labels(args.method, opts)
    run = load_run(args.run) if args.run is not None else {}
    train_ds = None
    if args.embeddings is not None or reads_labels:
        train_ds = load_dataset(args.data, split="train", data_dir=args.data_dir)
        if run and run["config"]["data"]["fingerprint"] != train_ds.fingerprint:
            raise ValueError(f"--data: run {args.run} was trained on data set {run['config']['data']['fingerprint']}, "
                             f"but --data {args.data!r} is {train_ds.fingerprint}")
    embeddings = run.get("train")
    if args.embeddings is not None:
        embeddings = load_embeddings(args.embeddings, dataset_size=len(train_ds))
    labels = None
    if reads_labels:
        if not train_ds.has_labels:
            raise ValueError(f"--method: {args.method!r} needs the training labels, but {args.data!r} has none")
        labels = train_ds.labels
    fingerprint = run["config"]["data"]["fingerprint"] if run else train_ds.fingerprint
    sel = select(args.method, fraction=args.fraction, budget=args.budget, scores=run.get("scores"),
                 embeddings=embeddings, labels=labels, seed=args.seed, fingerprint=fingerprint, **opts)
    sel.save(args.out)
    print(f"selected {len(sel)} of {sel.dataset_size} examples with {args.method}; wrote {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    # the ssl protocol trains its own encoder on each subset: a run or another evaluator would be ignored
    if args.protocol == "ssl" and (args.evaluator != ["probe"] or args.run is not None):
        raise ValueError("--evaluator/--run: they apply to --protocol coreset; the ssl protocol trains its own "
                         "encoder on each subset and probes it")
    sels = [Selection.load(p) for p in args.selection]
    if args.protocol == "ssl":  # SAS's protocol: contrastive training on each subset, full-set probe
        rows = evaluate_ssl(sels, data=args.data, data_dir=args.data_dir, seeds=tuple(range(args.seeds)),
                            random_baseline=not args.no_random, train_options={"epochs": args.ssl_epochs},
                            device=args.device)
    else:
        rows = evaluate_selections(sels, run_dir=args.run, data=args.data, data_dir=args.data_dir,
                                   evaluators=tuple(args.evaluator), seeds=tuple(range(args.seeds)),
                                   random_baseline=not args.no_random, device=args.device)
    report = write_results(rows, args.out, title=args.data)
    print(report["markdown"])
    diff_plot = f", {report['difference_plot'].name}" if report["difference_plot"] is not None else ""
    print(f"wrote {args.out}/results.csv, summary.csv, results.md, accuracy_vs_fraction.png{diff_plot}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)  # small ops on a shared CPU: one thread avoids oversubscription
    t0 = time.perf_counter()
    opts = {"epochs": args.epochs}
    methods = [m for m in DEFAULT_METHODS if args.methods is None or m.label in args.methods]
    report = run_pipeline(args.out, data=args.data, data_dir=args.data_dir, train_options=opts, methods=methods,
                          fractions=args.fractions, seeds=tuple(range(args.seeds)), evaluators=tuple(args.evaluator),
                          scratch_steps=args.scratch_steps, ssl_options={"epochs": args.ssl_epochs},
                          encoder_seeds=tuple(range(args.encoder_seeds)), device=args.device,
                          progress=not args.no_progress)
    _print_report(report, args.out, t0)
    return 0


def _print_report(report: dict, out: str, t0: float) -> None:
    print()
    print(report["markdown"])
    plots = ", ".join(p.name for p in (report["plot"], report.get("difference_plot")) if p is not None)
    print(f"pipeline wall time: {time.perf_counter() - t0:.1f}s; wrote {out}/config.json, train_*/, "
          f"selections/, results.csv, summary.csv, results.md, {plots}")


def benchmark_methods(labels: list[str] | None = None) -> list[MethodSpec]:
    """The leaderboard's rows: every label-free and supervised row of the demo (`DEFAULT_METHODS`), each
    at the benchmark's fractions (not the demo's own pruning rates), under the coreset evaluators only
    (the ssl protocol's rows are left out: it trains an encoder per subset), with random always in.
    `labels` picks rows by label (random is added when missing)."""
    out: dict[str, MethodSpec] = {}
    for m in DEFAULT_METHODS:
        if m.evaluators is not None or m.label in out or (labels is not None and m.label not in labels
                                                            and m.label != "random"):
            continue
        out[m.label] = MethodSpec(m.label, m.method, dict(m.options), run=m.run)
    return list(out.values())


def _cmd_benchmark(args: argparse.Namespace) -> int:
    # an interval needs a spread over the whole pipeline: at least two encoders, each re-scoring and re-selecting
    if args.encoder_seeds < 2:
        raise ValueError(f"--encoder-seeds: a 95% interval over the whole pipeline needs at least 2 encoder seeds "
                         f"(each retrains, re-scores and re-selects), got {args.encoder_seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    methods = benchmark_methods(args.methods)
    trainers = tuple(t for t in METHODS.values if t == "simclr" or any(m.run == t for m in methods))  # probe: simclr
    report = run_pipeline(args.out, data=args.data, data_dir=args.data_dir, train_options={"epochs": args.epochs},
                          trainers=trainers, methods=methods, fractions=args.fractions,
                          seeds=tuple(range(args.seeds)), evaluators=tuple(args.evaluator),
                          scratch_steps=args.scratch_steps, encoder_seeds=tuple(range(args.encoder_seeds)),
                          device=args.device, progress=not args.no_progress)
    _print_report(report, args.out, t0)
    return 0


def _add_job_command(sub, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    """A command of the main job: its parser, which runs `func` and takes the data options."""
    p = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, help=help,
                       description=description)
    p.set_defaults(func=func)
    _add_data_args(p)
    return p


def _add_main_job_commands(sub) -> argparse.ArgumentParser:
    train = p = _add_job_command(sub, "train", _cmd_train,
                         help="train SimCLR or MoCo v2 and score every example (CSS) while training",
                         description="Train a contrastive model on the training split, accumulating each example's "
                                     "positive-pair cosine (CSS score). Writes OUT/config.json, OUT/metrics.csv, "
                                     "OUT/checkpoints/last.pt and encoder.safetensors, OUT/scores.npz and "
                                     "OUT/embeddings.npz; resumes from OUT's checkpoint if present. --config replays "
                                     "a run's config.json (or reads a .yaml/.json of settings); flags given win.")
    p.add_argument("--out", required=True, type=_path, help="run directory")
    p.add_argument("--config", default=None, type=_path, metavar="FILE",
                   help="settings from a .json/.yaml file, e.g. a run's config.json (flags given override them)")
    p.add_argument("--method", default="simclr", choices=METHODS.values,
                   help="mining: contrastive learning with mined potential samples (cx.nn.PotentialMiningLoss)")
    p.add_argument("--base", default=None, choices=BASES.values,
                   help="--method mining only: its SimCLR form (the batch; default) or MoCo form (momentum encoder, "
                        "queue)")
    p.add_argument("--encoder", default="auto", type=_encoder,
                   help=f"{', '.join(ENCODERS.values)}, torchvision:<name> (e.g. torchvision:resnet18) or "
                        "timm:<name> (when timm is installed); auto: small_cnn for images and signals, mlp for vectors")
    p.add_argument("--pretrained", default=None, type=_path, metavar="PATH",
                   help="local weights for the encoder (.pt/.pth state dict or .safetensors); nothing is downloaded")
    p.add_argument("--width", type=_positive_int, default=32, help="small_cnn channel width")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES.values,
                   help="cosine: decays to 0 at the last epoch, after --warmup-epochs of linear warm-up")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--amp", default="auto", choices=["auto", *AMP.values],
                   help="bf16 autocast (also on the CPU), off, or auto: bf16 on CUDA, off on the CPU")
    p.add_argument("--temperature", type=float, default=None, help="None: 0.5 for SimCLR, 0.2 for MoCo")
    p.add_argument("--proj-dim", type=int, default=64, help="projection head output width")
    p.add_argument("--proj-hidden", type=int, default=128, help="projection head hidden width")
    p.add_argument("--queue-size", type=int, default=1024, help="MoCo negatives queue")
    p.add_argument("--momentum", type=float, default=0.99, help="MoCo key encoder momentum")
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--css-on", default="projection", choices=CSS_ON.values,
                   help="embedding whose positive-pair cosine is the CSS score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT has a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm, GPUs only)")

    p = _add_job_command(sub, "select", _cmd_select, help="select a coreset from a training run's scores/embeddings",
                         description="Select examples with a registered method using RUN's CSS scores and backbone "
                                     "embeddings (or an --embeddings file); write a Selection file (.npz, no pickle).")
    p.add_argument("--run", default=None, type=_path, help="training run directory (from `coreset-ext train`)")
    p.add_argument("--embeddings", default=None, metavar="PATH", type=_path,
                   help="embeddings file (.npy, .pt, or .npz with array 'train') to use instead of the run's")
    p.add_argument("--method", required=True,
                   help=f"one of: {', '.join(available_methods())} ({', '.join(supervised_methods())} read the "
                        "training labels, as do sas with classes=labels and balanced_random with by=class)")
    p.add_argument("--fraction", type=float, default=None, help="subset size as a fraction of the pool, in (0, 1]")
    p.add_argument("--budget", type=int, default=None, help="subset size as a number of examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--by-class", action="store_true",
                   help="select per class, reading the labels (methods with an option 'by': balanced_random)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. keep=easiest or n_clusters=20 (repeatable); read as the option's "
                        "type: bools as true/True/1 or false/False/0")
    p.add_argument("--out", required=True, type=_path, help="selection file to write (.npz)")

    p = _add_job_command(sub, "evaluate", _cmd_evaluate,
                         help="test accuracy of classifiers trained on selections vs random subsets of the same size",
                         description="Train a classifier on each selection only (linear probe on RUN's frozen "
                                     "features, or a small network from scratch), over seeds, with random subsets "
                                     "of the same sizes as the reference. Writes the table (Markdown, CSV) and a plot.")
    p.add_argument("--selection", nargs="+", required=True, type=_path, help="selection files")
    p.add_argument("--run", default=None, type=_path, help="training run directory (needed by the probe evaluator)")
    _add_evaluation_args(p, ["probe"], "with --protocol coreset")
    p.add_argument("--protocol", choices=["coreset", "ssl"], default="coreset",
                   help="coreset: train a classifier on the subset (--evaluator); ssl: SAS's protocol, contrastive "
                        "training on the subset only, then a linear probe on the full labelled training set")
    p.add_argument("--no-random", action="store_true", help="skip the random baseline")
    p.add_argument("--out", required=True, type=_path, help="directory for results.{csv,md} and the plot")

    p = _add_job_command(sub, "demo", _cmd_demo,
                         help="the whole pipeline on digits: SimCLR+MoCo with CSS, every selector, table and plot",
                         description="Train SimCLR and MoCo with CSS scores, select 10/20/30/50%% with every method, "
                                     "evaluate each subset over seeds (linear probe and from-scratch network), and "
                                     "write the table and the plot into OUT.")
    p.add_argument("--out", default="runs/demo", type=_path, help="run directory")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--fractions", type=_fractions, default=_fractions(_FRACTIONS))
    _add_evaluation_args(p, ["probe", "scratch"], None)
    p.add_argument("--threads", type=_threads, default=1, help="CPU threads for torch (0: torch's default)")
    labels = list(dict.fromkeys(m.label for m in DEFAULT_METHODS))
    p.add_argument("--methods", nargs="+", default=None, choices=labels, metavar="LABEL",
                   help=f"rows to run (default: all): {', '.join(labels)}; the SAS/ELFS rows use their own "
                        "fractions (keep 10/30/50/70%%), and sas and random also run the ssl protocol")
    p.add_argument("--scratch-steps", type=_positive_int, default=200, help="steps of the scratch evaluator")
    p.add_argument("--encoder-seeds", type=_positive_int, default=1,
                   help="train the contrastive encoders once per encoder seed (0..N-1), re-scoring, re-selecting "
                        "and re-evaluating with each: the spread and the paired differences cover the whole pipeline")
    p.add_argument("--no-progress", action="store_true")

    p = _add_job_command(sub, "benchmark", _cmd_benchmark,
                         help="leaderboard: every label-free and supervised selector against random, over encoder "
                              "seeds, with paired differences and 95%% intervals",
                         description="Run every label-free and supervised method of the demo against random through "
                                     "the whole pipeline once per encoder seed (SimCLR+MoCo retrained, re-scored, "
                                     "re-selected), evaluate each subset over seeds, and write the table (accuracy, "
                                     "and each method's paired difference from random with its 95% t interval over "
                                     "encoder seeds x seeds), the CSVs, and plots of accuracy and of the paired "
                                     "difference against fraction into OUT.")
    p.add_argument("--out", default="runs/benchmark", type=_path, help="run directory")
    p.add_argument("--epochs", type=int, default=15, help="contrastive epochs per encoder")
    p.add_argument("--fractions", type=_fractions, default=_fractions("0.1,0.3"))
    p.add_argument("--encoder-seeds", type=int, default=3,
                   help="encoders trained per trainer (seeds 0..N-1), at least 2: the interval's spread")
    p.add_argument("--seeds", type=_positive_int, default=3, help="evaluation (and selection) seeds per encoder")
    p.add_argument("--evaluator", nargs="+", default=["probe", "scratch"], choices=["probe", "scratch"])
    p.add_argument("--methods", nargs="+", default=None, choices=[m.label for m in benchmark_methods()],
                   metavar="LABEL", help=f"rows to run (default: all; random is always in): "
                                         f"{', '.join(m.label for m in benchmark_methods())}")
    p.add_argument("--threads", type=_threads, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--scratch-steps", type=_positive_int, default=200, help="steps of the scratch evaluator")
    p.add_argument("--no-progress", action="store_true")
    return train


# --------------------------------------------------------------------------------------------
# active learning in realistic pools (issue 19)
# --------------------------------------------------------------------------------------------

def _classes(text: str) -> tuple[int, ...]:
    """"0-5", "6,7,9" or "0-2,8": class labels."""
    try:
        out = []
        for part in text.split(","):
            lo, dash, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        out = []
    if not text.strip() or not out and text.strip() != "none":
        raise argparse.ArgumentTypeError(f"expected classes such as 0-5 or 6,7,9 (or none), got {text!r}")
    return tuple(out)


def _cmd_active(args: argparse.Namespace) -> int:
    from coreset_ext.active import FeatureConfig, run_active_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    features = FeatureConfig(epochs_first=args.epochs_first, epochs=args.epochs, width=args.width,
                             device=args.device)
    report = run_active_benchmark(args.out, data=args.data, data_dir=args.data_dir, id_classes=args.id_classes,
                                  ood_classes=args.ood_classes, ambiguous_fraction=args.ambiguous_fraction,
                                  ood_fraction=args.ood_fraction, methods=args.method, seeds=tuple(range(args.seeds)),
                                  rounds=args.rounds, budget=args.budget, features=features,
                                  progress=not args.no_progress)
    print()
    print(report["markdown"])
    print(f"active learning wall time: {time.perf_counter() - t0:.1f}s; wrote {args.out}/config.json, seed*/, "
          "rounds.csv, summary.csv, results.md, active_learning.png")
    return 0


def _add_active_command(sub) -> None:
    from coreset_ext.active import METHODS

    p = sub.add_parser("active", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="active learning in a realistic pool (OOD and ambiguous examples): contrastive "
                            "acquisition against the baselines",
                       description="Build a realistic pool from the training split (ID classes, OOD classes, "
                                   "ambiguous blends and noisy copies), then query BUDGET examples per round for "
                                   "ROUNDS rounds with each method, a simulated oracle answering; per round the "
                                   "accuracy of a classifier of the labelled ID examples on the ID test set, the "
                                   "labels spent and the OOD/ambiguous picks. Writes OUT/rounds.csv, summary.csv, "
                                   "results.md and active_learning.png; each learner's state is saved after every "
                                   "step, so rerunning the command resumes.")
    p.set_defaults(func=_cmd_active)
    _add_data_args(p)
    p.add_argument("--out", default="runs/active", type=_path, help="output directory")
    p.add_argument("--method", nargs="+", default=list(METHODS.values), choices=METHODS.values,
                   help="acquisition methods to compare")
    p.add_argument("--rounds", type=_positive_int, default=8)
    p.add_argument("--budget", type=_positive_int, default=40, help="labels per round")
    p.add_argument("--seeds", type=_positive_int, default=3, help="pools and loops per method (seeds 0..N-1)")
    p.add_argument("--id-classes", type=_classes, default=_classes("0-5"), help="in-distribution classes")
    p.add_argument("--ood-classes", type=_classes, default=_classes("6-9"), help="out-of-distribution classes")
    p.add_argument("--ambiguous-fraction", type=float, default=0.2, help="share of ambiguous examples in the pool")
    p.add_argument("--ood-fraction", type=float, default=0.3, help="share of OOD examples in the pool")
    p.add_argument("--epochs-first", type=_positive_int, default=15, help="contrastive epochs before round 1")
    p.add_argument("--epochs", type=_positive_int, default=3, help="warm-started contrastive epochs per later round")
    p.add_argument("--width", type=_positive_int, default=32, help="small_cnn channel width")
    p.add_argument("--threads", type=_threads, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")


if __name__ == "__main__":
    sys.exit(main())
