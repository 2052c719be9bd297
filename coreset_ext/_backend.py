"""Which backends exist on this machine, and which one serves each op.

Backends, fastest first: "cuda" (compiled CUDA kernels in `_C`), "triton" (Triton kernels),
"cpp" (compiled CPU kernels in `_C`), "reference" (pure PyTorch, `coreset_ext.reference`).
`python -m coreset_ext info` prints the table this module computes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("cuda", "triton", "cpp", "reference")

_BUILD_HINT = (
    "coreset_ext._C is not built, so every op runs on its pure-PyTorch reference backend. "
    "Build it with `pip install --no-build-isolation -e .` (or `make test`), "
    "with FORCE_CUDA=1 for the CUDA kernels."
)


@functools.lru_cache(maxsize=None)
def load_extension() -> str | None:
    """Imports `coreset_ext._C` once. Returns None on success, else why it failed (and warns once)."""
    try:
        from coreset_ext import _C  # noqa: F401  (import registers the compiled ops)
    except ImportError as exc:
        warnings.warn(f"{_BUILD_HINT} ({exc})", RuntimeWarning, stacklevel=3)
        return str(exc)
    return None


def has_extension() -> bool:
    return load_extension() is None


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """The build information compiled into `_C` ({} when `_C` is missing)."""
    if not has_extension():
        return {}
    return json.loads(torch.ops.coreset_ext.build_info())


def has_cuda_kernels() -> bool:
    return bool(build_info().get("cuda_built"))


@functools.lru_cache(maxsize=None)
def triton_status() -> str | None:
    """None when Triton kernels can run here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class OpBackends:
    """The backends that implement an op on each kind of device, fastest first."""

    gpu: tuple[str, ...]
    cpu: tuple[str, ...]


# Filled by the modules of coreset_ext.ops as ops are defined; read by `info` and `select_backend`.
OPS: dict[str, OpBackends] = {}


def register_op(name: str, *, gpu: tuple[str, ...], cpu: tuple[str, ...]) -> None:
    OPS[name] = OpBackends(gpu=gpu, cpu=cpu)


def why_unavailable(backend: str, device_type: str) -> str | None:
    """None if `backend` can run on `device_type` here, else the reason it cannot."""
    gpu = torch.cuda.is_available()
    if backend == "reference":
        return None
    if backend == "cpp":
        return None if has_extension() else "coreset_ext._C not built"
    if backend == "cuda":
        if not has_extension():
            return "coreset_ext._C not built"
        if not has_cuda_kernels():
            return "_C built without CUDA (" + build_info().get("cuda_reason", "?") + ")"
        return None if gpu else "no CUDA GPU"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        if device_type == "cpu":
            return None if triton_interpreting() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        return None if gpu else "no CUDA GPU"
    raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")


def select_backend(op: str, device: torch.device, requested: str | None = None) -> str:
    """The backend that serves `op` for tensors on `device`.

    `requested` (an explicit `backend=` argument) must be available, or this raises. Otherwise the
    fastest available backend for the device wins, falling back to the reference.
    """
    spec = OPS[op]
    candidates = spec.gpu if device.type == "cuda" else spec.cpu
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend={requested!r} is not one of {BACKENDS}")
        # Triton serves GPU tensors, and CPU tensors only under TRITON_INTERPRET=1 (tests).
        offered = candidates + (("triton",) if "triton" in spec.gpu else ())
        if requested != "reference" and requested not in offered:
            raise ValueError(f"backend={requested!r} does not implement {op} on {device.type}")
        why = why_unavailable(requested, device.type)
        if why is not None:
            raise RuntimeError(f"backend={requested!r} for {op} is unavailable: {why}")
        return requested
    for backend in candidates:
        if why_unavailable(backend, device.type) is None:
            return backend
    return "reference"


@functools.lru_cache(maxsize=None)
def default_backend(op: str, device_type: str) -> str:
    """The automatic choice for `op` on a kind of device, probed once per process."""
    return select_backend(op, torch.device(device_type))


