// gather_tokens on the CPU (SEMANTICS.md section 3): out[n, k] = x[n, keep[n, k]] + pos[keep[n, k]].
// Forward: parallel over output rows, strides read in place, float32 add (float64 when a float64
// tensor is involved), one rounding.
// Backward: both gradients are written row by row from float32 (float64) sums in a fixed order
// (ascending k, then n), so they are deterministic and independent of the thread count; no
// zero-fill pass and no atomics. Every index is range-checked where it is read (free next to the
// row copy), and on its own when D == 0 leaves no row to read.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "effssl/checks.h"

namespace effssl {
namespace {

constexpr const char* kOp = "gather_tokens";

// float64 too (unlike effssl::is_float_kind): float64 models take the unfused path through
// this op (nn/vit.py), and patch_embed_gather, which it must equal, takes float64.
inline bool is_token_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// Calls f(T{}) with T the C++ type of a float32/float64/float16/bfloat16 dtype.
template <typename F>
void dispatch_float(at::ScalarType s, const char* what, F&& f) {
  switch (s) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default:
      TORCH_CHECK_TYPE(false, kOp, ": ", what, " must be float32, float64, float16 or bfloat16, got ", s);
  }
}

// Accumulator of a sum that involves A and B: float64 when either is, float32 otherwise.
template <typename A, typename B>
using acc_t = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>;

template <typename F>
void dispatch_index(at::ScalarType s, F&& f) {
  switch (s) {
    case at::kLong: f(int64_t{}); break;
    case at::kInt: f(int32_t{}); break;
    default: TORCH_CHECK_TYPE(false, kOp, ": keep must be int32 or int64, got ", s);
  }
}

[[noreturn]] void index_error(int64_t n, int64_t k, int64_t l, int64_t L) {
  TORCH_CHECK_VALUE(false, kOp, ": keep[", n, ", ", k, "] = ", l, " is outside [0, ", L, ")");
  __builtin_unreachable();
}

// keep [N, K] read with its strides (no copy, int32 or int64).
template <typename Idx>
struct KeepView {
  const Idx* p;
  int64_t s0, s1, L;
  int64_t at(int64_t n, int64_t k) const {
    const int64_t l = static_cast<int64_t>(p[n * s0 + k * s1]);
    if (l < 0 || l >= L) index_error(n, k, l, L);
    return l;
  }
};

// Range-checks every index without reading x: when D == 0 the kernels read no row, and a bad
// index must still raise, as it does for D > 0.
template <typename Idx>
void check_all(const KeepView<Idx>& kv, int64_t N, int64_t K) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) kv.at(n, k);
}

// Shared argument rules; the Python wrapper checks the same with friendlier types first.
void check_keep(const at::Tensor& keep, int64_t N, const at::Device& dev) {
  EFFSSL_CHECK(keep.scalar_type() == at::kLong || keep.scalar_type() == at::kInt, kOp,
               "keep must be int32 or int64, got ", keep.scalar_type());
  EFFSSL_CHECK(keep.dim() == 2, kOp, "keep must be 2-D [N, K], got ", keep.sizes());
  EFFSSL_CHECK(keep.size(0) == N, kOp, "keep has batch ", keep.size(0), " but x has ", N);
  EFFSSL_CHECK(keep.size(1) >= 1, kOp, "keep must keep at least one token (K >= 1)");
  EFFSSL_CHECK(keep.device() == dev, kOp, "keep must be on the device of x");
}

// pos [L, D] or [1, L, D] -> [L, D] view.
at::Tensor pos_2d(const at::Tensor& pos, int64_t L, int64_t D, const at::Device& dev) {
  EFFSSL_CHECK(is_token_float(pos.scalar_type()), kOp,
               "pos_embed must be float32, float64, float16 or bfloat16, got ", pos.scalar_type());
  const bool ok = (pos.dim() == 2 && pos.size(0) == L && pos.size(1) == D) ||
                  (pos.dim() == 3 && pos.size(0) == 1 && pos.size(1) == L && pos.size(2) == D);
  EFFSSL_CHECK(ok, kOp, "pos_embed must be [L, D] or [1, L, D] with L = ", L, ", D = ", D,
               ", got ", pos.sizes());
  EFFSSL_CHECK(pos.device() == dev, kOp, "pos_embed must be on the device of x");
  return pos.dim() == 3 ? pos.select(0, 0) : pos;
}

// ----------------------------------------------------------------------------- forward
// Output type of x + pos, as torch.promote_types for these four dtypes (no pos: x's type):
// the common type, float64 if either is, else float32 (float16 + bfloat16 -> float32).
template <typename TX, typename TP>
using promoted_t =
    std::conditional_t<std::is_void_v<TP> || std::is_same_v<TX, TP>, TX, acc_t<TX, TP>>;

