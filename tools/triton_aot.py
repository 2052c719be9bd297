"""Compile every Triton kernel for a GPU target on a machine without a GPU, and report its resources.

The interpreter (TRITON_INTERPRET=1) checks what a kernel computes but not that it compiles: it
accepts shapes, dtypes and layouts the real compiler rejects, and says nothing of registers. This
tool runs the launch wrappers of `coreset_ext.triton_kernels` on small CPU tensors with a stand-in
driver whose target is a CUDA architecture (sm_90 by default). Every launch, and every config of an
autotuned launch, is compiled by Triton's real pipeline down to a cubin (ptxas included) instead of
run; it fails on any compile error and, with --max-spill, on kernels that spill registers.

    python tools/triton_aot.py                  # sm_90, table of registers / spills / shared memory
    python tools/triton_aot.py --arch 80 -k nt_xent --all-configs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch


@dataclass
class Compiled:
    case: str
    kernel: str
    config: str
    regs: int
    spill_bytes: int
    shared: int
    mma: str
    tuned: bool  # one of an autotuner's configs: the autotuner skips those that cannot launch


# Shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def mma_kind(ptx: str) -> str:
    """Which matrix instructions the kernel's dots became: "wgmma" (warpgroup MMA, the only path
    to Hopper's full tensor-core rate), "mma" (Ampere's mma.sync: on sm_90 the slower path), or
    "-" (no tensor cores: FMA products, or no dot at all)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync", ptx) else "-"


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, bytes of local memory (spills) per thread) from cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    stack = int(re.search(r"STACK:(\d+)", out).group(1))
    local = int(re.search(r"LOCAL:(\d+)", out).group(1))
    return regs, stack + local


