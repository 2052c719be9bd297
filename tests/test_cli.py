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
                 "--evaluator", "probe", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| css_simclr |" in printed and "| css_moco |" in printed and "pipeline wall time" in printed
    for name in ("config.json", "results.md", "results.csv", "summary.csv", "accuracy_vs_fraction.png",
                 "train_simclr/scores.npz", "train_moco/scores.npz", "selections/kcenter_50pct_seed1.npz"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize("argv,message", [
    (["select", "--run", "{run}", "--method", "nope", "--fraction", "0.1", "--out", "{tmp}/x.npz"],
     "unknown method 'nope'; known methods: aum, balanced_random, ccs, css, "),
    (["select", "--run", "{run}", "--method", "css", "--fraction", "1.5", "--out", "{tmp}/x.npz"],
     "fraction must be in (0, 1], got 1.5"),
    (["select", "--run", "{run}", "--method", "random", "--budget", "5000", "--out", "{tmp}/x.npz"],
     "budget: 5000 is larger than the data set size 1438"),
    (["select", "--run", "{tmp}/missing", "--method", "css", "--fraction", "0.1", "--out", "{tmp}/x.npz"],
     "is not a training run directory"),
    (["train", "--data", "cifar10", "--data-dir", "{tmp}/nodata", "--out", "{tmp}/r"], "does not exist"),
    (["evaluate", "--selection", "{tmp}/other.npz", "--evaluator", "scratch", "--out", "{tmp}/e"],
     "made for a data set of 10 examples, but the data set given has 1438"),
])
def test_bad_arguments_fail_cleanly(tmp_path_factory, argv, message, capsys):
    import torch

    from coreset_ext.select import Selection

    tmp = tmp_path_factory.mktemp("bad")
    run = tmp_path_factory.getbasetemp() / "shared_run"
    if not (run / "scores.npz").is_file():
        assert main(["train", "--out", str(run), *TINY]) == 0
    Selection(torch.arange(3), "random", dataset_size=10).save(tmp / "other.npz")
    argv = [a.format(run=run, tmp=tmp) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "coreset_ext", "select", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--fraction" in r.stdout
