// patch_embed_gather on the CPU: im2col of the kept patches only, one GEMM, pos[keep] fused.
//
//   _gather_patches   images [N, C, H, W] (any strides) -> cols [N, K, C*p*p] in `dtype`
//   _scatter_patches  cols [N, K, C*p*p] -> [N, C, H, W] (its adjoint; duplicates summed)
//   patch_embed_gather  cols @ weight.reshape(D, -1)^T + bias, then + pos_embed[keep]
//
// Columns are ordered (c, ky, kx), the order of weight.reshape(D, C*p*p), so the GEMM needs no
// permuted copy of the weight. The gather converts pixels to the GEMM dtype as it copies, so
// only the kept fraction of an image is ever converted (AMP: fp32 images, bf16 weight).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "effssl/checks.h"

namespace effssl {
namespace {

inline bool is_float_or_double(const at::Tensor& t) {
  return is_float_kind(t) || t.scalar_type() == at::kDouble;
}

// Checks shared by the three ops: images 4-D float, keep integer [N, K] on the same device.
void check_images_keep(const char* op, const at::Tensor& images, const at::Tensor& keep,
                       int64_t p) {
  EFFSSL_CHECK(images.dim() == 4, op, "images must be 4-D [N, C, H, W], got ", images.sizes());
  EFFSSL_CHECK(is_float_or_double(images), op,
               "images must be float32, float64, float16 or bfloat16, got ", images.scalar_type());
  EFFSSL_CHECK(p >= 1, op, "patch size must be positive, got ", p);
  EFFSSL_CHECK(images.size(2) % p == 0 && images.size(3) % p == 0, op, "H and W (",
               images.size(2), "x", images.size(3), ") must be divisible by the patch size ", p);
  EFFSSL_CHECK(keep.dim() == 2 && keep.size(0) == images.size(0), op,
               "keep must have shape [N, K] with N = ", images.size(0), ", got ", keep.sizes());
  EFFSSL_CHECK(keep.scalar_type() == at::kLong || keep.scalar_type() == at::kInt, op,
               "keep must be int32 or int64, got ", keep.scalar_type());
  EFFSSL_CHECK(keep.device() == images.device(), op, "keep must be on the device of images");
}

// Patch index of row r of keep, checked against L (the kernels read every index anyway).
template <typename idx_t>
inline int64_t patch_index(const idx_t* keep, int64_t r, int64_t L, const char* op) {
  const int64_t l = static_cast<int64_t>(keep[r]);
  EFFSSL_CHECK(l >= 0 && l < L, op, "keep values must be in [0, L) with L = ", L, ", got ", l);
  return l;
}

// Every index of keep [N, K] checked against L without reading a pixel: when C == 0 (or H, W == 0)
// the kernels read nothing, and a bad index must still raise, as it does otherwise.
void check_all_patches(const at::Tensor& keep, int64_t L, const char* op) {
  const at::Tensor k64 = keep.to(at::kLong).contiguous();
  const int64_t* kp = k64.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < k64.numel(); ++r) patch_index(kp, r, L, op);
}

template <typename in_t, typename out_t, typename idx_t>
void gather_kernel(const at::Tensor& images, const idx_t* keep, int64_t K, int64_t p, out_t* out) {
  const in_t* img = images.const_data_ptr<in_t>();
  const int64_t N = images.size(0), C = images.size(1);
  const int64_t Wp = images.size(3) / p, L = (images.size(2) / p) * Wp;
  const int64_t sn = images.stride(0), sc = images.stride(1), sh = images.stride(2),
                sw = images.stride(3);
  const int64_t cpp = C * p * p;
  at::parallel_for(0, N * K, std::max<int64_t>(1, 4096 / cpp), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / K;
      const int64_t l = patch_index(keep, r, L, "_gather_patches");
      const in_t* base = img + n * sn + (l / Wp) * p * sh + (l % Wp) * p * sw;
      out_t* o = out + r * cpp;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t ky = 0; ky < p; ++ky, o += p) {
          const in_t* row = base + c * sc + ky * sh;
          if (sw == 1) {  // the common NCHW case: a contiguous run the compiler vectorises
            for (int64_t kx = 0; kx < p; ++kx) o[kx] = static_cast<out_t>(row[kx]);
          } else {
            for (int64_t kx = 0; kx < p; ++kx) o[kx] = static_cast<out_t>(row[kx * sw]);
          }
        }
      }
    }
  });
}

