// C++ CPU backend of the contrastive losses of coreset_ext/ops/contrastive.py: nt_xent,
// info_nce_queue and pair_cosine, forward and backward, each pass ONE call from Python (issue 14:
// the Python reference issues ~40 ATen calls per step, which is the whole cost at small batches).
// Each function computes what its coreset_ext/reference.py counterpart computes (the formulas are
// in the docstrings there): same outputs, same gradients, rows divided by max(||x||, eps).
//
// Accumulation is in float64 for float64 inputs and float32 otherwise (float16/bfloat16 inputs are
// widened once on entry); losses, lse and cosines come back in that dtype and gradients in the
// inputs' dtype. Small problems run plain loops (no operator dispatch at all); beyond kLoopMacs
// multiply-adds per block the products go to at::mm, kBlockRows rows of the logits at a time (the
// reference's CHUNK_SIZE), so memory stays O(kBlockRows * rows) at any batch size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace coreset_ext {
namespace {

using at::Tensor;

constexpr int64_t kBlockRows = 1024;   // = reference.CHUNK_SIZE
constexpr int64_t kLoopMacs = 1 << 14;  // at or below: loops beat a BLAS call's own overhead
constexpr int64_t kGrainWork = 1 << 15;  // multiply-adds per parallel task (fewer: one thread)
// logits per block above which the exponentials go through ATen's vectorised kernels: a scalar
// std::exp costs ~10 ns, which at B = 64 against a 256-key queue was most of a step
constexpr int64_t kLoopExps = 1 << 11;

int64_t grain(int64_t work_per_row) { return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_row)); }

at::ScalarType acc_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// x in the accumulation dtype, contiguous (x itself when it already is: no copy on the usual path)
Tensor widened(const Tensor& x, at::ScalarType acc) { return x.to(acc).contiguous(); }

void check_rows(const char* op, const char* name, const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(1) >= 1, op, ": ", name,
              " must be a non-empty [batch, dim] tensor, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating point, got ",
              x.scalar_type());
}

void check_vector(const char* op, const char* name, const Tensor& v, int64_t n) {
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 1 && v.size(0) == n && at::isFloatingType(v.scalar_type()), op,
              ": ", name, " must be a floating CPU vector of length ", n, ", got shape ", v.sizes());
}

template <typename T>
T dot(const T* a, const T* b, int64_t d) {
  T s = 0;
#pragma omp simd reduction(+ : s)  // lets the compiler reorder the sum into vector lanes
  for (int64_t k = 0; k < d; ++k) s += a[k] * b[k];
  return s;
}

// The rows of x [n, d] as they enter a loss: out_i = x_i / max(||x_i||, eps) when `normalize`
// (else x_i); norm_i = ||x_i|| and c_i = max(norm_i, eps) either way (the cosines need them).
template <typename T>
void prepare_rows(const T* x, T* out, T* norm, T* c, int64_t n, int64_t d, bool normalize, double eps) {
  at::parallel_for(0, n, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = x + i * d;
      norm[i] = std::sqrt(dot(xi, xi, d));
      c[i] = std::max(norm[i], static_cast<T>(eps));
      T* oi = out + i * d;
      if (normalize) {
        const T ci = c[i];
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) oi[k] = xi[k] / ci;
      } else if (oi != xi) {
        std::copy(xi, xi + d, oi);
      }
    }
  });
}

// a b^T for a [r, d], b [m, d] (contiguous, dtype T): loops when small, at::mm when not
template <typename T>
Tensor dots(const Tensor& a, const Tensor& b) {
  const int64_t r = a.size(0), m = b.size(0), d = a.size(1);
  if (r * m * d > kLoopMacs) return at::mm(a, b.t());
  Tensor out = at::empty({r, m}, a.options());
  const T* pa = a.const_data_ptr<T>();
  const T* pb = b.const_data_ptr<T>();
  T* po = out.mutable_data_ptr<T>();
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < m; ++j) po[i * m + j] = dot(pa + i * d, pb + j * d, d);
  return out;
}

