"""Host-side helpers for the launch wrappers: integer arithmetic, the device to launch on, and what
the device offers (the launch-config tables of the kernel modules read these).

triton.cdiv and triton.next_power_of_2 are constexpr functions: called from Python, each costs
about 2 us of argument unwrapping, and one training step of a fused loss makes a dozen such calls.
"""

from __future__ import annotations

import functools
import os

import torch


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


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 follows torch's own matmul setting, IEEE unless the user
    allowed TF32 (16-bit inputs ignore it)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still exercises several splits


def hopper(device: torch.device) -> bool:
    """Compute capability 9 or later: warpgroup MMA (wgmma) for row tiles of 64."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def on_tensor_device(launch):
    """Runs a launch wrapper with its first tensor argument's GPU as the current device.

    Triton launches on the current device and its stream, not on the tensors' device: tensors on
    cuda:1 while cuda:0 is current would be read by a kernel running on cuda:0."""
    @functools.wraps(launch)
    def wrapper(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if device.type != "cuda":
            return launch(*args, **kwargs)
        with torch.cuda.device(device):
            return launch(*args, **kwargs)
    return wrapper
