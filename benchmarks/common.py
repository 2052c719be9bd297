"""What every benchmark in benchmarks/ shares: synchronised timing, peak memory, OOM as a result,
and the hardware floor of DESIGN.md.

A benchmark test calls `measure(benchmark, fn, op=..., impl=..., size=..., ...)`. `make bench`
(benchmarks/run.py) reads the `extra_info` it records to build the results table, the ratios to
the eager baseline (impl "eager") and to peers, and the fraction of the floor.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

# Measured on one H100 (DESIGN.md): bf16 matmul ~800 TFLOP/s, device copy ~3.0 TB/s. TF32 runs
# at half the bf16 rate; plain fp32 FMA units at ~60 TFLOP/s are not the floor for TF32 dots.
H100_FLOPS = {torch.bfloat16: 800e12, torch.float16: 800e12, torch.float32: 400e12}
H100_BYTES_PER_S = 3.0e12


def floor_seconds(*, flops: float = 0.0, bytes_moved: float = 0.0, dtype: torch.dtype = torch.bfloat16) -> float:
    """The larger of arithmetic time and memory time on the reference H100."""
    return max(flops / H100_FLOPS.get(dtype, 400e12), bytes_moved / H100_BYTES_PER_S)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    benchmark,
    fn,
    *,
    op: str,
    impl: str,
    size: dict,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    pass_: str = "fwd",
    floor_s: float | None = None,
    rounds: int | None = None,
    warmup: int = 2,
):
    """Times `fn()` (synchronised), records peak device memory, and stores the metadata.

    An out-of-memory error is recorded as a result (extra_info["oom"] = True) and the test skips.
    """
    device = torch.device(device)
    benchmark.extra_info.update(
        op=op, impl=impl, size=size, device=str(device), pass_=pass_,
        dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
        floor_s=floor_s, oom=False, peak_mem_bytes=None,
    )

    def run():
        out = fn()
        sync(device)
        return out

    try:
        for _ in range(warmup):
            run()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        if rounds is None:
            result = benchmark(run)
        else:
            result = benchmark.pedantic(run, rounds=rounds, iterations=1)
        if device.type == "cuda":
            benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base
        return result
    except torch.OutOfMemoryError:
        # pytest-benchmark keeps no record of a skipped test, so the OOM goes to an event log
        # that benchmarks/run.py reads: out-of-memory is a result, not a crash.
        benchmark.extra_info["oom"] = True
        log = os.environ.get("CORESET_BENCH_EVENTS")
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(benchmark.extra_info) + "\n")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        pytest.skip(f"{op}/{impl} {size}: out of memory (recorded)")


def devices() -> list[str]:
    """Devices to benchmark on: the CPU always, the GPU where there is one."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
