// photometric on the CPU: the per-sample colour chain of effssl_kernels/reference/photometric.py
// (jitter in the sample's order, grayscale, separable gaussian blur, solarize, normalise) in one
// pass per view. Each sample is loaded once into three float32 planes (uint8 as integer levels),
// every op runs plane-wise in float32 with the reference's roundings (uint8 truncated to a level
// after each op as torchvision does), and the result is rounded once into the output.
// Parallel over samples. Views are read through their strides (any layout); the output is
// contiguous, or channels_last when the views are.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace effssl {
namespace {

constexpr const char* kOp = "photometric";
constexpr int64_t kCols = 13;  // packed row: see pack_params in effssl_kernels/ops/photometric.py
enum Col { BRIGHT = 0, CONTRAST, SAT, HUE, ORDER, JITTER = 8, GRAY, BLUR, SOLARIZE, THRESH };

// Constants as torch uses them: a Python float (double) cast to the float32 opmath type.
const float kR = static_cast<float>(0.2989), kG = static_cast<float>(0.587), kB = static_cast<float>(0.114);
const float kInv255 = static_cast<float>(1.0 / 255);
const float kSixth = static_cast<float>(1.0 / 6.0);
const float kHueOut = static_cast<float>(255 + 1.0 - 1e-3);  // (y * 255.999).to(uint8)

// a + b * c rounded once to float32. b * c is exact in double, so this is the reference's
// float64 emulation of torch's fused add-with-alpha, and it vectorizes (std::fma is a libm call
// on baseline x86-64). It differs from a true fma only through double rounding (~2^-29 odds).
inline float fmadd(float a, float b, float c) {
  return static_cast<float>(static_cast<double>(a) + static_cast<double>(b) * static_cast<double>(c));
}

// torchvision's grayscale: r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).
inline float gray_of(float r, float g, float b) { return fmadd(fmadd(r * kR, g, kG), b, kB); }

// Branch-free helpers. GCC (-ftrapping-math) turns a ?: whose result feeds more arithmetic
// into branches, which neither vectorize nor predict on image data; a select through bit masks
// stays a select (and vectorizes to and/andnot/or).
inline uint32_t ubits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float fbits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t mask_of(bool c) { return static_cast<uint32_t>(-static_cast<int32_t>(c)); }
inline float sel(bool c, float a, float b) {  // c ? a : b
  const uint32_t m = mask_of(c);
  return fbits((ubits(a) & m) | (ubits(b) & ~m));
}
inline float one_if(bool c) { return fbits(mask_of(c) & 0x3f800000u); }  // c ? 1.f : 0.f
inline float max_f(float a, float b) { return sel(a < b, b, a); }  // std::max (NaN a kept)
inline float min_f(float a, float b) { return sel(b < a, b, a); }  // std::min

// Round half to even for |v| < 2^22 (and 0 <= v < 2^23): adding and removing 2^23 rounds in
// the default rounding mode.
inline float round_even(float v) { return (v + 8388608.f) - 8388608.f; }

// Exact floor; floats with |v| >= 2^23 (and inf/NaN) are already integral.
inline float floor_f(float v) {
  const float m = std::copysign(8388608.f, v);
  const float r = (v + m) - m;
  return sel(std::fabs(v) < 8388608.f, r - one_if(r > v), v);
}

// .clamp_(0, 255).to(uint8) as a float level. Floor first, then clamp (the same for integer
// bounds): below 2^23 the floor is exact, above it (and inf) the clamp gives 255; NaN -> 0.
inline float to_level(float v) {
  const float r = round_even(v);
  v = r - one_if(r > v);
  return min_f(sel(v > 0.f, v, 0.f), 255.f);
}

inline float clamp01(float v) { return min_f(max_f(v, 0.f), 1.f); }  // torch clamp: NaN kept

// finish of brightness/contrast/saturation: clamp to [0, 1], or to a uint8 level.
template <bool kInt>
inline float finish(float v) { return kInt ? to_level(v) : clamp01(v); }

// One sample's packed recipe.
struct Recipe {
  float bright, contrast, sat, hue, thr;
  int order[4];
  bool jitter, gray, blur, solarize;
};

// torchvision's _rgb_to_hsv, h = (h + shift) mod 1, _hsv_to_rgb for one pixel, op by op in
// float32 (separate statements: each op rounds on its own, as the batched tensor ops do).
// Selects instead of branches so that the pixel loop vectorizes.
C10_ALWAYS_INLINE void hue_pixel(float& r, float& g, float& b, float shift) {
  const float maxc = max_f(max_f(r, g), b);
  const float minc = min_f(min_f(r, g), b);
  const bool eqc = maxc == minc;
  const float cr = maxc - minc;
  const float s = cr / sel(eqc, 1.f, maxc);
  const float crd = sel(eqc, 1.f, cr);
  const float rc = (maxc - r) / crd, gc = (maxc - g) / crd, bc = (maxc - b) / crd;
  const float hr = bc - gc;
  float hg = rc + 2.f;
  hg = hg - bc;
  float hb = gc + 4.f;
  hb = hb - rc;
  float h = sel(maxc == r, hr, sel(maxc == g, hg, hb));
  h = h * kSixth;
  h = h + 1.f;
  h = h - one_if(h >= 1.f);  // fmod(h, 1): h is in [5/6, 11/6] (rc, gc, bc are in [0, 1])
  h = h + shift;
  h = h - floor_f(h);  // torch remainder(h, 1), in [0, 1]
  // _hsv_to_rgb; i = floor(h * 6) is 0..6, and 6 is 0 after remainder(i, 6).
  const float v = maxc;
  const float h6 = h * 6.f;
  const float fi = floor_f(h6);
  const float f = h6 - fi;
  const float sxf = s * f;
  const float oms = 1.f - s;
  const float q = clamp01((1.f - sxf) * v);
  const float t = clamp01((sxf + oms) * v);
  const float p = clamp01(oms * v);
  // r = [v,q,p,p,t,v][i], g = [t,v,v,q,p,p][i], b = [p,p,t,v,v,q][i]
  r = sel(fi == 1.f, q, sel(fi == 2.f || fi == 3.f, p, sel(fi == 4.f, t, v)));
  g = sel(fi == 1.f || fi == 2.f, v, sel(fi == 3.f, q, sel(fi == 4.f || fi == 5.f, p, t)));
  b = sel(fi == 2.f, t, sel(fi == 3.f || fi == 4.f, v, sel(fi == 5.f, q, p)));
}

// Per-thread scratch and the chain on one sample's planes.
template <bool kInt>
struct Chain {
  int64_t H, W, HW;
  std::vector<float> planes, tmp, row;  // 3*HW, HW, W + 2*pad

