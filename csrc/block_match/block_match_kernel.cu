// CUDA kernels of block_match (SEMANTICS.md section 1; design and numerics in
// shared/research/block_match.md sections 1, 4, 5, 6).
//
// Three kernels, chosen per call by the launcher at the bottom of this file:
//   bm_image_kernel  one CTA per sample with all of b' and the covered part of a in shared memory;
//                    one warp per block, lanes over candidates, direct fp32 (a-b)^2. For small
//                    images (CIFAR 3x32x32: 24 KB), where the work is latency-bound.
//   bm_tiled_kernel  the fast path: one CTA per (sample, block). The template (C x B x B) and the
//                    clipped search window are staged in shared memory as float32, centred by the
//                    template's per-channel mean; the cross term X[d] = sum T*W is a register-tiled
//                    FFMA loop, sum W^2 per displacement comes from box sums, and
//                    mse ~ (sum T^2 + sum W^2 - 2X) / (C*B*B) picks the winner, which is then
//                    re-scored with a direct fp32 (a-b)^2 pass.
//   bm_direct_kernel the fallback when even one channel of the tiled kernel's window does not fit in
//                    shared memory: one thread per candidate, direct fp32 (a-b)^2 read from global.
// Every kernel is deterministic run to run: fixed reduction orders and no atomics; the argmin
// compares (key, rank) pairs, a total order because every candidate has its own rank.
//
// Registers and spills for sm_90 are checked without a GPU by python_tests/test_cuda_ptxas.py.
//
// Setting EFFSSL_BLOCK_MATCH_CUDA_PATH=image|tiled|direct forces a kernel (tests and benchmarks;
// a forced kernel that cannot run the shape falls through to the next one in that order).
#include "block_match.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace effssl {
namespace {

// ------------------------------------------------------------------------------------------------
// Shared helpers
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Butterfly sum: every lane ends with the same value (each step adds the same two numbers on
// both lanes of a pair, and fp32 addition is commutative), in a fixed order.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// CTA-wide sum in a fixed order; every thread gets the result. `red` holds NW floats.
template <int NW>
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();  // `red` may still be read by a previous call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) s += red[w];
  return s;
}

// One candidate of the argmin. key = isnan(mse) ? -1 : mse (clamped >= 0 for the identity), so a
// NaN beats every number; among equal keys the smaller block_match_rank wins.
struct Cand {
  float key;
  long long rank;
  int dyi, dxi;  // index of the displacement inside the candidate grid of the block
  float mse;
};

__device__ __forceinline__ Cand cand_none() { return Cand{INFINITY, LLONG_MAX, 0, 0, INFINITY}; }

__device__ __forceinline__ bool cand_less(float ka, long long ra, float kb, long long rb) {
  return ka < kb || (ka == kb && ra < rb);
}

__device__ __forceinline__ void warp_argmin(Cand& c) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float k = __shfl_xor_sync(0xffffffffu, c.key, o);
    const long long r = __shfl_xor_sync(0xffffffffu, c.rank, o);
    const int y = __shfl_xor_sync(0xffffffffu, c.dyi, o);
    const int x = __shfl_xor_sync(0xffffffffu, c.dxi, o);
    const float m = __shfl_xor_sync(0xffffffffu, c.mse, o);
    if (cand_less(k, r, c.key, c.rank)) c = Cand{k, r, y, x, m};
  }
}

struct ArgminScratch {
  float key[32];
  long long rank[32];
  int dyi[32], dxi[32];
  float mse[32];
};

// CTA-wide argmin; every thread gets the winner.
template <int NW>
__device__ __forceinline__ Cand block_argmin(Cand c, ArgminScratch& s) {
  warp_argmin(c);
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // the scratch may still be read by a previous call
  if ((threadIdx.x & 31) == 0) {
    s.key[warp] = c.key;
    s.rank[warp] = c.rank;
    s.dyi[warp] = c.dyi;
    s.dxi[warp] = c.dxi;
    s.mse[warp] = c.mse;
  }
  __syncthreads();
  Cand r = Cand{s.key[0], s.rank[0], s.dyi[0], s.dxi[0], s.mse[0]};
#pragma unroll
  for (int w = 1; w < NW; ++w)
    if (cand_less(s.key[w], s.rank[w], r.key, r.rank)) r = Cand{s.key[w], s.rank[w], s.dyi[w], s.dxi[w], s.mse[w]};
  return r;
}

// Writes one block's result. A winner whose mse is +inf is what the reference reports as
// "no candidate beat the initial +inf": psnr -inf and offset (0, 0); the no-candidate case also
// comes here with mse = +inf. mse 0 gives +inf dB, NaN gives NaN.
__device__ __forceinline__ void write_result(const BlockMatchParams& p, long long o, float mse, int dy, int dx) {
  float psnr;
  if (mse == INFINITY) {
    psnr = -INFINITY;
    dy = 0;
    dx = 0;
  } else {
    psnr = 10.f * log10f((p.data_range * p.data_range) / mse);
  }
  p.psnr[o] = psnr;
  p.offset[2 * o] = dy;
  p.offset[2 * o + 1] = dx;
}

