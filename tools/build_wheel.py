"""`make wheel`: builds a coreset-ext wheel into dist/, then installs it into a fresh virtual
environment and runs a smoke test from there.

CUDA wheel when torch is a CUDA build and nvcc is found (or FORCE_CUDA=1), else the CPU wheel.
TORCH_CUDA_ARCH_LIST defaults to sm_80, sm_86, sm_90 with PTX for the newest, plus sm_100 when
this nvcc knows it. The local version tag names CUDA and torch (e.g. 0.1.0+cu130torch2.11) so a
wheel is never installed beside a torch it was not built for. torch's libraries are not bundled:
the wheel links against the torch installed beside it.

    python tools/build_wheel.py [--no-test] [--dist dist]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent


def nvcc() -> str | None:
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def default_arch_list(nvcc_path: str) -> str:
    known = subprocess.run([nvcc_path, "--list-gpu-arch"], capture_output=True, text=True).stdout
    archs = ["8.0", "8.6", "9.0"]
    if "compute_100" in known:
        archs.append("10.0")
    archs[-1] += "+PTX"
    return ";".join(archs)


def local_tag(with_cuda: bool) -> str:
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if with_cuda:
        return f"cu{torch.version.cuda.replace('.', '')}torch{major_minor}"
    return f"cputorch{major_minor}"


def build(dist: Path) -> Path:
    force = os.environ.get("FORCE_CUDA")
    nv = nvcc()
    with_cuda = force == "1" or (force != "0" and torch.version.cuda is not None and nv is not None)
    env = dict(os.environ, CORESET_EXT_LOCAL_VERSION=local_tag(with_cuda))
    if with_cuda:
        env["FORCE_CUDA"] = "1"
        env.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list(nv))
        print(f"building a CUDA wheel for {env['TORCH_CUDA_ARCH_LIST']} (MAX_JOBS={env.get('MAX_JOBS', 'auto')})")
    else:
        print("building a CPU wheel (no CUDA build of torch with nvcc here)")
    dist.mkdir(parents=True, exist_ok=True)
    before = set(dist.glob("*.whl"))
    # --no-build-isolation: the extension must be compiled against the torch that will import it,
    # not a torch that pip would download into an isolated build environment.
    subprocess.check_call([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                           "-w", str(dist), str(ROOT)], env=env)
    new = sorted(set(dist.glob("*.whl")) - before) or sorted(dist.glob(f"*{env['CORESET_EXT_LOCAL_VERSION']}*.whl"))
    wheel = new[-1]
    print(f"built {wheel}")
    return wheel


SMOKE = r"""
import torch, coreset_ext as cx
from coreset_ext import _backend
assert _backend.has_extension(), "the wheel's _C did not load"
info = _backend.build_info()
print("build info:", info)
s = torch.zeros(4)
cx.ops.score_scatter_add_(s, torch.tensor([1, 1, 3]), torch.tensor([1.0, 2.0, 3.0]))
assert s.tolist() == [0.0, 3.0, 0.0, 3.0], s
if torch.cuda.is_available() and info["cuda_built"]:
    g = torch.zeros(4, device="cuda")
    cx.ops.score_scatter_add_(g, torch.tensor([1, 1, 3], device="cuda"), torch.ones(3, device="cuda"))
    assert g.tolist() == [0.0, 2.0, 0.0, 1.0], g
    print("CUDA kernels ran")
print(_backend.report())
print("smoke test passed")
"""


def smoke_test(wheel: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        # System site packages give the new environment the machine's torch when it has one (the
        # GPU machine, which has no network); otherwise the same torch is installed from the index.
        subprocess.check_call([sys._base_executable, "-m", "venv", "--system-site-packages", str(venv)])
        py = str(venv / "bin" / "python")
        has_torch = subprocess.run([py, "-c", f"import torch; assert torch.__version__ == {torch.__version__!r}"],
                                   capture_output=True).returncode == 0
        if not has_torch:
            subprocess.check_call([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__}", "numpy"])
        subprocess.check_call([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
        # run from an empty directory so that the source tree cannot be imported by mistake
        subprocess.check_call([py, "-c", SMOKE], cwd=tmp)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dist", type=Path, default=ROOT / "dist")
    p.add_argument("--no-test", action="store_true", help="skip installing and smoke-testing the wheel")
    args = p.parse_args()
    wheel = build(args.dist)
    if not args.no_test:
        smoke_test(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
