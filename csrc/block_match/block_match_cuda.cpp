// CUDA registration of block_match: checks and allocation here (g++ compiles torch headers far
// faster than nvcc); the kernels live in block_match_kernel.cu behind a plain launcher.
#ifdef WITH_CUDA
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "block_match_args.h"

namespace effssl {
namespace {

ScalarKind scalar_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default: return ScalarKind::Float32;
  }
}

std::tuple<at::Tensor, at::Tensor> block_match_cuda(const at::Tensor& a, const at::Tensor& b,
                                                    int64_t block_size, int64_t search_radius,
                                                    double data_range,
                                                    const std::optional<at::Tensor>& centers,
                                                    const std::optional<at::Tensor>& flip) {
  BlockMatchParams p{};
  check_block_match(a, b, block_size, search_radius, data_range, centers, flip, p);
  const c10::cuda::CUDAGuard guard(a.device());
  auto [psnr, offset] = empty_block_match_outputs(a, p);
  if (psnr.numel() == 0) return {psnr, offset};
  const auto c32 = prepare_centers(centers);
  const auto f = flip.has_value() ? std::optional<at::Tensor>(flip->contiguous()) : std::nullopt;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  for (int d = 0; d < 4; ++d) p.sa[d] = a.stride(d), p.sb[d] = b.stride(d);
  p.centers = c32.has_value() ? c32->data_ptr<int32_t>() : nullptr;
  p.flip = f.has_value() ? f->data_ptr<bool>() : nullptr;
  p.psnr = psnr.data_ptr<float>();
  p.offset = offset.data_ptr<int32_t>();
  const int err = block_match_cuda_launch(p, scalar_kind(a), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  return {psnr, offset};
}

}  // namespace

TORCH_LIBRARY_IMPL(effssl_kernels, CUDA, m) { m.impl("block_match", &block_match_cuda); }

}  // namespace effssl
#endif  // WITH_CUDA