// Where block `bid` = (n * Hb + i) * Wb + j searches.
struct BlockLoc {
  int n, i, j;
  long long cy, cx;  // search centre in b' (b mirrored back when flipped); any int32 value
  DRange ry, rx;     // candidate displacements per axis (lo > hi: none)
  bool fl;
};

__device__ __forceinline__ BlockLoc locate(const BlockMatchParams& p, long long bid) {
  BlockLoc l;
  const long long hw = static_cast<long long>(p.Hb) * p.Wb;
  const long long n = bid / hw;
  const long long rem = bid - n * hw;
  l.n = static_cast<int>(n);
  l.i = static_cast<int>(rem / p.Wb);
  l.j = static_cast<int>(rem - static_cast<long long>(l.i) * p.Wb);
  if (p.centers != nullptr) {
    l.cy = p.centers[2 * bid];
    l.cx = p.centers[2 * bid + 1];
  } else {
    l.cy = static_cast<long long>(l.i) * p.block;
    l.cx = static_cast<long long>(l.j) * p.block;
  }
  l.ry = block_match_drange(l.cy, p.H, p.block, p.radius);
  l.rx = block_match_drange(l.cx, p.W, p.block, p.radius);
  l.fl = p.flip != nullptr && p.flip[l.n];
  return l;
}

// ------------------------------------------------------------------------------------------------
// bm_image_kernel: small images, one CTA per sample
// ------------------------------------------------------------------------------------------------

constexpr int kImageThreads = 256;
constexpr int kImageWarps = kImageThreads / 32;
constexpr long long kImageSmemAuto = 48 * 1024;  // the image path is taken automatically up to this

