// scores[index[i]] += float(values[i]), sequentially: duplicates are summed in index order, so
// the result is deterministic. All indices are checked before the first write, so a bad index
// raises and leaves the buffer as it was.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

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

void score_scatter_add_cpu(at::Tensor& scores, const at::Tensor& index, const at::Tensor& values,
                           bool deterministic) {
  (void)deterministic;  // the CPU kernel is always deterministic
  TORCH_CHECK(scores.device().is_cpu() && index.device().is_cpu() && values.device().is_cpu(),
              "score_scatter_add_: all tensors must be on the CPU");
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "score_scatter_add_: scores must be float32");
  TORCH_CHECK(scores.dim() == 1 && scores.is_contiguous(),
              "score_scatter_add_: scores must be a contiguous 1-D tensor");
  TORCH_CHECK(index.dim() == 1 && values.dim() == 1 && index.numel() == values.numel(),
              "score_scatter_add_: index and values must be 1-D of equal length, got ",
              index.sizes(), " and ", values.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong,
              "score_scatter_add_: index must be int32 or int64");
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

TORCH_LIBRARY_IMPL(coreset_ext, CPU, m) { m.impl("score_scatter_add_", &score_scatter_add_cpu); }

}  // namespace coreset_ext
