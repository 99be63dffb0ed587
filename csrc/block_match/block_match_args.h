// Validation and output allocation of block_match, shared by the CPU and CUDA registrations.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/empty.h>

#include <limits>
#include <optional>
#include <tuple>

#include "block_match.h"
#include "effssl/checks.h"

namespace effssl {

// Checks every rule of SEMANTICS.md section 1 and fills the shape fields of p.
inline void check_block_match(const at::Tensor& a, const at::Tensor& b, int64_t block_size,
                              int64_t search_radius, double data_range,
                              const std::optional<at::Tensor>& centers,
                              const std::optional<at::Tensor>& flip, BlockMatchParams& p) {
  constexpr const char* op = "block_match";
  EFFSSL_CHECK(a.dim() == 4 && b.dim() == 4, op, "a and b must be 4-D [N, C, H, W]");
  EFFSSL_CHECK(a.sizes() == b.sizes(), op, "a and b must have the same shape, got ", a.sizes(),
               " and ", b.sizes());
  EFFSSL_CHECK(a.device() == b.device(), op, "a and b must be on the same device");
  EFFSSL_CHECK(a.scalar_type() == b.scalar_type(), op, "a and b must have the same dtype");
  EFFSSL_CHECK(is_float_kind(a), op, "dtype must be float32, float16 or bfloat16, got ",
               a.scalar_type());
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3);
  EFFSSL_CHECK(C >= 1, op, "C must be at least 1");
  EFFSSL_CHECK(H <= (1 << 24) && W <= (1 << 24), op, "H and W must be at most 2^24");
  EFFSSL_CHECK(N <= std::numeric_limits<int>::max(), op, "N too large");
  EFFSSL_CHECK(block_size >= 1, op, "block_size must be positive, got ", block_size);
  EFFSSL_CHECK(block_size <= H && block_size <= W, op, "block_size ", block_size,
               " is larger than the image ", H, "x", W);
  EFFSSL_CHECK(search_radius >= 0 && search_radius <= (1 << 16), op,
               "search_radius must be in [0, 65536], got ", search_radius);
  // the wrapper's bounds (ops/block_match.py MIN_RANGE, MAX_RANGE): data_range^2 must stay a
  // normal float32, or every psnr silently comes out -inf (underflow) or +inf (overflow)
  EFFSSL_CHECK(data_range >= 1e-18 && data_range <= 1e18, op,
               "data_range must be in [1e-18, 1e+18], got ", data_range);
  // a block's sum of C * B^2 squared differences of up to data_range must fit float32
  const double block_peak = data_range * data_range * static_cast<double>(C) *
                            static_cast<double>(block_size) * static_cast<double>(block_size);
  EFFSSL_CHECK(block_peak <= std::numeric_limits<float>::max(), op,
               "data_range^2 * C * block_size^2 = ", block_peak, " overflows float32");
  // the kernels count channel rows C * block_size in int
  EFFSSL_CHECK(C * block_size <= std::numeric_limits<int>::max(), op, "C * block_size = ", C * block_size,
               " must be below 2^31");
  const int64_t Hb = H / block_size, Wb = W / block_size;
  if (centers.has_value()) {
    const auto& c = *centers;
    EFFSSL_CHECK(c.scalar_type() == at::kInt || c.scalar_type() == at::kLong, op,
                 "centers must be int32 or int64, got ", c.scalar_type());
    EFFSSL_CHECK(c.dim() == 4 && c.size(0) == N && c.size(1) == Hb && c.size(2) == Wb &&
                     c.size(3) == 2,
                 op, "centers must have shape [N, Hb, Wb, 2] = [", N, ", ", Hb, ", ", Wb,
                 ", 2], got ", c.sizes());
    EFFSSL_CHECK(c.device() == a.device(), op, "centers must be on the device of a");
  }
  if (flip.has_value()) {
    const auto& f = *flip;
    EFFSSL_CHECK(f.scalar_type() == at::kBool, op, "flip must be bool, got ", f.scalar_type());
    EFFSSL_CHECK(f.dim() == 1 && f.size(0) == N, op, "flip must have shape [N] = [", N,
                 "], got ", f.sizes());
    EFFSSL_CHECK(f.device() == a.device(), op, "flip must be on the device of a");
  }
  p.N = static_cast<int>(N);
  p.C = static_cast<int>(C);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.block = static_cast<int>(block_size);
  p.radius = static_cast<int>(search_radius);
  p.Hb = static_cast<int>(Hb);
  p.Wb = static_cast<int>(Wb);
  p.data_range = static_cast<float>(data_range);
}

// int32 contiguous centres; int64 values beyond int32 are clamped (they stay outside any image).
inline std::optional<at::Tensor> prepare_centers(const std::optional<at::Tensor>& centers) {
  if (!centers.has_value()) return std::nullopt;
  at::Tensor c = *centers;
  if (c.scalar_type() == at::kLong)
    c = at::clamp(c, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max());
  return c.to(at::kInt).contiguous();
}

inline std::tuple<at::Tensor, at::Tensor> empty_block_match_outputs(const at::Tensor& a,
                                                                    const BlockMatchParams& p) {
  auto psnr = at::empty({p.N, p.Hb, p.Wb}, a.options().dtype(at::kFloat));
  auto offset = at::empty({p.N, p.Hb, p.Wb, 2}, a.options().dtype(at::kInt));
  return {psnr, offset};
}

}  // namespace effssl
