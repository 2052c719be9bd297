// k-means assignment on the CPU: blocks of rows in parallel, one single-threaded GEMM per block.
//
// This is scikit-learn's layout: threads take blocks of rows and each block's x.c products come
// from one BLAS call (nested inside at::parallel_for, so it runs on the calling thread). It
// avoids a parallel region per GEMM, which on a small or busy machine costs more than the GEMM
// itself. Far from the origin the products are taken about the centroids' mean (see prepare), and
// the winner's distance is always recomputed from the difference itself, so both stay exact there.
// Up to kSmallK centroids the products come from a register-tiled loop of ours, not BLAS; the
// argmin, distance and update sums run in one function built for AVX-512/AVX2/baseline. Only a block x k score matrix exists at a time, in a buffer each task reuses. The
// argmin keeps the first minimum (lowest index wins ties). Centroids arrive prepared by the
// caller (coreset_ext/ops/kmeans.py): normalised for cosine.
//
// kmeans_lloyd_step_cpu fuses the update into the same pass (the rows are still in cache): the
// sums are formed exactly as kmeans_update_cpu forms them (same fixed row ranges, double
// accumulation in row order, merged in range order), so both paths give bit-identical sums.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kmeans_ranges.h"

// The Fortran BLAS in torch's own libraries (MKL on x86 builds), if they export it: weak, so a torch
// without these symbols still loads this extension (block_products then uses at::mm_out).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace coreset_ext {

constexpr int64_t kRowsPerBlock = 512;  // 512 x k scores stay in L2; GEMMs ~8% faster than 256
constexpr double kEps = 1e-6;           // as coreset_ext.reference.EPS

namespace {

// Up to this many centroids the products come from our own register-tiled loop (small_products:
// centroids laid out [d, k_pad], vectorised over centroids), not a BLAS call: MKL's sgemm spends
// more on a 512 x 10 x 16 product than the loop does. Above it the two measured alike on this
// AMD EPYC (k = 100 and 1000, d = 64 and 256, one thread), and MKL is the one tuned elsewhere.
constexpr int kTileRows = 4;   // the products' register tile (see small_products)
constexpr int kTileCols = 32;
constexpr int64_t kSmallK = 32;

struct Prepared {
  at::Tensor xc, c, c_sq, shift;
  at::Tensor c_t_pad;  // small k: the centroids [d, k_pad], zero-padded to whole AVX-512 registers
  int64_t n, d, k;
  int64_t k_pad;       // score row stride: k, or k rounded up to 16 for small k (c_sq padded with +inf)
  double alpha;
  bool shifted;  // rows are copied minus `shift` before the products (see prepare)
};

// Euclidean products are taken in a frame shifted to the centroids' mean: ||x - c||^2 =
// ||x'||^2 - 2 x'.c' + ||c'||^2 with x' = x - m, c' = c - m. Far from the origin (an offset of
// 1e4 and a spread of 1) the unshifted terms are ~1e8 and their difference loses every digit of
// float32; shifted, they are of the spread's size. Cosine is taken about the origin: no shift.
// The shift costs a copy of every row, so it is taken only where it matters: when the centroids'
// mean lies farther from the origin than their RMS spread about it. Nearer (KMeans centres its data
// once per fit, so always there), the terms about the origin are of the spread's size already, and
// the products are taken on x in place.
Prepared prepare(const at::Tensor& x, const at::Tensor& centroids, bool cosine, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && centroids.device().is_cpu(), name,
              ": x and centroids must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && centroids.dim() == 2 && x.size(1) == centroids.size(1), name,
              ": x [n, d] and centroids [k, d] expected, got ", x.sizes(), " and ", centroids.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              ": x must be float32 or float64");
  TORCH_CHECK(centroids.size(0) >= 1, name, ": need at least one centroid");
  TORCH_CHECK(centroids.size(0) <= INT32_MAX, name, ": at most 2^31 - 1 centroids, got ", centroids.size(0));
  Prepared p;
  p.xc = x.contiguous();
  at::Tensor c = centroids.to(x.scalar_type());
  p.shifted = false;
  if (cosine) {
    p.shift = at::zeros({x.size(1)}, c.options());
  } else {
    const at::Tensor c64 = c.to(at::kDouble);
    const at::Tensor mean = c64.mean(0);
    const double offset_sq = mean.square().sum().item<double>();
    const double spread_sq = (c64 - mean).square().sum(1).mean().item<double>();
    p.shifted = offset_sq > spread_sq;
    p.shift = p.shifted ? mean.to(x.scalar_type()) : at::zeros({x.size(1)}, c.options());
    if (p.shifted) c = c - p.shift;
  }
  p.c = c.contiguous();
  // ||c'||^2 is added in the argmin loop (no bias pass over the scores); zero for cosine
  p.c_sq = cosine ? at::zeros({c.size(0)}, c.options()) : (c * c).sum(1).contiguous();
  p.n = x.size(0);
  p.d = x.size(1);
  p.k = c.size(0);
  p.k_pad = p.k;
  if (p.k <= kSmallK) {
    // padded centroids score +inf: never the (strict) minimum
    p.k_pad = (p.k + kTileCols - 1) / kTileCols * kTileCols;
    p.c_t_pad = at::zeros({p.d, p.k_pad}, c.options());
    p.c_t_pad.narrow(1, 0, p.k).copy_(p.c.t());
    p.c_sq = at::cat({p.c_sq, at::full({p.k_pad - p.k}, std::numeric_limits<double>::infinity(), c.options())});
  }
  p.alpha = cosine ? -1.0 : -2.0;
  return p;
}

