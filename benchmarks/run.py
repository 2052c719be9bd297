"""Runs the benchmark suites and writes the results table: `make bench` (and `make gpu-check`).

    python benchmarks/run.py --out benchmarks/results [--gpu | --cpu] [-k EXPR] [--quick]

Benchmarks the CPU, and the GPU where there is one (--gpu or --cpu: only that). Writes, per device:
  <device>.json  every measurement: op, impl, size, pass, dtype, median and spread, peak memory,
                 ratios to the eager baseline and to each peer, fraction of the hardware floor;
                 plus device name, versions and commit;
  <device>.md    the same as a Markdown table;
  <device>.png   one panel per op: time against size, one line per implementation, log scale.
It compares with the committed results for the same device (benchmarks/results/<device>.json)
and flags regressions of more than 10% in median time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "benchmarks" / "results"
REGRESSION = 0.10


def device_name(gpu: bool) -> str:
    import torch

    if gpu:
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def environment(gpu: bool) -> dict:
    import torch

    env = {"device": device_name(gpu), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        env["commit"] = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                                stderr=subprocess.DEVNULL).strip()
    except Exception:  # a copy of the tree without .git (e.g. a remote GPU machine)
        env["commit"] = os.environ.get("CORESET_EXT_COMMIT", "unknown")
    import coreset_ext

    env["coreset_ext"] = coreset_ext.__version__
    return env


def run_pytest(out_json: Path, events: Path, gpu: bool, expr: str | None, quick: bool) -> int:
    args = [sys.executable, "-m", "pytest", "-q", str(ROOT / "benchmarks"), "-p", "no:cacheprovider",
            f"--benchmark-json={out_json}", "--benchmark-disable-gc", "--benchmark-warmup=off",
            "-o", "python_files=bench_*.py"]
    sel = []
    if gpu:
        sel.append("cuda")
    else:
        sel.append("cpu")
    if expr:
        sel.append(f"({expr})")
    args += ["-k", " and ".join(sel)]
    if quick:
        args += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.1"]
    else:
        args += ["--benchmark-min-rounds=5", "--benchmark-max-time=0.5"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # keep peers' paths
    env = dict(os.environ, CORESET_BENCH_EVENTS=str(events), PYTHONPATH=path)
    return subprocess.call(args, env=env, cwd=ROOT)


def key_of(r: dict) -> tuple:
    return (r["op"], json.dumps(r["size"], sort_keys=True), r["pass"], r["dtype"])


def collect(bench_json: Path, events: Path) -> list[dict]:
    rows = []
    if bench_json.exists():
        data = json.loads(bench_json.read_text())
        for b in data.get("benchmarks", []):
            x = b["extra_info"]
            if "op" not in x:
                continue
            st = b["stats"]
            rows.append({
                "op": x["op"], "impl": x["impl"], "size": x["size"], "pass": x.get("pass_", "fwd"),
                "dtype": x.get("dtype"), "device": x.get("device"), "oom": False,
                "median_s": st["median"], "iqr_s": st["iqr"], "min_s": st["min"], "rounds": st["rounds"],
                "peak_mem_bytes": x.get("peak_mem_bytes"), "floor_s": x.get("floor_s"),
                **{k: v for k, v in x.items() if k.startswith("metric_")},
            })
    if events.exists():
        for line in events.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("oom"):
                rows.append({"op": ev["op"], "impl": ev["impl"], "size": ev["size"], "pass": ev.get("pass_", "fwd"),
                             "dtype": ev.get("dtype"), "device": ev.get("device"), "oom": True,
                             "median_s": None, "iqr_s": None, "min_s": None, "rounds": 0,
                             "peak_mem_bytes": None, "floor_s": ev.get("floor_s")})
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Per case: how many times faster ours is than each other implementation; floor fractions."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(key_of(r), []).append(r)
    for group in groups.values():
        ours = [r for r in group if r["impl"] == "coreset_ext" and not r["oom"]]
        for r in group:
            # the floors are the H100's (DESIGN.md): a fraction only means something on a GPU
            if r["floor_s"] and r["median_s"] and str(r.get("device", "")).startswith("cuda"):
                r["floor_fraction"] = r["floor_s"] / r["median_s"]
        if ours:
            t = ours[0]["median_s"]
            ours[0]["speedup_vs"] = {r["impl"]: (r["median_s"] / t if r["median_s"] else "OOM")
                                     for r in group if r["impl"] != "coreset_ext"}


def fmt_time(s: float | None) -> str:
    if s is None:
        return "OOM"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_mem(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def metrics_text(r: dict) -> str:
    """The benchmark's own measurements besides time (extra_info keys metric_*), e.g. inertia."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
        return str(v)
    return "; ".join(f"{k.removeprefix('metric_')} {fmt(v)}" for k, v in r.items() if k.startswith("metric_"))


