// block_match on the CPU: direct float32 (a - b)^2 per candidate, parallel over blocks.
// Direct (not the a^2+b^2-2ab identity) because it is exact and the CPU has no FLOPs to spare
// on a re-score; the search visits every candidate, keeping the (key, rank) minimum.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/index_copy.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/nonzero.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "block_match_args.h"

namespace effssl {
namespace {

constexpr int kTileDx = 16;  // candidates along x scored together: the inner loop vectorises

// Sum of squared differences of one B x B x C block of a against `n` (< kTileDx, the tail of
// a row of candidates; full tiles take tile_ssd16 below, in the same order of operations)
// horizontally consecutive candidates starting at pb. The loop runs over candidates innermost,
// so each template value meets the window values of every candidate; per-row partial sums keep
// the float32 error of a long chain small.
inline void tile_ssd(const float* pa, const float* pb, int64_t plane, int W, int C, int B,
                     int n, float* out) {
  float total[kTileDx] = {};
  for (int c = 0; c < C; ++c) {
    const float* ra = pa + c * plane;
    const float* rb = pb + c * plane;
    for (int ky = 0; ky < B; ++ky, ra += W, rb += W) {
      float row[kTileDx] = {};
      for (int kx = 0; kx < B; ++kx) {
        const float t = ra[kx];
        for (int j = 0; j < n; ++j) {
          const float d = t - rb[kx + j];
          row[j] += d * d;
        }
      }
      for (int j = 0; j < n; ++j) total[j] += row[j];
    }
  }
  for (int j = 0; j < n; ++j) out[j] = total[j];
}

// Tiles of 4 * NV candidates with their accumulators in NV explicit 4-float vectors (GCC/Clang
// vector extensions, SSE on any x86-64): written as the loop above, GCC keeps the 16 partial sums
// in memory and spills every iteration (measured 6-9 GFLOP/s per core vs 17 for this form).
// Every candidate's sum runs in the same order of operations in every tile width (and in
// tile_ssd), so a candidate scored by two tiles gets the same value twice.
typedef float v4f __attribute__((vector_size(16)));
static_assert(kTileDx == 16, "the widest tile is four 4-float vectors of candidates");

inline v4f loadu4(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof v);  // an unaligned load
  return v;
}

template <int NV>
inline void tile_ssd_vec(const float* pa, const float* pb, int64_t plane, int W, int C, int B,
                         float* out) {
  v4f total[NV] = {};
  for (int c = 0; c < C; ++c) {
    const float* ra = pa + c * plane;
    const float* rb = pb + c * plane;
    for (int ky = 0; ky < B; ++ky, ra += W, rb += W) {
      v4f row[NV] = {};  // per-row partial sums, as in tile_ssd
      for (int kx = 0; kx < B; ++kx) {
        const float s = ra[kx];
        const v4f t = {s, s, s, s};
        const float* q = rb + kx;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          const v4f d = t - loadu4(q + 4 * v);
          row[v] += d * d;
        }
      }
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) total[v] += row[v];
    }
  }
  std::memcpy(out, total, sizeof total);
}

// Scores the candidates dx0 .. dx0 + count - 1 of one row into ssd[0 .. count): the widest tile
// that fits, and for a tail of 1-3 candidates a 4-wide tile ending at the row's last candidate
// (it re-scores up to 3 candidates already scored, never reads past the last one: the row may
// end at the tensor's end); `first` is where the tail's scores start in ssd. Returns the
// number of candidates consumed.
inline int score_tile(const float* pa, const float* pb, int64_t plane, int W, int C, int B, int count,
                      int row_count, float* ssd, int& first) {
  first = 0;
  if (count >= 16) return tile_ssd_vec<4>(pa, pb, plane, W, C, B, ssd), 16;
  if (count >= 8) return tile_ssd_vec<2>(pa, pb, plane, W, C, B, ssd), 8;
  if (count >= 4) return tile_ssd_vec<1>(pa, pb, plane, W, C, B, ssd), 4;
  if (row_count >= 4) {  // back up over scored candidates: one vector instead of a scalar tail
    first = 4 - count;
    tile_ssd_vec<1>(pa, pb - first, plane, W, C, B, ssd);
    return count;
  }
  tile_ssd(pa, pb, plane, W, C, B, count, ssd);
  return count;
}

