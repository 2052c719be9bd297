// k-means assignment on the CPU: blocks of rows in parallel, one single-threaded GEMM per block.
//
// This is scikit-learn's layout: threads take blocks of rows and each block's x.c products come
// from one BLAS call (nested inside at::parallel_for, so it runs on the calling thread). It
// avoids a parallel region per GEMM, which on a small or busy machine costs more than the GEMM
// itself. Far from the origin the products are taken about the centroids' mean (see prepare), and
// the winner's distance is always recomputed from the difference itself, so both stay exact there.
// Up to 128 centroids (64 in float64) the products come from a register-tiled loop of ours, not BLAS; the
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
#include <cstring>
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
// MKL's per-thread thread count (returns the previous one; 0: the global setting): our GEMMs run
// inside our own parallel region and must stay on their thread. MKL keeps nested calls sequential
// by itself unless the thread count was set explicitly (mkl_set_num_threads, e.g. by
// threadpoolctl's threadpool_limits), when each call would start MKL threads of its own on cores
// that our threads already hold: measured 3-4x slower fits on 2 cores.
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace coreset_ext {

constexpr int64_t kRowsPerBlock = 512;  // 512 x k scores stay in L2; GEMMs ~8% faster than 256
constexpr double kEps = 1e-6;           // as coreset_ext.reference.EPS

namespace {

// Up to this many vectors of centroids the scores come from our own register-tiled loop
// (small_block: vectorised over centroids, scores never leave the registers), not a BLAS call: at
// 512 x 10 x 16 the call and the score matrix's round trip through memory cost more than the
// products, and at k = 100 (d = 16 to 256, one thread) the loop took 0.65-0.9x MKL's sgemm + argmin.
// Above it BLAS (MKL's sgemm in torch's x86 builds).
constexpr int64_t kSmallVecs = 8;  // up to 8 vectors of centroids: k <= 128 (float), 64 (double)
constexpr int64_t kVecBytes = 64;  // small_block's vector: 16 floats, 8 doubles (one AVX-512 register)

struct Prepared {
  at::Tensor xc, c, c_sq, shift;
  at::Tensor c_sq_pad;  // c_sq padded with +inf to k_pad: the argmin runs over whole vectors
  at::Tensor c_t_pad;   // small k: alpha * the centroids [d, k_pad] (see small_block)
  int64_t n, d, k;
  int64_t k_pad;        // k rounded up to whole 64-byte vectors: the score row stride
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
  const int64_t lanes = kVecBytes / static_cast<int64_t>(c.element_size());
  p.k_pad = (p.k + lanes - 1) / lanes * lanes;
  p.c_sq_pad = at::cat({p.c_sq, at::full({p.k_pad - p.k}, std::numeric_limits<double>::infinity(), c.options())});
  if (p.k_pad / lanes <= kSmallVecs) {
    // alpha is -2 or -1: the scaling is exact
    p.c_t_pad = at::zeros({p.d, p.k_pad}, c.options());
    p.c_t_pad.narrow(1, 0, p.k).copy_(p.c.t() * (cosine ? -1.0 : -2.0));
  }
  p.alpha = cosine ? -1.0 : -2.0;
  return p;
}

// Per-task scratch: the block's shifted rows (when shifted) and its block x k scores.
struct Scratch {
  at::Tensor rows, dots, c_t;
  Scratch(const Prepared& p)
      : rows(at::empty({kRowsPerBlock, p.d}, p.xc.options())), dots(at::zeros({kRowsPerBlock, p.k_pad}, p.xc.options())),
        c_t(p.c.t()) {}
};

// The per-row work after each block's GEMM (argmin, the winner's distance, the update sums) is one
// function compiled for AVX-512, AVX2 and the x86-64 baseline, the loader picking one for the CPU it
// runs on (GCC function multiversioning): the wheel stays portable, the loops are not held to SSE2,
// and the helpers below are inlined into it (no call per row).
// (KMEANS_CLONES: kmeans_ranges.h)
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

// One row's work once its label `arg` and score `best` are known (`row`: as in the products,
// `xi`: the raw row).
template <typename scalar_t>
KMEANS_INLINE void row_tail(int64_t arg, scalar_t best, const scalar_t* row, const scalar_t* c, const scalar_t* xi,
                            int64_t d, bool cosine, float* dst_i, scalar_t* sums, int64_t* cnt) {
  if (sums != nullptr) {
    add_row(sums + arg * d, xi, d);
    ++cnt[arg];
  }
  if (dst_i == nullptr) return;
  double out_d;
  if (cosine) {
    const double x_norm = std::sqrt(static_cast<double>(sum_sq<scalar_t, false>(row, nullptr, d)));
    out_d = 1.0 + static_cast<double>(best) / std::max(x_norm, kEps);
  } else {
    out_d = static_cast<double>(sum_sq<scalar_t, true>(row, c + arg * d, d));
  }
  *dst_i = static_cast<float>(out_d);
}

// Small k (at most kSmallVecs vectors of centroids): the products, the argmin and the row's tail in one pass, the
// scores of a tile of rows held in registers, never written out. GCC vector extensions (64-byte
// vectors: one AVX-512 register, two AVX2 ones) so that the one source serves every target_clones
// variant. score[j] = c_sq[j] + sum_t x[t] * ct[t, j], ct = alpha * c^T padded to whole vectors with
// zeros (their c_sq is +inf: never the minimum). Ties go to the lowest index, as first_argmin.
template <typename scalar_t>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef int32_t index_t;
  // lane i ^ s for s = 8, 4, 2, 1: the butterfly of a lane-wise minimum (constant masks, so that
  // each step is one permute)
  static constexpr I swap[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7},
                                {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11},
                                {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13},
                                {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}};
  static constexpr int steps = 4;
  static constexpr I iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
};
template <>
struct VecOf<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  typedef int64_t index_t;
  static constexpr I swap[3] = {{4, 5, 6, 7, 0, 1, 2, 3}, {2, 3, 0, 1, 6, 7, 4, 5}, {1, 0, 3, 2, 5, 4, 7, 6}};
  static constexpr int steps = 3;
  static constexpr I iota = {0, 1, 2, 3, 4, 5, 6, 7};
};