template <typename T>
__global__ void __launch_bounds__(kImageThreads) bm_image_kernel(const BlockMatchParams p) {
  extern __shared__ float4 dsm_image[];
  float* sm = reinterpret_cast<float*>(dsm_image);
  const int B = p.block, C = p.C, H = p.H, W = p.W;
  const int Hc = p.Hb * B, Wc = p.Wb * B;  // part of a covered by blocks
  float* as = sm;                          // [C][Hc][Wc]
  float* bs = sm + C * Hc * Wc;            // [C][H][W], b' (already mirrored back when flipped)
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
  const int nblk = p.Hb * p.Wb;
  const float cbb = static_cast<float>(static_cast<long long>(C) * B * B);

  for (int n = blockIdx.x; n < p.N; n += gridDim.x) {
    const bool fl = p.flip != nullptr && p.flip[n];
    __syncthreads();  // the previous sample is done with the buffers
    const int hw = H * W;
    for (int idx = t; idx < C * hw; idx += kImageThreads) {
      const int c = idx / hw, rem = idx - c * hw;
      const int y = rem / W, x = rem - y * W;
      const int gx = fl ? W - 1 - x : x;
      bs[idx] = to_float(b[n * p.sb[0] + c * p.sb[1] + y * p.sb[2] + gx * p.sb[3]]);
    }
    const int hwc = Hc * Wc;
    for (int idx = t; idx < C * hwc; idx += kImageThreads) {
      const int c = idx / hwc, rem = idx - c * hwc;
      const int y = rem / Wc, x = rem - y * Wc;
      as[idx] = to_float(a[n * p.sa[0] + c * p.sa[1] + y * p.sa[2] + x * p.sa[3]]);
    }
    __syncthreads();

    for (int blk = warp; blk < nblk; blk += kImageWarps) {  // warp-uniform loop
      const long long o = static_cast<long long>(n) * nblk + blk;
      const BlockLoc l = locate(p, o);
      if (l.ry.lo > l.ry.hi || l.rx.lo > l.rx.hi) {
        if (lane == 0) write_result(p, o, INFINITY, 0, 0);
        continue;
      }
      const int Dy = l.ry.hi - l.ry.lo + 1, Dx = l.rx.hi - l.rx.lo + 1;
      const int nc = Dy * Dx;  // <= H * W here
      Cand best = cand_none();
      // Lanes take consecutive dx of one dy: their b' reads are consecutive words, the a reads
      // one broadcast word.
      for (int q = lane; q < nc; q += 32) {
        const int dyi = q / Dx, dxi = q - dyi * Dx;
        const int dy = l.ry.lo + dyi, dx = l.rx.lo + dxi;
        const int y0 = static_cast<int>(l.cy + dy), x0 = static_cast<int>(l.cx + dx);
        float s = 0.f;
        for (int c = 0; c < C; ++c) {
          for (int ky = 0; ky < B; ++ky) {
            const float* ar = as + (c * Hc + l.i * B + ky) * Wc + l.j * B;
            const float* br = bs + (c * H + y0 + ky) * W + x0;
            for (int kx = 0; kx < B; ++kx) {
              const float d = ar[kx] - br[kx];
              s = fmaf(d, d, s);
            }
          }
        }
        const float mse = s / cbb;
        const float key = isnan(mse) ? -1.f : mse;
        const long long rank = block_match_rank(dy, dx, p.radius);
        if (cand_less(key, rank, best.key, best.rank)) best = Cand{key, rank, dyi, dxi, mse};
      }
      warp_argmin(best);
      if (lane == 0) write_result(p, o, best.mse, l.ry.lo + best.dyi, l.rx.lo + best.dxi);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// bm_tiled_kernel: the fast path, one CTA per (sample, block)
// ------------------------------------------------------------------------------------------------
//
// Work split. A thread tile is one dy row times PX consecutive dx (PX = 9, 17 or 33, picked per
// CTA from the block's own Dx: 33 = 2r+1 for r = 16, 17 for the clipped border blocks). Tiles
// along dx start every S = PX - 1 columns (so a tile's first column is 16-byte aligned for
// float4 loads; neighbouring tiles overlap by one column, which only the left tile keeps).
// The K dimension (rows (c, ky) of the template) is split over KS groups of threads, each group
// covering every tile; the groups' partial sums are added in a fixed order at the end.
// Main case 224x224, B = 32, r = 16: an interior block has 33 tiles x 8 groups of 12 rows = 264 of
// 288 threads busy; a top/bottom border block (Dy = 17) 17 tiles x 16 groups of 6 rows.
//
// Inner loop. For each template row (c, ky) a thread runs its dx tile along kx in chunks of
// KC = 16 (then 8, 4, 2, 1 for the rest of B): KC template values are loaded with broadcast
// float4 loads (every thread of a group reads the same address), the PX + KC - 1 window values of
// its row once as float4, and PX * KC FFMAs run from registers (acc[j] += t[k] * w[k + j]).
// For PX = 33, KC = 16: 528 FFMA per 4 + 12 LDS.128, about 3% non-FFMA issue.
// Window rows have pitch P with P / 4 odd, so 8 consecutive dy rows (one quarter-warp phase of a
// 128-bit load) hit 8 different 16-byte bank groups.
//
// Numerics. The template and window of channel c are both centred by the template's channel
// mean before the identity (a-b is unchanged, the squared terms shrink), which keeps the
// cancellation in sumA2 + sumB2 - 2X small (research note section 5). The winner is re-scored
// with a direct fp32 pass over the raw inputs, so the reported psnr is the direct mse.

constexpr int kTileThreads = 288;
constexpr int kTileWarps = kTileThreads / 32;
constexpr int kSeg = 8;  // box sums slide over at most this many outputs before a fresh sum

// Shared-memory layout of bm_tiled_kernel, in floats, from the launcher (same for every CTA: the
// sizes are maxima over the blocks of the call).
//   [0, offSq)          region R, reused in turn by:
//                         template [Cc][B][TP] + window [Cc][WH][P]  (staging, main loop)
//                         partial sums [KS][tiles][PX]               (K-split reduction)
//                         horizontal box sums hs [WH][Dx]            (epilogue)
//   [offSq, offX)       sq [WHmax][WWmax]: sum over channels of the centred window squared
//   [offX, offMean)     X [Dy][Dx]: cross term per displacement
//   [offMean, ...)      mean [Cc]: template mean per channel of the current chunk
struct TiledLayout {
  int Cc;      // channels staged per chunk
  int TP;      // template row pitch (multiple of 4)
  int P;       // window row pitch (multiple of 4, P / 4 odd)
  int WWmax;   // pitch of sq
  int offSq, offX, offMean;
};

struct TileCtx {
  int n, i, j;
  bool fl;
  int wy0, wx0;  // top-left of the search window in b' (inside the image)
  int Dy, Dx;    // candidate grid
  int WH, WW;    // window size: Dy + B - 1, Dx + B - 1
};

// Loads N consecutive floats from shared memory; p is aligned to A floats (A = 1, 2 or 4).
template <int N, int A>
__device__ __forceinline__ void load_vec(float (&v)[N], const float* p) {
  if constexpr (A >= 4) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(p)[q];
      v[4 * q] = f.x;
      v[4 * q + 1] = f.y;
      v[4 * q + 2] = f.z;
      v[4 * q + 3] = f.w;
    }
    constexpr int done = (N / 4) * 4;
    if constexpr (N - done >= 2) {
      const float2 f = *reinterpret_cast<const float2*>(p + done);
      v[done] = f.x;
      v[done + 1] = f.y;
    }
    if constexpr ((N - done) % 2 == 1) v[N - 1] = p[N - 1];
  } else if constexpr (A >= 2) {
#pragma unroll
    for (int q = 0; q < N / 2; ++q) {
      const float2 f = reinterpret_cast<const float2*>(p)[q];
      v[2 * q] = f.x;
      v[2 * q + 1] = f.y;
    }
    if constexpr (N % 2 == 1) v[N - 1] = p[N - 1];
  } else {
#pragma unroll
    for (int q = 0; q < N; ++q) v[q] = p[q];
  }
}

// acc[j] += sum_{k < KC} tp[k] * wp[k + j]: KC template values against PX + KC - 1 window values.
template <int PX, int KC, int A>
__device__ __forceinline__ void mac_chunk(float (&acc)[PX], const float* tp, const float* wp) {
  float tv[KC];
  float wv[PX + KC - 1];
  load_vec<KC, A>(tv, tp);
  load_vec<PX + KC - 1, A>(wv, wp);
#pragma unroll
  for (int k = 0; k < KC; ++k) {
#pragma unroll
    for (int j = 0; j < PX; ++j) acc[j] = fmaf(tv[k], wv[k + j], acc[j]);
  }
}

// One template row against one window row: B is a runtime value, cut into chunks of 16 and then
// 8, 4, 2, 1. tr and wr are 16-byte aligned, so every chunk before the last starts at a multiple
// of 4 floats and the last (size 1) at a multiple of 2.
template <int PX>
__device__ __forceinline__ void mac_row(float (&acc)[PX], const float* tr, const float* wr, int B) {
  int kx = 0;
#pragma unroll 1
  for (; kx + 16 <= B; kx += 16) mac_chunk<PX, 16, 4>(acc, tr + kx, wr + kx);
  if (kx + 8 <= B) {
    mac_chunk<PX, 8, 4>(acc, tr + kx, wr + kx);
    kx += 8;
  }
  if (kx + 4 <= B) {
    mac_chunk<PX, 4, 4>(acc, tr + kx, wr + kx);
    kx += 4;
  }
  if (kx + 2 <= B) {
    mac_chunk<PX, 2, 4>(acc, tr + kx, wr + kx);
    kx += 2;
  }
  if (kx < B) mac_chunk<PX, 1, 2>(acc, tr + kx, wr + kx);
}

// Stages channels [c0, c0 + cc) of the template and of the search window, both as float32 centred
// by the template's channel mean. `first` (first pass over the channels) also accumulates
// sq (sum over channels of the window squared) and the thread's part of sum T^2.
template <typename T>
__device__ __forceinline__ void stage_chunk(const BlockMatchParams& p, const TiledLayout& L, const TileCtx& k, int c0,
                                            int cc, bool first, float* sm, float& sA2) {
  const int B = p.block, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* Ts = sm;
  float* Ws = sm + L.Cc * B * L.TP;
  float* sq = sm + L.offSq;
  float* mean = sm + L.offMean;
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);

  __syncthreads();  // whoever used the buffers before (previous chunk, pass or block) is done

  // Template rows (c, ky) over warps, kx over lanes (coalesced for NCHW).
  const long long abase = static_cast<long long>(k.n) * p.sa[0] + static_cast<long long>(k.i) * B * p.sa[2] +
                          static_cast<long long>(k.j) * B * p.sa[3];
  for (int row = warp; row < cc * B; row += kTileWarps) {
    const int c = row / B, ky = row - c * B;
    const T* src = a + abase + static_cast<long long>(c0 + c) * p.sa[1] + static_cast<long long>(ky) * p.sa[2];
    for (int kx = lane; kx < B; kx += 32) Ts[row * L.TP + kx] = to_float(src[static_cast<long long>(kx) * p.sa[3]]);
  }
  __syncthreads();

  // Channel means, one warp per channel, fixed order.
  for (int c = warp; c < cc; c += kTileWarps) {
    float s = 0.f;
    for (int ky = 0; ky < B; ++ky)
      for (int kx = lane; kx < B; kx += 32) s += Ts[(c * B + ky) * L.TP + kx];
    s = warp_sum(s);
    if (lane == 0) mean[c] = s / static_cast<float>(B * B);
  }
  __syncthreads();

  for (int row = warp; row < cc * B; row += kTileWarps) {
    const float m = mean[row / B];
    for (int kx = lane; kx < B; kx += 32) {
      const float v = Ts[row * L.TP + kx] - m;
      Ts[row * L.TP + kx] = v;
      if (first) sA2 = fmaf(v, v, sA2);
    }
  }

  // Window rows over warps, columns over lanes, channels inner (sq needs all of them). Columns
  // [WW, P) are zeroed: the main loop reads them for dx outside the grid (results discarded),
  // and zeros keep those lanes free of stale values.
  const long long bbase = static_cast<long long>(k.n) * p.sb[0];
  for (int y = warp; y < k.WH; y += kTileWarps) {
    const T* brow = b + bbase + static_cast<long long>(k.wy0 + y) * p.sb[2];
    for (int x = lane; x < L.P; x += 32) {
      if (x < k.WW) {
        int gx = k.wx0 + x;
        if (k.fl) gx = p.W - 1 - gx;
        const T* src = brow + static_cast<long long>(gx) * p.sb[3];
        float q = 0.f;
        for (int c = 0; c < cc; ++c) {
          const float v = to_float(src[static_cast<long long>(c0 + c) * p.sb[1]]) - mean[c];
          Ws[(c * k.WH + y) * L.P + x] = v;
          q = fmaf(v, v, q);
        }
        if (first) {
          float* sp = sq + y * L.WWmax + x;
          *sp = (c0 == 0) ? q : *sp + q;
        }
      } else {
        for (int c = 0; c < cc; ++c) Ws[(c * k.WH + y) * L.P + x] = 0.f;
      }
    }
  }
  __syncthreads();
}