  Chain(int64_t H_, int64_t W_, int64_t K) : H(H_), W(W_), HW(H_ * W_), planes(3 * HW), tmp(HW), row(W + K) {}

  float* R() { return planes.data(); }
  float* G() { return planes.data() + HW; }
  float* B() { return planes.data() + 2 * HW; }

  void brightness(float f) {
    float* p = planes.data();
    for (int64_t i = 0; i < 3 * HW; ++i) p[i] = finish<kInt>(p[i] * f);
  }

  // gray of a pixel, floored for uint8 (torchvision floors before blending and in grayscale).
  static float gray_level(float r, float g, float b) {
    const float y = gray_of(r, g, b);
    return kInt ? to_level(y) : y;
  }

  void contrast(float c) {
    const float *r = R(), *g = G(), *b = B();
    // Four partial sums so the loop pipelines (exact for uint8 levels; for floats the order
    // only moves the double sum by ~1e-16 relative).
    double acc[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= HW; i += 4)
      for (int k = 0; k < 4; ++k) acc[k] += gray_level(r[i + k], g[i + k], b[i + k]);
    for (; i < HW; ++i) acc[0] += gray_level(r[i], g[i], b[i]);
    const double sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    const float mean = static_cast<float>(sum / static_cast<double>(HW));
    const float alpha = 1.f - c;
    float* p = planes.data();
    for (i = 0; i < 3 * HW; ++i) p[i] = finish<kInt>(fmadd(p[i] * c, mean, alpha));
  }

