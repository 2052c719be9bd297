// scores[index[i]] += float(values[i]), sequentially: duplicates are summed in index order, so
// the result is deterministic. All indices are checked before the first write, so a bad index
// raises and leaves the buffer as it was.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

namespace coreset_ext {

template <typename index_t, typename value_t>
static void scatter_add_kernel(float* scores, int64_t n, const index_t* index,
                               const value_t* values, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = static_cast<int64_t>(index[i]);
    TORCH_CHECK_INDEX(j >= 0 && j < n, "index contains ", j, ", out of range for scores of size ", n,
                      " (at position ", i, ")");
  }
  for (int64_t i = 0; i < m; ++i) {
    scores[index[i]] += static_cast<float>(values[i]);
  }
}

// index and values of either kernel: 1-D, equal length, int32/int64 indices.
static void check_index_values(const char* op, const at::Tensor& index, const at::Tensor& values) {
  TORCH_CHECK(index.dim() == 1 && values.dim() == 1 && index.numel() == values.numel(), op,
              ": index and values must be 1-D of equal length, got ", index.sizes(), " and ", values.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, op,
              ": index must be int32 or int64");
}

void score_scatter_add_cpu(at::Tensor& scores, const at::Tensor& index, const at::Tensor& values,
                           bool deterministic) {
  (void)deterministic;  // the CPU kernel is always deterministic
  TORCH_CHECK(scores.device().is_cpu() && index.device().is_cpu() && values.device().is_cpu(),
              "score_scatter_add_: all tensors must be on the CPU");
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "score_scatter_add_: scores must be float32");
  TORCH_CHECK(scores.dim() == 1 && scores.is_contiguous(),
              "score_scatter_add_: scores must be a contiguous 1-D tensor");
  check_index_values("score_scatter_add_", index, values);
  const at::Tensor idx = index.contiguous();
  const at::Tensor val = values.contiguous();
  float* out = scores.data_ptr<float>();
  const int64_t n = scores.numel();
  const int64_t m = idx.numel();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "score_scatter_add_cpu", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(),
                                    "score_scatter_add_cpu", [&] {
      scatter_add_kernel<index_t, scalar_t>(out, n, idx.data_ptr<index_t>(),
                                            val.data_ptr<scalar_t>(), m);
    });
  });
}

// validate="device" on the CPU (ops/scatter.py): the screen of DeviceErrors fused into the scatter,
// one pass instead of six ATen calls. Entries with an index outside [0, n), or (check_values) a
// non-finite value, are skipped; flags (int64 [3]: lowest index, highest index, non-finite count,
// DeviceErrors.flags) are updated in place for the next host-side check to report.
template <typename index_t, typename value_t>
static void screened_scatter_add_kernel(float* scores, int64_t n, const index_t* index,
                                        const value_t* values, int64_t m, int64_t* flags,
                                        bool check_values) {
  int64_t lowest = flags[0], highest = flags[1], nonfinite = 0;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = static_cast<int64_t>(index[i]);
    const float v = static_cast<float>(values[i]);
    lowest = j < lowest ? j : lowest;
    highest = j > highest ? j : highest;
    const bool finite = std::isfinite(v);
    nonfinite += check_values && !finite;
    if (j >= 0 && j < n && (finite || !check_values)) scores[j] += v;
  }
  flags[0] = lowest;
  flags[1] = highest;
  flags[2] += nonfinite;
}

void score_scatter_add_screened_cpu(at::Tensor& scores, const at::Tensor& index, const at::Tensor& values,
                                    at::Tensor& flags, bool check_values) {
  TORCH_CHECK(scores.device().is_cpu() && index.device().is_cpu() && values.device().is_cpu() &&
                  flags.device().is_cpu(),
              "score_scatter_add_screened_cpu: all tensors must be on the CPU");
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.dim() == 1 && scores.is_contiguous(),
              "score_scatter_add_screened_cpu: scores must be a contiguous 1-D float32 tensor");
  TORCH_CHECK(flags.scalar_type() == at::kLong && flags.dim() == 1 && flags.numel() >= 3 &&
                  flags.is_contiguous(),
              "score_scatter_add_screened_cpu: flags must be a contiguous int64 tensor of at least 3");
  check_index_values("score_scatter_add_screened_cpu", index, values);
  const at::Tensor idx = index.contiguous();
  const at::Tensor val = values.contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "score_scatter_add_screened_cpu", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(),
                                    "score_scatter_add_screened_cpu", [&] {
      screened_scatter_add_kernel<index_t, scalar_t>(
          scores.data_ptr<float>(), scores.numel(), idx.data_ptr<index_t>(), val.data_ptr<scalar_t>(),
          idx.numel(), flags.data_ptr<int64_t>(), check_values);
    });
  });
}

TORCH_LIBRARY_IMPL(coreset_ext, CPU, m) {
  m.impl("score_scatter_add_", &score_scatter_add_cpu);
  m.impl("score_scatter_add_screened_cpu", &score_scatter_add_screened_cpu);
}

}  // namespace coreset_ext