template <typename TX, typename TP, typename Idx>
void forward_kernel(const at::Tensor& x, const KeepView<Idx>& kv, const at::Tensor* pos,
                    at::Tensor& out) {
  using TO = promoted_t<TX, TP>;
  using A = acc_t<TO, TO>;
  const int64_t N = x.size(0), K = out.size(1), D = x.size(2);
  const TX* xp = x.const_data_ptr<TX>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1), sx2 = x.stride(2);
  TO* op = out.data_ptr<TO>();
  at::parallel_for(0, N * K, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / K, k = r - n * K;
      const int64_t l = kv.at(n, k);
      const TX* xr = xp + n * sx0 + l * sx1;
      TO* o = op + r * D;
      if constexpr (std::is_void_v<TP>) {
        if (sx2 == 1) {
          std::memcpy(o, xr, D * sizeof(TO));
        } else {
          for (int64_t d = 0; d < D; ++d) o[d] = xr[d * sx2];
        }
      } else {
        // one float32 (float64) add and one rounding: what torch's own x + pos computes
        const TP* pr = pos->const_data_ptr<TP>() + l * pos->stride(0);
        const int64_t sp1 = pos->stride(1);
        if (sx2 == 1 && sp1 == 1) {  // contiguous rows: the loop vectorises
          for (int64_t d = 0; d < D; ++d)
            o[d] = static_cast<TO>(static_cast<A>(xr[d]) + static_cast<A>(pr[d]));
        } else {
          for (int64_t d = 0; d < D; ++d)
            o[d] = static_cast<TO>(static_cast<A>(xr[d * sx2]) + static_cast<A>(pr[d * sp1]));
        }
      }
    }
  });
}

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& keep,
                             const std::optional<at::Tensor>& pos_embed) {
  EFFSSL_CHECK(x.dim() == 3, kOp, "x must be 3-D [N, L, D], got ", x.sizes());
  EFFSSL_CHECK(is_token_float(x.scalar_type()), kOp,
               "x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2);
  EFFSSL_CHECK(L >= 1, kOp, "x must have at least one token (L >= 1)");
  check_keep(keep, N, x.device());
  const int64_t K = keep.size(1);
  std::optional<at::Tensor> pos;
  at::ScalarType out_type = x.scalar_type();
  if (pos_embed.has_value()) {
    pos = pos_2d(*pos_embed, L, D, x.device());
    out_type = c10::promoteTypes(out_type, pos->scalar_type());
  }
  at::Tensor out = at::empty({N, K, D}, x.options().dtype(out_type));
  dispatch_index(keep.scalar_type(), [&](auto i_tag) {
    using Idx = decltype(i_tag);
    const KeepView<Idx> kv{keep.const_data_ptr<Idx>(), keep.stride(0), keep.stride(1), L};
    if (out.numel() == 0) {  // D == 0 (or N == 0): no row read, check the indices anyway
      check_all(kv, N, K);
      return;
    }
    dispatch_float(x.scalar_type(), "x", [&](auto x_tag) {
      using TX = decltype(x_tag);
      if (!pos) {
        forward_kernel<TX, void, Idx>(x, kv, nullptr, out);
        return;
      }
      dispatch_float(pos->scalar_type(), "pos_embed", [&](auto p_tag) {
        forward_kernel<TX, decltype(p_tag), Idx>(x, kv, &*pos, out);
      });
    });
  });
  return out;
}

// ----------------------------------------------------------------------------- backward
// a[0:D] += row g (stride sg2), in A (float32 or float64); unit stride spelled out so that
// loop vectorises.
template <typename A, typename TG>
inline void add_row(A* a, const TG* g, int64_t D, int64_t sg2) {
  if (sg2 == 1) {
    for (int64_t d = 0; d < D; ++d) a[d] += static_cast<A>(g[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) a[d] += static_cast<A>(g[d * sg2]);
  }
}

// grad_x[n, l] = sum of grad[n, k] over keep[n, k] == l, ascending k, in float32 (float64 when
// grad or x is float64). Per sample, a
// linked list head[l] -> k -> nxt[k] (built backwards, so it runs in ascending k) finds the
// rows; each grad_x row is written once (zeros, a converted copy, or the float32 sum).
template <typename TG, typename TX, typename Idx>
void backward_x_kernel(const at::Tensor& grad, const KeepView<Idx>& kv, at::Tensor& gx) {
  using A = acc_t<TG, TX>;
  const int64_t N = grad.size(0), K = grad.size(1), D = grad.size(2), L = kv.L;
  const TG* gp = grad.const_data_ptr<TG>();
  const int64_t sg0 = grad.stride(0), sg1 = grad.stride(1), sg2 = grad.stride(2);
  TX* xp = gx.data_ptr<TX>();
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(L * D, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<int64_t> head(L), nxt(K);
    std::vector<A> acc(D);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(head.begin(), head.end(), -1);
      for (int64_t k = K - 1; k >= 0; --k) {
        const int64_t l = kv.at(n, k);
        nxt[k] = head[l];
        head[l] = k;
      }
      for (int64_t l = 0; l < L; ++l) {
        TX* o = xp + (n * L + l) * D;
        int64_t k = head[l];
        if (k < 0) {
          std::fill(o, o + D, static_cast<TX>(0.f));
          continue;
        }
        const TG* g = gp + n * sg0 + k * sg1;
        if (nxt[k] < 0) {  // the common case: a token kept once
          if (sg2 == 1) {  // unit stride spelled out so the conversion loop vectorises
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<TX>(static_cast<A>(g[d]));
          } else {
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<TX>(static_cast<A>(g[d * sg2]));
          }
          continue;
        }
        A* a = acc.data();
        std::fill(a, a + D, A(0));
        for (; k >= 0; k = nxt[k]) add_row(a, gp + n * sg0 + k * sg1, D, sg2);
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<TX>(a[d]);
      }
    }
  });
}

