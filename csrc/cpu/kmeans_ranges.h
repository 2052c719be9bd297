// The deterministic range-partitioned centroid sums shared by kmeans_update_cpu and the fused
// kmeans_lloyd_step_cpu.
//
// Rows are cut into a fixed number of contiguous ranges (a function of n, k and d only, never of
// the threads); each range is summed in row order into its own [k, d] buffer, and the buffers are
// then added in range order, in double. So the sums are bit-identical run to run and whatever the
// thread count. kmeans_update accumulates each range in double; the fused Lloyd step in x's own
// dtype, as scikit-learn (float32 for float32 x): KMeans centres its data, and a range holds at
// most n / 256 rows of it, merged in double.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>

namespace coreset_ext {

// Many small ranges, handed to the threads as they become free, keep both cores busy on a shared
// machine (a descheduled thread holds up only its current range); the partial buffers are bounded,
// which also bounds what the merge reads against the work of the pass:
constexpr int64_t kMaxRanges = 256;
constexpr int64_t kMinRowsPerRange = 256;                  // scikit-learn's chunk size
// 4 MiB of float partial sums at most: zeroing and merging them is memory traffic on top of the
// pass (at n = 10k, k = 1000, d = 128 it took ~10% of a one-thread step at 8 MiB)
constexpr int64_t kMaxPartialElems = int64_t(1) << 20;
// Each range's buffer is zeroed and merged: at least kRowsPerCluster rows per range and cluster
// keep that traffic a fraction of the rows' own (at n = 10k, k = 100, d = 256, 39 ranges of
// partial sums moved 40% as many bytes as x), but never fewer than kMinRanges ranges.
constexpr int64_t kRowsPerCluster = 8;
constexpr int64_t kMinRanges = 8;

// acc += row, in acc's dtype. float and double rows have AVX-512/AVX2/baseline bodies chosen at load
// time (GCC function multiversioning: the wheel stays portable); float16/bfloat16 rows a plain loop.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KMEANS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KMEANS_CLONES
#endif
template <typename acc_t, typename scalar_t>
inline void add_row(acc_t* acc, const scalar_t* row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<acc_t>(row[j]);
}
KMEANS_CLONES static void add_row(double* acc, const float* row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<double>(row[j]);
}
KMEANS_CLONES static void add_row(double* acc, const double* row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += row[j];
}

template <typename acc_t>
struct RowRanges {
  int64_t count;  // number of ranges
  int64_t per;    // rows per range (the last may be shorter)
  int64_t k;
  std::unique_ptr<acc_t[]> partial;    // count x [k, d] partial sums, zeroed by each range's task
  std::unique_ptr<int64_t[]> counts;   // count x [k] rows per cluster

  RowRanges(int64_t n, int64_t k_, int64_t d)
      : count(std::max<int64_t>(1, std::min({kMaxRanges, n / kMinRowsPerRange,
                                               std::max<int64_t>(kMinRanges, n / (kRowsPerCluster * k_)),
                                               kMaxPartialElems / std::max<int64_t>(1, k_ * d)}))),
        per((n + count - 1) / count),
        k(k_),
        partial(new acc_t[static_cast<size_t>(count * k_ * d)]),
        counts(new int64_t[static_cast<size_t>(count * k_)]) {}

  // Range r's [k, d] sums and [k] counts, zeroed: called once by the task that fills range r (in
  // parallel, and the buffer is then in that thread's cache).
  acc_t* start(int64_t r, int64_t d) {
    std::fill_n(partial.get() + r * k * d, k * d, acc_t(0));
    std::fill_n(counts.get() + r * k, k, int64_t(0));
    return partial.get() + r * k * d;
  }
  int64_t* range_counts(int64_t r) { return counts.get() + r * k; }

  // sums[c, j] = the partial sums added in range order, in double; small problems on one thread (a
  // parallel region costs more than it saves). With `cnt`, the counts too.
  template <typename out_t>
  void merge(int64_t d, out_t* sums, int64_t* cnt = nullptr) const {
    const int64_t grain = k * d * count < (int64_t(1) << 16) ? k : std::max<int64_t>(1, 4096 / (d * count));
    at::parallel_for(0, k, grain, [&](int64_t c0, int64_t c1) {
      std::unique_ptr<double[]> acc(new double[static_cast<size_t>(d)]);
      for (int64_t c = c0; c < c1; ++c) {
        std::fill_n(acc.get(), d, 0.0);
        for (int64_t r = 0; r < count; ++r) add_row(acc.get(), partial.get() + (r * k + c) * d, d);
        for (int64_t j = 0; j < d; ++j) sums[c * d + j] = static_cast<out_t>(acc[j]);
        if (cnt != nullptr) {
          int64_t s = 0;
          for (int64_t r = 0; r < count; ++r) s += counts[r * k + c];
          cnt[c] = s;
        }
      }
    });
  }
};

}  // namespace coreset_ext
