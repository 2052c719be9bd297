// k-means assignment on the CPU: blocks of rows in parallel, one single-threaded GEMM per block.
//
// This is scikit-learn's layout: threads take blocks of rows and each block's x.c products come
// from one BLAS call (nested inside at::parallel_for, so it runs on the calling thread). It
// avoids a parallel region per GEMM, which on a small or busy machine costs more than the GEMM
// itself. The products are taken about the centroids' mean (see prepare) and the winner's
// distance is recomputed from the difference itself, so both stay exact far from the origin. Only a block x k score matrix exists at a time, in a buffer each task reuses. The
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

struct Prepared {
  at::Tensor xc, c, c_sq, shift;
  int64_t n, d, k;
  double alpha;
};

// Euclidean products are taken in a frame shifted to the centroids' mean: ||x - c||^2 =
// ||x'||^2 - 2 x'.c' + ||c'||^2 with x' = x - m, c' = c - m. Far from the origin (an offset of
// 1e4 and a spread of 1) the unshifted terms are ~1e8 and their difference loses every digit of
// float32; shifted, they are of the spread's size. Cosine is taken about the origin: no shift.
Prepared prepare(const at::Tensor& x, const at::Tensor& centroids, bool cosine, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && centroids.device().is_cpu(), name,
              ": x and centroids must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && centroids.dim() == 2 && x.size(1) == centroids.size(1), name,
              ": x [n, d] and centroids [k, d] expected, got ", x.sizes(), " and ", centroids.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              ": x must be float32 or float64");
  TORCH_CHECK(centroids.size(0) >= 1, name, ": need at least one centroid");
  Prepared p;
  p.xc = x.contiguous();
  at::Tensor c = centroids.to(x.scalar_type());
  if (cosine) {
    p.shift = at::zeros({x.size(1)}, c.options());
  } else {
    p.shift = c.to(at::kDouble).mean(0).to(x.scalar_type());
    c = c - p.shift;
  }
  p.c = c.contiguous();
  // ||c'||^2 is added in the argmin loop (no bias pass over the scores); zero for cosine
  p.c_sq = cosine ? at::zeros({c.size(0)}, c.options()) : (c * c).sum(1).contiguous();
  p.n = x.size(0);
  p.d = x.size(1);
  p.k = c.size(0);
  p.alpha = cosine ? -1.0 : -2.0;
  return p;
}

// Per-task scratch: the block's shifted rows and its block x k scores.
struct Scratch {
  at::Tensor rows, dots, c_t;
  Scratch(const Prepared& p)
      : rows(at::empty({kRowsPerBlock, p.d}, p.xc.options())), dots(at::empty({kRowsPerBlock, p.k}, p.xc.options())),
        c_t(p.c.t()) {}
};

// Sum of squares with 8 independent accumulators (a single chain is latency-bound).
template <typename scalar_t>
scalar_t sum_sq(const scalar_t* a, const scalar_t* b, int64_t d) {
  scalar_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int u = 0; u < 8; ++u) {
      const scalar_t t = a[j + u] - (b ? b[j + u] : scalar_t(0));
      part[u] += t * t;
    }
  }
  for (; j < d; ++j) {
    const scalar_t t = a[j] - (b ? b[j] : scalar_t(0));
    part[0] += t * t;
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Index of the first minimum of bias[j] + a * row[j]: a vectorisable min pass, then a scan that
// stops at the first entry equal to it (lowest index wins ties, as the other backends).
template <typename scalar_t>
int64_t first_argmin(const scalar_t* bias, scalar_t a, const scalar_t* row, int64_t k, scalar_t* best_out) {
  scalar_t best = std::numeric_limits<scalar_t>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    const scalar_t v = bias[j] + a * row[j];
    best = v < best ? v : best;
  }
  int64_t arg = 0;
  for (int64_t j = 0; j < k; ++j) {
    if (bias[j] + a * row[j] == best) {
      arg = j;
      break;
    }
  }
  *best_out = best;
  return arg;
}

// dots [m, k] = rows [m, d] . c'^T. The Fortran BLAS that torch links (MKL's sgemm_/dgemm_, found at
// load time through weak symbols) called directly on the buffers: at::mm's dispatch and tensor
// bookkeeping cost more than the product itself at small k * d. Where torch exports no BLAS
// symbols, at::mm_out serves. BLAS is column-major: dots^T [k, m] = (c' as [d, k])^T . (rows as [d, m]).
template <typename scalar_t>
void block_products(const scalar_t* c, const scalar_t* rows, int64_t m, int64_t k, int64_t d, scalar_t* dots,
                    Scratch& scratch) {
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
  at::mm_out(out, scratch.rows.narrow(0, 0, m), scratch.c_t);
}

// Labels and distances of rows [s, e) (e - s <= kRowsPerBlock).
template <typename scalar_t>
void assign_rows(const Prepared& p, bool cosine, int64_t s, int64_t e, Scratch& scratch, int64_t* lab, float* dst) {
  const int64_t k = p.k, d = p.d, m = e - s;
  const scalar_t* xp = p.xc.data_ptr<scalar_t>();
  const scalar_t* mp = p.shift.data_ptr<scalar_t>();
  scalar_t* rp = scratch.rows.data_ptr<scalar_t>();
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* xi = xp + (s + i) * d;
    scalar_t* ri = rp + i * d;
    for (int64_t j = 0; j < d; ++j) ri[j] = xi[j] - mp[j];
  }
  scalar_t* sp = scratch.dots.data_ptr<scalar_t>();
  const scalar_t* cp = p.c.data_ptr<scalar_t>();
  block_products<scalar_t>(cp, rp, m, k, d, sp, scratch);
  const scalar_t* csp = p.c_sq.data_ptr<scalar_t>();
  const scalar_t a = static_cast<scalar_t>(p.alpha);
  for (int64_t i = 0; i < m; ++i) {
    scalar_t best;
    const int64_t arg = first_argmin<scalar_t>(csp, a, sp + i * k, k, &best);
    double out_d;
    if (cosine) {
      const double x_norm = std::sqrt(static_cast<double>(sum_sq<scalar_t>(rp + i * d, nullptr, d)));
      out_d = 1.0 + static_cast<double>(best) / std::max(x_norm, kEps);
    } else {
      // the winner's distance from the difference itself, not from the expanded form
      out_d = static_cast<double>(sum_sq<scalar_t>(rp + i * d, cp + arg * d, d));
    }
    lab[s + i] = arg;
    dst[s + i] = static_cast<float>(out_d);
  }
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
        assign_rows<scalar_t>(p, cosine, s, e, scratch, lab, dst);
        // labels are in [0, k) by construction
        for (int64_t i = s; i < e; ++i) ranges.add(r, lab[i], xp + i * d, k, d);
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
