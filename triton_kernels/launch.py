"""Host-side integer arithmetic for the launch wrappers.

triton.cdiv and triton.next_power_of_2 are constexpr functions: called from Python, each costs
about 2 us of argument unwrapping, and one training step of a fused loss makes a dozen such calls.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
