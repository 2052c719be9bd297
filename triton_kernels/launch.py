"""Host-side helpers for the launch wrappers: integer arithmetic, and the device to launch on.

triton.cdiv and triton.next_power_of_2 are constexpr functions: called from Python, each costs
about 2 us of argument unwrapping, and one training step of a fused loss makes a dozen such calls.
"""

from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_d(d: int) -> int:
    """Block width for a feature dimension d: tl.dot needs every block dimension >= 16; padding
    columns are masked to zero."""
    return max(16, next_power_of_2(d))


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