def markdown(rows: list[dict], env: dict, regressions: list[str]) -> str:
    lines = [f"# Benchmarks on {env['device']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, Python {env['python']}, "
             f"coreset-ext {env['coreset_ext']} at commit {', '.join(c[:12] for c in env['commit'].split(', '))}.", "",
             "Median of the timed rounds (synchronised); spread is the interquartile range. "
             "`speedup` is the other implementation's median over ours (>1: ours is faster). "
             "`floor` is the fraction of the H100 hardware floor of DESIGN.md reached.", ""]
    if regressions:
        lines += ["**Regressions over 10% against the committed results:**", ""] + [f"- {r}" for r in regressions] + [""]
    for op in sorted({r["op"] for r in rows}):
        lines += [f"## {op}", "", "| size | pass | dtype | impl | median | spread | peak memory | floor | speedup of ours | "
                  "measured besides time |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted((r for r in rows if r["op"] == op), key=lambda r: (key_of(r), r["impl"])):
            size = ", ".join(f"{k}={v}" for k, v in r["size"].items())
            sp = r.get("speedup_vs")
            sp_txt = "; ".join(f"{k}: {v:.2f}x" if isinstance(v, float) else f"{k}: {v}" for k, v in sp.items()) if sp else ""
            floor = f"{100 * r['floor_fraction']:.0f}%" if r.get("floor_fraction") else "-"
            spread = fmt_time(r["iqr_s"]) if r["iqr_s"] is not None else "-"
            lines.append(f"| {size} | {r['pass']} | {r['dtype']} | {r['impl']} | {fmt_time(r['median_s'])} | {spread} | "
                         f"{fmt_mem(r['peak_mem_bytes'])} | {floor} | {sp_txt} | {metrics_text(r)} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows})
    if not ops:
        return
    fig, axes = plt.subplots(len(ops), 1, figsize=(9, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        # one headline pass per op (fwd+bwd where measured), one line per implementation and dtype
        op_rows = [r for r in rows if r["op"] == op and r["median_s"] is not None]
        passes = {r["pass"] for r in op_rows}
        headline = "fwd+bwd" if "fwd+bwd" in passes else sorted(passes)[0]
        series: dict[str, list[tuple[str, float]]] = {}
        cases: list[str] = []
        for r in op_rows:
            if r["pass"] != headline:
                continue
            case = ", ".join(f"{k}={v}" for k, v in r["size"].items())
            if case not in cases:
                cases.append(case)
            series.setdefault(f"{r['impl']} ({r['dtype']})", []).append((case, r["median_s"]))
        for label, pts in sorted(series.items()):
            pts.sort(key=lambda p: cases.index(p[0]))
            ax.plot([cases.index(c) for c, _ in pts], [t for _, t in pts], marker="o", label=label)
        op = f"{op} ({headline})"
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("median time (s)")
        ax.set_title(f"{op} on {env['device']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def regressions_against(rows: list[dict], committed: Path) -> list[str]:
    if not committed.exists():
        return []
    old = {(key_of(r), r["impl"]): r for r in json.loads(committed.read_text())["results"]}
    out = []
    for r in rows:
        o = old.get((key_of(r), r["impl"]))
        if o and o.get("median_s") and r["median_s"] and r["median_s"] > o["median_s"] * (1 + REGRESSION):
            out.append(f"{r['op']} {r['impl']} {r['size']} {r['pass']} {r['dtype']}: "
                       f"{fmt_time(o['median_s'])} -> {fmt_time(r['median_s'])}")
    return out


def write_results(rows: list[dict], env: dict, out: Path, plot_png: bool = True) -> str:
    name = slug(env["device"])
    out.mkdir(parents=True, exist_ok=True)
    regs = regressions_against(rows, COMMITTED / f"{name}.json")
    (out / f"{name}.json").write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    (out / f"{name}.md").write_text(markdown(rows, env, regs))
    if plot_png:
        plot(rows, env, out / f"{name}.png")
    print(f"wrote {out / name}.{{json,md{',png' if plot_png else ''}}}: {len(rows)} measurements")
    for r in regs:
        print("REGRESSION", r)
    return name


def merge(paths: list[Path], out: Path) -> int:
    """Combines result files of one device (e.g. several partial GPU runs) into one table."""
    rows, env, commits = [], None, []
    for path in paths:
        data = json.loads(path.read_text())
        if env is not None and data["environment"]["device"] != env["device"]:
            raise SystemExit(f"{path} is from {data['environment']['device']}, not {env['device']}")
        env = dict(data["environment"])
        commits.append(env["commit"][:12])
        for r in data["results"]:
            r.setdefault("commit", env["commit"][:12])  # each row keeps the commit it was measured at
        rows += data["results"]
    env["commit"] = ", ".join(dict.fromkeys(commits))
    for r in rows:  # ratios and floors are recomputed over the combined rows
        r.pop("speedup_vs", None)
        r.pop("floor_fraction", None)
    add_ratios(rows)
    write_results(rows, env, out)
    return 0


def run_device(gpu: bool, out: Path, expr: str | None, quick: bool, plot_png: bool = True) -> int:
    env = environment(gpu)
    with tempfile.TemporaryDirectory() as tmp:
        bench_json, events = Path(tmp) / "bench.json", Path(tmp) / "events.jsonl"
        rc = run_pytest(bench_json, events, gpu, expr, quick)
        rows = collect(bench_json, events)
    if not rows:
        print("no benchmark results were collected", file=sys.stderr)
        return rc or 1
    write_results(rows, env, out, plot_png)
    # a failed benchmark fails the run; an out-of-memory one is a recorded result (it skips)
    return rc if rc not in (0, 5) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=COMMITTED)
    p.add_argument("--gpu", action="store_true", help="only the CUDA device")
    p.add_argument("--cpu", action="store_true", help="only the CPU")
    p.add_argument("-k", dest="expr", help="pytest -k expression selecting benchmarks")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="combine result files of one device into one table (no benchmarking)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    import torch

    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu given but no CUDA GPU is visible")
    # default: the CPU always, and the GPU where there is one
    targets = [True] if args.gpu else [False] if args.cpu else [False] + ([True] if torch.cuda.is_available() else [])
    rc = 0
    for gpu in targets:
        rc = run_device(gpu, args.out, args.expr, args.quick, not args.no_plot) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