// cols [N*K, C*p*p] (contiguous) -> images [N, C, H, W] as contiguous acc_t. Parallel over samples:
// a sample's duplicates land in its own image, so the sum is race-free and its order fixed.
template <typename in_t, typename acc_t, typename idx_t>
void scatter_kernel(const in_t* cols, const idx_t* keep, int64_t N, int64_t K, int64_t C,
                    int64_t H, int64_t W, int64_t p, acc_t* out) {
  const int64_t Wp = W / p, L = (H / p) * Wp, cpp = C * p * p;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t* img = out + n * C * H * W;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t l = patch_index(keep, n * K + k, L, "_scatter_patches");
        const in_t* src = cols + (n * K + k) * cpp;
        acc_t* base = img + (l / Wp) * p * W + (l % Wp) * p;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t ky = 0; ky < p; ++ky, src += p) {
            acc_t* row = base + c * H * W + ky * W;
            for (int64_t kx = 0; kx < p; ++kx) row[kx] += static_cast<acc_t>(src[kx]);
          }
      }
    }
  });
}

// y[r, :] += pos[keep[r], :] in place, computed in opmath (float, or double for double) and
// rounded once: what `y + pos` gives in PyTorch for y and pos already in y's dtype.
template <typename t, typename idx_t>
void add_pos_kernel(t* y, const t* pos, const idx_t* keep, int64_t rows, int64_t D, int64_t L) {
  using acc_t = at::opmath_type<t>;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const t* pr = pos + patch_index(keep, r, L, "patch_embed_gather") * D;
      t* yr = y + r * D;
      for (int64_t d = 0; d < D; ++d)
        yr[d] = static_cast<t>(static_cast<acc_t>(yr[d]) + static_cast<acc_t>(pr[d]));
    }
  });
}

at::Tensor gather_patches_cpu(const at::Tensor& images, const at::Tensor& keep, int64_t patch_size,
                              at::ScalarType dtype) {
  constexpr const char* op = "_gather_patches";
  check_images_keep(op, images, keep, patch_size);
  EFFSSL_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                   dtype == at::kBFloat16,
               op, "dtype must be a floating-point type, got ", dtype);
  const int64_t N = images.size(0), K = keep.size(1), C = images.size(1), p = patch_size;
  EFFSSL_CHECK(p <= (INT64_MAX / std::max<int64_t>(C, 1)) / p, op, "patch size ", p, " is too large");
  at::Tensor out = at::empty({N, K, C * p * p}, images.options().dtype(dtype));
  if (out.numel() == 0) {
    check_all_patches(keep, (images.size(2) / p) * (images.size(3) / p), op);
    return out;
  }
  const at::Tensor k64 = keep.to(at::kLong).contiguous();
  const int64_t* kp = k64.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "_gather_patches", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "_gather_patches", [&] {
      gather_kernel<in_t, scalar_t, int64_t>(images, kp, K, p, out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

at::Tensor scatter_patches_cpu(const at::Tensor& cols, const at::Tensor& keep, int64_t patch_size,
                               int64_t height, int64_t width, at::ScalarType dtype) {
  constexpr const char* op = "_scatter_patches";
  const int64_t p = patch_size;
  EFFSSL_CHECK(p >= 1, op, "patch size must be positive, got ", p);
  EFFSSL_CHECK(p <= INT64_MAX / p, op, "patch size ", p, " is too large");  // p * p below
  EFFSSL_CHECK(cols.dim() == 3 && cols.size(2) % (p * p) == 0 && cols.size(2) > 0, op,
               "cols must be [N, K, C*p*p], got ", cols.sizes());
  EFFSSL_CHECK(is_float_or_double(cols), op, "cols must be floating point, got ", cols.scalar_type());
  EFFSSL_CHECK(height >= 0 && width >= 0 && height % p == 0 && width % p == 0, op,
               "height and width must be non-negative multiples of the patch size");
  EFFSSL_CHECK(keep.dim() == 2 && keep.size(0) == cols.size(0) && keep.size(1) == cols.size(1),
               op, "keep must be [N, K] matching cols, got ", keep.sizes());
  EFFSSL_CHECK(keep.scalar_type() == at::kLong || keep.scalar_type() == at::kInt, op,
               "keep must be int32 or int64, got ", keep.scalar_type());
  EFFSSL_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                   dtype == at::kBFloat16,
               op, "dtype must be a floating-point type, got ", dtype);
  const int64_t N = cols.size(0), K = cols.size(1), C = cols.size(2) / (p * p);
  // Sum in float (double for double) whatever the output dtype: duplicates add up exactly once.
  const auto acc = (cols.scalar_type() == at::kDouble || dtype == at::kDouble) ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({N, C, height, width}, cols.options().dtype(acc));
  if (N * K == 0 || out.numel() == 0) {
    check_all_patches(keep, (height / p) * (width / p), op);
    return out.to(dtype);
  }
  const at::Tensor k64 = keep.to(at::kLong).contiguous();
  const at::Tensor c = cols.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "_scatter_patches", [&] {
    using in_t = scalar_t;
    if (acc == at::kDouble)
      scatter_kernel<in_t, double, int64_t>(c.const_data_ptr<in_t>(), k64.const_data_ptr<int64_t>(),
                                            N, K, C, height, width, p, out.mutable_data_ptr<double>());
    else
      scatter_kernel<in_t, float, int64_t>(c.const_data_ptr<in_t>(), k64.const_data_ptr<int64_t>(),
                                           N, K, C, height, width, p, out.mutable_data_ptr<float>());
  });
  return out.to(dtype);
}

