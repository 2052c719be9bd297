import pytest
import torch
from _utils import poisoned


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by make gpu-check)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: random inputs, never zeros, reproducible failures."""
    return torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())


@pytest.fixture
def poison():
    """Every torch.empty / empty_like made during the test starts as NaN (integers: their maximum),
    so an output element a kernel never writes shows (see _utils.poisoned)."""
    with poisoned():
        yield