  void saturation(float s) {
    float *r = R(), *g = G(), *b = B();
    const float alpha = 1.f - s;
    for (int64_t i = 0; i < HW; ++i) {
      const float y = gray_level(r[i], g[i], b[i]);
      r[i] = finish<kInt>(fmadd(r[i] * s, y, alpha));
      g[i] = finish<kInt>(fmadd(g[i] * s, y, alpha));
      b[i] = finish<kInt>(fmadd(b[i] * s, y, alpha));
    }
  }

  void hue(float shift) {
    float *r = R(), *g = G(), *b = B();
    for (int64_t i = 0; i < HW; ++i) {
      float x = r[i], y = g[i], z = b[i];
      if constexpr (kInt) x *= kInv255, y *= kInv255, z *= kInv255;
      hue_pixel(x, y, z, shift);
      if constexpr (kInt) x = to_level(x * kHueOut), y = to_level(y * kHueOut), z = to_level(z * kHueOut);
      r[i] = x, g[i] = y, b[i] = z;
    }
  }

  void grayscale() {
    float *r = R(), *g = G(), *b = B();
    for (int64_t i = 0; i < HW; ++i) {
      r[i] = g[i] = b[i] = gray_level(r[i], g[i], b[i]);
    }
  }

  // Separable convolution with reflect padding (index -1 -> 1, H -> H-2): rows into tmp, then
  // columns back into the plane. uint8 rounds half to even (torch round_).
  void blur(const float* w, int64_t K) {
    const int64_t pad = K / 2;
    auto reflect = [](int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); };
    for (int c = 0; c < 3; ++c) {
      float* p = planes.data() + c * HW;
      for (int64_t y = 0; y < H; ++y) {
        const float* src = p + y * W;
        float* buf = row.data();
        for (int64_t x = -pad; x < W + pad; ++x) buf[x + pad] = src[reflect(x, W)];
        float* o = tmp.data() + y * W;
        for (int64_t x = 0; x < W; ++x) o[x] = w[0] * buf[x];
        for (int64_t j = 1; j < K; ++j) {
          const float wj = w[j];
          const float* bj = buf + j;
          for (int64_t x = 0; x < W; ++x) o[x] += wj * bj[x];
        }
      }
      for (int64_t y = 0; y < H; ++y) {
        float* o = p + y * W;
        const float* t0 = tmp.data() + reflect(y - pad, H) * W;
        for (int64_t x = 0; x < W; ++x) o[x] = w[0] * t0[x];
        for (int64_t j = 1; j < K; ++j) {
          const float wj = w[j];
          const float* tj = tmp.data() + reflect(y - pad + j, H) * W;
          for (int64_t x = 0; x < W; ++x) o[x] += wj * tj[x];
        }
        if constexpr (kInt) {
          // Clamp (only user-made weights can leave [0, 255]; it keeps the uint8 cast defined),
          // then round half to even.
          for (int64_t x = 0; x < W; ++x) o[x] = round_even(min_f(sel(o[x] > 0.f, o[x], 0.f), 255.f));
        }
      }
    }
  }

  // uint8: x >= thr * 255 ? 255 - x (bitwise_not) : x.
  void solarize(float thr) {
    const float t = kInt ? thr * 255.f : thr, top = kInt ? 255.f : 1.f;
    float* p = planes.data();
    for (int64_t i = 0; i < 3 * HW; ++i) p[i] = sel(p[i] >= t, top - p[i], p[i]);
  }

  // uint8 first to [0, 1] as to_dtype(scale=True): x * (1/255).
  void normalise(const float* mean, const float* stdv) {
    for (int c = 0; c < 3; ++c) {
      float* p = planes.data() + c * HW;
      const float m = mean[c], sd = stdv[c];
      for (int64_t i = 0; i < HW; ++i) {
        const float v = kInt ? p[i] * kInv255 : p[i];
        p[i] = (v - m) / sd;
      }
    }
  }

