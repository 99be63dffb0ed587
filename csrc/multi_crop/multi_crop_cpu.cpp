// multi_crop on the CPU (SEMANTICS.md section 4): for each image and each of its P boxes, crop,
// resize bilinearly (align_corners=False, no antialias) and mirror where flipped, in one pass.
// The index/weight arithmetic is torch's upsample_bilinear2d on the crop (see
// effssl_kernels/reference/multi_crop.py for the formulas), so integer boxes reproduce
// torchvision's resized_crop(antialias=False) up to float rounding.
// Parallel over output rows; each box's column taps are computed once per thread chunk and
// reused for every row and channel. Images are read in place through their strides (any layout);
// the output is contiguous [N*P, C, oh, ow].
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>


namespace effssl {
namespace {

constexpr const char* kOp = "multi_crop";

// Calls f(T{}) with T the C++ type of a supported image/output dtype.
template <typename F>
void dispatch_image(at::ScalarType s, const char* what, F&& f) {
  switch (s) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kByte: f(uint8_t{}); break;
    default:
      TORCH_CHECK_TYPE(false, kOp, ": ", what, " must be float32, float64, float16, bfloat16 or uint8, got ", s);
  }
}

// Taps of one output position along an axis: source indices (-1: not read, contributes 0)
// and weights.
template <typename acc>
struct Tap {
  int64_t i0, i1;
  acc w0, w1;
};

template <typename acc>
Tap<acc> axis_tap(acc start, acc size, int64_t o, int64_t out, int64_t limit) {
  const acc scale = size / static_cast<acc>(out);
  acc s = scale * (static_cast<acc>(o) + acc(0.5)) - acc(0.5);  // torch's source index
  s = std::max(s, acc(0));
  s = std::min(s, std::max(size - acc(1), acc(0)));
  const acc fs = std::floor(start);
  const acc u = s + (start - fs);
  const acc k = std::floor(u);
  Tap<acc> t;
  t.w1 = u - k;
  t.w0 = acc(1) - t.w1;
  // Finite boxes are checked by the caller; clamp anyway so a cast never overflows.
  const acc big = acc(1 << 30);
  const int64_t i0 = static_cast<int64_t>(std::min(std::max(fs + k, -big), big));
  t.i0 = (i0 >= 0 && i0 < limit) ? i0 : -1;
  t.i1 = (i0 + 1 >= 0 && i0 + 1 < limit && t.w1 != acc(0)) ? i0 + 1 : -1;
  return t;
}

template <typename out_t, typename acc>
out_t store(acc v) {
  if constexpr (std::is_same_v<out_t, uint8_t>) {
    // Round half up and saturate (NaN -> 0): the reference's rule.
    v = std::min(std::max(v, acc(0)), acc(255));
    return static_cast<uint8_t>(std::floor(v + acc(0.5)));
  } else {
    return static_cast<out_t>(v);
  }
}

template <typename scalar_t, typename out_t>
void run(const at::Tensor& images, const at::Tensor& boxes, const at::Tensor& flips, at::Tensor& out,
         int64_t P, int64_t oh, int64_t ow) {
  using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t sn = images.stride(0), sc = images.stride(1), sh = images.stride(2), sw = images.stride(3);
  const scalar_t* ip = images.const_data_ptr<scalar_t>();
  const acc* bp = boxes.const_data_ptr<acc>();  // [N*P, 4] contiguous, already in acc
  const bool* fp = flips.const_data_ptr<bool>();  // [N*P] contiguous
  out_t* op = out.mutable_data_ptr<out_t>();
  const int64_t rows = out.size(0) * oh;  // (box, output row) pairs

  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, ow * C)), [&](int64_t lo, int64_t hi) {
    std::vector<Tap<acc>> xt(ow);
    int64_t cached = -1;
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t q = r / oh, y = r - q * oh;  // box q = n * P + p
      const acc* b = bp + q * 4;
      if (q != cached) {
        for (int64_t x = 0; x < ow; ++x) {
          const int64_t xs = fp[q] ? ow - 1 - x : x;  // mirror: column x reads column ow-1-x's taps
          xt[x] = axis_tap<acc>(b[1], b[3], xs, ow, W);
        }
        cached = q;
      }
      const Tap<acc> yt = axis_tap<acc>(b[0], b[2], y, oh, H);
      const scalar_t* img = ip + (q / P) * sn;
      out_t* o = op + (q * C * oh + y) * ow;
      for (int64_t c = 0; c < C; ++c, o += oh * ow) {
        const scalar_t* r0 = yt.i0 >= 0 ? img + c * sc + yt.i0 * sh : nullptr;
        const scalar_t* r1 = yt.i1 >= 0 ? img + c * sc + yt.i1 * sh : nullptr;
        for (int64_t x = 0; x < ow; ++x) {
          const Tap<acc>& t = xt[x];
          auto row = [&](const scalar_t* rp) -> acc {
            if (rp == nullptr) return acc(0);
            const acc v0 = t.i0 >= 0 ? static_cast<acc>(rp[t.i0 * sw]) : acc(0);
            const acc v1 = t.i1 >= 0 ? static_cast<acc>(rp[t.i1 * sw]) : acc(0);
            return t.w0 * v0 + t.w1 * v1;
          };
          const acc top = row(r0);
          const acc v = yt.i1 >= 0 ? yt.w0 * top + yt.w1 * row(r1) : yt.w0 * top;
          o[x] = store<out_t, acc>(v);
        }
      }
    }
  });
}