// Per-task scratch: the block's shifted rows (when shifted) and its block x k scores.
struct Scratch {
  at::Tensor rows, dots, c_t;
  Scratch(const Prepared& p)
      : rows(at::empty({kRowsPerBlock, p.d}, p.xc.options())), dots(at::empty({kRowsPerBlock, p.k_pad}, p.xc.options())),
        c_t(p.c.t()) {}
};

// The per-row work after each block's GEMM (argmin, the winner's distance, the update sums) is one
// function compiled for AVX-512, AVX2 and the x86-64 baseline, the loader picking one for the CPU it
// runs on (GCC function multiversioning): the wheel stays portable, the loops are not held to SSE2,
// and the helpers below are inlined into it (no call per row).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KMEANS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KMEANS_CLONES
#endif
#define KMEANS_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;  // independent accumulators / argmin lanes: one AVX-512 float register

// Sum of squares of a - b over d, in kLanes independent accumulators (one chain is latency-bound)
// reduced pairwise; without `diff`, b is ignored (the row's own squared norm).
template <typename scalar_t, bool diff>
KMEANS_INLINE scalar_t sum_sq(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t d) {
  scalar_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
#pragma GCC unroll 16
    for (int u = 0; u < kLanes; ++u) {
      const scalar_t t = diff ? a[j + u] - b[j + u] : a[j + u];
      part[u] += t * t;
    }
  }
  for (; j < d; ++j) {
    const scalar_t t = diff ? a[j] - b[j] : a[j];
    part[0] += t * t;
  }
#pragma GCC unroll 16
  for (int u = 0; u < kLanes / 2; ++u) part[u] += part[u + kLanes / 2];
#pragma GCC unroll 8
  for (int u = 0; u < kLanes / 4; ++u) part[u] += part[u + kLanes / 4];
  return ((part[0] + part[2]) + (part[1] + part[3]));
}