// w b * scale for w [r, m], b [m, d] (contiguous, dtype T), written into out [r, d]
template <typename T>
void mm_into(const Tensor& w, const Tensor& b, T scale, Tensor out) {
  const int64_t r = w.size(0), m = w.size(1), d = b.size(1);
  if (r * m * d > kLoopMacs) {
    at::mm_out(out, w, b);
    out.mul_(scale);
    return;
  }
  const T* pw = w.const_data_ptr<T>();
  const T* pb = b.const_data_ptr<T>();
  T* po = out.mutable_data_ptr<T>();
  for (int64_t i = 0; i < r; ++i) {
    T* oi = po + i * d;
    std::fill(oi, oi + d, T(0));
    for (int64_t j = 0; j < m; ++j) {
      const T wij = pw[i * m + j];
      const T* bj = pb + j * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) oi[k] += wij * bj[k];
    }
    for (int64_t k = 0; k < d; ++k) oi[k] *= scale;
  }
}

// In place: g_i <- (g_i - zhat_i <g_i, zhat_i> [norm_i > eps]) / c_i, the gradient through
// x_i / max(||x_i||, eps) (reference._normalize_backward)
template <typename T>
void normalize_backward(const T* zhat, const T* norm, const T* c, T* g, int64_t n, int64_t d, double eps) {
  at::parallel_for(0, n, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* zi = zhat + i * d;
      T* gi = g + i * d;
      const T proj = norm[i] > static_cast<T>(eps) ? dot(gi, zi, d) : T(0), ci = c[i];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) gi[k] = (gi[k] - zi[k] * proj) / ci;
    }
  });
}

// The [2B, d] rows z = [z1; z2] in the accumulation dtype, prepared (see prepare_rows)
template <typename T>
std::tuple<Tensor, Tensor, Tensor> stacked(const Tensor& z1, const Tensor& z2, bool normalize, double eps) {
  const at::ScalarType acc = acc_type(z1);
  const int64_t half = z1.size(0), n = 2 * half, d = z1.size(1);
  Tensor z = at::empty({n, d}, z1.options().dtype(acc));
  Tensor norm = at::empty({n}, z.options()), c = at::empty({n}, z.options());
  const Tensor a = widened(z1, acc), b = widened(z2, acc);
  T* pz = z.mutable_data_ptr<T>();
  T* pn = norm.mutable_data_ptr<T>();
  T* pc = c.mutable_data_ptr<T>();
  prepare_rows(a.const_data_ptr<T>(), pz, pn, pc, half, d, normalize, eps);
  prepare_rows(b.const_data_ptr<T>(), pz + half * d, pn + half, pc + half, half, d, normalize, eps);
  return {z, norm, c};
}

// A gradient [rows, d] in the accumulation dtype back in the input's dtype
Tensor as_input(const Tensor& g, const Tensor& like) { return g.scalar_type() == like.scalar_type() ? g : g.to(like.scalar_type()); }

// ------------------------------------------------------------------------------------ nt_xent

template <typename T>
std::tuple<Tensor, Tensor, Tensor> nt_xent_fwd_impl(const Tensor& z1, const Tensor& z2, double temperature,
                                                    bool normalize, double eps) {
  const int64_t half = z1.size(0), n = 2 * half, d = z1.size(1);
  const T inv_t = static_cast<T>(1.0 / temperature);
  Tensor z, norm, c;
  std::tie(z, norm, c) = stacked<T>(z1, z2, normalize, eps);
  Tensor rows = at::empty({n}, z.options()), lse = at::empty({n}, z.options()), cos = at::empty({half}, z.options());
  const T* pc = c.const_data_ptr<T>();
  T* prow = rows.mutable_data_ptr<T>();
  T* plse = lse.mutable_data_ptr<T>();
  T* pcos = cos.mutable_data_ptr<T>();
  for (int64_t s = 0; s < n; s += kBlockRows) {
    const int64_t r = std::min(kBlockRows, n - s);
    Tensor logits = dots<T>(z.narrow(0, s, r), z);  // <z_i, z_j>, rows s .. s + r
    if (r * n > kLoopExps) {
      logits.mul_(inv_t).diagonal(s).fill_(-std::numeric_limits<T>::infinity());  // row i's own entry
      const Tensor l = at::logsumexp(logits, {1});
      const T* pl = logits.const_data_ptr<T>();
      const T* pls = l.const_data_ptr<T>();
      for (int64_t ri = 0; ri < r; ++ri) {
        const int64_t i = s + ri;
        plse[i] = pls[ri];
        prow[i] = pls[ri] - pl[ri * n + (i + half) % n];
      }
      continue;
    }
    const T* pl = logits.const_data_ptr<T>();
    at::parallel_for(0, r, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t ri = begin; ri < end; ++ri) {
        const int64_t i = s + ri;
        const T* li = pl + ri * n;
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < n; ++j)
          if (j != i && li[j] * inv_t > m) m = li[j] * inv_t;
        T sum = 0;
        for (int64_t j = 0; j < n; ++j)
          if (j != i) sum += std::exp(li[j] * inv_t - m);
        plse[i] = m + std::log(sum);
        prow[i] = plse[i] - li[(i + half) % n] * inv_t;
      }
    });
  }
  // cos(z1_i, z2_i): the positive logits times t when normalised, else from the raw rows
  const Tensor a = normalize ? z : widened(z1, z.scalar_type());
  const Tensor b = normalize ? z.narrow(0, half, half) : widened(z2, z.scalar_type());
  const T* pa = a.const_data_ptr<T>();
  const T* pb = b.const_data_ptr<T>();
  for (int64_t i = 0; i < half; ++i) {
    const T dab = dot(pa + i * d, pb + i * d, d);
    pcos[i] = normalize ? dab : dab / (pc[i] * pc[half + i]);
  }
  return {rows, lse, cos};
}

