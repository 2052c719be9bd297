// The op schemas of coreset_ext, in one place. Kernels register their implementations from
// csrc/cpu/<op>_cpu.cpp and csrc/cuda/<op>_cuda.cu with TORCH_LIBRARY_IMPL; fake kernels and
// autograd formulas are registered from Python (coreset_ext/ops/).
#include <Python.h>
#include <torch/library.h>

#include "build_info.h"

extern "C" {
// _C is imported for its side effect of registering the ops below; it has no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace coreset_ext {

std::string build_info() { return kBuildInfo; }

TORCH_LIBRARY(coreset_ext, m) {
  m.def("build_info() -> str", &build_info);
  // ---- contrastive losses (issue 14) ----
  // CPU backend of the Python custom ops of coreset_ext/ops/contrastive.py (csrc/cpu/contrastive_cpu.cpp):
  // one call per pass, computing what coreset_ext/reference.py computes. Forward -> (rows, lse, cos),
  // float32 (float64 for float64 inputs); backward -> gradients in the inputs' dtype.
  m.def("nt_xent_cpu(Tensor z1, Tensor z2, float temperature, bool normalize, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("nt_xent_backward_cpu(Tensor grad_rows, Tensor z1, Tensor z2, Tensor lse, float temperature, bool normalize, "
        "float eps) -> (Tensor, Tensor)");
  m.def("info_nce_queue_cpu(Tensor q, Tensor k, Tensor queue, float temperature, bool normalize, float eps) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("info_nce_queue_backward_cpu(Tensor grad_rows, Tensor q, Tensor k, Tensor queue, Tensor lse, "
        "float temperature, bool normalize, float eps) -> Tensor");
  m.def("pair_cosine_cpu(Tensor a, Tensor b, float eps) -> Tensor");
  m.def("pair_cosine_backward_cpu(Tensor grad, Tensor a, Tensor b, float eps) -> (Tensor, Tensor)");
  // scores[index[i]] += values[i] for every i; duplicates are summed. Bounds are checked by the
  // kernels themselves (CPU: error before any write; CUDA: out-of-range entries are skipped).
  m.def("score_scatter_add_(Tensor(a!) scores, Tensor index, Tensor values, bool deterministic) -> ()");
  // CPU only: the same, skipping entries with a bad index or (check_values) a non-finite value and
  // recording them in flags (ops/scatter.py DeviceErrors.flags); validate="device" on the CPU.
  m.def("score_scatter_add_screened_cpu(Tensor(a!) scores, Tensor index, Tensor values, Tensor(b!) flags, "
        "bool check_values) -> ()");
  // ---- kmeans (issue 4) ----
  // Per-cluster sums [k, d] (float32; float64 for float64 x) and counts [k] int64 of the rows of
  // x grouped by labels (int64). Deterministic, no float atomics. Bounds checked by the kernels
  // (CPU: error before any write; CUDA: out-of-range labels are never read or written).
  m.def("kmeans_update(Tensor x, Tensor labels, int k) -> (Tensor, Tensor)");
  // CPU backend of the Python custom op coreset_ext::kmeans_assign (ops/kmeans.py): x float32/float64,
  // centroids prepared by the caller (normalised for cosine). -> (labels int64, distance float32).
  m.def("kmeans_assign_cpu(Tensor x, Tensor centroids, bool cosine) -> (Tensor, Tensor)");
  // The same fused with kmeans_update (one pass over x): -> (labels, distance, sums, counts); the
  // distance only if asked (else empty), sums in x's dtype. Used by KMeans on the CPU.
  m.def("kmeans_lloyd_step_cpu(Tensor x, Tensor centroids, bool cosine, bool distance) -> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace coreset_ext
