// k-means update on the GPU: per-cluster sums of the rows of x and counts, with no float atomics.
//
//  1. A stable sort of the labels (a radix sort, i.e. repeated counting sorts) groups the rows of
//     each cluster in ascending row order; binary searches give each cluster's segment.
//  2. Each segment is cut into chunks of kChunk rows; one block per (chunk, 128 features) sums its
//     rows in order into a partial buffer (fp32, or fp64 for double input).
//  3. One block per (cluster, 128 features) adds that cluster's partials in chunk order.
// Every sum is formed in a fixed order, so results are bit-identical run to run. The chunking
// depends only on the labels, so a giant cluster still spreads over many blocks. Labels outside
// [0, k) sort outside every segment and are never read or written; the Python wrapper reports
// them as errors in eager mode. No host synchronisation: buffers are sized by upper bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace coreset_ext {

constexpr int kFeatures = 128;  // threads per block: one feature column each
constexpr int64_t kChunk = 256;  // rows per partial sum

// chunk_offsets[c] .. chunk_offsets[c+1] are cluster c's chunks; total chunks = chunk_offsets[k].
template <typename scalar_t, typename acc_t>
__global__ void kmeans_partial_kernel(const scalar_t* __restrict__ x, int64_t d,
                                      const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ offsets,
                                      const int64_t* __restrict__ chunk_offsets, int64_t k,
                                      acc_t* __restrict__ partial) {
  const int64_t chunk = blockIdx.x;
  if (chunk >= chunk_offsets[k]) return;
  // the cluster owning this chunk: last c with chunk_offsets[c] <= chunk
  int64_t lo = 0, hi = k;  // invariant: chunk_offsets[lo] <= chunk < chunk_offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (chunk_offsets[mid] <= chunk) lo = mid; else hi = mid;
  }
  const int64_t c = lo;
  const int64_t f = static_cast<int64_t>(blockIdx.y) * kFeatures + threadIdx.x;
  if (f >= d) return;
  const int64_t start = offsets[c] + (chunk - chunk_offsets[c]) * kChunk;
  const int64_t stop = min(start + kChunk, offsets[c + 1]);
  acc_t sum = 0;
#pragma unroll 4
  for (int64_t p = start; p < stop; ++p) {
    sum += static_cast<acc_t>(x[order[p] * d + f]);
  }
  partial[chunk * d + f] = sum;
}

template <typename acc_t>
__global__ void kmeans_reduce_kernel(const acc_t* __restrict__ partial, int64_t d,
                                     const int64_t* __restrict__ chunk_offsets, int64_t k,
                                     acc_t* __restrict__ sums) {
  const int64_t c = blockIdx.x;
  const int64_t f = static_cast<int64_t>(blockIdx.y) * kFeatures + threadIdx.x;
  if (c >= k || f >= d) return;
  acc_t sum = 0;
  for (int64_t j = chunk_offsets[c]; j < chunk_offsets[c + 1]; ++j) sum += partial[j * d + f];
  sums[c * d + f] = sum;
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cuda(const at::Tensor& x, const at::Tensor& labels,
                                                      int64_t k) {
  TORCH_CHECK(x.is_cuda() && labels.device() == x.device(),
              "kmeans_update: x and labels must be on the same CUDA device");
  TORCH_CHECK(x.dim() == 2, "kmeans_update: x must be 2-D, got ", x.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0),
              "kmeans_update: labels must be 1-D with one entry per row of x, got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "kmeans_update: labels must be int64");
  TORCH_CHECK(k >= 1, "kmeans_update: k must be >= 1, got ", k);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  const auto out_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sums = at::empty({k, d}, x.options().dtype(out_type));

  // Narrow keys make the radix sort cheaper (int16: 2 byte passes instead of 8). Out-of-range
  // labels become -1 first so that narrowing cannot wrap them into [0, k).
  const auto key_type = k < 32767 ? at::kShort : (k < (int64_t(1) << 31) - 1 ? at::kInt : at::kLong);
  const at::Tensor valid = labels.ge(0).logical_and(labels.lt(k));
  const at::Tensor keys = at::where(valid, labels, at::full({}, -1, labels.options())).to(key_type);
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_labels = std::get<0>(sorted).contiguous();
  const at::Tensor order = std::get<1>(sorted).contiguous();
  const at::Tensor bounds = at::arange(k + 1, keys.options());
  // offsets[c] = #labels < c: cluster c occupies sorted positions offsets[c] .. offsets[c+1].
  const at::Tensor offsets = at::searchsorted(sorted_labels, bounds).to(at::kLong).contiguous();
  const at::Tensor counts = offsets.slice(0, 1) - offsets.slice(0, 0, k);
  const at::Tensor chunks = at::floor_divide(counts + (kChunk - 1), kChunk);
  const at::Tensor chunk_offsets =
      at::cat({at::zeros({1}, offsets.options()), at::cumsum(chunks, 0)}).contiguous();
  // at most n / kChunk + k chunks (each cluster's last chunk may be partial)
  const int64_t max_chunks = n / kChunk + k;
  if (n == 0 || d == 0) {
    sums.zero_();
    return {sums, counts.contiguous()};
  }
  const at::Tensor xc = x.contiguous();
  const dim3 threads(kFeatures);
  const int64_t ftiles = (d + kFeatures - 1) / kFeatures;
  TORCH_CHECK(ftiles < 65536 && k < (int64_t(1) << 31) && max_chunks < (int64_t(1) << 31),
              "kmeans_update: sizes too large for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "kmeans_update_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::Tensor partial = at::empty({max_chunks, d}, x.options().dtype(out_type));
    kmeans_partial_kernel<scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>(max_chunks), static_cast<unsigned>(ftiles)), threads, 0, stream>>>(
            xc.data_ptr<scalar_t>(), d, order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
            chunk_offsets.data_ptr<int64_t>(), k, partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    kmeans_reduce_kernel<acc_t>
        <<<dim3(static_cast<unsigned>(k), static_cast<unsigned>(ftiles)), threads, 0, stream>>>(
            partial.data_ptr<acc_t>(), d, chunk_offsets.data_ptr<int64_t>(), k, sums.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts.contiguous()};
}

TORCH_LIBRARY_IMPL(coreset_ext, CUDA, m) { m.impl("kmeans_update", &kmeans_update_cuda); }

}  // namespace coreset_ext
