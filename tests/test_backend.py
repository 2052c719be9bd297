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


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_ops_run_on_their_tensors_gpu():
    """Tensors on cuda:1 while cuda:0 is current: Triton launches on the current device unless
    the wrappers switch to the tensors' own; the results must match the same call on cuda:0."""
    from coreset_ext import ops

    g = torch.Generator().manual_seed(0)
    z1, z2, queue = (torch.randn(n, 64, generator=g) for n in (300, 300, 1000))

    def run(dev):
        a = z1.to(dev).requires_grad_()
        loss = ops.nt_xent(a, z2.to(dev), 0.3) + ops.info_nce_queue(a, z2.to(dev), queue.to(dev), 0.2)
        loss.backward()
        labels, _ = ops.kmeans_assign(queue.to(dev), z1[:50].to(dev))
        return [t.cpu() for t in (loss, a.grad, labels, ops.cosine_rowsum(z1.to(dev)))]

    with torch.cuda.device(0):
        other, home = run("cuda:1"), run("cuda:0")
    for got, want in zip(other, home):  # split backwards sum with atomics: close, not equal
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
