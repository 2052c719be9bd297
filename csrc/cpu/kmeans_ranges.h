// The deterministic range-partitioned centroid sums shared by kmeans_update_cpu and the fused
// kmeans_lloyd_step_cpu: both must split the rows and merge the partial sums identically, so that
// the fused step stays bit-identical to assignment followed by update.
//
// Rows are cut into a fixed number of contiguous ranges (a function of n only, never of the
// threads); each range is summed in row order into its own double-precision [k, d] buffer, and the
// buffers are then added in range order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace coreset_ext {

// Many small ranges, handed to the threads as they become free, keep both cores busy on a shared
// machine (a descheduled thread holds up only its current range); the partial buffers are bounded:
constexpr int64_t kMaxRanges = 256;
constexpr int64_t kMinRowsPerRange = 256;                  // scikit-learn's chunk size
constexpr int64_t kMaxPartialDoubles = int64_t(1) << 22;   // 32 MiB of partial sums at most

// acc += row in double. float and double rows have AVX-512/AVX2/baseline bodies chosen at load time
// (GCC function multiversioning: the wheel stays portable); float16/bfloat16 rows a plain loop.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KMEANS_RANGES_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KMEANS_RANGES_CLONES
#endif
template <typename scalar_t>
inline void add_row(double* acc, const scalar_t* row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<double>(row[j]);
}
KMEANS_RANGES_CLONES static void add_row(double* acc, const float* row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<double>(row[j]);
}
KMEANS_RANGES_CLONES static void add_row(double* acc, const double* row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += row[j];
}

struct RowRanges {
  int64_t count;  // number of ranges
  int64_t per;    // rows per range (the last may be shorter)
  std::vector<double> partial;  // count x [k, d] partial sums

  RowRanges(int64_t n, int64_t k, int64_t d)
      : count(std::max<int64_t>(1, std::min({kMaxRanges, n / kMinRowsPerRange,
                                               kMaxPartialDoubles / std::max<int64_t>(1, k * d)}))),
        per((n + count - 1) / count),
        partial(static_cast<size_t>(count * k * d), 0.0) {}

  // Range r's [k, d] buffer (the fused Lloyd step adds its rows there itself).
  double* range_sums(int64_t r, int64_t k, int64_t d) { return partial.data() + r * k * d; }

  // Adds a row of x to cluster `label` in range r's buffer.
  template <typename scalar_t>
  void add(int64_t r, int64_t label, const scalar_t* row, int64_t k, int64_t d) {
    add_row(partial.data() + (r * k + label) * d, row, d);
  }

  // sums[c, j] = the partial sums added in range order; small problems on one thread (a parallel
  // region costs more than it saves).
  template <typename out_t>
  void merge(int64_t k, int64_t d, out_t* sums) const {
    const int64_t grain = k * d < (int64_t(1) << 16) ? k : 1;
    at::parallel_for(0, k, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t j = 0; j < d; ++j) {
          double s = 0.0;
          for (int64_t r = 0; r < count; ++r) s += partial[(r * k + c) * d + j];
          sums[c * d + j] = static_cast<out_t>(s);
        }
      }
    });
  }
};

}  // namespace coreset_ext