class _TargetOnlyDriver:
    """Enough of a Triton driver for JITFunction.run(warmup=True): a target, no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def _compile_instead_of_launch(arch: int, record, all_configs: bool):
    """Route every launch to a compile for `arch`; autotuned launches compile their first config,
    or each one with `all_configs`."""
    import triton
    from coreset_ext.triton_kernels import contrastive, kmeans, mining, similarity
    from triton.runtime import autotuner, driver, jit

    tuning = [False]

    def jit_run(self, *args, grid, warmup, **kwargs):
        config = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())
                           if k.startswith("BLOCK") or k in ("num_warps", "num_stages"))
        kernel = orig_jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        record(self.fn.__name__, config, kernel, tuning[0])
        return kernel

    def tuned_run(self, *args, grid=None, warmup=None, **kwargs):
        tuning[0] = True
        try:
            for config in self.configs if all_configs else self.configs[:1]:
                self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
        finally:
            tuning[0] = False
        self.best_config = self.configs[0]  # what the wrappers read back after a launch

    orig_jit_run = jit.JITFunction.run
    seen = {}

    def jit_run_fresh(self, *args, **kwargs):
        # Triton caches compiled kernels and the target per device; the stand-in driver is
        # always device 0, so clear what another architecture (or a real GPU) left there.
        if id(self) not in seen:
            seen[id(self)] = self
            self.device_caches.clear()
        return jit_run(self, *args, **kwargs)

    cuda = torch.device("cuda")
    patches = [
        (jit.JITFunction, "run", jit_run_fresh),
        (autotuner.Autotuner, "run", tuned_run),
        # the kernel modules' public launch configuration, answering as for a CUDA tensor on a GPU
        # of this architecture with 132 SMs (an H100); the wrappers read these names at each call
        (contrastive, "tiles",
         lambda d, device, dtype, backward=False, f=contrastive.tiles: f(d, cuda, dtype, backward)),
        (contrastive, "symmetric_tiles", lambda d, device, dtype, f=contrastive.symmetric_tiles: f(d, cuda, dtype)),
        (contrastive, "num_sms", lambda device: 132),
        (contrastive, "_arch", lambda device: 90 if arch >= 90 else 80 if arch == 80 else "default"),
        (contrastive, "autotune", lambda x: contrastive.block_d(x.shape[1]) <= 128),
        (kmeans, "autotune", lambda x: True),
        # the fixed per-architecture tiles (the default launch), as on a GPU of this architecture
        (kmeans, "tiles", lambda device, prec, f=kmeans.tiles: f(cuda, prec)),
        (kmeans, "_arch", lambda device: 90 if arch >= 90 else 80),
        (similarity, "tiles", lambda device, d, f=similarity.tiles: f(cuda, d)),
        (mining, "num_sms", lambda device: 132),  # its tiles are contrastive.tiles (patched above)
        (torch.cuda, "device", lambda device: contextlib.nullcontext()),
    ]

    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    driver.set_active(_TargetOnlyDriver(arch))
    try:
        yield triton
    finally:
        for fn in seen.values():
            fn.device_caches.clear()
        for obj, name, old in saved:
            setattr(obj, name, old)
        driver.reset_active() if driver._default is not None else setattr(driver, "_active", None)


def _without_autotuning(module, thunk):
    def run():
        autotune = module.autotune
        module.autotune = lambda x: False
        try:
            thunk()
        finally:
            module.autotune = autotune
    return run


def _streaming(thunk):
    """NT-Xent through the row-streaming kernels where it would take the symmetric ones (what
    deterministic algorithms get)."""
    from coreset_ext.triton_kernels import contrastive as C

    def run():
        symmetric = C.symmetric
        C.symmetric = lambda normalize, temperature, d, dtype: False
        try:
            thunk()
        finally:
            C.symmetric = symmetric
    return run


def _cases():
    """(name, thunk) pairs: each thunk calls launch wrappers the way coreset_ext.ops does."""
    from coreset_ext.triton_kernels import contrastive as C
    from coreset_ext.triton_kernels import kmeans as K
    from coreset_ext.triton_kernels import mining as M
    from coreset_ext.triton_kernels import similarity as S

    def rand(*shape, dtype):
        return torch.randn(*shape).to(dtype)

    def tf32(thunk):
        def run():  # fp32 inputs with TF32 allowed take the tensor cores, hence other tiles
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                thunk()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before
        return run

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        tag = str(dtype).removeprefix("torch.")
        for d in (64, 128, 256):
            for normalize in (True, False):
                def nt_xent(d=d, dtype=dtype, normalize=normalize):
                    for n in (256, 4096):  # 4096 rows (B = 2048) split the columns on 132 SMs
                        z1, z2 = rand(n // 2, d, dtype=dtype), rand(n // 2, d, dtype=dtype)
                        _, lse, _ = C.nt_xent_fwd(z1, z2, 0.1, normalize, 1e-6)
                        C.nt_xent_bwd(torch.ones(n), z1, z2, lse, 0.1, normalize, 1e-6)
                # normalised: the symmetric kernels; raw rows: the row-streaming ones
                out.append((f"nt_xent {tag} d={d} normalize={normalize}", nt_xent))
                if d <= 128:  # the fixed tiles, the default (autotuning is an opt-in)
                    out.append((f"nt_xent {tag} d={d} normalize={normalize} fixed tiles",
                                _without_autotuning(C, nt_xent)))
                if normalize:
                    out.append((f"nt_xent {tag} d={d} normalize=True streaming", _streaming(nt_xent)))
                    if d <= 128:
                        out.append((f"nt_xent {tag} d={d} normalize=True streaming fixed tiles",
                                    _without_autotuning(C, _streaming(nt_xent))))

        def info_nce(dtype=dtype):
            q, k, queue = rand(64, 128, dtype=dtype), rand(64, 128, dtype=dtype), rand(4096, 128, dtype=dtype)
            _, lse, _ = C.info_nce_queue_fwd(q, k, queue, 0.2, True, 1e-6)
            C.info_nce_queue_bwd(torch.ones(64), q, k, queue, lse, 0.2, True, 1e-6)

        def pair_cosine(dtype=dtype):
            a, b = rand(64, 128, dtype=dtype), rand(64, 128, dtype=dtype)
            C.pair_cosine_fwd(a, b, 1e-6)
            C.pair_cosine_bwd(torch.ones(64), a, b, 1e-6)

        def kmeans_assign(dtype=dtype):
            for d in (128, 256):
                for cosine in (False, True):
                    K.kmeans_assign(rand(256, d, dtype=dtype), rand(100, d, dtype=torch.float32), cosine)

        def similarity(dtype=dtype):
            x = rand(256, 128, dtype=dtype)
            inv = 1.0 / x.float().norm(dim=1)
            groups = torch.randint(0, 4, (256,))
            S.cosine_rowsum(x, x, inv, inv, None, None, 0.0, True)
            S.cosine_rowsum(x, x, inv, inv, groups, groups, 0.0, True)
            S.cosine_topk(x, x, inv, inv, 10, True)

        def potential_mining(dtype=dtype):
            # SimCLR (the batch) and MoCo (a queue) forms, forward and backward. Not d = 256: its mining
            # launches similarity's top-k kernel, whose fp32 tiles spill 112-168 bytes there on sm_80
            for d in (64, 128):
                for b, queue in ((256, None), (64, rand(4096, d, dtype=dtype))):
                    z1, z2 = rand(b, d, dtype=dtype), rand(b, d, dtype=dtype)
                    rows, lse, _, _, alpha, edges = M.potential_mining_fwd(
                        z1, z2, queue, 0.2, 4, "soft", 0.1, 0.9, 1.0, 0.25, 1.0, 1e-6)
                    # the kernels were compiled, not run: mined indices that the torch glue can read
                    index = torch.randint(0, 2 * b if queue is None else queue.shape[0], (rows.shape[0], 4))
                    M.potential_mining_bwd(torch.ones(rows.shape[0]), z1, z2, queue, lse, index, alpha, edges,
                                           0.2, 1e-6)

        out += [(f"info_nce_queue {tag}", info_nce), (f"pair_cosine {tag}", pair_cosine),
                (f"potential_mining {tag}", potential_mining),
                (f"kmeans_assign {tag}", kmeans_assign),
                (f"kmeans_assign {tag} fixed tiles", _without_autotuning(K, kmeans_assign)),
                (f"similarity {tag}", similarity)]
    out += [(name.replace("float32", "float32 tf32"), tf32(thunk)) for name, thunk in list(out)
            if "float32" in name and not name.startswith(("pair_cosine", "similarity"))]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90 (default 90)")
    p.add_argument("-k", default="", help="only cases whose name contains this text")
    p.add_argument("--all-configs", action="store_true",
                   help="compile every autotuning config, not only the first (minutes)")
    p.add_argument("--max-spill", type=int, default=None,
                   help="fail when a fixed launch spills more than this many bytes per thread")
    args = p.parse_args(argv)

    results: list[Compiled] = []
    case_name = [""]

    def record(kernel_name, config, kernel, tuned):
        regs, spill = resource_usage(kernel.asm["cubin"])
        results.append(Compiled(case_name[0], kernel_name, config, regs, spill, kernel.metadata.shared,
                                mma_kind(kernel.asm["ptx"]), tuned))

    failures = []
    with _compile_instead_of_launch(args.arch, record, args.all_configs):
        for name, thunk in _cases():
            if args.k not in name:
                continue
            case_name[0] = name
            try:
                thunk()
            except Exception as e:  # a compile error: report it with the case, keep going
                failures.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")

    seen = set()
    print(f"Triton kernels compiled for sm_{args.arch}. launch: fixed (the wrapper's own tiles) or tuned "
          "(an autotuning candidate; the autotuner drops slow or unlaunchable ones).\n")
    print("| case | kernel | launch | config | registers | spill bytes | shared memory | MMA |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        key = (r.case, r.kernel, r.config)
        if key in seen:
            continue
        seen.add(key)
        launch = "tuned" if r.tuned else "fixed"
        print(f"| {r.case} | {r.kernel} | {launch} | {r.config} | {r.regs} | {r.spill_bytes} | {r.shared} | {r.mma} |")
    limit = SHARED_LIMIT.get(args.arch)
    if limit is not None:
        failures += [f"{r.case}: {r.kernel} [{r.config}] needs {r.shared} bytes of shared memory, "
                     f"sm_{args.arch} has {limit}" for r in results if r.shared > limit and not r.tuned]
    if args.max_spill is not None:
        failures += [f"{r.case}: {r.kernel} [{r.config}] spills {r.spill_bytes} bytes per thread"
                     for r in results if r.spill_bytes > args.max_spill and not r.tuned]
    print(f"\n{len(seen)} kernel variants compiled for sm_{args.arch}; {len(failures)} problems")
    for f in failures:
        print("FAIL", f)
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