template <typename T>
std::tuple<Tensor, Tensor> nt_xent_bwd_impl(const Tensor& grad_rows, const Tensor& z1, const Tensor& z2,
                                            const Tensor& lse, double temperature, bool normalize, double eps) {
  const int64_t half = z1.size(0), n = 2 * half, d = z1.size(1);
  const T inv_t = static_cast<T>(1.0 / temperature);
  Tensor z, norm, c;
  std::tie(z, norm, c) = stacked<T>(z1, z2, normalize, eps);
  const Tensor g = widened(grad_rows, z.scalar_type()), l = widened(lse, z.scalar_type());
  const T* pg = g.const_data_ptr<T>();
  const T* plse = l.const_data_ptr<T>();
  Tensor gz = at::empty({n, d}, z.options());
  for (int64_t s = 0; s < n; s += kBlockRows) {
    const int64_t r = std::min(kBlockRows, n - s);
    Tensor w = dots<T>(z.narrow(0, s, r), z);  // the logits of rows s .. s + r, then their weights
    T* pw = w.mutable_data_ptr<T>();
    // w_ij = g_i p_ij + g_j p_ji - (g_i + g_j) [j = p(i)], p_ij = exp(s_ij / t - lse_i), p_ii = 0:
    // the rows of (w + w^T) of the reference's dense formula (s is symmetric)
    if (r * n > kLoopExps) {
      w.mul_(inv_t);
      const Tensor p_ji = (w - l.unsqueeze(0)).exp_().mul_(g.unsqueeze(0));
      w.sub_(l.narrow(0, s, r).unsqueeze(1)).exp_().mul_(g.narrow(0, s, r).unsqueeze(1)).add_(p_ji);
      w.diagonal(s).zero_();
      for (int64_t ri = 0; ri < r; ++ri) {
        const int64_t i = s + ri, p = (i + half) % n;
        pw[ri * n + p] -= pg[i] + pg[p];
      }
      mm_into<T>(w, z, inv_t, gz.narrow(0, s, r));
      continue;
    }
    at::parallel_for(0, r, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t ri = begin; ri < end; ++ri) {
        const int64_t i = s + ri;
        T* wi = pw + ri * n;
        for (int64_t j = 0; j < n; ++j) {
          const T x = wi[j] * inv_t;
          wi[j] = j == i ? T(0) : pg[i] * std::exp(x - plse[i]) + pg[j] * std::exp(x - plse[j]);
        }
        const int64_t p = (i + half) % n;
        wi[p] -= pg[i] + pg[p];
      }
    });
    mm_into<T>(w, z, inv_t, gz.narrow(0, s, r));
  }
  if (normalize)
    normalize_backward(z.const_data_ptr<T>(), norm.const_data_ptr<T>(), c.const_data_ptr<T>(),
                       gz.mutable_data_ptr<T>(), n, d, eps);
  // two outputs that share no memory (a custom op's outputs may not alias)
  Tensor g1 = as_input(gz.narrow(0, 0, half), z1), g2 = as_input(gz.narrow(0, half, half), z2);
  if (g1.scalar_type() == gz.scalar_type()) g2 = g2.clone();
  return {g1, g2};
}