// Every lane = the minimum over the lanes.
template <typename scalar_t, typename W>
KMEANS_INLINE W lanes_min(W a) {
  using Vec = VecOf<scalar_t>;
  if constexpr (Vec::steps == 4) {
    W b = __builtin_shuffle(a, Vec::swap[0]); a = b < a ? b : a;
    b = __builtin_shuffle(a, Vec::swap[1]); a = b < a ? b : a;
    b = __builtin_shuffle(a, Vec::swap[2]); a = b < a ? b : a;
    b = __builtin_shuffle(a, Vec::swap[3]); a = b < a ? b : a;
  } else {
    W b = __builtin_shuffle(a, Vec::swap[0]); a = b < a ? b : a;
    b = __builtin_shuffle(a, Vec::swap[1]); a = b < a ? b : a;
    b = __builtin_shuffle(a, Vec::swap[2]); a = b < a ? b : a;
  }
  return a;
}

// Index of the first minimum of bias[j] + a * row[j] over k_pad (a whole number of vectors; padded
// entries have bias +inf and a finite row value: never the minimum): lane-wise minima and their
// first indices (strict <), then the overall minimum and the lowest index holding it. Lowest index
// wins ties, as the other backends. k < 2^31 (checked in prepare).
template <typename scalar_t>
KMEANS_INLINE int64_t first_argmin(const scalar_t* bias, scalar_t a, const scalar_t* row, int64_t k_pad,
                                   scalar_t* best_out) {
  using V = typename VecOf<scalar_t>::V;
  using I = typename VecOf<scalar_t>::I;
  constexpr int L = 64 / sizeof(scalar_t);
  V best = V{} + std::numeric_limits<scalar_t>::infinity();
  I arg = I{};
  I idx = VecOf<scalar_t>::iota;
  for (int64_t j = 0; j < k_pad; j += L, idx += L) {
    V b, r;
    std::memcpy(&b, bias + j, sizeof(V));
    std::memcpy(&r, row + j, sizeof(V));
    const V v = b + a * r;
    const I less = v < best;
    best = less ? v : best;
    arg = less ? idx : arg;
  }
  const V m = lanes_min<scalar_t>(best);
  arg = best == m ? arg : I{} + static_cast<typename VecOf<scalar_t>::index_t>(k_pad);
  arg = lanes_min<scalar_t>(arg);
  *best_out = m[0];
  return arg[0];
}