// Cross term X[dy][dx] of the block into sm + L.offX, for tile width PX. Returns (in sA2) this
// thread's part of sum T^2.
template <typename T, int PX>
__device__ __forceinline__ void tiled_cross(const BlockMatchParams& p, const TiledLayout& L, const TileCtx& k, float* sm,
                                            float& sA2) {
  constexpr int S = PX - 1;  // tile stride along dx
  const int B = p.block;
  const int t = threadIdx.x;
  const int ntx = (k.Dx <= PX) ? 1 : (k.Dx - 1 + S - 1) / S;  // ceil((Dx - 1) / S)
  const int tiles = k.Dy * ntx;
  const int tpp = min(tiles, kTileThreads);  // tiles per pass
  const int passes = (tiles + tpp - 1) / tpp;
  const int KS = passes > 1 ? 1 : max(1, min(kTileThreads / tiles, L.Cc * B));
  const int g = t / tpp, tl = t - g * tpp;
  const int nchunks = (p.C + L.Cc - 1) / L.Cc;
  const float* Ts = sm;
  const float* Ws = sm + L.Cc * B * L.TP;
  float* Xs = sm + L.offX;

  for (int pass = 0; pass < passes; ++pass) {
    const int tile = pass * tpp + tl;
    const bool active = g < KS && tile < tiles;
    // Consecutive threads take consecutive dy of one dx tile: rows P apart, conflict-free.
    const int txi = active ? tile / k.Dy : 0;
    const int dyi = active ? tile - txi * k.Dy : 0;
    const int tx0 = txi * S;
    float acc[PX];
#pragma unroll
    for (int j = 0; j < PX; ++j) acc[j] = 0.f;

#pragma unroll 1
    for (int ch = 0; ch < nchunks; ++ch) {
      const int c0 = ch * L.Cc;
      const int cc = min(L.Cc, p.C - c0);
      // With one chunk the staged data survives across passes (passes > 1 means KS = 1, which
      // writes X directly and leaves region R alone).
      if (pass == 0 || nchunks > 1) stage_chunk<T>(p, L, k, c0, cc, pass == 0, sm, sA2);
      if (active) {
        const int rows = cc * B;
        const int rpg = (rows + KS - 1) / KS;
        const int r0 = g * rpg;
        const int r1 = min(rows, r0 + rpg);
        if (r0 < r1) {
          int c = r0 / B;
          int ky = r0 - c * B;
          const float* tr = Ts + r0 * L.TP;
          const float* wr = Ws + (c * k.WH + ky + dyi) * L.P + tx0;
#pragma unroll 1
          for (int r = r0; r < r1; ++r) {
            mac_row<PX>(acc, tr, wr, B);
            tr += L.TP;
            wr += L.P;
            if (++ky == B) {  // next channel: window plane c+1 starts WH rows after plane c
              ky = 0;
              wr += (k.WH - B) * L.P;
            }
          }
        }
      }
    }

    if (KS == 1) {
      if (active) {
        // A tile keeps columns [tx0, tx0 + S); the last one keeps up to Dx - 1 (at most PX).
        const int own = (txi == ntx - 1) ? k.Dx - tx0 : S;
        float* xrow = Xs + dyi * k.Dx + tx0;
#pragma unroll
        for (int j = 0; j < PX; ++j)
          if (j < own) xrow[j] = acc[j];
      }
    } else {
      __syncthreads();  // every group is done reading the template and window (region R)
      float* part = sm;
      if (active) {
        float* dst = part + (g * tpp + tl) * PX;
#pragma unroll
        for (int j = 0; j < PX; ++j) dst[j] = acc[j];
      }
      __syncthreads();
      for (int d = t; d < k.Dy * k.Dx; d += kTileThreads) {
        const int y = d / k.Dx, x = d - y * k.Dx;
        const int ti = min(x / S, ntx - 1);
        const int j = x - ti * S;
        const int tile_d = ti * k.Dy + y;
        float s = 0.f;
        for (int gg = 0; gg < KS; ++gg) s += part[(gg * tpp + tile_d) * PX + j];
        Xs[d] = s;
      }
    }
  }
}