// Index of the first minimum of bias[j] + a * row[j], in one pass: each of kLanes lanes keeps its
// first minimum (strict <), then the lowest index among the lanes holding the overall minimum wins,
// and the tail (indices above every lane's) replaces it only when strictly smaller. Lowest index
// wins ties, as the other backends. k < 2^31 (checked in prepare).
template <typename scalar_t>
KMEANS_INLINE int64_t first_argmin(const scalar_t* bias, scalar_t a, const scalar_t* row, int64_t k, scalar_t* best_out) {
  scalar_t lane_best[kLanes];
  int32_t lane_arg[kLanes];
  for (int u = 0; u < kLanes; ++u) {
    lane_best[u] = std::numeric_limits<scalar_t>::infinity();
    lane_arg[u] = 0;
  }
  int32_t j = 0;
  const int32_t k32 = static_cast<int32_t>(k);
  for (; j + kLanes <= k32; j += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const scalar_t v = bias[j + u] + a * row[j + u];
      const bool less = v < lane_best[u];
      lane_best[u] = less ? v : lane_best[u];
      lane_arg[u] = less ? j + u : lane_arg[u];
    }
  }
  // branch-free (vectorisable) reductions: the minimum, then the lowest index holding it
  scalar_t best = lane_best[0];
  for (int u = 1; u < kLanes; ++u) best = lane_best[u] < best ? lane_best[u] : best;
  int32_t arg = std::numeric_limits<int32_t>::max();
  for (int u = 0; u < kLanes; ++u) arg = (lane_best[u] == best && lane_arg[u] < arg) ? lane_arg[u] : arg;
  if (arg == std::numeric_limits<int32_t>::max()) arg = 0;  // no full group of kLanes (k < kLanes)
  for (; j < k32; ++j) {
    const scalar_t v = bias[j] + a * row[j];
    if (v < best) {
      best = v;
      arg = j;
    }
  }
  *best_out = best;
  return arg;
}

// A block of m rows after its GEMM: per row the first argmin of c_sq + alpha * scores, the distance
// (euclidean: from the difference to the winner itself, not the expanded form; cosine: 1 - cos), and,
// when `sums` is given, the raw row x added to its cluster's double sums [k, d].
template <typename scalar_t>
KMEANS_INLINE void finish_block_impl(const scalar_t* scores, const scalar_t* c_sq, scalar_t alpha, const scalar_t* rows,
                                     const scalar_t* c, const scalar_t* x, int64_t m, int64_t k, int64_t d, bool cosine,
                                     int64_t* lab, float* dst, double* sums) {
  for (int64_t i = 0; i < m; ++i) {
    scalar_t best;
    const int64_t arg = first_argmin(c_sq, alpha, scores + i * k, k, &best);  // k: the score row stride
    double out_d;
    if (cosine) {
      const double x_norm = std::sqrt(static_cast<double>(sum_sq<scalar_t, false>(rows + i * d, nullptr, d)));
      out_d = 1.0 + static_cast<double>(best) / std::max(x_norm, kEps);
    } else {
      out_d = static_cast<double>(sum_sq<scalar_t, true>(rows + i * d, c + arg * d, d));
    }
    lab[i] = arg;
    dst[i] = static_cast<float>(out_d);
    if (sums != nullptr) {
      double* acc = sums + arg * d;
      const scalar_t* xi = x + i * d;
      for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<double>(xi[j]);
    }
  }
}

// scores [m, k_pad] = rows [m, d] . c_t_pad [d, k_pad] (k_pad a multiple of kTileCols): tiles of
// kTileRows rows x kTileCols centroids whose accumulators stay in registers while t runs over d.
template <typename scalar_t, int R>
KMEANS_INLINE void product_tile(const scalar_t* rows, const scalar_t* c_t, int64_t d, int64_t k_pad, scalar_t* scores) {
  for (int64_t j0 = 0; j0 < k_pad; j0 += kTileCols) {
    scalar_t acc[R][kTileCols] = {};
    for (int64_t t = 0; t < d; ++t) {
      const scalar_t* ct = c_t + t * k_pad + j0;
      for (int r = 0; r < R; ++r) {
        const scalar_t xv = rows[r * d + t];
        for (int u = 0; u < kTileCols; ++u) acc[r][u] += xv * ct[u];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < kTileCols; ++u) scores[r * k_pad + j0 + u] = acc[r][u];
  }
}
template <typename scalar_t>
KMEANS_INLINE void small_products_impl(const scalar_t* rows, const scalar_t* c_t, int64_t m, int64_t d, int64_t k_pad,
                                       scalar_t* scores) {
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows)
    product_tile<scalar_t, kTileRows>(rows + i * d, c_t, d, k_pad, scores + i * k_pad);
  for (; i < m; ++i) product_tile<scalar_t, 1>(rows + i * d, c_t, d, k_pad, scores + i * k_pad);
}
#define KMEANS_SMALL_PRODUCTS(scalar_t)                                                                      \
  KMEANS_CLONES void small_products(const scalar_t* rows, const scalar_t* c_t, int64_t m, int64_t d, int64_t k_pad, \
                                    scalar_t* scores) {                                                      \
    small_products_impl<scalar_t>(rows, c_t, m, d, k_pad, scores);                                          \
  }