// a, b: contiguous float32 [N, C, H, W], b already mirrored where flip is set.
void block_match_cpu_kernel(const float* a, const float* b, const BlockMatchParams& p) {
  const int B = p.block, r = p.radius, H = p.H, W = p.W, C = p.C;
  const int64_t plane = static_cast<int64_t>(H) * W;
  // int64: Hb * Wb passes 2^31 for B = 1 on a 46341^2 image (H, W may reach 2^24)
  const int64_t per_sample = static_cast<int64_t>(p.Hb) * p.Wb;
  const int64_t nblocks = p.N * per_sample;
  const float inv_count = 1.f / (static_cast<float>(C) * B * B);
  const float peak2 = p.data_range * p.data_range;
  const int64_t work = int64_t(2 * r + 1) * (2 * r + 1) * C * B * B;
  at::parallel_for(0, nblocks, std::max<int64_t>(1, 65536 / (work + 1)), [&](int64_t begin, int64_t end) {
    float ssd[kTileDx];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / per_sample;
      const int i = static_cast<int>((blk / p.Wb) % p.Hb), j = static_cast<int>(blk % p.Wb);
      const int64_t cy = p.centers ? p.centers[2 * blk] : int64_t(i) * B;
      const int64_t cx = p.centers ? p.centers[2 * blk + 1] : int64_t(j) * B;
      const DRange ry = block_match_drange(cy, H, B, r), rx = block_match_drange(cx, W, B, r);
      const float* pa = a + n * C * plane + int64_t(i) * B * W + int64_t(j) * B;
      float best_key = INFINITY, best_mse = INFINITY;
      int64_t best_rank = INT64_MAX;
      int best_dy = 0, best_dx = 0;
      for (int dy = ry.lo; dy <= ry.hi; ++dy) {
        const int row_count = rx.hi - rx.lo + 1;
        for (int dx0 = rx.lo, count; dx0 <= rx.hi; dx0 += count) {
          const float* pb = b + n * C * plane + (cy + dy) * W + (cx + dx0);
          int first;
          count = score_tile(pa, pb, plane, W, C, B, rx.hi - dx0 + 1, row_count, ssd, first);
          for (int t = 0; t < count; ++t) {
            const int dx = dx0 + t;
            const float mse = ssd[first + t] * inv_count;
            const float key = std::isnan(mse) ? -1.f : mse;
            const int64_t rank = block_match_rank(dy, dx, r);
            if (key < best_key || (key == best_key && rank < best_rank))
              best_key = key, best_mse = mse, best_rank = rank, best_dy = dy, best_dx = dx;
          }
        }
      }
      // best_mse stays +inf without a candidate: peak2 / inf = 0 -> -inf dB. A +inf mse (values
      // so large that the sum overflows) is no match either: offset (0, 0), as the reference.
      if (best_mse == INFINITY) best_dy = 0, best_dx = 0;
      p.psnr[blk] = 10.f * std::log10(peak2 / best_mse);
      p.offset[2 * blk] = best_dy;
      p.offset[2 * blk + 1] = best_dx;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> block_match_cpu(const at::Tensor& a, const at::Tensor& b,
                                                   int64_t block_size, int64_t search_radius,
                                                   double data_range,
                                                   const std::optional<at::Tensor>& centers,
                                                   const std::optional<at::Tensor>& flip) {
  BlockMatchParams p{};
  check_block_match(a, b, block_size, search_radius, data_range, centers, flip, p);
  auto [psnr, offset] = empty_block_match_outputs(a, p);
  if (psnr.numel() == 0) return {psnr, offset};
  const at::Tensor a32 = a.to(at::kFloat).contiguous();
  at::Tensor b32 = b.to(at::kFloat).contiguous();
  if (flip.has_value()) {
    // Mirror the flipped samples only, in b's float32 copy: no flips cost no copy; any flip a
    // copy of b when b is float32 contiguous already (the kernel reads one array), else none
    // beyond the conversion to float32 that is made anyway.
    const at::Tensor rows = at::nonzero(*flip).view({-1});
    if (rows.numel() > 0) {
      if (b32.data_ptr() == b.data_ptr()) b32 = b32.clone();  // never the caller's tensor
      b32.index_copy_(0, rows, at::flip(b32.index_select(0, rows), {3}));
    }
  }
  const auto c32 = prepare_centers(centers);
  p.centers = c32.has_value() ? c32->data_ptr<int32_t>() : nullptr;
  p.psnr = psnr.data_ptr<float>();
  p.offset = offset.data_ptr<int32_t>();
  block_match_cpu_kernel(a32.data_ptr<float>(), b32.data_ptr<float>(), p);
  return {psnr, offset};
}

}  // namespace

TORCH_LIBRARY_IMPL(effssl_kernels, CPU, m) { m.impl("block_match", &block_match_cpu); }

}  // namespace effssl