// Sum of B consecutive values v[0], v[stride], ... (fixed order).
__device__ __forceinline__ float box_sum(const float* v, int B, int stride) {
  float s = 0.f;
  for (int k = 0; k < B; ++k) s += v[k * stride];
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kTileThreads, 2) bm_tiled_kernel(const BlockMatchParams p, const TiledLayout L) {
  extern __shared__ float4 dsm_tiled[];
  float* sm = reinterpret_cast<float*>(dsm_tiled);
  __shared__ float red[kTileWarps];
  __shared__ ArgminScratch scratch;
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const int B = p.block;
  const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
  const long long total = static_cast<long long>(p.N) * p.Hb * p.Wb;
  const long long cbb_i = static_cast<long long>(p.C) * B * B;
  const float cbb = static_cast<float>(cbb_i);
  const float inv_cbb = 1.f / cbb;

  for (long long bid = blockIdx.x; bid < total; bid += gridDim.x) {
    const BlockLoc l = locate(p, bid);
    if (l.ry.lo > l.ry.hi || l.rx.lo > l.rx.hi) {  // CTA-uniform
      if (t == 0) write_result(p, bid, INFINITY, 0, 0);
      continue;
    }
    TileCtx k;
    k.n = l.n;
    k.i = l.i;
    k.j = l.j;
    k.fl = l.fl;
    k.wy0 = static_cast<int>(l.cy + l.ry.lo);
    k.wx0 = static_cast<int>(l.cx + l.rx.lo);
    k.Dy = l.ry.hi - l.ry.lo + 1;
    k.Dx = l.rx.hi - l.rx.lo + 1;
    k.WH = k.Dy + B - 1;
    k.WW = k.Dx + B - 1;

    float sA2 = 0.f;
    if (k.Dx <= 9)
      tiled_cross<T, 9>(p, L, k, sm, sA2);
    else if (k.Dx <= 17)
      tiled_cross<T, 17>(p, L, k, sm, sA2);
    else
      tiled_cross<T, 33>(p, L, k, sm, sA2);
    // block_sum's first barrier also makes X complete and frees region R.
    const float sumA2 = block_sum<kTileWarps>(sA2, red);

    // Horizontal box sums hs[y][dx] = sum_{kx < B} sq[y][dx + kx], sliding over at most kSeg
    // outputs. A sliding sum that turns non-finite (a NaN or inf entered it) is recomputed
    // directly, so a NaN marks only the windows that contain it.
    const float* sq = sm + L.offSq;
    const float* Xs = sm + L.offX;
    float* hs = sm;
    {
      const int nsx = (k.Dx + kSeg - 1) / kSeg;
      for (int task = t; task < k.WH * nsx; task += kTileThreads) {
        const int y = task / nsx, sg = task - y * nsx;
        const int x0 = sg * kSeg, x1 = min(x0 + kSeg, k.Dx);
        const float* row = sq + y * L.WWmax;
        float s = box_sum(row + x0, B, 1);
        hs[y * k.Dx + x0] = s;
        for (int x = x0 + 1; x < x1; ++x) {
          s = (s - row[x - 1]) + row[x + B - 1];
          if (!isfinite(s)) s = box_sum(row + x, B, 1);
          hs[y * k.Dx + x] = s;
        }
      }
    }
    __syncthreads();

    // Vertical box sums give sumB2[dy][dx]; with X and sumA2 they give the approximate mse and
    // the key of each candidate; each thread keeps its best.
    // (With a not finite every key is NaN: the re-score below then scores each candidate.)
    const bool a_finite = isfinite(sumA2);
    Cand best = cand_none();
    {
      const int nsy = (k.Dy + kSeg - 1) / kSeg;
      for (int task = t; task < k.Dx * nsy; task += kTileThreads) {
        const int sg = task / k.Dx, x = task - sg * k.Dx;
        const int y0 = sg * kSeg, y1 = min(y0 + kSeg, k.Dy);
        const float* col = hs + x;
        float s = box_sum(col + y0 * k.Dx, B, k.Dx);
        for (int y = y0; y < y1; ++y) {
          if (y > y0) {
            s = (s - col[(y - 1) * k.Dx]) + col[(y + B - 1) * k.Dx];
            if (!isfinite(s)) s = box_sum(col + y * k.Dx, B, k.Dx);
          }
          const float ssd = fmaf(-2.f, Xs[y * k.Dx + x], sumA2 + s);
          float mse = ssd * inv_cbb;
          // A NaN here is a NaN in the window or in a, or an inf in the window (inf - inf);
          // with a and the window NaN-free and a finite, the true mse is +inf (never taken, as
          // in the reference), not NaN (which beats every number).
          if (isnan(mse) && a_finite && !isnan(s)) mse = INFINITY;
          const float key = isnan(mse) ? -1.f : fmaxf(mse, 0.f);
          const long long rank = block_match_rank(l.ry.lo + y, l.rx.lo + x, p.radius);
          if (cand_less(key, rank, best.key, best.rank)) best = Cand{key, rank, y, x, mse};
        }
      }
    }
    const Cand win = block_argmin<kTileWarps>(best, scratch);

    // Re-score the winner: direct fp32 (a - b')^2 over the raw inputs. With an inf or NaN in a
    // (sumA2 not finite) every key above was NaN, so a true NaN (a NaN in a window, or inf - inf
    // where b has a's inf), which must win, was not told from a +inf: then every candidate is
    // scored so (CTA-uniform loop; a slow path for a rare block).
    // Candidates are compared by their sums (as by mse: cbb > 0), divided once at the end.
    const int ny = a_finite ? 1 : k.Dy, nx = a_finite ? 1 : k.Dx;
    const long long abase = static_cast<long long>(l.n) * p.sa[0];
    const long long bbase = static_cast<long long>(l.n) * p.sb[0];
    Cand fin = cand_none();
    for (int qy = 0; qy < ny; ++qy)
    for (int qx = 0; qx < nx; ++qx) {
      const int dyi = a_finite ? win.dyi : qy, dxi = a_finite ? win.dxi : qx;
      const int dy = l.ry.lo + dyi, dx = l.rx.lo + dxi;
      const int y0 = static_cast<int>(l.cy + dy), x0 = static_cast<int>(l.cx + dx);
      float s = 0.f;
      for (int row = warp; row < p.C * B; row += kTileWarps) {
        const int c = row / B, ky = row - c * B;
        const T* pa = a + abase + static_cast<long long>(c) * p.sa[1] +
                      static_cast<long long>(l.i * B + ky) * p.sa[2] + static_cast<long long>(l.j) * B * p.sa[3];
        const T* pb = b + bbase + static_cast<long long>(c) * p.sb[1] + static_cast<long long>(y0 + ky) * p.sb[2];
        for (int kx = lane; kx < B; kx += 32) {
          int bx = x0 + kx;
          if (l.fl) bx = p.W - 1 - bx;
          const float d = to_float(pa[static_cast<long long>(kx) * p.sa[3]]) -
                          to_float(pb[static_cast<long long>(bx) * p.sb[3]]);
          s = fmaf(d, d, s);
        }
      }
      s = block_sum<kTileWarps>(s, red);
      const float key = isnan(s) ? -1.f : s;
      const long long rank = block_match_rank(dy, dx, p.radius);
      if (cand_less(key, rank, fin.key, fin.rank)) fin = Cand{key, rank, dyi, dxi, s};
    }
    if (t == 0) write_result(p, bid, fin.mse / cbb, l.ry.lo + fin.dyi, l.rx.lo + fin.dxi);
    // The next block's first stage_chunk starts with a barrier before touching shared memory.
  }
}

