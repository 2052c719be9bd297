"""tools/triton_aot.py: Triton kernels compiled for a GPU architecture on a machine without one,
and the tool's failures (compile errors, shared memory, spills) reported as failures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles for a real target: the interpreter replaces the compiler")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import triton_aot  # noqa: E402


def test_compiles_for_sm90_and_reports_resources(capsys):
    assert triton_aot.main(["--arch", "90", "-k", "pair_cosine bfloat16"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "_pair_cosine_bwd_kernel" in line]
    assert rows, out
    registers = int(rows[0].split("|")[5])
    assert 0 < registers <= 255


def test_too_much_shared_memory_fails(monkeypatch, capsys):
    monkeypatch.setitem(triton_aot.SHARED_LIMIT, 90, 64)  # pair_cosine's forward takes 128 bytes
    assert triton_aot.main(["--arch", "90", "-k", "pair_cosine bfloat16"]) == 1
    assert "shared memory" in capsys.readouterr().out


def test_spills_fail_under_max_spill(monkeypatch, capsys):
    monkeypatch.setattr(triton_aot, "resource_usage", lambda cubin: (255, 4096))
    assert triton_aot.main(["--arch", "90", "-k", "pair_cosine bfloat16", "--max-spill", "64"]) == 1
    assert "spills 4096 bytes" in capsys.readouterr().out


def test_mma_kind_reads_the_ptx():
    assert triton_aot.mma_kind("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}") == "wgmma"
    assert triton_aot.mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma"
    assert triton_aot.mma_kind("fma.rn.f32 %f1, %f2, %f3, %f4;") == "-"


@pytest.mark.parametrize("case", ["nt_xent bfloat16 d=128 normalize=True fixed tiles",
                                  "nt_xent float32 tf32 d=128 normalize=True fixed tiles",
                                  "info_nce_queue bfloat16"])
def test_tensor_core_tiles_take_wgmma_on_sm90(case, capsys):
    # 32-row tiles compile to mma.sync on Hopper, at about half its tensor-core rate
    assert triton_aot.main(["--arch", "90", "-k", case]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines()
            if line.startswith(f"| {case} |") and ("_fwd" in line or "_bwd" in line) and "kernel" in line
            and "combine" not in line and "finish" not in line]
    assert len(rows) >= 2, out
    assert all(r[8].strip() == "wgmma" for r in rows), out
