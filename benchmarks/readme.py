"""Regenerates the README's results section from the committed benchmarks/results/*.json.

    python benchmarks/readme.py            # rewrites the block between the results markers

Only measured figures appear, each under the device it was measured on; the key rows are our
implementation's median and its speedup over the eager baseline and each peer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def section() -> str:
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        env, rows = data["environment"], data["results"]
        out += [f"### {env['device']}", "",
                f"torch {env['torch']}, triton {env['triton']}, commit {', '.join(c[:12] for c in env['commit'].split(', '))}; "
                f"full table: [`{path.with_suffix('.md').relative_to(ROOT)}`]({path.with_suffix('.md').relative_to(ROOT)}).", "",
                "| op | size | pass | dtype | ours | speedup over others (x) | floor |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            if r["impl"] != "coreset_ext" or r.get("median_s") is None:
                continue
            size = ", ".join(f"{k}={v}" for k, v in r["size"].items())
            sp = "; ".join(f"{k} {v:.2f}" if isinstance(v, (int, float)) else f"{k} {v}"
                           for k, v in (r.get("speedup_vs") or {}).items())
            floor = f"{100 * r['floor_fraction']:.0f}%" if r.get("floor_fraction") else "-"
            out.append(f"| {r['op']} | {size} | {r['pass']} | {r['dtype']} | {fmt_time(r['median_s'])} | {sp} | {floor} |")
        png = path.with_suffix(".png")
        if png.exists():
            out += ["", f"![{env['device']}]({png.relative_to(ROOT)})"]
        out.append("")
    if not out:
        out = ["No results committed yet: run `make bench` (and `make gpu-check` on a GPU)."]
    return "\n".join(out)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section()}\n{END}{tail}")
    print("README.md results section regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
