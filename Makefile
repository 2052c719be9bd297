# coreset-ext: make demo | make test | make bench | make gpu-check | make wheel
#
# `make test` and `make demo` set everything up on a fresh machine: a virtual environment in
# .venv (unless VENV names another), torch==2.13.0 unless an importable torch is already there,
# the test and training dependencies, and the compiled extension.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
DEPS := "numpy<2.4" scikit-learn pytest pytest-benchmark hypothesis pybind11 ninja matplotlib tqdm setuptools wheel \
	pyyaml safetensors pillow
# torchvision's models (the trainer's encoders) without letting pip replace the pinned torch: the
# release that matches TORCH_SPEC, installed with --no-deps.
TORCHVISION_SPEC ?= torchvision==0.28.*
MAX_JOBS ?= 2
export MAX_JOBS

# The nvcc syntax check compiles csrc/cuda/*.cu against the headers of a CUDA build of torch: the
# CPU build lacks c10/cuda's generated headers. Only the headers are unpacked from its wheel.
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_HEADERS := .cache/cuda-torch-headers
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
NVCC_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

# make gpu-check runs with the machine's own python (no network there), writes results here.
GPU_PY ?= python3
RESULTS_DIR ?= benchmarks/results/latest

.PHONY: help venv build test test-cpu test-triton triton-aot nvcc-check demo leaderboard active bench fuzz gpu-check wheel clean

help:
	@echo "make demo       set up, then train, score, select and evaluate on the embedded digits data"
	@echo "make test       set up, build, run the tests (Triton in the interpreter) and the nvcc check"
	@echo "make leaderboard every selector vs random on digits, 3 encoder seeds, paired 95% intervals"
	@echo "make active     active learning in a realistic digits pool (OOD, ambiguous): every method, 3 seeds"
	@echo "make bench      run the benchmarks on this machine, write benchmarks/results/<device>.{json,md}"
	@echo "make fuzz       the fuzz suite at length: FUZZ_EXAMPLES (default 2000) fresh random cases per test"
	@echo "make gpu-check  on a CUDA machine: build with CUDA, run every test and the GPU benchmarks"
	@echo "make wheel      build a wheel (CUDA when available) into dist/"

$(PY):
	python3 -m venv $(VENV)

venv: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	@# numpy 2.4 breaks Triton 3.6's interpreter (loops with runtime bounds), hence the pin.
	@$(PY) -c "import triton, sklearn, pytest, pytest_benchmark, hypothesis, pybind11, ninja, matplotlib, tqdm, numpy, \
	  yaml, safetensors, PIL; assert tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 4)" 2>/dev/null \
	  || $(PIP) install -q $(TRITON_SPEC) $(DEPS)
	@$(PY) -c "import importlib.util as u; assert u.find_spec('torchvision')" 2>/dev/null \
	  || $(PIP) install -q --no-deps "$(TORCHVISION_SPEC)"

build: venv
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: build test-cpu test-triton triton-aot nvcc-check
	@echo "make test: all passed"

test-cpu: build
	$(PY) -m pytest -q -m "not cuda and not triton" tests --doctest-modules coreset_ext

# Triton kernels run on the CPU through Triton's interpreter.
test-triton: build
	rc=0; TRITON_INTERPRET=1 $(PY) -m pytest -q -m "triton and not cuda" tests || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no Triton tests collected"; else exit $$rc; fi

