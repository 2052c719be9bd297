"""The README's quick start in Python (the block after `<!-- readme-quickstart -->`) runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_quick_start_with_your_own_data_and_model_runs():
    text = README.read_text()
    block = re.search(r"<!-- readme-quickstart -->\n```python\n(.*?)```", text, re.DOTALL)
    assert block is not None, "README.md lost its quick-start block"
    namespace: dict = {}
    exec(compile(block.group(1), "README.md quick start", "exec"), namespace)  # noqa: S102 -- our own README
    assert namespace["css"].shape == (256,) and bool(torch.isfinite(namespace["css"]).all())
    assert len(namespace["subset"]) == round(0.3 * 256)
    assert namespace["out"]["css"].shape == (256,) and namespace["out"]["embeddings"].shape == (256, 16)