  void run(const Recipe& rc, const float* w, int64_t K, const float* mean, const float* stdv) {
    if (rc.jitter) {
      for (int slot = 0; slot < 4; ++slot) {
        switch (rc.order[slot]) {
          case 0: brightness(rc.bright); break;
          case 1: contrast(rc.contrast); break;
          case 2: saturation(rc.sat); break;
          default:
            if (rc.hue != 0.f) hue(rc.hue);  // ColorJitter skips a hue shift of 0
        }
      }
    }
    if (rc.gray) grayscale();
    if (rc.blur) blur(w, K);
    if (rc.solarize) solarize(rc.thr);
    if (mean != nullptr) normalise(mean, stdv);
  }
};

// uint8 out: v is already a level in [0, 255].
template <typename out_t>
inline out_t store(float v) {
  if constexpr (std::is_same_v<out_t, uint8_t>) return static_cast<uint8_t>(static_cast<int32_t>(v));
  else return static_cast<out_t>(v);
}

template <typename in_t, typename out_t>
void run(const at::Tensor& views, const std::vector<Recipe>& recipes, const at::Tensor& weights,
         const std::optional<at::Tensor>& norm, at::Tensor& out) {
  constexpr bool kInt = std::is_same_v<in_t, uint8_t>;
  const int64_t N = views.size(0), H = views.size(2), W = views.size(3), K = weights.size(1);
  const int64_t sn = views.stride(0), sc = views.stride(1), sh = views.stride(2), sw = views.stride(3);
  const int64_t on = out.stride(0), oc = out.stride(1), oh = out.stride(2), ow = out.stride(3);
  const in_t* ip = views.const_data_ptr<in_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  const float* wp = weights.const_data_ptr<float>();  // [N, K] contiguous
  float mean[3] = {0, 0, 0}, stdv[3] = {1, 1, 1};
  const bool has_norm = norm.has_value();
  if (has_norm) {
    const float* np_ = norm->const_data_ptr<float>();  // [2, 3] contiguous
    for (int c = 0; c < 3; ++c) mean[c] = np_[c], stdv[c] = np_[3 + c];
  }

  at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
    Chain<kInt> chain(H, W, K);
    for (int64_t n = lo; n < hi; ++n) {
      const Recipe& rc = recipes[n];
      for (int c = 0; c < 3; ++c) {
        float* p = chain.planes.data() + c * chain.HW;
        const in_t* src = ip + n * sn + c * sc;
        for (int64_t y = 0; y < H; ++y, p += W) {
          const in_t* s = src + y * sh;
          if (sw == 1) {  // rows in place: a loop the compiler vectorizes
            for (int64_t x = 0; x < W; ++x) p[x] = static_cast<float>(s[x]);
          } else {
            for (int64_t x = 0; x < W; ++x) p[x] = static_cast<float>(s[x * sw]);
          }
        }
      }
      chain.run(rc, wp + n * K, K, has_norm ? mean : nullptr, stdv);
      // The one rounding into the output dtype.
      for (int c = 0; c < 3; ++c) {
        const float* p = chain.planes.data() + c * chain.HW;
        out_t* dst = op + n * on + c * oc;
        for (int64_t y = 0; y < H; ++y, p += W) {
          out_t* d = dst + y * oh;
          if (ow == 1) {
            for (int64_t x = 0; x < W; ++x) d[x] = store<out_t>(p[x]);
          } else {
            for (int64_t x = 0; x < W; ++x) d[x * ow] = store<out_t>(p[x]);
          }
        }
      }
    }
  });
}