// ------------------------------------------------------------------------------------------------
// bm_direct_kernel: fallback for windows too large for shared memory
// ------------------------------------------------------------------------------------------------

constexpr int kDirectThreads = 256;
constexpr int kDirectWarps = kDirectThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kDirectThreads) bm_direct_kernel(const BlockMatchParams p) {
  __shared__ ArgminScratch scratch;
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const int B = p.block;
  const long long total = static_cast<long long>(p.N) * p.Hb * p.Wb;
  const float cbb = static_cast<float>(static_cast<long long>(p.C) * B * B);

  for (long long bid = blockIdx.x; bid < total; bid += gridDim.x) {
    const BlockLoc l = locate(p, bid);
    if (l.ry.lo > l.ry.hi || l.rx.lo > l.rx.hi) {
      if (threadIdx.x == 0) write_result(p, bid, INFINITY, 0, 0);
      continue;
    }
    const int Dy = l.ry.hi - l.ry.lo + 1, Dx = l.rx.hi - l.rx.lo + 1;
    const long long nc = static_cast<long long>(Dy) * Dx;
    const long long abase = static_cast<long long>(l.n) * p.sa[0] +
                            static_cast<long long>(l.i) * B * p.sa[2] + static_cast<long long>(l.j) * B * p.sa[3];
    const long long bbase = static_cast<long long>(l.n) * p.sb[0];
    Cand best = cand_none();
    for (long long q = threadIdx.x; q < nc; q += kDirectThreads) {
      const int dyi = static_cast<int>(q / Dx), dxi = static_cast<int>(q - static_cast<long long>(dyi) * Dx);
      const int dy = l.ry.lo + dyi, dx = l.rx.lo + dxi;
      const int y0 = static_cast<int>(l.cy + dy), x0 = static_cast<int>(l.cx + dx);
      float s = 0.f;
      for (int c = 0; c < p.C; ++c) {
        for (int ky = 0; ky < B; ++ky) {
          const T* pa = a + abase + static_cast<long long>(c) * p.sa[1] + static_cast<long long>(ky) * p.sa[2];
          const T* pb = b + bbase + static_cast<long long>(c) * p.sb[1] + static_cast<long long>(y0 + ky) * p.sb[2];
          for (int kx = 0; kx < B; ++kx) {
            const int bx = l.fl ? p.W - 1 - (x0 + kx) : x0 + kx;
            const float d = to_float(pa[static_cast<long long>(kx) * p.sa[3]]) -
                            to_float(pb[static_cast<long long>(bx) * p.sb[3]]);
            s = fmaf(d, d, s);
          }
        }
      }
      const float mse = s / cbb;
      const float key = isnan(mse) ? -1.f : mse;
      const long long rank = block_match_rank(dy, dx, p.radius);
      if (cand_less(key, rank, best.key, best.rank)) best = Cand{key, rank, dyi, dxi, mse};
    }
    const Cand win = block_argmin<kDirectWarps>(best, scratch);
    if (threadIdx.x == 0) write_result(p, bid, win.mse, l.ry.lo + win.dyi, l.rx.lo + win.dxi);
    __syncthreads();  // scratch is read by every thread before the next block overwrites it
  }
}

