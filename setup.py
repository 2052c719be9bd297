"""Builds coreset_ext._C: the C++ CPU kernels always, the CUDA kernels when asked or possible.

Environment:
  FORCE_CUDA=1            build the CUDA kernels even if no GPU is visible (nvcc must exist)
  FORCE_CUDA=0            never build them
  TORCH_CUDA_ARCH_LIST    e.g. "8.0;9.0+PTX" (default: sm_80 and sm_90, PTX for the newest)
  MAX_JOBS                parallel compile jobs (honoured by torch's ninja build)
  CORESET_EXT_LOCAL_VERSION  local version tag appended to the version (set by `make wheel`)
"""

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).parent.resolve()
VERSION = "0.1.0"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _nvcc() -> str | None:
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _want_cuda() -> tuple[bool, str]:
    force = os.environ.get("FORCE_CUDA", "")
    if force == "0":
        return False, "FORCE_CUDA=0"
    nvcc = _nvcc()
    if force == "1":
        if nvcc is None:
            raise SystemExit("FORCE_CUDA=1 but nvcc was not found: set CUDA_HOME")
        if torch.version.cuda is None:
            raise SystemExit(f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU build")
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if nvcc is None:
        return False, "nvcc not found"
    return True, "CUDA build of torch and nvcc found"


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # a copy of the tree without .git
        return os.environ.get("CORESET_EXT_COMMIT", "unknown")


def _write_build_info(info: dict) -> Path:
    # The build information is compiled into _C so that what `info` prints is what was loaded.
    out = ROOT / "build" / "generated"
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(info, sort_keys=True)
    header = f'#pragma once\nstatic const char* kBuildInfo = R"JSON({text})JSON";\n'
    path = out / "build_info.h"
    if not path.exists() or path.read_text() != header:
        path.write_text(header)
    return out


def extensions():
    with_cuda, why = _want_cuda()
    arch_list = None
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    info = {
        "version": VERSION,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_built": with_cuda,
        "cuda_reason": why,
        "arch_list": arch_list,
        "commit": _git_commit(),
    }
    gen_dir = _write_build_info(info)

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    extra = {"cxx": cxx}
    ext_cls = cpp_extension.CppExtension
    define = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
        define = [("CORESET_EXT_WITH_CUDA", "1")]
    return [
        ext_cls(
            "coreset_ext._C",
            sources,
            include_dirs=[str(gen_dir)],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            define_macros=define,
            py_limited_api=False,
        )
    ]


def version() -> str:
    local = os.environ.get("CORESET_EXT_LOCAL_VERSION")
    return f"{VERSION}+{local}" if local else VERSION


setup(
    version=version(),
    packages=["coreset_ext", "coreset_ext.ops", "coreset_ext.select", "coreset_ext.train", "coreset_ext.triton_kernels"],
    # triton_kernels/ lives at the top of the repository but installs inside the package: a
    # top-level module named `triton_kernels` would collide with other packages of that name.
    package_dir={"coreset_ext": "coreset_ext", "coreset_ext.triton_kernels": "triton_kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