// A block of m rows after its GEMM: per row the first argmin of c_sq + alpha * scores; when `dst` is
// given, the distance (euclidean: from the difference to the winner itself, not the expanded form;
// cosine: 1 - cos); when `sums` is given, the raw row x added to its cluster's sums [k, d] (x's
// dtype: a range's partial sums, see kmeans_ranges.h) and counted in `cnt`.
template <typename scalar_t>
KMEANS_INLINE void finish_block_impl(const scalar_t* scores, const scalar_t* c_sq, scalar_t alpha, const scalar_t* rows,
                                     const scalar_t* c, const scalar_t* x, int64_t m, int64_t k_pad, int64_t d,
                                     bool cosine, int64_t* lab, float* dst, scalar_t* sums, int64_t* cnt) {
  for (int64_t i = 0; i < m; ++i) {
    scalar_t best;
    const int64_t arg = first_argmin(c_sq, alpha, scores + i * k_pad, k_pad, &best);
    lab[i] = arg;
    row_tail(arg, best, rows + i * d, c, x + i * d, d, cosine, dst == nullptr ? nullptr : dst + i, sums, cnt);
  }
}

template <typename scalar_t, int NV, int RT>
KMEANS_INLINE void small_tile(const scalar_t* rows, const scalar_t* ct, const scalar_t* c_sq, int64_t d, int64_t* lab,
                              scalar_t* best) {
  using V = typename VecOf<scalar_t>::V;
  using I = typename VecOf<scalar_t>::I;
  constexpr int L = 64 / sizeof(scalar_t);
  V acc[RT][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    V b;
    std::memcpy(&b, c_sq + v * L, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) acc[r][v] = b;
  }
  for (int64_t t = 0; t < d; ++t) {
    V cv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(&cv[v], ct + (t * NV + v) * L, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) {
      const scalar_t xr = rows[r * d + t];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += xr * cv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RT; ++r) {
    V m = acc[r][0];
#pragma GCC unroll 8
    for (int v = 1; v < NV; ++v) m = acc[r][v] < m ? acc[r][v] : m;
    m = lanes_min<scalar_t>(m);
    I arg = VecOf<scalar_t>::iota + L * NV;  // above every index
#pragma GCC unroll 8
    for (int v = NV - 1; v >= 0; --v) arg = acc[r][v] == m ? VecOf<scalar_t>::iota + v * L : arg;  // lowest v wins
    arg = lanes_min<scalar_t>(arg);
    lab[r] = arg[0];
    best[r] = m[0];
  }
}

template <typename scalar_t, int NV>
KMEANS_INLINE void small_block_nv(const scalar_t* rows, const scalar_t* ct, const scalar_t* c_sq, int64_t m, int64_t d,
                                  int64_t* lab, scalar_t* best) {
  constexpr int RT = NV == 1 ? 8 : NV <= 4 ? 4 : 2;  // RT x NV accumulators, at most 16 registers
  int64_t i = 0;
  for (; i + RT <= m; i += RT) small_tile<scalar_t, NV, RT>(rows + i * d, ct, c_sq, d, lab + i, best + i);
  for (; i < m; ++i) small_tile<scalar_t, NV, 1>(rows + i * d, ct, c_sq, d, lab + i, best + i);
}

template <typename scalar_t>
KMEANS_INLINE void small_block_impl(const scalar_t* ct, const scalar_t* c_sq, int64_t nv, const scalar_t* rows,
                                    const scalar_t* c, const scalar_t* x, int64_t m, int64_t d, bool cosine,
                                    int64_t* lab, scalar_t* best, float* dst, scalar_t* sums, int64_t* cnt) {
  switch (nv) {
    case 1: small_block_nv<scalar_t, 1>(rows, ct, c_sq, m, d, lab, best); break;
    case 2: small_block_nv<scalar_t, 2>(rows, ct, c_sq, m, d, lab, best); break;
    case 3: small_block_nv<scalar_t, 3>(rows, ct, c_sq, m, d, lab, best); break;
    case 4: small_block_nv<scalar_t, 4>(rows, ct, c_sq, m, d, lab, best); break;
    case 5: small_block_nv<scalar_t, 5>(rows, ct, c_sq, m, d, lab, best); break;
    case 6: small_block_nv<scalar_t, 6>(rows, ct, c_sq, m, d, lab, best); break;
    case 7: small_block_nv<scalar_t, 7>(rows, ct, c_sq, m, d, lab, best); break;
    default: small_block_nv<scalar_t, 8>(rows, ct, c_sq, m, d, lab, best); break;
  }
  for (int64_t i = 0; i < m; ++i)
    row_tail(lab[i], best[i], rows + i * d, c, x + i * d, d, cosine, dst == nullptr ? nullptr : dst + i, sums, cnt);
}
#define KMEANS_SMALL_BLOCK(scalar_t)                                                                             \
  KMEANS_CLONES void small_block(const scalar_t* ct, const scalar_t* c_sq, int64_t nv, const scalar_t* rows,     \
                                 const scalar_t* c, const scalar_t* x, int64_t m, int64_t d, bool cosine,         \
                                 int64_t* lab, scalar_t* best, float* dst, scalar_t* sums, int64_t* cnt) {        \
    small_block_impl<scalar_t>(ct, c_sq, nv, rows, c, x, m, d, cosine, lab, best, dst, sums, cnt);               \
  }
KMEANS_SMALL_BLOCK(float)
KMEANS_SMALL_BLOCK(double)
#define KMEANS_FINISH_BLOCK(scalar_t)                                                                            \
  KMEANS_CLONES void finish_block(const scalar_t* scores, const scalar_t* c_sq, scalar_t alpha, const scalar_t* rows, \
                                  const scalar_t* c, const scalar_t* x, int64_t m, int64_t k, int64_t d, bool cosine,  \
                                  int64_t* lab, float* dst, scalar_t* sums, int64_t* cnt) {                        \
    finish_block_impl<scalar_t>(scores, c_sq, alpha, rows, c, x, m, k, d, cosine, lab, dst, sums, cnt);           \
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
void block_products(const scalar_t* c, const scalar_t* rows, int64_t m, int64_t k, int64_t k_pad, int64_t d,
                    scalar_t* dots, const at::Tensor& rows_src, int64_t row0, Scratch& scratch) {
  const int bm = static_cast<int>(m), bk = static_cast<int>(k), bd = static_cast<int>(d);
  const int ldc = static_cast<int>(k_pad);
  const char trans = 'T', plain = 'N';
  const scalar_t one = 1, zero = 0;
  const bool small = k_pad <= INT32_MAX && d <= INT32_MAX;  // m <= kRowsPerBlock
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (sgemm_ != nullptr && small) {
      sgemm_(&trans, &plain, &bk, &bm, &bd, &one, c, &bd, rows, &bd, &zero, dots, &ldc);
      return;
    }
  } else {
    if (dgemm_ != nullptr && small) {
      dgemm_(&trans, &plain, &bk, &bm, &bd, &one, c, &bd, rows, &bd, &zero, dots, &ldc);
      return;
    }
  }
  at::Tensor out = scratch.dots.narrow(0, 0, m).narrow(1, 0, k);
  at::mm_out(out, rows_src.narrow(0, row0, m), scratch.c_t);  // the view only where it is used
}

// Labels and (with `dst`) distances of rows [s, e) (e - s <= kRowsPerBlock); with `sums` ([k, d])
// and `cnt` ([k]), the rows are also added to their clusters' sums and counts, in row order.
template <typename scalar_t>
void assign_rows(const Prepared& p, bool cosine, int64_t s, int64_t e, Scratch& scratch, int64_t* lab, float* dst,
                 scalar_t* sums = nullptr, int64_t* cnt = nullptr) {
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
  if (p.c_t_pad.defined()) {
    // the block's best scores go where the scores would
    small_block(p.c_t_pad.data_ptr<scalar_t>(), p.c_sq_pad.data_ptr<scalar_t>(), p.c_t_pad.size(1) * p.c_t_pad.element_size() / kVecBytes,
                rp, cp, xp, m, d, cosine, lab + s, sp, dst == nullptr ? nullptr : dst + s, sums, cnt);
    return;
  }
  block_products<scalar_t>(cp, rp, m, k, p.k_pad, d, sp, p.shifted ? scratch.rows : p.xc, p.shifted ? 0 : s, scratch);
  // the padded score columns stay 0 (never written): +inf + alpha * 0 is never the minimum
  finish_block(sp, p.c_sq_pad.data_ptr<scalar_t>(), static_cast<scalar_t>(p.alpha), rp, cp, xp, m, p.k_pad, d, cosine,
               lab + s, dst == nullptr ? nullptr : dst + s, sums, cnt);
}

// Runs fn(task, scratch) for every task in [0, tasks), handed to the threads one at a time as they
// become free (an atomic counter) instead of in fixed shares: on a busy machine a descheduled
// thread delays only its current task. No result depends on which thread ran a task.
template <typename Fn>
void for_each_task(const Prepared& p, int64_t tasks, bool parallel, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t threads = parallel ? std::min<int64_t>(tasks, at::get_num_threads()) : 1;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int mkl_threads = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    Scratch scratch(p);
    for (int64_t t = next++; t < tasks; t = next++) fn(t, scratch);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_threads);
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
    const at::Tensor& x, const at::Tensor& centroids, bool cosine, bool distance) {
  const Prepared p = prepare(x, centroids, cosine, "kmeans_lloyd_step_cpu");
  const int64_t n = p.n, d = p.d, k = p.k;
  at::Tensor labels = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({distance ? n : 0}, x.options().dtype(at::kFloat));
  int64_t* lab = labels.data_ptr<int64_t>();
  float* dst = distance ? dist.data_ptr<float>() : nullptr;
  at::Tensor sums = at::empty({k, d}, x.options());
  at::Tensor counts = at::empty({k}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(p.xc.scalar_type(), "kmeans_lloyd_step_cpu", [&] {
    RowRanges<scalar_t> ranges(n, k, d);
    for_each_task(p, ranges.count, ranges.count > 1, [&](int64_t r, Scratch& scratch) {
      scalar_t* acc = ranges.start(r, d);
      int64_t* cnt = ranges.range_counts(r);
      const int64_t end = std::min(n, (r + 1) * ranges.per);
      for (int64_t s = r * ranges.per; s < end; s += kRowsPerBlock) {
        const int64_t e = std::min(end, s + kRowsPerBlock);
        // labels are in [0, k) by construction
        assign_rows<scalar_t>(p, cosine, s, e, scratch, lab, dst, acc, cnt);
      }
    });
    ranges.merge(d, sums.data_ptr<scalar_t>(), counts.data_ptr<int64_t>());
  });
  return {labels, dist, sums, counts};
}

TORCH_LIBRARY_IMPL(coreset_ext, CPU, m) {
  m.impl("kmeans_assign_cpu", &kmeans_assign_cpu);
  m.impl("kmeans_lloyd_step_cpu", &kmeans_lloyd_step_cpu);
}

}  // namespace coreset_ext
