"""The leaderboard (`coreset-ext benchmark`, issue 21 item 3) and the honest evaluation behind it
(item 2): encoder seeds, each method's paired difference from random and its 95% t interval."""

import csv
import math
import re

import numpy as np
import pytest

from coreset_ext.cli import main
from coreset_ext.train.evaluate import (markdown_table, paired_difference, paired_runs, summarize, t_quantile,
                                        write_results)
from coreset_ext.train.pipeline import run_pipeline

CELL = re.compile(r"^[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]$")


# ------------------------------------------------------------------------------------ statistics
def _t975(df: int) -> float:
    """t_{0.975}(df) by an independent route: scipy when installed, else bisection on the t CDF
    integrated numerically (Simpson) from the density."""
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, df))
    except ImportError:
        pass

    def cdf(x: float) -> float:  # P(T <= x) for x > 0: 0.5 + integral of the density over [0, x]
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        n = 20000
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.975 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("df", [1, 2, 3, 5, 8, 17, 29, 30, 31, 45, 80, 200, 5000])
def test_t_quantile_matches_an_independent_computation(df):
    assert t_quantile(df) == pytest.approx(_t975(df), abs=2e-6)


def test_t_quantile_rejects_bad_df():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="df must be"):
            t_quantile(bad)


@pytest.mark.parametrize("n", [2, 3, 5, 9, 40])
def test_paired_difference_matches_numpy_on_fresh_random_numbers(n):
    rng = np.random.default_rng(1000 + n)
    reference = rng.uniform(0.6, 0.95, size=n)
    values = reference + rng.normal(0.01, 0.02, size=n)
    mean, low, high = paired_difference(values.tolist(), reference.tolist())
    d = values - reference  # the independent computation: numpy's mean and sample std, the t quantile
    half = _t975(n - 1) * d.std(ddof=1) / math.sqrt(n)
    assert mean == pytest.approx(d.mean(), abs=1e-12)
    assert low == pytest.approx(d.mean() - half, abs=1e-6)
    assert high == pytest.approx(d.mean() + half, abs=1e-6)
    assert low <= mean <= high


def test_paired_difference_interval_covers_the_true_difference_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    trials, true = 4000, 0.02
    covered = 0
    for _ in range(trials):
        ref = rng.uniform(0.7, 0.9, size=4)
        vals = ref + true + rng.normal(0, 0.03, size=4)  # 4 pairs: df = 3, where a normal quantile would undercover
        _, low, high = paired_difference(vals.tolist(), ref.tolist())
        covered += low <= true <= high
    assert 0.935 <= covered / trials <= 0.965


def test_paired_difference_needs_two_pairs_and_equal_lengths():
    with pytest.raises(ValueError, match="seeds: a 95% interval .* at least 2 pairs"):
        paired_difference([0.9], [0.8])
    with pytest.raises(ValueError, match="reference"):
        paired_difference([0.9, 0.8], [0.8])


def _rows(rng, methods=("random", "kcenter", "css"), fractions=(0.1, 0.3), encoder_seeds=(0, 1), seeds=(0, 1, 2)):
    return [{"method": m, "fraction": f, "budget": 10, "evaluator": "probe", "encoder_seed": e, "seed": s,
             "accuracy": float(rng.uniform(0.5, 1.0))}
            for m in methods for f in fractions for e in encoder_seeds for s in seeds]


def test_summary_pairs_each_method_with_random_on_encoder_seed_and_seed():
    rng = np.random.default_rng(3)
    rows = _rows(rng)
    rng.shuffle(rows)  # pairing goes by the keys, not by the order of the rows
    rows.append({**rows[0], "method": "kcenter", "fraction": 0.5})  # no random at 50%: no difference
    summary = {(s["method"], s["fraction"]): s for s in summarize(rows)}
    acc = {(r["method"], r["fraction"], r["encoder_seed"], r["seed"]): r["accuracy"] for r in rows}
    for m in ("kcenter", "css"):
        for f in (0.1, 0.3):
            d = np.array([acc[(m, f, e, s)] - acc[("random", f, e, s)] for e in (0, 1) for s in (0, 1, 2)])
            s = summary[(m, f)]
            half = _t975(5) * d.std(ddof=1) / math.sqrt(6)
            assert s["pairs"] == 6 and s["n"] == 6 and s["encoder_seeds"] == 2
            assert s["diff"] == pytest.approx(d.mean())
            assert (s["diff_low"], s["diff_high"]) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-6)
    assert summary[("random", 0.1)]["diff"] is None and summary[("kcenter", 0.5)]["diff"] is None
    table = markdown_table(list(summary.values()))
    assert "mean ± std over 1-6 runs" in table  # the 50% cell holds one run: the header says so
    assert "mean ± std over 6 runs (2 encoder seeds × 3 seeds)" in markdown_table(summarize(rows[:-1]))
    assert "over 6 pairs" in table
    diff_lines = [ln for ln in table.split("Paired difference")[1].splitlines() if ln.startswith("| kcenter |")]
    cells = [c.strip() for c in diff_lines[0].strip("|").split("|")][1:]
    assert all(CELL.match(c) for c in cells[:2]) and cells[2] == "", cells
    k = summary[("kcenter", 0.1)]
    assert cells[0] == f"{100 * k['diff']:+.1f} [{100 * k['diff_low']:+.1f}, {100 * k['diff_high']:+.1f}]"