at::Tensor photometric_cpu(const at::Tensor& views, const at::Tensor& params, const at::Tensor& blur_weights,
                           const std::optional<at::Tensor>& norm) {
  TORCH_CHECK_VALUE(views.dim() == 4 && views.size(1) == 3, kOp, ": views must be [N, 3, H, W], got ",
                    views.sizes());
  const at::ScalarType vt = views.scalar_type();
  TORCH_CHECK_TYPE(vt == at::kFloat || vt == at::kHalf || vt == at::kBFloat16 || vt == at::kByte, kOp,
                   ": views must be float32, float16, bfloat16 or uint8, got ", vt);
  const int64_t N = views.size(0), H = views.size(2), W = views.size(3);
  TORCH_CHECK_VALUE(views.device().is_cpu() && params.device().is_cpu() && blur_weights.device().is_cpu() &&
                        (!norm.has_value() || norm->device().is_cpu()),
                    kOp, ": this kernel runs on CPU tensors");
  TORCH_CHECK_TYPE(params.scalar_type() == at::kFloat, kOp, ": params must be float32, got ", params.scalar_type());
  TORCH_CHECK_VALUE(params.dim() == 2 && params.size(0) == N && params.size(1) == kCols, kOp,
                    ": params must be [N, 13] with N = ", N, ", got ", params.sizes());
  TORCH_CHECK_TYPE(blur_weights.scalar_type() == at::kFloat, kOp, ": blur_weights must be float32, got ",
                   blur_weights.scalar_type());
  TORCH_CHECK_VALUE(blur_weights.dim() == 2 && blur_weights.size(0) == N, kOp,
                    ": blur_weights must be [N, K] with N = ", N, ", got ", blur_weights.sizes());
  const int64_t K = blur_weights.size(1);
  TORCH_CHECK_VALUE(K >= 1 && K % 2 == 1, kOp, ": the blur kernel size K must be odd and >= 1, got ", K);
  if (norm.has_value()) {
    TORCH_CHECK_TYPE(norm->scalar_type() == at::kFloat, kOp, ": norm must be float32, got ", norm->scalar_type());
    TORCH_CHECK_VALUE(norm->dim() == 2 && norm->size(0) == 2 && norm->size(1) == 3, kOp,
                      ": norm must be [2, 3] (mean; std), got ", norm->sizes());
  }

  // The [N, 13] rows, checked once here (small: a copy is cheap).
  const at::Tensor pc = params.contiguous();
  const float* pp = pc.const_data_ptr<float>();
  std::vector<Recipe> recipes(N);
  bool any_blur = false;
  for (int64_t n = 0; n < N; ++n) {
    const float* q = pp + n * kCols;
    Recipe& rc = recipes[n];
    rc.bright = q[BRIGHT], rc.contrast = q[CONTRAST], rc.sat = q[SAT], rc.hue = q[HUE], rc.thr = q[THRESH];
    rc.jitter = q[JITTER] != 0.f, rc.gray = q[GRAY] != 0.f, rc.blur = q[BLUR] != 0.f;
    rc.solarize = q[SOLARIZE] != 0.f;
    for (int s = 0; s < 4; ++s) {
      const float o = q[ORDER + s];
      TORCH_CHECK_VALUE(o == 0.f || o == 1.f || o == 2.f || o == 3.f, kOp, ": params[", n, ", ", ORDER + s,
                        "] (jitter order slot ", s, ") must be an op id 0..3 (brightness, contrast, saturation, hue), got ",
                        o);
      rc.order[s] = static_cast<int>(o);
    }
    any_blur = any_blur || rc.blur;
  }
  TORCH_CHECK_VALUE(!any_blur || K / 2 < std::min(H, W), kOp, ": blur kernel ", K, " needs views larger than ", K / 2,
                    " px for reflect padding, got ", H, "x", W);

  const bool channels_last = views.is_contiguous(at::MemoryFormat::ChannelsLast) && !views.is_contiguous();
  const at::ScalarType ot = (vt == at::kByte && norm.has_value()) ? at::kFloat : vt;
  at::Tensor out = at::empty(views.sizes(), views.options().dtype(ot).memory_format(
                                                channels_last ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor wc = blur_weights.contiguous();
  std::optional<at::Tensor> nc;
  if (norm.has_value()) nc = norm->contiguous();

  switch (vt) {
    case at::kFloat: run<float, float>(views, recipes, wc, nc, out); break;
    case at::kHalf: run<at::Half, at::Half>(views, recipes, wc, nc, out); break;
    case at::kBFloat16: run<at::BFloat16, at::BFloat16>(views, recipes, wc, nc, out); break;
    default:
      if (nc.has_value()) {
        run<uint8_t, float>(views, recipes, wc, nc, out);
      } else {
        run<uint8_t, uint8_t>(views, recipes, wc, nc, out);
      }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(effssl_kernels, CPU, m) { m.impl("photometric", &photometric_cpu); }

}  // namespace effssl