# Every Triton kernel compiled for sm_90 and sm_80 by Triton's own compiler (ptxas included), no GPU
# needed: the interpreter above checks results but accepts code the compiler rejects. It fails on a
# compile error, a fixed launch beyond the architecture's shared memory, or one spilling more than
# 64 bytes per thread (sm_80 spills 16 in fp32 top-k). The tables of registers, spills, shared
# memory and matrix instructions (wgmma or mma.sync) per kernel land in build/triton-aot/.
triton-aot: build
	mkdir -p build/triton-aot
	@# one process per architecture (Triton caches one target per process), both at once
	for arch in 90 80; do \
	  $(PY) tools/triton_aot.py --arch $$arch --max-spill 64 > build/triton-aot/sm_$$arch.md 2>&1 & \
	done; \
	rc=0; for job in $$(jobs -p); do wait $$job || rc=1; done; \
	for arch in 90 80; do tail -n 1 build/triton-aot/sm_$$arch.md; done; \
	if [ $$rc -ne 0 ]; then grep -h "^FAIL\|Error" build/triton-aot/*.md; exit 1; fi

nvcc-check: venv
	@if [ -z "$(NVCC)" ]; then echo "nvcc-check: SKIPPED, nvcc not found"; exit 0; fi; \
	if [ ! -f $(CUDA_HEADERS)/torch/include/c10/cuda/impl/cuda_cmake_macros.h ]; then \
	  mkdir -p .cache/wheels $(CUDA_HEADERS); \
	  $(PIP) download -q --no-deps --only-binary=:all: -d .cache/wheels $(CUDA_TORCH_SPEC); \
	  $(PY) -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('.cache/wheels/torch-*.whl')[0]); \
	    z.extractall('$(CUDA_HEADERS)', [n for n in z.namelist() if n.startswith('torch/include/')])"; \
	fi; \
	pyinc=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])"); \
	mkdir -p build/nvcc-check; \
	for f in csrc/cuda/*.cu; do \
	  echo "nvcc -c $$f"; \
	  $(NVCC) -c $$f -o build/nvcc-check/$$(basename $$f .cu).o -std=c++20 --expt-relaxed-constexpr \
	    $(NVCC_ARCH) -D_GLIBCXX_USE_CXX11_ABI=1 -Xcompiler -fPIC \
	    -I$(CUDA_HEADERS)/torch/include -I$(CUDA_HEADERS)/torch/include/torch/csrc/api/include \
	    -I$$pyinc -w || exit 1; \
	done; echo "nvcc-check: every csrc/cuda/*.cu compiled"

demo: build
	$(PY) -m coreset_ext demo --out runs/demo

# Every selector against random through the whole pipeline, 3 encoder seeds x 3 seeds, with paired
# differences and 95% intervals (about 5 minutes on 2 CPU cores): the README's leaderboard.
leaderboard: build
	$(PY) -m coreset_ext benchmark --data digits --fractions 0.1,0.3 --encoder-seeds 3 --out runs/benchmark

# Active learning in a realistic digits pool (ID 0-5, OOD 6-9 at 30%, 20% ambiguous): the contrastive
# method, its OOD-unaware ablation and the baselines, 8 rounds of 40 labels, 3 seeds (a few minutes
# on 2 CPU cores; rerunning resumes): the README's active-learning table.
active: build
	$(PY) -m coreset_ext active --data digits --rounds 8 --budget 40 --seeds 3 --out runs/active

# The fuzz suite runs in `make test` with a bounded, derandomised number of cases; here at length
# and with fresh randomness every run.
FUZZ_EXAMPLES ?= 2000
fuzz: build
	CORESET_EXT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) CORESET_EXT_FUZZ_RANDOM=1 $(PY) -m pytest -q tests/test_fuzz.py

# faiss-cpu is a CPU k-means peer; only the benchmarks need it.
bench: build
	@$(PY) -c "import faiss" 2>/dev/null || $(PIP) install -q faiss-cpu
	$(PY) benchmarks/run.py --out benchmarks/results
	$(PY) benchmarks/readme.py

# On the GPU machine: CUDA build, every test (GPU-only ones included; the Triton tests on the GPU,
# then once more in the interpreter as CI runs them), then the GPU benchmarks. BENCH_ARGS=--quick
# shortens the benchmark rounds.
gpu-check:
	FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" \
	  $(GPU_PY) -m pip install -q --no-build-isolation --no-deps --no-index -e .
	mkdir -p $(RESULTS_DIR)
	$(GPU_PY) -m coreset_ext info | tee $(RESULTS_DIR)/info.txt
	$(GPU_PY) -m pytest -q -m "not triton or cuda" tests --junitxml=$(RESULTS_DIR)/tests-gpu.xml
	TRITON_INTERPRET=1 $(GPU_PY) -m pytest -q -m "triton and not cuda" tests
	$(GPU_PY) benchmarks/run.py --out $(RESULTS_DIR) --gpu $(BENCH_ARGS)

wheel: venv
	$(PY) tools/build_wheel.py

clean:
	rm -rf build dist *.egg-info coreset_ext/_C*.so .pytest_cache