std::tuple<Tensor, Tensor, Tensor> nt_xent_cpu(const Tensor& z1, const Tensor& z2, double temperature, bool normalize,
                                               double eps) {
  check_rows("nt_xent_cpu", "z1", z1);
  check_rows("nt_xent_cpu", "z2", z2);
  TORCH_CHECK(z1.sizes() == z2.sizes(), "nt_xent_cpu: z1 and z2 must have the same shape, got ", z1.sizes(), " and ",
              z2.sizes());
  if (acc_type(z1) == at::kDouble) return nt_xent_fwd_impl<double>(z1, z2, temperature, normalize, eps);
  return nt_xent_fwd_impl<float>(z1, z2, temperature, normalize, eps);
}

std::tuple<Tensor, Tensor> nt_xent_backward_cpu(const Tensor& grad_rows, const Tensor& z1, const Tensor& z2,
                                                const Tensor& lse, double temperature, bool normalize, double eps) {
  check_rows("nt_xent_backward_cpu", "z1", z1);
  check_rows("nt_xent_backward_cpu", "z2", z2);
  TORCH_CHECK(z1.sizes() == z2.sizes(), "nt_xent_backward_cpu: z1 and z2 must have the same shape, got ",
              z1.sizes(), " and ", z2.sizes());
  check_vector("nt_xent_backward_cpu", "grad_rows", grad_rows, 2 * z1.size(0));
  check_vector("nt_xent_backward_cpu", "lse", lse, 2 * z1.size(0));
  if (acc_type(z1) == at::kDouble)
    return nt_xent_bwd_impl<double>(grad_rows, z1, z2, lse, temperature, normalize, eps);
  return nt_xent_bwd_impl<float>(grad_rows, z1, z2, lse, temperature, normalize, eps);
}

// ----------------------------------------------------------------------------- info_nce_queue

