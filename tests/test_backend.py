"""Backend selection and `python -m coreset_ext info` tell the truth."""

import subprocess
import sys

import pytest
import torch

from coreset_ext import _backend


def test_info_runs_and_reports_each_op():
    out = subprocess.run([sys.executable, "-m", "coreset_ext", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for op in _backend.OPS:
        assert op in out.stdout
    if not torch.cuda.is_available():
        assert "GPU             : none" in out.stdout
    info = _backend.build_info()
    if info:
        assert info["torch"] == torch.__version__, "the loaded _C was built against this torch"
        assert ("CUDA kernels built" in out.stdout) == info["cuda_built"]


def test_scatter_backend_choice():
    cpu = _backend.select_backend("score_scatter_add_", torch.device("cpu"))
    assert cpu == ("cpp" if _backend.has_extension() else "reference")
    if torch.cuda.is_available():
        gpu = _backend.select_backend("score_scatter_add_", torch.device("cuda"))
        assert gpu == ("cuda" if _backend.has_cuda_kernels() else "reference")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_explicit_missing_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend='cuda' for score_scatter_add_ is unavailable"):
        _backend.select_backend("score_scatter_add_", torch.device("cuda"), requested="cuda")
    with pytest.raises(ValueError, match="not one of"):
        _backend.select_backend("score_scatter_add_", torch.device("cpu"), requested="metal")