def test_summary_averages_one_methods_runs_with_one_key_into_one_pair():
    # two selections of one method (selection seeds 0 and 1), each evaluated with seeds 0 and 1:
    # two pairs, not four
    rows = [{"method": m, "fraction": 0.2, "budget": 5, "evaluator": "probe", "seed": s, "accuracy": a}
            for m, s, a in (("sas", 0, 0.8), ("sas", 0, 0.9), ("sas", 1, 0.7), ("sas", 1, 0.75),
                            ("random", 0, 0.8), ("random", 1, 0.7))]
    vals, refs = paired_runs(rows)[("probe", "sas", 0.2)]
    assert vals == pytest.approx([0.85, 0.725]) and refs == pytest.approx([0.8, 0.7])
    s = [r for r in summarize(rows) if r["method"] == "sas"][0]
    assert s["pairs"] == 2 and s["n"] == 4
    assert "mean ± std over 2-4 seeds" in markdown_table(summarize(rows))


def test_one_pair_gives_the_difference_without_an_interval(tmp_path):
    rows = _rows(np.random.default_rng(5), encoder_seeds=(0,), seeds=(0,))
    report = write_results(rows, tmp_path)
    assert "no interval: one pair" in report["markdown"]
    assert re.search(r"\| kcenter \| [+-]\d+\.\d \| [+-]\d+\.\d \|", report["markdown"])
    assert report["difference_plot"].stat().st_size > 1000


# ------------------------------------------------------------------------------- the command
def test_benchmark_tiny_run(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", "--out", str(out), "--epochs", "1", "--fractions", "0.2", "--encoder-seeds", "2",
                 "--seeds", "1", "--methods", "random", "kcenter", "css_simclr", "--scratch-steps", "3",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mean ± std over 2 runs (2 encoder seeds × 1 seed" in printed
    for name in ("config.json", "results.md", "results.csv", "summary.csv", "accuracy_vs_fraction.png",
                 "difference_vs_fraction.png", "train_simclr_enc0/scores.npz", "train_simclr_enc1/scores.npz",
                 "selections/kcenter_20pct_enc0_seed0.npz", "selections/kcenter_20pct_enc1_seed0.npz"):
        assert (out / name).is_file(), name
    assert not (out / "train_moco_enc0").exists()  # no row reads MoCo's scores: not trained
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["evaluator"] for r in rows} == {"probe", "scratch"}  # both coreset evaluators by default
    rows = [r for r in rows if r["evaluator"] == "probe"]
    assert {(r["method"], r["encoder_seed"]) for r in rows} == {(m, e) for m in ("random", "kcenter", "css_simclr")
                                                                for e in ("0", "1")}
    # each encoder is its own: retrained with its seed, so re-scored (css selects by score)
    from coreset_ext.select import Selection

    css = [Selection.load(out / "selections" / f"css_simclr_20pct_enc{e}_seed0.npz").indices for e in (0, 1)]
    assert set(css[0].tolist()) != set(css[1].tolist())
    # the summary's paired difference, recomputed from the per-run CSV
    acc = {(r["method"], r["encoder_seed"]): float(r["accuracy"]) for r in rows}
    summary = {r["method"]: r for r in csv.DictReader((out / "summary.csv").open()) if r["evaluator"] == "probe"}
    d = np.array([acc[("kcenter", e)] - acc[("random", e)] for e in ("0", "1")])
    half = _t975(1) * d.std(ddof=1) / math.sqrt(2)
    assert int(summary["kcenter"]["pairs"]) == 2
    assert float(summary["kcenter"]["diff"]) == pytest.approx(d.mean())
    assert float(summary["kcenter"]["diff_low"]) == pytest.approx(d.mean() - half, abs=1e-6)
    assert float(summary["kcenter"]["diff_high"]) == pytest.approx(d.mean() + half, abs=1e-6)
    table = (out / "results.md").read_text()
    line = [ln for ln in table.split("Paired difference")[1].splitlines() if ln.startswith("| kcenter |")][0]
    assert CELL.match(line.strip("|").split("|")[1].strip())


@pytest.mark.parametrize("value", ["1", "0", "-2"])
def test_benchmark_refuses_fewer_than_two_encoder_seeds(tmp_path, capsys, value):
    assert main(["benchmark", "--out", str(tmp_path / "b"), "--encoder-seeds", value, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "--encoder-seeds" in err and "at least 2" in err
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_run_pipeline_checks_encoder_seeds(tmp_path):
    for seeds, message in (((0, 0), "encoder_seeds: must be distinct"), ((), "encoder_seeds: give at least one"),
                           ((-1,), "encoder_seeds must be"), ((1.5,), "encoder_seeds must be")):
        with pytest.raises(ValueError, match=message):
            run_pipeline(tmp_path / "p", encoder_seeds=seeds, log=lambda *a: None)
    with pytest.raises(ValueError, match="train_options: seed=3 contradicts encoder_seeds"):
        run_pipeline(tmp_path / "p", encoder_seeds=(0, 1), train_options={"seed": 3}, log=lambda *a: None)
    assert not (tmp_path / "p").exists()