// q, k [B, d] and queue [K, d] prepared: (qhat, ||q||, max(||q||, eps), khat, max(||k||, eps), the
// queue as given, widened, and per key 1 / max(||queue_j||, eps), 1 / (max(||queue_j||, eps) t)).
// The queue is never normalised row by row (K x d divisions per pass, most of a small step
// against a large queue): <q, queuehat_j> = <q, queue_j> / max(||queue_j||, eps) scales the
// logits' columns instead, and sum_j p_ij queuehat_j = sum_j (p_ij / max(||queue_j||, eps)) queue_j.
template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> moco_rows(
    const Tensor& q, const Tensor& k, const Tensor& queue, double temperature, bool normalize, double eps) {
  const at::ScalarType acc = acc_type(q);
  const int64_t b = q.size(0), kq = queue.size(0), d = q.size(1);
  const Tensor qa = widened(q, acc), ka = widened(k, acc), qua = widened(queue, acc);
  auto prepared = [&](const Tensor& x, int64_t rows, Tensor& norm, Tensor& c) {
    norm = at::empty({rows}, qa.options());
    c = at::empty({rows}, qa.options());
    Tensor out = normalize ? at::empty({rows, d}, qa.options()) : x;
    prepare_rows(x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), norm.mutable_data_ptr<T>(),
                 c.mutable_data_ptr<T>(), rows, d, normalize, eps);
    return out;
  };
  Tensor qn, qc, kn, kc;
  Tensor qh = prepared(qa, b, qn, qc), kh = prepared(ka, b, kn, kc);
  Tensor inv_c = at::empty({kq}, qa.options()), col = at::empty({kq}, qa.options());
  const T* pu = qua.const_data_ptr<T>();
  T* pinv = inv_c.mutable_data_ptr<T>();
  T* pcol = col.mutable_data_ptr<T>();
  const T inv_t = static_cast<T>(1.0 / temperature);
  at::parallel_for(0, kq, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      pinv[j] = normalize ? T(1) / std::max(std::sqrt(dot(pu + j * d, pu + j * d, d)), static_cast<T>(eps)) : T(1);
      pcol[j] = pinv[j] * inv_t;
    }
  });
  return {qh, qn, qc, kh, kc, qua, inv_c, col};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> info_nce_fwd_impl(const Tensor& q, const Tensor& k, const Tensor& queue,
                                                     double temperature, bool normalize, double eps) {
  const int64_t b = q.size(0), kq = queue.size(0), d = q.size(1);
  const T inv_t = static_cast<T>(1.0 / temperature);
  Tensor qh, qn, qc, kh, kc, qu, inv_c, col;
  std::tie(qh, qn, qc, kh, kc, qu, inv_c, col) = moco_rows<T>(q, k, queue, temperature, normalize, eps);
  const T* pcol = col.const_data_ptr<T>();
  Tensor rows = at::empty({b}, qh.options()), lse = at::empty({b}, qh.options()), cos = at::empty({b}, qh.options());
  const T* pq = qh.const_data_ptr<T>();
  const T* pk = kh.const_data_ptr<T>();
  const T* pqc = qc.const_data_ptr<T>();
  const T* pkc = kc.const_data_ptr<T>();
  T* prow = rows.mutable_data_ptr<T>();
  T* plse = lse.mutable_data_ptr<T>();
  T* pcos = cos.mutable_data_ptr<T>();
  for (int64_t s = 0; s < b; s += kBlockRows) {
    const int64_t r = std::min(kBlockRows, b - s);
    Tensor logits = dots<T>(qh.narrow(0, s, r), qu);  // <q_i, queue_j>, then times col_j
    // log sum_j exp(<q_i, queuehat_j> / t) through ATen's vectorised kernels for large blocks
    const bool vectorized = r * kq > kLoopExps;
    const Tensor neg = vectorized ? at::logsumexp(logits.mul_(col.unsqueeze(0)), {1}) : logits;
    const T* pl = logits.const_data_ptr<T>();
    const T* pneg = neg.const_data_ptr<T>();
    at::parallel_for(0, r, grain(kq), [&](int64_t begin, int64_t end) {
      for (int64_t ri = begin; ri < end; ++ri) {
        const int64_t i = s + ri;
        const T* li = pl + ri * kq;
        const T dqk = dot(pq + i * d, pk + i * d, d);
        const T pos = dqk * inv_t;
        if (vectorized) {  // logaddexp(pos, neg_i)
          const T m = std::max(pos, pneg[ri]);
          plse[i] = m + std::log(std::exp(pos - m) + std::exp(pneg[ri] - m));
        } else {
          T m = pos;
          for (int64_t j = 0; j < kq; ++j) m = std::max(m, li[j] * pcol[j]);
          T sum = std::exp(pos - m);
          for (int64_t j = 0; j < kq; ++j) sum += std::exp(li[j] * pcol[j] - m);
          plse[i] = m + std::log(sum);
        }
        prow[i] = plse[i] - pos;
        pcos[i] = normalize ? dqk : dqk / (pqc[i] * pkc[i]);
      }
    });
  }
  return {rows, lse, cos};
}

