// k-means update on the CPU: per-cluster sums of the rows of x and counts.
//
// Deterministic whatever the thread count (see kmeans_ranges.h); x is read once, sequentially. Labels are checked before any write, so an out-of-range
// label raises and nothing is written out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "kmeans_ranges.h"

namespace coreset_ext {

template <typename scalar_t, typename out_t>
static void kmeans_update_kernel(const scalar_t* x, int64_t n, int64_t d, const int64_t* labels,
                                 int64_t k, out_t* sums) {
  RowRanges<double> ranges(n, k, d);
  at::parallel_for(0, ranges.count, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double* acc = ranges.start(r, d);
      const int64_t end = std::min(n, (r + 1) * ranges.per);
      for (int64_t i = r * ranges.per; i < end; ++i) add_row(acc + labels[i] * d, x + i * d, d);
    }
  });
  ranges.merge(d, sums);
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                     int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && labels.device().is_cpu(),
              "kmeans_update: x and labels must be on the CPU");
  TORCH_CHECK(x.dim() == 2, "kmeans_update: x must be 2-D, got ", x.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0),
              "kmeans_update: labels must be 1-D with one entry per row of x, got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "kmeans_update: labels must be int64");
  TORCH_CHECK(k >= 1, "kmeans_update: k must be >= 1, got ", k);
  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor lab = labels.contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();

  // counts, checking every label before anything is written
  at::Tensor counts = at::zeros({k}, labels.options());
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = lp[i];
    TORCH_CHECK_INDEX(c >= 0 && c < k, "kmeans_update: labels[", i, "] = ", c,
                      " is out of range for k = ", k);
    ++cnt[c];
  }

  const auto out_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sums = at::empty({k, d}, x.options().dtype(out_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "kmeans_update_cpu", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    kmeans_update_kernel<scalar_t, out_t>(xc.data_ptr<scalar_t>(), n, d, lp, k, sums.data_ptr<out_t>());
  });
  return {sums, counts};
}

TORCH_LIBRARY_IMPL(coreset_ext, CPU, m) { m.impl("kmeans_update", &kmeans_update_cpu); }

}  // namespace coreset_ext