// Boxes must be finite with positive sizes: a clear error here, not garbage taps.
template <typename T>
void check_boxes(const T* p, int64_t count, int64_t P) {
  for (int64_t i = 0; i < count; ++i) {
    const T* q = p + 4 * i;
    TORCH_CHECK_VALUE(std::isfinite(q[0]) && std::isfinite(q[1]) && std::isfinite(q[2]) && std::isfinite(q[3]) &&
                          q[2] > 0 && q[3] > 0,
                      kOp, ": box [", i / P, ", ", i % P, "] = (", q[0], ", ", q[1], ", ", q[2], ", ", q[3],
                      ") must be finite with positive height and width");
  }
}

at::Tensor multi_crop_cpu(const at::Tensor& images, const at::Tensor& boxes, const at::Tensor& flips, int64_t out_h,
                          int64_t out_w, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(images.dim() == 4, kOp, ": images must be [N, C, H, W], got ", images.dim(), "-D");
  const int64_t N = images.size(0);
  TORCH_CHECK_VALUE(boxes.dim() == 3 && boxes.size(0) == N && boxes.size(2) == 4, kOp,
                    ": boxes must be [N, P, 4] with N = ", N, ", got ", boxes.sizes());
  const int64_t P = boxes.size(1);
  TORCH_CHECK_VALUE(flips.dim() == 2 && flips.size(0) == N && flips.size(1) == P, kOp,
                    ": flips must be [N, P] = [", N, ", ", P, "], got ", flips.sizes());
  TORCH_CHECK_TYPE(flips.scalar_type() == at::kBool, kOp, ": flips must be bool, got ", flips.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(boxes.scalar_type()) || at::isIntegralType(boxes.scalar_type(), false), kOp,
                   ": boxes must be a float or int tensor, got ", boxes.scalar_type());
  TORCH_CHECK_VALUE(out_h > 0 && out_w > 0, kOp, ": out_size must be positive, got (", out_h, ", ", out_w, ")");
  TORCH_CHECK_VALUE(images.size(2) > 0 && images.size(3) > 0, kOp, ": images must not be empty, got ", images.sizes());
  // source and output coordinates are float32 here: exact for integers up to 2^24 only
  constexpr int64_t kMaxSide = int64_t{1} << 24;
  TORCH_CHECK_VALUE(images.size(2) <= kMaxSide && images.size(3) <= kMaxSide, kOp,
                    ": H and W must be at most 16777216, got ", images.size(2), "x", images.size(3));
  TORCH_CHECK_VALUE(out_h <= kMaxSide && out_w <= kMaxSide, kOp,
                    ": out_size must be at most 16777216 a side, got (", out_h, ", ", out_w, ")");
  TORCH_CHECK_VALUE(images.device().is_cpu() && boxes.device().is_cpu() && flips.device().is_cpu(), kOp,
                    ": this kernel runs on CPU tensors");
  const at::ScalarType it = images.scalar_type();
  const at::ScalarType ot = out_dtype.value_or(it);
  const bool low_float = ot == at::kFloat || ot == at::kHalf || ot == at::kBFloat16;
  TORCH_CHECK_TYPE(ot == it || (it != at::kDouble && low_float), kOp,
                    ": out_dtype must be the images' dtype or float32/float16/bfloat16 (images ", it, ", out_dtype ", ot, ")");
  const at::ScalarType bt = it == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor b = boxes.to(bt).contiguous();
  const at::Tensor f = flips.contiguous();
  if (bt == at::kDouble) {
    check_boxes(b.const_data_ptr<double>(), N * P, P);
  } else {
    check_boxes(b.const_data_ptr<float>(), N * P, P);
  }
  at::Tensor out = at::empty({N * P, images.size(1), out_h, out_w}, images.options().dtype(ot));
  if (out.numel() == 0) return out;
  dispatch_image(it, "images", [&](auto itag) {
    using scalar_t = decltype(itag);
    dispatch_image(ot, "out_dtype", [&](auto otag) {
      using out_t = decltype(otag);
      if constexpr (std::is_same_v<scalar_t, double> == std::is_same_v<out_t, double> &&
                    (std::is_same_v<out_t, uint8_t> <= std::is_same_v<scalar_t, uint8_t>)) {
        run<scalar_t, out_t>(images, b, f, out, P, out_h, out_w);
      } else {
        TORCH_INTERNAL_ASSERT(false, kOp, ": dtype pair not dispatched");  // excluded by the check above
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(effssl_kernels, CPU, m) { m.impl("multi_crop", &multi_crop_cpu); }

}  // namespace effssl
