// Argument checks shared by the CPU and CUDA registrations. Messages name the op and the rule,
// so a direct torch.ops call fails as clearly as the Python wrapper (which checks first).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define EFFSSL_CHECK(cond, op, ...) TORCH_CHECK(cond, op, ": ", __VA_ARGS__)

namespace effssl {

inline bool is_float_kind(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

}  // namespace effssl
