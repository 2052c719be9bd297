"""The coreset-ext command: train -> select -> evaluate -> demo run, and bad arguments fail cleanly."""

import subprocess
import sys

import pytest

from coreset_ext.cli import main

TINY = ["--epochs", "1", "--batch-size", "128", "--width", "8", "--no-progress"]


@pytest.mark.parametrize("command", ["train", "select", "evaluate", "demo", "info"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: coreset-ext " + command in capsys.readouterr().out


def test_train_select_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    for name in ("config.json", "scores.npz", "embeddings.npz", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    sel = tmp_path / "css.npz"
    assert main(["select", "--run", str(run), "--method", "css", "--fraction", "0.2", "--out", str(sel)]) == 0
    assert main(["select", "--run", str(run), "--method", "balanced_random", "--by-class", "--budget", "50",
                 "--option", "by=class", "--out", str(tmp_path / "bal.npz")]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--selection", str(sel), str(tmp_path / "bal.npz"),
                 "--seeds", "2", "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "| css |" in table and "| random |" in table and "| balanced_random |" in table
    assert (out / "accuracy_vs_fraction.png").stat().st_size > 1000
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 4 * 2  # (css, balanced, 2 random baselines) x 2 seeds


def test_demo_writes_table_and_plot(tmp_path, capsys):
    pytest.importorskip("coreset_ext.cluster")  # prototypes and balanced_random per cluster use KMeans
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--fractions", "0.1,0.5", "--seeds", "2",
                 "--evaluator", "probe", "--methods", "random", "css_simclr", "css_moco", "kcenter", "elfs",
                 "--ssl-epochs", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| css_simclr |" in printed and "| css_moco |" in printed and "pipeline wall time" in printed
    for name in ("config.json", "results.md", "results.csv", "summary.csv", "accuracy_vs_fraction.png",
                 "train_simclr/scores.npz", "train_moco/scores.npz", "selections/kcenter_50pct_seed1.npz",
                 "selections/elfs_70pct_seed1.npz"):
        assert (out / name).is_file(), name
    # Rows with their own fractions (elfs: keep 10/30/50/70%) and evaluators (random also runs the ssl
    # protocol at those fractions); the pipeline's fractions for the others.
    import csv

    rows = list(csv.DictReader((out / "results.csv").open()))
    got = {(r["method"], r["evaluator"]): set() for r in rows}
    for r in rows:
        got[(r["method"], r["evaluator"])].add(float(r["fraction"]))
    assert got[("elfs", "probe")] == {0.1, 0.3, 0.5, 0.7}
    assert got[("kcenter", "probe")] == {0.1, 0.5}
    assert got[("random", "probe")] == {0.1, 0.2, 0.3, 0.5, 0.7}
    assert got[("random", "ssl")] == {0.1, 0.3, 0.5, 0.7}
    assert ("elfs", "ssl") not in got and ("kcenter", "ssl") not in got
    assert "Evaluator: ssl" in printed and "Evaluator: probe" in printed


def test_select_supervised_baseline_and_embeddings_file(tmp_path_factory, capsys):
    import numpy as np

    from coreset_ext.select import Selection

    tmp = tmp_path_factory.mktemp("sup")
    run = _shared_run(tmp_path_factory)
    # aum reads the training labels (passed by the command) and the run's embeddings.
    assert main(["select", "--run", str(run), "--method", "aum", "--fraction", "0.1",
                 "--option", "proxy_epochs=2", "--out", str(tmp / "aum.npz")]) == 0
    sel = Selection.load(tmp / "aum.npz")
    assert len(sel) == 144 and sel.method == "aum" and sel.scores is not None
    # An embeddings file in place of the run: same selection as the run's own embeddings.
    from coreset_ext.io import load_npz

    arrays, _ = load_npz(run / "embeddings.npz")
    np.save(tmp / "emb.npy", arrays["train"])
    assert main(["select", "--embeddings", str(tmp / "emb.npy"), "--method", "aum", "--fraction", "0.1",
                 "--option", "proxy_epochs=2", "--out", str(tmp / "aum_file.npz")]) == 0
    assert Selection.load(tmp / "aum_file.npz").indices.tolist() == sel.indices.tolist()
    # sas with classes=labels gets the labels too; without them it would fail.
    assert main(["select", "--run", str(run), "--method", "sas", "--budget", "50", "--option", "classes=labels",
                 "--out", str(tmp / "sas.npz")]) == 0
    assert len(Selection.load(tmp / "sas.npz")) == 50
    # A file of the wrong length, and neither a run nor a file: clean errors naming both values.
    np.save(tmp / "short.npy", arrays["train"][:10])
    capsys.readouterr()
    assert main(["select", "--embeddings", str(tmp / "short.npy"), "--method", "sas", "--fraction", "0.1",
                 "--out", str(tmp / "x.npz")]) == 2
    assert "has 10 rows but the data set has 1438 examples" in capsys.readouterr().err
    assert main(["select", "--method", "random", "--fraction", "0.1", "--out", str(tmp / "x.npz")]) == 2
    assert "--run/--embeddings" in capsys.readouterr().err


def test_evaluate_ssl_protocol(tmp_path_factory, capsys):
    pytest.importorskip("coreset_ext.cluster")  # sas's latent classes come from KMeans
    import csv

    tmp = tmp_path_factory.mktemp("ssl")
    run = _shared_run(tmp_path_factory)
    assert main(["select", "--run", str(run), "--method", "sas", "--budget", "40", "--out", str(tmp / "sas.npz")]) == 0
    out = tmp / "eval"
    assert main(["evaluate", "--protocol", "ssl", "--ssl-epochs", "1", "--selection", str(tmp / "sas.npz"),
                 "--seeds", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["method"], r["budget"], r["evaluator"]) for r in rows] == [("sas", "40", "ssl"), ("random", "40", "ssl")]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert "Evaluator: ssl" in (out / "results.md").read_text()
    assert "Evaluator: ssl" in capsys.readouterr().out


def _shared_run(tmp_path_factory):
    run = tmp_path_factory.getbasetemp() / "shared_run"
    if not (run / "scores.npz").is_file():
        assert main(["train", "--out", str(run), *TINY]) == 0
    return run


@pytest.mark.parametrize("argv,message", [
    (["select", "--run", "{run}", "--method", "nope", "--fraction", "0.1", "--out", "{tmp}/x.npz"],
     "unknown method 'nope'; known methods: aum, balanced_random, ccs, css, el2n, elfs, "),
    (["select", "--run", "{run}", "--method", "css", "--fraction", "1.5", "--out", "{tmp}/x.npz"],
     "fraction must be in (0, 1], got 1.5"),
    (["select", "--run", "{run}", "--method", "random", "--budget", "5000", "--out", "{tmp}/x.npz"],
     "budget: 5000 is larger than the data set size 1438"),
    (["select", "--run", "{tmp}/missing", "--method", "css", "--fraction", "0.1", "--out", "{tmp}/x.npz"],
     "is not a training run directory"),
    (["train", "--data", "cifar10", "--data-dir", "{tmp}/nodata", "--out", "{tmp}/r"], "does not exist"),
    (["evaluate", "--selection", "{tmp}/other.npz", "--evaluator", "scratch", "--out", "{tmp}/e"],
     "made for a data set of 10 examples, but the data set given has 1438"),
    (["evaluate", "--selection", "{tmp}/other.npz", "--seeds", "0", "--out", "{tmp}/e"],
     "argument --seeds: expected a positive integer, got '0'"),
    (["evaluate", "--selection", "{tmp}/truncated.npz", "--out", "{tmp}/e"], "File is not a zip file"),
    (["evaluate", "--selection", "{tmp}/float_indices.npz", "--out", "{tmp}/e"], "indices must be a 1-D integer"),
    (["evaluate", "--run", "{tmp}/nan_run", "--selection", "{tmp}/ok.npz", "--out", "{tmp}/e"],
     "'train' must be a finite 2-D float array"),
    (["select", "--embeddings", "{tmp}/absent.npy", "--method", "kcenter", "--fraction", "0.1", "--out",
      "{tmp}/x.npz"], "No such file"),
])
def test_bad_arguments_fail_cleanly(tmp_path_factory, argv, message, capsys):
    import shutil

    import numpy as np
    import torch

    from coreset_ext.io import load_npz, save_npz
    from coreset_ext.select import Selection

    tmp = tmp_path_factory.mktemp("bad")
    run = _shared_run(tmp_path_factory)
    Selection(torch.arange(3), "random", dataset_size=10).save(tmp / "other.npz")
    Selection(torch.arange(3), "random", dataset_size=1438).save(tmp / "ok.npz")
    (tmp / "truncated.npz").write_bytes((tmp / "ok.npz").read_bytes()[:50])
    arrays, meta = load_npz(tmp / "ok.npz")
    save_npz(tmp / "float_indices.npz", {**arrays, "indices": np.array([0.9, 1.9, 2.5])}, meta)
    shutil.copytree(run, tmp / "nan_run")
    arrays, meta = load_npz(tmp / "nan_run" / "embeddings.npz")
    arrays["train"][3, 1] = np.nan
    save_npz(tmp / "nan_run" / "embeddings.npz", arrays, meta)
    argv = [a.format(run=run, tmp=tmp) for a in argv]
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "coreset_ext", "select", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--fraction" in r.stdout


def test_train_writes_metrics_and_the_encoder_and_its_config_replays_the_run(tmp_path, capsys):
    import csv
    import json

    import numpy as np

    from coreset_ext.train.models import build_encoder

    first, again, flat = tmp_path / "first", tmp_path / "again", tmp_path / "flat"
    assert main(["train", "--out", str(first), *TINY, "--epochs", "2", "--lr-schedule", "cosine",
                 "--warmup-epochs", "1", "--amp", "bf16", "--device", "cpu"]) == 0
    assert "simclr epoch 2/2: loss" in capsys.readouterr().out  # the library's log lines, shown by the command
    rows = list(csv.DictReader((first / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and list(rows[0]) == ["epoch", "loss", "lr", "throughput",
                                                                          "css_mean", "seconds"]
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]) < 2e-3 and 0 < float(rows[1]["css_mean"]) <= 1
    record = json.loads((first / "config.json").read_text())
    assert record["source"] == {"data": "digits", "data_dir": None} and record["train"]["amp"] == "bf16"
    # the run's own config.json, fed back, gives the same run
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again), "--no-progress"]) == 0
    a, b = np.load(first / "scores.npz"), np.load(again / "scores.npz")
    assert np.array_equal(a["sum/css"], b["sum/css"]) and np.array_equal(a["count/css"], b["count/css"])
    # a flat YAML of settings; a flag given beside it wins
    (tmp_path / "run.yaml").write_text("method: moco\nepochs: 3\nwidth: 4\nqueue_size: 64\nbatch_size: 256\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--epochs", "1", "--out", str(flat),
                 "--no-progress"]) == 0
    train = json.loads((flat / "config.json").read_text())["train"]
    assert (train["method"], train["epochs"], train["width"], train["queue_size"]) == ("moco", 1, 4, 64)
    # the exported encoder loads as pretrained weights
    enc = build_encoder("auto", (1, 8, 8), width=4, pretrained=flat / "checkpoints" / "encoder.safetensors")
    assert enc.out_dim == 8


@pytest.mark.parametrize("text,suffix,message", [
    ("epochs: 2\nlearning_rate: 0.1\n", ".yaml", r"unknown settings \['learning_rate'\]"),
    ("[1, 2]", ".json", "must hold a mapping of settings, got list"),
    ("{not json", ".json", "cannot be parsed"),
    ("epochs: 2", ".toml", "must be a .json, .yaml or .yml file"),
])
def test_bad_config_files_are_named(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--config: {path}" in err and __import__("re").search(message, err), err