template <typename T>
Tensor info_nce_bwd_impl(const Tensor& grad_rows, const Tensor& q, const Tensor& k, const Tensor& queue,
                         const Tensor& lse, double temperature, bool normalize, double eps) {
  const int64_t b = q.size(0), kq = queue.size(0), d = q.size(1);
  const T inv_t = static_cast<T>(1.0 / temperature);
  Tensor qh, qn, qc, kh, kc, qu, inv_c, col;
  std::tie(qh, qn, qc, kh, kc, qu, inv_c, col) = moco_rows<T>(q, k, queue, temperature, normalize, eps);
  const T* pcol = col.const_data_ptr<T>();
  const Tensor g = widened(grad_rows, qh.scalar_type()), l = widened(lse, qh.scalar_type());
  const T* pg = g.const_data_ptr<T>();
  const T* plse = l.const_data_ptr<T>();
  const T* pk = kh.const_data_ptr<T>();
  const T* pinv = inv_c.const_data_ptr<T>();
  Tensor gz = at::empty({b, d}, qh.options());
  T* pgz = gz.mutable_data_ptr<T>();
  for (int64_t s = 0; s < b; s += kBlockRows) {
    const int64_t r = std::min(kBlockRows, b - s);
    Tensor p = dots<T>(qh.narrow(0, s, r), qu);  // the logits, then p_ij = exp(s_ij / t - lse_i)
    T* pp = p.mutable_data_ptr<T>();
    Tensor p_sum;
    if (r * kq > kLoopExps) {  // ATen's vectorised exp
      p_sum = p.mul_(col.unsqueeze(0)).sub_(l.narrow(0, s, r).unsqueeze(1)).exp_().sum(1);
      if (normalize) p.mul_(inv_c.unsqueeze(0));
    } else {
      p_sum = at::empty({r}, qh.options());
    }
    T* psum = p_sum.mutable_data_ptr<T>();
    if (r * kq <= kLoopExps) at::parallel_for(0, r, grain(kq), [&](int64_t begin, int64_t end) {
      for (int64_t ri = begin; ri < end; ++ri) {
        T* pi = pp + ri * kq;
        T sum = 0;
        for (int64_t j = 0; j < kq; ++j) {
          const T pij = std::exp(pi[j] * pcol[j] - plse[s + ri]);
          sum += pij;
          pi[j] = pij * pinv[j];
        }
        psum[ri] = sum;
      }
    });
    mm_into<T>(p, qu, T(1), gz.narrow(0, s, r));  // sum_j p_ij queuehat_j
    // dL/dqhat_i = (g_i / t) [sum_j p_ij queuehat_j - (sum_j p_ij) khat_i]  (p_pos - 1 = -sum_j p_ij)
    for (int64_t ri = 0; ri < r; ++ri) {
      const int64_t i = s + ri;
      T* gi = pgz + i * d;
      const T* ki = pk + i * d;
      const T scale = pg[i] * inv_t;
      for (int64_t c = 0; c < d; ++c) gi[c] = (gi[c] - psum[ri] * ki[c]) * scale;
    }
  }
  if (normalize)
    normalize_backward(qh.const_data_ptr<T>(), qn.const_data_ptr<T>(), qc.const_data_ptr<T>(), pgz, b, d, eps);
  return as_input(gz, q);
}

std::tuple<Tensor, Tensor, Tensor> info_nce_queue_cpu(const Tensor& q, const Tensor& k, const Tensor& queue,
                                                      double temperature, bool normalize, double eps) {
  check_rows("info_nce_queue_cpu", "q", q);
  check_rows("info_nce_queue_cpu", "k", k);
  check_rows("info_nce_queue_cpu", "queue", queue);
  TORCH_CHECK(k.sizes() == q.sizes() && queue.size(1) == q.size(1),
              "info_nce_queue_cpu: k must have q's shape and queue q's dimension, got ", q.sizes(), ", ", k.sizes(),
              ", ", queue.sizes());
  if (acc_type(q) == at::kDouble) return info_nce_fwd_impl<double>(q, k, queue, temperature, normalize, eps);
  return info_nce_fwd_impl<float>(q, k, queue, temperature, normalize, eps);
}

Tensor info_nce_queue_backward_cpu(const Tensor& grad_rows, const Tensor& q, const Tensor& k, const Tensor& queue,
                                   const Tensor& lse, double temperature, bool normalize, double eps) {
  check_rows("info_nce_queue_backward_cpu", "q", q);
  check_rows("info_nce_queue_backward_cpu", "k", k);
  check_rows("info_nce_queue_backward_cpu", "queue", queue);
  TORCH_CHECK(k.sizes() == q.sizes() && queue.size(1) == q.size(1),
              "info_nce_queue_backward_cpu: k must have q's shape and queue q's dimension, got ", q.sizes(), ", ",
              k.sizes(), ", ", queue.sizes());
  check_vector("info_nce_queue_backward_cpu", "grad_rows", grad_rows, q.size(0));
  check_vector("info_nce_queue_backward_cpu", "lse", lse, q.size(0));
  if (acc_type(q) == at::kDouble)
    return info_nce_bwd_impl<double>(grad_rows, q, k, queue, lse, temperature, normalize, eps);
  return info_nce_bwd_impl<float>(grad_rows, q, k, queue, lse, temperature, normalize, eps);
}

// -------------------------------------------------------------------------------- pair_cosine

template <typename T>
Tensor pair_cosine_fwd_impl(const Tensor& a, const Tensor& b, double eps) {
  const at::ScalarType acc = acc_type(a);
  const int64_t n = a.size(0), d = a.size(1);
  const Tensor x = widened(a, acc), y = widened(b, acc);
  Tensor cos = at::empty({n}, x.options());
  const T* px = x.const_data_ptr<T>();
  const T* py = y.const_data_ptr<T>();
  T* pc = cos.mutable_data_ptr<T>();
  const T e = static_cast<T>(eps);
  at::parallel_for(0, n, grain(3 * d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = px + i * d;
      const T* yi = py + i * d;
      const T cx = std::max(std::sqrt(dot(xi, xi, d)), e), cy = std::max(std::sqrt(dot(yi, yi, d)), e);
      pc[i] = dot(xi, yi, d) / (cx * cy);
    }
  });
  return cos;
}