@torch.compiler.assume_constant_result
def resolve(op: str, device_type: str, requested: str = "") -> str:
    """The backend a public op passes to its custom op ("" requests the automatic choice).

    The one way every op chooses its backend. torch.compile cannot trace the probing behind it
    (module lookups, the environment), so it runs once while tracing and its answer is a constant
    of the graph; eagerly the automatic choice is a cached lookup.
    """
    if not requested:
        return default_backend(op, device_type)
    return select_backend(op, torch.device(device_type), requested)


_NO_CONTEXT = contextlib.nullcontext()


def no_autocast(x: torch.Tensor):
    """A context that turns autocast off around an op's implementation, for x's device: every op
    accumulates in float32 itself, and autocast must not lower its products to bf16/fp16 halfway
    through a formula. Nothing to enter when no autocast is on, the usual case: one cheap test,
    as this runs on every training step."""
    if not torch._C._is_any_autocast_enabled():
        return _NO_CONTEXT
    return torch.autocast(x.device.type, enabled=False)


_FALLBACK_LIBRARY = None  # a torch.library.Library holding the ops _C did not define (kept alive here)


def define_fallback(schema: str, impl) -> None:
    """Serves an op of csrc/ops.cpp with its Python `impl` (the reference) wherever `_C` does not:
    defines the schema when `_C` is missing, and registers `impl` for the devices without a
    compiled kernel. User code and torch.compile then see one op either way."""
    global _FALLBACK_LIBRARY
    if _FALLBACK_LIBRARY is None:
        _FALLBACK_LIBRARY = torch.library.Library("coreset_ext", "FRAGMENT")
    name = schema.split("(", 1)[0]
    if not has_extension():
        _FALLBACK_LIBRARY.define(schema)
        _FALLBACK_LIBRARY.impl(name, impl, "CPU")
    if not has_cuda_kernels():
        _FALLBACK_LIBRARY.impl(name, impl, "CUDA")


def report() -> str:
    """Human-readable build information and op -> backend table."""
    lines = ["coreset-ext"]
    try:
        from importlib.metadata import version

        lines.append(f"  package version : {version('coreset-ext')}")
    except Exception:
        lines.append("  package version : (not installed as a distribution)")
    lines.append(f"  torch           : {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    if torch.cuda.is_available():
        lines.append(f"  GPU             : {torch.cuda.get_device_name()}")
    else:
        lines.append("  GPU             : none")
    tstat = triton_status()
    tver = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton

        tver = triton.__version__
    lines.append(f"  triton          : {tver}" + (f" ({tstat})" if tstat else ""))
    info = build_info()
    if info:
        lines.append(
            f"  _C build        : torch {info['torch']}, CUDA kernels "
            + (f"built for {info['arch_list']} (CUDA {info['torch_cuda']})" if info["cuda_built"]
               else f"not built ({info['cuda_reason']})")
            + f", commit {info['commit'][:12]}"
        )
    else:
        lines.append(f"  _C build        : missing ({load_extension()})")
    lines.append("")
    lines.append("  op                    device  serves     others")
    for name in sorted(OPS):
        spec = OPS[name]
        for dev, cands in (("cuda", spec.gpu), ("cpu", spec.cpu)):
            chosen = select_backend(name, torch.device(dev)) if dev == "cpu" or torch.cuda.is_available() else None
            others = []
            for b in cands + ("reference",):
                if b == chosen or b in [o.split(":")[0] for o in others]:
                    continue
                why = why_unavailable(b, dev)
                if dev == "cuda" and not torch.cuda.is_available():
                    why = why or "no CUDA GPU"
                others.append(f"{b}: {why}" if why else f"{b}: available, slower")
            lines.append(f"  {name:<21} {dev:<7} {chosen or '-':<10} " + "; ".join(others))
    return "\n".join(lines)
