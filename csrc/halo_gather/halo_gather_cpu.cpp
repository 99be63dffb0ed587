// halo_gather on the CPU (SEMANTICS.md section 2): each packed tile [C, bh, bw] with a border of
// halo pixels read from its neighbour tiles. A table [T, ph, pw] (built once per mask, stride and
// halo by sparse/tiles.py) names, for each padded pixel, the source pixel s = t*bh*bw + y*bw + x,
// or S = T*bh*bw (a removed neighbour: zero) or S + 1 (outside the image: `outside`).
// Forward: parallel over padded pixels, C channels copied per pixel; channels last out, any
// layout in (read through the strides unless channels last).
// Backward, deterministic and without atomics: the inverse table (padded pixels sorted by source,
// `order`, in runs `offsets[s]:offsets[s+1]`) lets each source pixel sum the gradients of every
// padded pixel that read it, in a fixed order, in float32 (float64 for float64).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include <cstdint>

#include "effssl/checks.h"

namespace effssl {
namespace {

constexpr const char* kOp = "halo_gather";

void check_table(const at::Tensor& table, const at::Tensor& tiles) {
  EFFSSL_CHECK(table.scalar_type() == at::kLong, kOp, "table must be int64, got ",
               table.scalar_type());
  EFFSSL_CHECK(table.dim() == 3, kOp, "table must be 3-D [R, ph, pw], got ", table.sizes());
  EFFSSL_CHECK(table.device() == tiles.device(), kOp, "table must be on the device of tiles");
}

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Where pixel p (flat over [T, bh, bw]) of a [T, C, bh, bw] tensor keeps its C channels.
struct PixelLayout {
  int64_t C, bh, bw, sT, sC, sH, sW;
  bool cl;  // channels-last contiguous: pixel p's channels are the C values at p * C
  explicit PixelLayout(const at::Tensor& t)
      : C(t.size(1)), bh(t.size(2)), bw(t.size(3)), sT(t.stride(0)), sC(t.stride(1)),
        sH(t.stride(2)), sW(t.stride(3)),
        cl(t.is_contiguous(at::MemoryFormat::ChannelsLast) || t.numel() == 0) {}
  int64_t base(int64_t p) const {  // two divisions per pixel, shared by its C channels
    if (cl) return p * C;
    const int64_t n = p / (bh * bw), yx = p - n * (bh * bw), y = yx / bw;
    return n * sT + y * sH + (yx - y * bw) * sW;
  }
  template <typename T, typename F>
  void for_channels(const T* x, int64_t p, F f) const {
    const T* q = x + base(p);
    if (cl) {
      for (int64_t c = 0; c < C; ++c) f(c, q[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) f(c, q[c * sC]);
    }
  }
  template <typename T>
  void copy_pixel(const T* x, int64_t p, T* o) const {
    if (cl) {
      std::copy(x + p * C, x + (p + 1) * C, o);
    } else {
      for_channels(x, p, [o](int64_t c, T v) { o[c] = v; });
    }
  }
};

at::Tensor halo_gather_cpu(const at::Tensor& tiles, const at::Tensor& table,
                           const at::Tensor& /*order*/, const at::Tensor& /*offsets*/,
                           double outside) {
  EFFSSL_CHECK(tiles.dim() == 4, kOp, "tiles must be 4-D [T, C, bh, bw], got ", tiles.sizes());
  const auto dt = tiles.scalar_type();
  TORCH_CHECK_TYPE(is_float_kind(tiles) || dt == at::kDouble, kOp,
                   ": tiles must be float32, float64, float16 or bfloat16, got ", dt);
  check_table(table, tiles);
  const int64_t T = tiles.size(0), C = tiles.size(1), bh = tiles.size(2), bw = tiles.size(3);
  const int64_t R = table.size(0), ph = table.size(1), pw = table.size(2), S = T * bh * bw;
  at::Tensor out = at::empty({R, C, ph, pw},
                             tiles.options().memory_format(at::MemoryFormat::ChannelsLast));
  // No early return for an empty `out`: with C = 0 the loop below copies nothing but still
  // checks every table entry.
  const at::Tensor tab = table.contiguous();
  const int64_t* tp = tab.const_data_ptr<int64_t>();
  // Channels-last tiles (the usual case): source pixel s's C channels are the C values at
  // s * C, with no per-pixel index arithmetic. Any other layout (pack's dense NCHW map) is read
  // through its strides rather than copied to channels last whole: pack keeps a fraction of it.
  const PixelLayout src(tiles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tiles.scalar_type(), kOp, [&] {
    const scalar_t* xp = tiles.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();  // channels last: padded pixel r at r * C
    const scalar_t fill = static_cast<scalar_t>(outside);
    at::parallel_for(0, R * ph * pw, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t s = tp[r];
        scalar_t* o = op + r * C;
        if (s >= 0 && s < S) {
          src.copy_pixel(xp, s, o);
        } else {  // S: removed neighbour, S + 1: outside the image
          TORCH_CHECK(s == S || s == S + 1, kOp, ": table entry ", s, " is outside [0, ", S + 2, ")");
          std::fill(o, o + C, s == S ? static_cast<scalar_t>(0) : fill);
        }
      }
    });
  });
  return out;
}

at::Tensor halo_gather_backward_cpu(const at::Tensor& grad, const at::Tensor& order,
                                    const at::Tensor& offsets, int64_t num_tiles, int64_t bh,
                                    int64_t bw) {
  EFFSSL_CHECK(grad.dim() == 4, kOp, "grad must be 4-D [R, C, ph, pw], got ", grad.sizes());
  EFFSSL_CHECK(order.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong, kOp,
               "order and offsets must be int64");
  const int64_t R = grad.size(0), C = grad.size(1), ph = grad.size(2), pw = grad.size(3);
  const int64_t T = num_tiles;
  EFFSSL_CHECK(T >= 0 && bh >= 1 && bw >= 1, kOp, "bad tile shape ", T, " x ", bh, " x ", bw);
  // T * bh * bw + 1 must not overflow int64 (a garbage num_tiles would wrap to a small S)
  EFFSSL_CHECK(bh <= INT64_MAX / bw && T <= (INT64_MAX - 1) / (bh * bw), kOp, "tile shape ", T, " x ",
               bh, " x ", bw, " is too large");
  const int64_t S = T * bh * bw;
  EFFSSL_CHECK(offsets.dim() == 1 && offsets.size(0) == S + 1, kOp, "offsets must be [",
               S + 1, "], got ", offsets.sizes());
  EFFSSL_CHECK(order.dim() == 1 && order.size(0) <= R * ph * pw, kOp,
               "order must be 1-D with at most ", R * ph * pw, " entries, got ", order.sizes());
  at::Tensor gt = at::empty({T, C, bh, bw},
                            grad.options().memory_format(at::MemoryFormat::ChannelsLast));
  const at::Tensor ord = order.contiguous(), off = offsets.contiguous();
  const int64_t* orp = ord.const_data_ptr<int64_t>();
  const int64_t* ofp = off.const_data_ptr<int64_t>();
  const int64_t M = ord.size(0);
  const int64_t Q = R * ph * pw;
  // The checks of the tables' values, where they are read: run s's bounds, order entry j.
  const auto run_of = [&](int64_t s) {
    const int64_t lo = ofp[s], hi = ofp[s + 1];
    TORCH_CHECK(0 <= lo && lo <= hi && hi <= M, kOp, ": offsets are not a partition of order");
    return std::pair<int64_t, int64_t>(lo, hi);
  };
  const auto entry = [&](int64_t j) {
    const int64_t q = orp[j];
    TORCH_CHECK(0 <= q && q < Q, kOp, ": order entry ", q, " out of range");
    return q;
  };
  if (gt.numel() == 0) {  // C == 0: nothing summed, but bad tables are refused as with C > 0
    for (int64_t s = 0; s < S; ++s) {
      const auto [lo, hi] = run_of(s);
      for (int64_t j = lo; j < hi; ++j) entry(j);
    }
    return gt;
  }
  // As in the forward: read through the strides unless channels last (unpack's gradient is a
  // dense NCHW map, most of whose pixels no tile reads).
  const PixelLayout src(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), kOp, [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = gt.data_ptr<scalar_t>();  // channels last: source pixel s at s * C
    at::parallel_for(0, S, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
      std::vector<acc> a(C);
      for (int64_t s = begin; s < end; ++s) {
        const auto [lo, hi] = run_of(s);
        scalar_t* o = op + s * C;
        if (hi - lo == 1 && std::is_same_v<scalar_t, acc>) {  // read once: a copy
          src.copy_pixel(gp, entry(lo), o);
          continue;
        }
        std::fill(a.begin(), a.end(), acc(0));
        for (int64_t j = lo; j < hi; ++j)
          src.for_channels(gp, entry(j), [&a](int64_t c, scalar_t v) { a[c] += static_cast<acc>(v); });
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(a[c]);
      }
    });
  });
  return gt;
}

}  // namespace

TORCH_LIBRARY_IMPL(effssl_kernels, CPU, m) {
  m.impl("halo_gather", &halo_gather_cpu);
  m.impl("halo_gather_backward", &halo_gather_backward_cpu);
}

}  // namespace effssl
