#!/usr/bin/env bash
# The GPU checks of `make gpu-check`, cut into steps that each fit one call of a lent GPU machine
# (10 minutes a command, results copied back from $OUT: at most 8 files, 2 folders down).
#
#   bash tools/gpu_session.sh tests kmeans        # on the GPU machine, from the repository root
#
# Steps, in the order a short lease should spend its time:
#   issue14        all of issue 14's GPU targets in about 5 minutes after the build: the CUDA tests of
#                  the contrastive kernels; NT-Xent bf16 at B = 1024 .. 65536 (ours symmetric and
#                  row-streaming in each pass, CUDA graph, eager_user, compile_user, inf-cl, floor);
#                  MoCo B = 256 against K = 65536; fp32 with TF32 off and on; the first call at a new
#                  shape in a fresh process (cold and warm Triton cache). Device tool command:
#                  bash tools/gpu_session.sh issue14      (OUT is set there)
#   tests          every CUDA-marked test (kernels against the float64 reference)
#   kmeans         k-means at n = 1M against flash-kmeans, fastkmeans, fast-pytorch-kmeans, naive
#   losses-bf16    NT-Xent and MoCo InfoNCE in bf16, with lightly and inf-cl
#   losses-fp32    the same in fp32
#   scatter        the score scatter, validated and unvalidated
#   kmeans-10m     k-means at n = 10M
#   kmeans-table   issue 15's GPU table (test_kmeans_gpu: n = 1M and 10M, k = 1000 and 65,536,
#                  with flash-kmeans, fastkmeans and fast-pytorch-kmeans) within 4 minutes
#   issue15        k-means' CUDA tests (at most 90 s), then kmeans-table
#   similarity     cosine row sums and top-k
#   mining         issue 18: the mining kernels' CUDA tests (B = 1000 and 4099, 257 queries against
#                  65,536 keys; fp32/fp16/bf16) and its loss rows against the plain losses
#   distributed    issue 20: the NCCL tests of tests/test_distributed.py (gathered loss and gradients,
#                  tracker sync, sharded KMeans, the trainer with SyncBatchNorm; one GPU, 2 ranks)
# Peers come from wheels in .whl/ (carried to the machine; see the device README for how to fetch
# them): they are installed into /tmp/site. Each benchmark step writes $OUT/parts/<step>.json;
# merge them here with `python benchmarks/run.py --merge <files> --out benchmarks/results`.
# CORESET_EXT_COMMIT names the commit (the machine gets no .git).
set -u
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT/parts"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1

if [ -n "$(ls .whl/*.whl 2>/dev/null)" ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >> "$LOG" 2>&1 || echo "peer wheels did not install (see log.txt)"
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site

if ! python3 -c "from coreset_ext import _backend as b; assert b.build_info()['cuda_built']" 2>/dev/null; then
  echo "building with CUDA (sm_90)"
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" timeout 400 \
    python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> "$LOG" 2>&1 \
    || { tail -30 "$LOG"; exit 1; }
fi
python3 -m coreset_ext info > "$OUT/info.txt" 2>&1

bench() {  # bench <step> <seconds> <pytest -k expression>
  echo "== $1" | tee -a "$LOG"
  timeout "$2" python3 benchmarks/run.py --gpu --quick --no-plot --out "$OUT/$1" -k "$3" >> "$LOG" 2>&1
  echo "$1: rc=$?" | tee -a "$LOG"
  if [ -f "$OUT/$1/"*.json ]; then mv "$OUT/$1/"*.json "$OUT/parts/$1.json"; fi
  rm -rf "${OUT:?}/$1"
}

for step in "$@"; do
  case "$step" in
    tests)
      echo "== tests" | tee -a "$LOG"
      timeout 540 python3 -m pytest -q -m cuda tests -p no:cacheprovider -rfE > "$OUT/tests.txt" 2>&1
      echo "tests: rc=$?; $(tail -n 1 "$OUT/tests.txt")" | tee -a "$LOG" ;;
    issue14)  # two benchmark runs, so that a slow torch.compile cannot cost the other rows
      echo "== issue14 tests" | tee -a "$LOG"
      timeout 90 python3 -m pytest -q -m cuda tests/test_contrastive_kernels.py -p no:cacheprovider -rfE \
        > "$OUT/issue14-tests.txt" 2>&1
      echo "issue14 tests: rc=$?; $(tail -n 1 "$OUT/issue14-tests.txt")" | tee -a "$LOG"
      bench issue14-kernels 150 "(test_nt_xent and bf16 and coreset_ext and not graph) or (test_nt_xent and fwd and bwd and bf16 and (graph or eager or inf_cl) and not compile) or (test_info_nce_queue and B256 and fwd and bwd and bf16) or test_nt_xent_fp32_precision"
      bench issue14-compile 170 "(test_nt_xent and fwd and bwd and bf16 and compile_user) or test_first_call" ;;
    kmeans) bench kmeans 500 "kmeans and not 10000000" ;;
    kmeans-10m) bench kmeans-10m 540 "kmeans and 10000000" ;;
    kmeans-table) bench kmeans-table 230 "test_kmeans_gpu" ;;
    issue15)  # k-means' CUDA tests (queued iterations, CUDA-graph capture, weights, offsets), then the table
      echo "== issue15 tests" | tee -a "$LOG"
      timeout 90 python3 -m pytest -q -m cuda tests/test_kmeans.py tests/test_kmeans_estimator.py -p no:cacheprovider \
        -rfE > "$OUT/issue15-tests.txt" 2>&1
      echo "issue15 tests: rc=$?; $(tail -n 1 "$OUT/issue15-tests.txt")" | tee -a "$LOG"
      bench kmeans-table 230 "test_kmeans_gpu" ;;
    losses-bf16) bench losses-bf16 540 "(nt_xent or info_nce) and bf16" ;;
    losses-fp32) bench losses-fp32 540 "(nt_xent or info_nce) and fp32" ;;
    scatter) bench scatter 300 "scatter" ;;
    similarity) bench similarity 400 "similarity or rowsum or topk" ;;
    mining)
      echo "== mining tests" | tee -a "$LOG"
      timeout 120 python3 -m pytest -q -m cuda tests/test_mining.py -p no:cacheprovider -rfE > "$OUT/mining-tests.txt" 2>&1
      echo "mining tests: rc=$?; $(tail -n 1 "$OUT/mining-tests.txt")" | tee -a "$LOG"
      bench mining 120 "test_potential_mining" ;;
    distributed)
      echo "== distributed tests" | tee -a "$LOG"
      timeout 150 python3 -m pytest -q -m cuda tests/test_distributed.py -p no:cacheprovider -rfE \
        > "$OUT/distributed-tests.txt" 2>&1
      echo "distributed tests: rc=$?; $(tail -n 1 "$OUT/distributed-tests.txt")" | tee -a "$LOG" ;;
    *) echo "unknown step: $step"; exit 2 ;;
  esac
done
