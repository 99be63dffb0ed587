// Plain C++ interface between the torch-facing code (.cpp) and the CUDA kernels (.cu).
// No torch headers here: nvcc compiles the .cu in ~2 s instead of minutes (see csrc/README.md).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define EFFSSL_HD __host__ __device__ __forceinline__
#else
#define EFFSSL_HD inline
#endif

namespace effssl {

enum class ScalarKind : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Arguments of one block_match call. Semantics: SEMANTICS.md section 1.
struct BlockMatchParams {
  const void* a;           // view A, [N, C, H, W], element strides sa (any layout)
  const void* b;           // view B, same shape and dtype, element strides sb
  int64_t sa[4];
  int64_t sb[4];
  int N, C, H, W;
  int block;               // B >= 1, B <= H and B <= W
  int radius;              // r >= 0
  int Hb, Wb;              // H / B, W / B
  const int32_t* centers;  // [N, Hb, Wb, 2] contiguous (y, x) search centres in b, or nullptr
                           // for the block's own top-left. Any int32 value is legal: kernels
                           // derive the candidate range in int64 (block_match_dy_range) so a
                           // centre far outside the image gives no candidate, never overflow
  const bool* flip;        // [N] or nullptr: search sample n on b mirrored left-right
  float data_range;        // > 0
  float* psnr;             // out [N, Hb, Wb], contiguous
  int32_t* offset;         // out [N, Hb, Wb, 2], contiguous (dy, dx)
};

// Search order shared by every backend: among exact ties of the mse key, the candidate with the
// smallest rank wins (smallest |dy|+|dx|, then smallest dy, then smallest dx). NaN mse counts as
// the smallest key, so a NaN anywhere in a block's candidates makes its psnr NaN.
EFFSSL_HD int64_t block_match_rank(int dy, int dx, int radius) {
  const int64_t side = 2 * static_cast<int64_t>(radius) + 1;
  const int64_t l1 = (dy < 0 ? -dy : dy) + (dx < 0 ? -dx : dx);
  return (l1 * side + (dy + radius)) * side + (dx + radius);
}

// Candidate displacements along one axis: d in [lo, hi] with 0 <= c + d <= size - B and |d| <= r.
// lo > hi means none. Computed in int64 so any int32 centre is safe.
struct DRange { int lo, hi; };
EFFSSL_HD DRange block_match_drange(int64_t c, int size, int block, int radius) {
  int64_t lo = -c > -radius ? -c : -static_cast<int64_t>(radius);
  int64_t hi = static_cast<int64_t>(size - block) - c;
  if (hi > radius) hi = radius;
  if (lo > hi) return {1, 0};
  return {static_cast<int>(lo), static_cast<int>(hi)};
}

#ifdef WITH_CUDA
// Launches on `stream` (a cudaStream_t). Returns 0 on success, else a cudaError_t code.
int block_match_cuda_launch(const BlockMatchParams& p, ScalarKind kind, void* stream);
// "image", "tiled" or "direct": the kernel this host thread's last launch ran ("" before any).
const char* block_match_cuda_last_path();
#endif

}  // namespace effssl