// ------------------------------------------------------------------------------------------------
// Launcher
// ------------------------------------------------------------------------------------------------

constexpr long long kTiledSmemPreferred = 110 * 1024;  // two CTAs of 288 threads per SM (228 KB)
constexpr long long kStaticSmemReserve = 1024;         // static __shared__ of the kernels, rounded up

long long round4(long long v) { return (v + 3) / 4 * 4; }

// Layout of bm_tiled_kernel for this call, or false when one channel does not fit in `limit`.
bool make_tiled_layout(const BlockMatchParams& p, long long limit, TiledLayout& L, long long& bytes) {
  const long long B = p.block, r = p.radius;
  const long long Dymax = std::min<long long>(2 * r + 1, p.H - B + 1);
  const long long Dxmax = std::min<long long>(2 * r + 1, p.W - B + 1);
  const long long WHmax = Dymax + B - 1, WWmax = Dxmax + B - 1;
  // The widest window row a CTA reads: its last dx tile starts at (ntx - 1) * S and reads
  // S + B columns from there (see tiled_cross / mac_chunk).
  long long pxmax, need;
  if (Dxmax <= 9) {
    pxmax = 9;
    need = 8 + B;
  } else if (Dxmax <= 17) {
    pxmax = 17;
    need = 16 + B;
  } else {
    pxmax = 33;
    need = (Dxmax - 1 + 31) / 32 * 32 + B;
  }
  long long P = round4(std::max(need, WWmax));
  if ((P / 4) % 2 == 0) P += 4;
  const long long TP = round4(B);
  const long long per_c = B * TP + WHmax * P;
  const long long floor_r = std::max<long long>(kTileThreads * pxmax, WHmax * Dxmax);
  const long long fixed = round4(WHmax * WWmax) + round4(Dymax * Dxmax);
  auto floats_for = [&](long long cc) { return round4(std::max(cc * per_c, floor_r)) + fixed + round4(cc); };
  auto fits = [&](long long cc, long long lim) { return floats_for(cc) * 4 <= lim; };
  long long cc = 0;
  const long long pref = std::min(limit, kTiledSmemPreferred);
  if (fits(1, pref)) {
    cc = 1;
    while (cc < p.C && fits(cc + 1, pref)) ++cc;
  } else if (fits(1, limit)) {
    cc = 1;  // one CTA per SM anyway: take as many channels as the opt-in limit allows
    while (cc < p.C && fits(cc + 1, limit)) ++cc;
  } else {
    return false;
  }
  L.Cc = static_cast<int>(cc);
  L.TP = static_cast<int>(TP);
  L.P = static_cast<int>(P);
  L.WWmax = static_cast<int>(WWmax);
  const long long rsz = round4(std::max(cc * per_c, floor_r));
  L.offSq = static_cast<int>(rsz);
  L.offX = static_cast<int>(rsz + round4(WHmax * WWmax));
  L.offMean = static_cast<int>(rsz + fixed);
  bytes = floats_for(cc) * 4;
  return true;
}