template <typename T>
std::tuple<Tensor, Tensor> pair_cosine_bwd_impl(const Tensor& grad, const Tensor& a, const Tensor& b, double eps) {
  const at::ScalarType acc = acc_type(a);
  const int64_t n = a.size(0), d = a.size(1);
  Tensor ah = at::empty({n, d}, a.options().dtype(acc)), bh = at::empty({n, d}, ah.options());
  Tensor an = at::empty({n}, ah.options()), ac = at::empty({n}, ah.options());
  Tensor bn = at::empty({n}, ah.options()), bc = at::empty({n}, ah.options());
  const Tensor x = widened(a, acc), y = widened(b, acc), g = widened(grad, acc);
  prepare_rows(x.const_data_ptr<T>(), ah.mutable_data_ptr<T>(), an.mutable_data_ptr<T>(), ac.mutable_data_ptr<T>(), n,
               d, true, eps);
  prepare_rows(y.const_data_ptr<T>(), bh.mutable_data_ptr<T>(), bn.mutable_data_ptr<T>(), bc.mutable_data_ptr<T>(), n,
               d, true, eps);
  // dc/dahat = g bhat, dc/dbhat = g ahat, then through the normalisations
  Tensor ga = at::empty({n, d}, ah.options()), gb = at::empty({n, d}, ah.options());
  const T* pa = ah.const_data_ptr<T>();
  const T* pb = bh.const_data_ptr<T>();
  const T* pg = g.const_data_ptr<T>();
  T* pga = ga.mutable_data_ptr<T>();
  T* pgb = gb.mutable_data_ptr<T>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) {
      pga[i * d + k] = pg[i] * pb[i * d + k];
      pgb[i * d + k] = pg[i] * pa[i * d + k];
    }
  normalize_backward(pa, an.const_data_ptr<T>(), ac.const_data_ptr<T>(), pga, n, d, eps);
  normalize_backward(pb, bn.const_data_ptr<T>(), bc.const_data_ptr<T>(), pgb, n, d, eps);
  return {as_input(ga, a), as_input(gb, b)};
}

Tensor pair_cosine_cpu(const Tensor& a, const Tensor& b, double eps) {
  check_rows("pair_cosine_cpu", "a", a);
  check_rows("pair_cosine_cpu", "b", b);
  TORCH_CHECK(a.sizes() == b.sizes(), "pair_cosine_cpu: a and b must have the same shape, got ", a.sizes(), " and ",
              b.sizes());
  if (acc_type(a) == at::kDouble) return pair_cosine_fwd_impl<double>(a, b, eps);
  return pair_cosine_fwd_impl<float>(a, b, eps);
}

std::tuple<Tensor, Tensor> pair_cosine_backward_cpu(const Tensor& grad, const Tensor& a, const Tensor& b, double eps) {
  check_rows("pair_cosine_backward_cpu", "a", a);
  check_rows("pair_cosine_backward_cpu", "b", b);
  TORCH_CHECK(a.sizes() == b.sizes(), "pair_cosine_backward_cpu: a and b must have the same shape, got ", a.sizes(),
              " and ", b.sizes());
  check_vector("pair_cosine_backward_cpu", "grad", grad, a.size(0));
  if (acc_type(a) == at::kDouble) return pair_cosine_bwd_impl<double>(grad, a, b, eps);
  return pair_cosine_bwd_impl<float>(grad, a, b, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(coreset_ext, CPU, m) {
  m.impl("nt_xent_cpu", &nt_xent_cpu);
  m.impl("nt_xent_backward_cpu", &nt_xent_backward_cpu);
  m.impl("info_nce_queue_cpu", &info_nce_queue_cpu);
  m.impl("info_nce_queue_backward_cpu", &info_nce_queue_backward_cpu);
  m.impl("pair_cosine_cpu", &pair_cosine_cpu);
  m.impl("pair_cosine_backward_cpu", &pair_cosine_backward_cpu);
}

}  // namespace coreset_ext
