// scores[index[i]] += float(values[i]) on the GPU.
//  - default: one fp32 atomicAdd per value (duplicates are summed; order, hence rounding, varies);
//  - deterministic: stable sort of the indices, then each run of equal indices is summed by one
//    thread in the sorted (= original) order and added once: bit-identical across runs.
// Out-of-range indices are skipped by the kernels (never written); the Python wrapper reports
// them as errors in eager mode.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace coreset_ext {

constexpr int kThreads = 256;

template <typename index_t, typename value_t>
__global__ void scatter_add_atomic_kernel(float* __restrict__ scores, int64_t n,
                                          const index_t* __restrict__ index,
                                          const value_t* __restrict__ values, int64_t m) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= m) return;
  const int64_t j = static_cast<int64_t>(index[i]);
  if (j < 0 || j >= n) return;
  atomicAdd(scores + j, static_cast<float>(values[i]));
}

template <typename value_t>
__global__ void scatter_add_sorted_kernel(float* __restrict__ scores, int64_t n,
                                          const int64_t* __restrict__ sorted_index,
                                          const int64_t* __restrict__ order,
                                          const value_t* __restrict__ values, int64_t m) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= m) return;
  const int64_t j = sorted_index[p];
  if (p > 0 && sorted_index[p - 1] == j) return;  // only the head of each run works
  if (j < 0 || j >= n) return;
  float sum = 0.f;
  for (int64_t q = p; q < m && sorted_index[q] == j; ++q) {
    sum += static_cast<float>(values[order[q]]);
  }
  scores[j] += sum;
}

void score_scatter_add_cuda(at::Tensor& scores, const at::Tensor& index, const at::Tensor& values,
                            bool deterministic) {
  TORCH_CHECK(scores.is_cuda() && index.device() == scores.device() &&
                  values.device() == scores.device(),
              "score_scatter_add_: all tensors must be on the same CUDA device");
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "score_scatter_add_: scores must be float32");
  TORCH_CHECK(scores.dim() == 1 && scores.is_contiguous(),
              "score_scatter_add_: scores must be a contiguous 1-D tensor");
  TORCH_CHECK(index.dim() == 1 && values.dim() == 1 && index.numel() == values.numel(),
              "score_scatter_add_: index and values must be 1-D of equal length");
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong,
              "score_scatter_add_: index must be int32 or int64");
  const int64_t m = index.numel();
  if (m == 0) return;
  const c10::cuda::CUDAGuard guard(scores.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = scores.numel();
  const at::Tensor val = values.contiguous();
  const int blocks = static_cast<int>((m + kThreads - 1) / kThreads);
  if (!deterministic) {
    const at::Tensor idx = index.contiguous();
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "score_scatter_add_cuda", [&] {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(),
                                      "score_scatter_add_cuda", [&] {
        scatter_add_atomic_kernel<index_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
            scores.data_ptr<float>(), n, idx.data_ptr<index_t>(), val.data_ptr<scalar_t>(), m);
      });
    });
  } else {
    // A stable sort keeps equal indices in their original order, so each run's sum is formed
    // in the same order on every call.
    auto sorted = at::sort(index.to(at::kLong), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor sorted_index = std::get<0>(sorted).contiguous();
    const at::Tensor order = std::get<1>(sorted).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(),
                                    "score_scatter_add_cuda_sorted", [&] {
      scatter_add_sorted_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          scores.data_ptr<float>(), n, sorted_index.data_ptr<int64_t>(),
          order.data_ptr<int64_t>(), val.data_ptr<scalar_t>(), m);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(coreset_ext, CUDA, m) { m.impl("score_scatter_add_", &score_scatter_add_cuda); }

}  // namespace coreset_ext