// grad_pos[l] = sum of grad[n, k] over keep[n, k] == l, ascending (n, k), in float32 (float64
// when grad or pos is float64): a
// counting sort of the N*K rows by l (serial, over N*K ints), then parallel over l.
template <typename TG, typename TP, typename Idx>
void backward_pos_kernel(const at::Tensor& grad, const KeepView<Idx>& kv, at::Tensor& gpos) {
  using A = acc_t<TG, TP>;
  const int64_t N = grad.size(0), K = grad.size(1), D = grad.size(2), L = kv.L;
  const TG* gp = grad.const_data_ptr<TG>();
  const int64_t sg0 = grad.stride(0), sg1 = grad.stride(1), sg2 = grad.stride(2);
  TP* pp = gpos.data_ptr<TP>();
  std::vector<int64_t> start(L + 1, 0), rows(N * K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) ++start[kv.at(n, k) + 1];
  for (int64_t l = 0; l < L; ++l) start[l + 1] += start[l];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) rows[fill[kv.at(n, k)]++] = n * K + k;
  }
  const int64_t per_l = std::max<int64_t>(1, (N * K / L) * D);
  at::parallel_for(0, L, std::max<int64_t>(1, 65536 / per_l), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(D);
    A* a = acc.data();
    for (int64_t l = begin; l < end; ++l) {
      std::fill(a, a + D, A(0));
      for (int64_t j = start[l]; j < start[l + 1]; ++j) {
        const int64_t n = rows[j] / K, k = rows[j] - n * K;
        add_row(a, gp + n * sg0 + k * sg1, D, sg2);
      }
      TP* o = pp + l * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<TP>(a[d]);
    }
  });
}

// Returns (grad_x [N, L, D] in x_dtype, grad_pos [L, D] in pos_dtype); a gradient not asked
// for comes back as an empty [0] tensor (a custom op cannot return None).
std::tuple<at::Tensor, at::Tensor> gather_tokens_backward_cpu(
    const at::Tensor& grad, const at::Tensor& keep, int64_t num_tokens, at::ScalarType x_dtype,
    at::ScalarType pos_dtype, bool need_x, bool need_pos) {
  EFFSSL_CHECK(grad.dim() == 3, kOp, "grad must be 3-D [N, K, D], got ", grad.sizes());
  EFFSSL_CHECK(is_token_float(grad.scalar_type()), kOp,
               "grad must be float32, float64, float16 or bfloat16, got ", grad.scalar_type());
  EFFSSL_CHECK(num_tokens >= 1, kOp, "num_tokens must be at least 1, got ", num_tokens);
  // checked here, not only where a kernel dispatches on them: with D == 0 none does
  TORCH_CHECK_TYPE(is_token_float(x_dtype) && is_token_float(pos_dtype), kOp,
                   ": x_dtype and pos_dtype must be float32, float64, float16 or bfloat16, got ", x_dtype,
                   " and ", pos_dtype);
  const int64_t N = grad.size(0), K = grad.size(1), D = grad.size(2), L = num_tokens;
  check_keep(keep, N, grad.device());
  EFFSSL_CHECK(keep.size(1) == K, kOp, "grad has ", K, " tokens but keep has ", keep.size(1));
  at::Tensor gx = need_x ? at::empty({N, L, D}, grad.options().dtype(x_dtype))
                         : at::empty({0}, grad.options().dtype(x_dtype));
  at::Tensor gpos = need_pos ? at::empty({L, D}, grad.options().dtype(pos_dtype))
                             : at::empty({0}, grad.options().dtype(pos_dtype));
  dispatch_index(keep.scalar_type(), [&](auto i_tag) {
    using Idx = decltype(i_tag);
    const KeepView<Idx> kv{keep.const_data_ptr<Idx>(), keep.stride(0), keep.stride(1), L};
    if (D == 0) check_all(kv, N, K);  // no row to read below, so no index checked there
    dispatch_float(grad.scalar_type(), "grad", [&](auto g_tag) {
      using TG = decltype(g_tag);
      if (need_x && gx.numel() > 0)
        dispatch_float(x_dtype, "x_dtype", [&](auto x_tag) {
          backward_x_kernel<TG, decltype(x_tag), Idx>(grad, kv, gx);
        });
      if (need_pos && gpos.numel() > 0)
        dispatch_float(pos_dtype, "pos_dtype", [&](auto p_tag) {
          backward_pos_kernel<TG, decltype(p_tag), Idx>(grad, kv, gpos);
        });
    });
  });
  return {gx, gpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(effssl_kernels, CPU, m) {
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("gather_tokens_backward", &gather_tokens_backward_cpu);
}

}  // namespace effssl