enum class Path { Auto, Image, Tiled, Direct };

// The kernel this host thread launched last (Path as int; 0 before any launch), for
// block_match_cuda_last_path(): benchmarks report which path ran (SEMANTICS.md section 5).
thread_local int g_last_path = 0;

Path forced_path() {
  const char* e = std::getenv("EFFSSL_BLOCK_MATCH_CUDA_PATH");
  if (e == nullptr) return Path::Auto;
  if (std::strcmp(e, "image") == 0) return Path::Image;
  if (std::strcmp(e, "tiled") == 0) return Path::Tiled;
  if (std::strcmp(e, "direct") == 0) return Path::Direct;
  return Path::Auto;
}

// Without the opt-in attribute, static + dynamic shared memory must stay within 48 KB (the default
// cudaFuncAttributeMaxDynamicSharedMemorySize is 48 KB minus the kernel's static __shared__), so
// the static part (bm_tiled_kernel: ~0.8 KB) must be counted here. The attribute is process-wide
// per function and device, so it is always raised to the device's whole opt-in `limit` (callers
// check bytes <= limit), never to this call's size: a host thread setting a smaller value between
// another thread's set and launch would make that launch fail.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, long long bytes, long long limit) {
  if (bytes + kStaticSmemReserve <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit));
}

template <typename T>
int launch_typed(const BlockMatchParams& p, cudaStream_t stream) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return static_cast<int>(err);
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return static_cast<int>(err);
  const long long limit = static_cast<long long>(optin) - kStaticSmemReserve;
  const Path force = forced_path();
  const long long total = static_cast<long long>(p.N) * p.Hb * p.Wb;
  const unsigned grid_blocks = static_cast<unsigned>(std::min<long long>(total, INT_MAX));

  // Small images: the whole sample in shared memory.
  if (force == Path::Auto || force == Path::Image) {
    const long long img =
        4LL * p.C * (static_cast<long long>(p.H) * p.W + static_cast<long long>(p.Hb) * p.block * p.Wb * p.block);
    if (img <= (force == Path::Image ? limit : kImageSmemAuto)) {
      err = allow_smem(bm_image_kernel<T>, img, limit);
      if (err != cudaSuccess) return static_cast<int>(err);
      const unsigned grid = static_cast<unsigned>(std::min<long long>(p.N, INT_MAX));
      g_last_path = static_cast<int>(Path::Image);
      bm_image_kernel<T><<<grid, kImageThreads, static_cast<size_t>(img), stream>>>(p);
      return static_cast<int>(cudaGetLastError());
    }
  }
  if (force != Path::Direct) {
    TiledLayout L;
    long long bytes = 0;
    if (make_tiled_layout(p, limit, L, bytes)) {
      err = allow_smem(bm_tiled_kernel<T>, bytes, limit);
      if (err != cudaSuccess) return static_cast<int>(err);
      g_last_path = static_cast<int>(Path::Tiled);
      bm_tiled_kernel<T><<<grid_blocks, kTileThreads, static_cast<size_t>(bytes), stream>>>(p, L);
      return static_cast<int>(cudaGetLastError());
    }
  }
  g_last_path = static_cast<int>(Path::Direct);
  bm_direct_kernel<T><<<grid_blocks, kDirectThreads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

const char* block_match_cuda_last_path() {
  static const char* const names[] = {"", "image", "tiled", "direct"};
  return names[g_last_path];
}

int block_match_cuda_launch(const BlockMatchParams& p, ScalarKind kind, void* stream) {
  if (p.N <= 0 || p.Hb <= 0 || p.Wb <= 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (kind) {
    case ScalarKind::Float32:
      return launch_typed<float>(p, s);
    case ScalarKind::Float16:
      return launch_typed<__half>(p, s);
    case ScalarKind::BFloat16:
      return launch_typed<__nv_bfloat16>(p, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace effssl
