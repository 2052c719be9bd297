"""Host-side helpers for the launch wrappers: integer arithmetic, the device to launch on, what the
device offers (cached per device: the launch-config tables of the kernel modules read these), and
the autotuning switch with its on-disk cache, shared by every kernel module.

triton.cdiv and triton.next_power_of_2 are constexpr functions: called from Python, each costs
about 2 us of argument unwrapping, and one training step of a fused loss makes a dozen such calls.
"""

from __future__ import annotations

import functools
import os

import torch
import triton


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_d(d: int) -> int:
    """Block width for a feature dimension d: tl.dot needs every block dimension >= 16; padding
    columns are masked to zero."""
    return max(16, next_power_of_2(d))


def interpreting() -> bool:
    """Triton's interpreter runs the kernels (TRITON_INTERPRET=1): small fixed tiles, no autotuning."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled() -> bool:
    """Whether launches that have autotuning candidates autotune: an opt-in (CORESET_EXT_AUTOTUNE=1),
    because tuning a new shape takes tens of seconds; CORESET_EXT_NO_AUTOTUNE=1 (the former
    opt-out) still wins. Never under the interpreter. Read per call: tests and users flip it."""
    env = os.environ
    return env.get("CORESET_EXT_AUTOTUNE") == "1" and env.get("CORESET_EXT_NO_AUTOTUNE") != "1" and not interpreting()


def autotuned(configs, key, **kwargs):
    """triton.autotune whose winners are cached on disk across processes: Triton's own autotuning
    cache (under TRITON_CACHE_DIR, ~/.triton/cache by default), keyed by the Triton version, the
    GPU target, the kernel's source, the tuning key (with argument dtypes) and the configs, so a
    second process at the same shape launches the winner without timing anything."""
    return triton.autotune(configs=configs, key=key, cache_results=True, **kwargs)


def precision(dtype: torch.dtype, exact: str = "ieee") -> str:
    """tl.dot's input_precision, read from torch's own matmul setting at each call (cheap): fp32
    takes TF32 where torch would (`torch.backends.cuda.matmul.allow_tf32`, which
    `torch.set_float32_matmul_precision("high")` also sets), else `exact`: "ieee" (fp32 products on
    the FMA units) or "tf32x3" (three tensor-core products that keep fp32's accuracy, several times
    faster). 16-bit inputs ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return exact
    return "tf32"


@functools.cache
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _properties(_index(device)).multi_processor_count
    return 2  # interpreter: still exercises several splits


def capability(device: torch.device) -> int:
    """Compute capability as one number (80, 90, ...); 0 off the GPU."""
    if device.type != "cuda":
        return 0
    p = _properties(_index(device))
    return 10 * p.major + p.minor


def hopper(device: torch.device) -> bool:
    """Compute capability 9 or later: warpgroup MMA (wgmma) for row tiles of 64."""
    return capability(device) >= 90


def on_tensor_device(launch):
    """Runs a launch wrapper with its first tensor argument's GPU as the current device.

    Triton launches on the current device and its stream, not on the tensors' device: tensors on
    cuda:1 while cuda:0 is current would be read by a kernel running on cuda:0."""
    @functools.wraps(launch)
    def wrapper(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
            return launch(*args, **kwargs)  # the common case: no device switch to pay for
        with torch.cuda.device(device):
            return launch(*args, **kwargs)
    return wrapper