at::Tensor patch_embed_gather_cpu(const at::Tensor& images, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& keep,
                                  const std::optional<at::Tensor>& pos_embed) {
  constexpr const char* op = "patch_embed_gather";
  EFFSSL_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3), op,
               "weight must be [D, C, p, p] (square patches), got ", weight.sizes());
  const int64_t D = weight.size(0), C = weight.size(1), p = weight.size(3);
  check_images_keep(op, images, keep, p);
  EFFSSL_CHECK(is_float_or_double(weight), op,
               "weight must be float32, float64, float16 or bfloat16, got ", weight.scalar_type());
  EFFSSL_CHECK(images.size(1) == C, op, "images have ", images.size(1), " channels, weight ", C);
  EFFSSL_CHECK(weight.device() == images.device(), op, "weight must be on the device of images");
  const auto dt = weight.scalar_type();  // the GEMM dtype; the Python wrapper promotes to it
  if (bias.has_value()) {
    EFFSSL_CHECK(bias->dim() == 1 && bias->size(0) == D, op, "bias must be [D] = [", D,
                 "], got ", bias->sizes());
    EFFSSL_CHECK(bias->scalar_type() == dt, op, "bias must have weight's dtype ", dt, ", got ",
                 bias->scalar_type());
    EFFSSL_CHECK(bias->device() == images.device(), op, "bias must be on the device of images");
  }
  const int64_t N = images.size(0), K = keep.size(1);
  const int64_t L = (images.size(2) / p) * (images.size(3) / p);
  auto out_dt = dt;
  if (pos_embed.has_value()) {
    const auto& pe = *pos_embed;
    EFFSSL_CHECK((pe.dim() == 2 || (pe.dim() == 3 && pe.size(0) == 1)) && pe.size(-2) == L &&
                     pe.size(-1) == D,
                 op, "pos_embed must be [1, L, D] or [L, D] with L = ", L, ", D = ", D, ", got ",
                 pe.sizes());
    EFFSSL_CHECK(is_float_or_double(pe), op, "pos_embed must be floating point, got ",
                 pe.scalar_type());
    EFFSSL_CHECK(pe.device() == images.device(), op, "pos_embed must be on the device of images");
    out_dt = c10::promoteTypes(dt, pe.scalar_type());
  }
  // This kernel fixes its own dtypes: keep autocast (still enabled in TLS when the op is called
  // under torch.autocast) from recasting the GEMM below.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (N * K == 0) return at::empty({N, K, D}, images.options().dtype(out_dt));
  const at::Tensor cols = gather_patches_cpu(images, keep, p, dt).view({N * K, C * p * p});
  const at::Tensor w2 = weight.reshape({D, C * p * p}).t();
  at::Tensor y = bias.has_value() ? at::addmm(*bias, cols, w2) : at::mm(cols, w2);
  if (pos_embed.has_value()) {
    // y is rounded to the GEMM dtype first, as the conv output of timm's path is
    if (out_dt != dt) y = y.to(out_dt);
    const at::Tensor pos = pos_embed->reshape({L, D}).to(out_dt).contiguous();
    const at::Tensor k64 = keep.to(at::kLong).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dt, "patch_embed_gather", [&] {
      add_pos_kernel<scalar_t, int64_t>(y.mutable_data_ptr<scalar_t>(), pos.const_data_ptr<scalar_t>(),
                                        k64.const_data_ptr<int64_t>(), N * K, D, L);
    });
  }
  return y.view({N, K, D});
}

}  // namespace

TORCH_LIBRARY_IMPL(effssl_kernels, CPU, m) {
  m.impl("patch_embed_gather", &patch_embed_gather_cpu);
  m.impl("_gather_patches", &gather_patches_cpu);
  m.impl("_scatter_patches", &scatter_patches_cpu);
}

}  // namespace effssl
