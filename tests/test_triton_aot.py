"""tools/triton_aot.py: Triton kernels compiled for a GPU architecture on a machine without one,
and the tool's failures (compile errors, shared memory, spills) reported as failures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("normalize", [True, False])
def test_batch_sizes_share_one_compiled_kernel(normalize):
    """The batch size is no compile-time constant: sizes are passed with do_not_specialize, so
    2B = 2000 (divisible by 16, which Triton would otherwise specialise on) and 2B = 2002 launch
    the same compiled kernels (symmetric with normalised rows; row-streaming with column splits
    without), and a new batch size costs no compile."""
    from coreset_ext.triton_kernels import contrastive as C

    launched = {1000: [], 1001: []}  # (kernel, compiled hash) of each launch, in order
    batch = [0]

    def record(kernel_name, config, kernel, tuned):
        launched[batch[0]].append((kernel_name, kernel.hash))

    with triton_aot._compile_instead_of_launch(90, record, False):
        for b in launched:
            batch[0] = b
            z1, z2 = torch.randn(b, 64, dtype=torch.bfloat16), torch.randn(b, 64, dtype=torch.bfloat16)
            _, lse, _ = C.nt_xent_fwd(z1, z2, 0.2, normalize, 1e-6)
            C.nt_xent_bwd(torch.ones(2 * b), z1, z2, lse, 0.2, normalize, 1e-6)
    names = [name for name, _ in launched[1000]]
    assert ("_nt_xent_sym_bwd_kernel" in names) == normalize, names
    assert len(names) >= 4 and launched[1000] == launched[1001], launched