KMEANS_SMALL_PRODUCTS(float)
KMEANS_SMALL_PRODUCTS(double)

#define KMEANS_FINISH_BLOCK(scalar_t)                                                                            \
  KMEANS_CLONES void finish_block(const scalar_t* scores, const scalar_t* c_sq, scalar_t alpha, const scalar_t* rows, \
                                  const scalar_t* c, const scalar_t* x, int64_t m, int64_t k, int64_t d, bool cosine,  \
                                  int64_t* lab, float* dst, double* sums) {                                        \
    finish_block_impl<scalar_t>(scores, c_sq, alpha, rows, c, x, m, k, d, cosine, lab, dst, sums);                \
  }
KMEANS_FINISH_BLOCK(float)
KMEANS_FINISH_BLOCK(double)

// out = x - shift, m rows of d (the products are taken about the centroids' mean).
#define KMEANS_SHIFTED(scalar_t)                                                                          \
  KMEANS_CLONES void shifted(const scalar_t* x, const scalar_t* shift, int64_t m, int64_t d, scalar_t* out) { \
    for (int64_t i = 0; i < m; ++i)                                                                       \
      for (int64_t j = 0; j < d; ++j) out[i * d + j] = x[i * d + j] - shift[j];                           \
  }
KMEANS_SHIFTED(float)
KMEANS_SHIFTED(double)

// dots [m, k] = rows [m, d] . c'^T. The Fortran BLAS that torch links (MKL's sgemm_/dgemm_, found at
// load time through weak symbols) called directly on the buffers: at::mm's dispatch and tensor
// bookkeeping cost more than the product itself at small k * d. Where torch exports no BLAS
// symbols, at::mm_out serves. BLAS is column-major: dots^T [k, m] = (c' as [d, k])^T . (rows as [d, m]).
template <typename scalar_t>
void block_products(const scalar_t* c, const scalar_t* rows, int64_t m, int64_t k, int64_t d, scalar_t* dots,
                    const at::Tensor& rows_t, Scratch& scratch) {
  const int bm = static_cast<int>(m), bk = static_cast<int>(k), bd = static_cast<int>(d);
  const char trans = 'T', plain = 'N';
  const scalar_t one = 1, zero = 0;
  const bool small = k <= INT32_MAX && d <= INT32_MAX;  // m <= kRowsPerBlock
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (sgemm_ != nullptr && small) {
      sgemm_(&trans, &plain, &bk, &bm, &bd, &one, c, &bd, rows, &bd, &zero, dots, &bk);
      return;
    }
  } else {
    if (dgemm_ != nullptr && small) {
      dgemm_(&trans, &plain, &bk, &bm, &bd, &one, c, &bd, rows, &bd, &zero, dots, &bk);
      return;
    }
  }
  at::Tensor out = scratch.dots.narrow(0, 0, m);
  at::mm_out(out, rows_t, scratch.c_t);
}

// Labels and distances of rows [s, e) (e - s <= kRowsPerBlock); with `sums` ([k, d] doubles), the
// rows are also added to their clusters' sums, in row order.
template <typename scalar_t>
void assign_rows(const Prepared& p, bool cosine, int64_t s, int64_t e, Scratch& scratch, int64_t* lab, float* dst,
                 double* sums = nullptr) {
  const int64_t k = p.k, d = p.d, m = e - s;
  const scalar_t* xp = p.xc.data_ptr<scalar_t>() + s * d;
  const scalar_t* rp = xp;  // the block's rows, in place unless shifted
  if (p.shifted) {
    scalar_t* shifted_rows = scratch.rows.data_ptr<scalar_t>();
    shifted(xp, p.shift.data_ptr<scalar_t>(), m, d, shifted_rows);
    rp = shifted_rows;
  }
  scalar_t* sp = scratch.dots.data_ptr<scalar_t>();
  const scalar_t* cp = p.c.data_ptr<scalar_t>();
  if (p.k_pad != k || k <= kSmallK) {
    small_products(rp, p.c_t_pad.data_ptr<scalar_t>(), m, d, p.k_pad, sp);
  } else {
    block_products<scalar_t>(cp, rp, m, k, d, sp, p.shifted ? scratch.rows.narrow(0, 0, m) : p.xc.narrow(0, s, m),
                             scratch);
  }
  // padded centroids (small k) score +inf: argmin over k_pad returns an index below k
  finish_block(sp, p.c_sq.data_ptr<scalar_t>(), static_cast<scalar_t>(p.alpha), rp, cp, xp, m, p.k_pad, d, cosine,
               lab + s, dst + s, sums);
}

