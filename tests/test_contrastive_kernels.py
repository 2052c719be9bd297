"""Triton contrastive kernels (triton_kernels/contrastive.py) and their launch helpers
(triton_kernels/launch.py): the switches and tables on the host side, and, in the interpreter, the
symmetric NT-Xent kernels against the float64 reference and against the non-symmetric ones."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from coreset_ext.triton_kernels import launch  # noqa: E402


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"CORESET_EXT_AUTOTUNE": "1"}, True),
    ({"CORESET_EXT_AUTOTUNE": "0"}, False),
    ({"CORESET_EXT_AUTOTUNE": "1", "CORESET_EXT_NO_AUTOTUNE": "1"}, False),
    ({"CORESET_EXT_NO_AUTOTUNE": "1"}, False),
])
def test_autotuning_is_opt_in(env, expected, monkeypatch):
    for name in ("CORESET_EXT_AUTOTUNE", "CORESET_EXT_NO_AUTOTUNE", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch.autotune_enabled() is expected
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter never autotunes
    assert launch.autotune_enabled() is False


def test_autotuned_caches_winners_on_disk():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, BLOCK: tl.constexpr):
        pass

    tuned = launch.autotuned([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"])(kernel)
    # Triton keeps winners in its cache directory when asked, except under its interpreter
    assert tuned.cache_results is not launch.interpreting()
