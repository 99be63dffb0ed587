// Runs block_match's CUDA launcher (block_match_kernel.cu, rewritten by cuda_emu.py for the
// emulator) on one case read from a file, and writes its outputs. Used by
// test_block_match_cuda_emu.py; every buffer is allocated at its exact size, so a sanitizer
// catches any access outside it.
//
// Input (native endianness): int64 header[20] = N, C, H, W, block, radius, kind (0 f32, 1 f16,
// 2 bf16), has_centers, has_flip, span_a, span_b (elements from the first one the view uses),
// sa[4], sb[4], pad; float64 data_range; a span (element bytes); b span; centers int32
// [N, Hb, Wb, 2] if any; flip uint8 [N] if any.
// Output: int64 status (the launcher's return), float32 psnr [N, Hb, Wb], int32 offset [.., 2].
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "block_match.h"

namespace {

template <typename T>
std::vector<T> read_vec(std::FILE* f, size_t n) {
  std::vector<T> v(n);
  if (n && std::fread(v.data(), sizeof(T), n, f) != n) {
    std::fprintf(stderr, "short input\n");
    std::exit(2);
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  const auto h = read_vec<int64_t>(in, 20);
  const double data_range = read_vec<double>(in, 1)[0];
  effssl::BlockMatchParams p{};
  p.N = static_cast<int>(h[0]), p.C = static_cast<int>(h[1]), p.H = static_cast<int>(h[2]);
  p.W = static_cast<int>(h[3]), p.block = static_cast<int>(h[4]), p.radius = static_cast<int>(h[5]);
  p.Hb = p.H / p.block, p.Wb = p.W / p.block;
  const auto kind = static_cast<effssl::ScalarKind>(h[6]);
  const size_t esize = kind == effssl::ScalarKind::Float32 ? 4 : 2;
  for (int d = 0; d < 4; ++d) p.sa[d] = h[11 + d], p.sb[d] = h[15 + d];
  const auto a = read_vec<unsigned char>(in, static_cast<size_t>(h[9]) * esize);
  const auto b = read_vec<unsigned char>(in, static_cast<size_t>(h[10]) * esize);
  const size_t blocks = static_cast<size_t>(p.N) * p.Hb * p.Wb;
  const auto centers = read_vec<int32_t>(in, h[7] ? 2 * blocks : 0);
  const auto flip8 = read_vec<unsigned char>(in, h[8] ? p.N : 0);
  std::fclose(in);
  // exact-size heap copies (std::vector<bool> has no data())
  std::unique_ptr<bool[]> flip(h[8] ? new bool[p.N] : nullptr);
  for (int n = 0; h[8] && n < p.N; ++n) flip[n] = flip8[n] != 0;
  std::vector<float> psnr(blocks);
  std::vector<int32_t> offset(2 * blocks);
  p.a = a.data();
  p.b = b.data();
  p.centers = h[7] ? centers.data() : nullptr;
  p.flip = flip.get();
  p.data_range = static_cast<float>(data_range);
  p.psnr = psnr.data();
  p.offset = offset.data();
  const int64_t status = effssl::block_match_cuda_launch(p, kind, nullptr);
  std::fprintf(stderr, "cuemu: last path %s\n", effssl::block_match_cuda_last_path());
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  std::fwrite(&status, sizeof(status), 1, out);
  std::fwrite(psnr.data(), sizeof(float), psnr.size(), out);
  std::fwrite(offset.data(), sizeof(int32_t), offset.size(), out);
  std::fclose(out);
  return 0;
}