// Runs fn(task, scratch) for every task in [0, tasks), handed to the threads one at a time as they
// become free (an atomic counter) instead of in fixed shares: on a busy machine a descheduled
// thread delays only its current task. No result depends on which thread ran a task.
template <typename Fn>
void for_each_task(const Prepared& p, int64_t tasks, bool parallel, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t threads = parallel ? std::min<int64_t>(tasks, at::get_num_threads()) : 1;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch scratch(p);
    for (int64_t t = next++; t < tasks; t = next++) fn(t, scratch);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x, const at::Tensor& centroids,
                                                     bool cosine) {
  const Prepared p = prepare(x, centroids, cosine, "kmeans_assign_cpu");
  at::Tensor labels = at::empty({p.n}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({p.n}, x.options().dtype(at::kFloat));
  int64_t* lab = labels.data_ptr<int64_t>();
  float* dst = dist.data_ptr<float>();
  const int64_t blocks = (p.n + kRowsPerBlock - 1) / kRowsPerBlock;
  // at least ~4 Mflop per task: below that a parallel region costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, kRowsPerBlock * p.k * p.d));
  AT_DISPATCH_FLOATING_TYPES(p.xc.scalar_type(), "kmeans_assign_cpu", [&] {
    for_each_task(p, blocks, blocks > grain, [&](int64_t b, Scratch& scratch) {
      assign_rows<scalar_t>(p, cosine, b * kRowsPerBlock, std::min(p.n, (b + 1) * kRowsPerBlock), scratch, lab, dst);
    });
  });
  return {labels, dist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_lloyd_step_cpu(
    const at::Tensor& x, const at::Tensor& centroids, bool cosine) {
  const Prepared p = prepare(x, centroids, cosine, "kmeans_lloyd_step_cpu");
  const int64_t n = p.n, d = p.d, k = p.k;
  at::Tensor labels = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({n}, x.options().dtype(at::kFloat));
  int64_t* lab = labels.data_ptr<int64_t>();
  float* dst = dist.data_ptr<float>();
  RowRanges ranges(n, k, d);
  at::Tensor sums = at::empty({k, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(p.xc.scalar_type(), "kmeans_lloyd_step_cpu", [&] {
    const scalar_t* xp = p.xc.data_ptr<scalar_t>();
    for_each_task(p, ranges.count, ranges.count > 1, [&](int64_t r, Scratch& scratch) {
      const int64_t end = std::min(n, (r + 1) * ranges.per);
      for (int64_t s = r * ranges.per; s < end; s += kRowsPerBlock) {
        const int64_t e = std::min(end, s + kRowsPerBlock);
        // labels are in [0, k) by construction
        assign_rows<scalar_t>(p, cosine, s, e, scratch, lab, dst, ranges.range_sums(r, k, d));
      }
    });
    ranges.merge(k, d, sums.data_ptr<scalar_t>());
  });
  at::Tensor counts = at::zeros({k}, x.options().dtype(at::kLong));
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) ++cnt[lab[i]];
  return {labels, dist, sums, counts};
}

TORCH_LIBRARY_IMPL(coreset_ext, CPU, m) {
  m.impl("kmeans_assign_cpu", &kmeans_assign_cpu);
  m.impl("kmeans_lloyd_step_cpu", &kmeans_lloyd_step_cpu);
}

}  // namespace coreset_ext
