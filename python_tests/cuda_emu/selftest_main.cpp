// Self-test of cuda_emu.h: small kernels whose behaviour on a GPU is known, one per mode
// (argv[1]); prints what the test in test_cuda_emu.py checks. Written directly against the
// emulator (static_shared / launch), as cuda_emu.py's rewrites would produce them.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

// Warp 1 writes shared memory, both warps shuffle (no __syncthreads), warp 0 reads: a race on a
// GPU. The emulator must let warp 0 run past its shuffle before warp 1 writes in some order.
__global__ void shuffle_race(float* out) {
  float(&s)[32] = ::cuemu::static_shared<float[32]>(0);
  const int t = threadIdx.x;
  if (t >= 32) s[t - 32] = static_cast<float>(t);
  const float v = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  if (t < 32) out[t] = s[t] + v;
}

// The same with the barrier: the same answer in every order.
__global__ void shuffle_synced(float* out) {
  float(&s)[32] = ::cuemu::static_shared<float[32]>(0);
  const int t = threadIdx.x;
  if (t >= 32) s[t - 32] = static_cast<float>(t);
  __syncthreads();
  const float v = __shfl_xor_sync(0xffffffffu, static_cast<float>(t), 1);
  if (t < 32) out[t] = s[t] + v;
}

__global__ void indices(int* out) {
  if (threadIdx.x == 3 && blockIdx.x == 1) {
    out[0] = threadIdx.y, out[1] = threadIdx.z, out[2] = blockIdx.y, out[3] = blockIdx.z;
    out[4] = blockDim.x, out[5] = blockDim.y, out[6] = gridDim.x, out[7] = gridDim.y;
  }
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void read_before_write(float* out) {
  float& s = ::cuemu::static_shared<float>(0);
  if (threadIdx.x == 0) out[0] = s;  // never written: NaN
}

__global__ void uses_dynamic(float* out) {
  float* d = static_cast<float*>(::cuemu::dynamic_smem());
  if (threadIdx.x == 0) out[0] = static_cast<float>(reinterpret_cast<unsigned long long>(d) % 128);
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  if (!std::strcmp(mode, "race") || !std::strcmp(mode, "synced")) {
    float out[32];
    ::cuemu::launch(!std::strcmp(mode, "race") ? shuffle_race : shuffle_synced, mode, 1024, dim3(1), dim3(64), 0,
                    nullptr, out);
    for (float v : out) std::printf("%g ", v);
    std::printf("\n");
  } else if (!std::strcmp(mode, "indices")) {
    int out[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
    ::cuemu::launch(indices, "indices", 1024, dim3(2), dim3(64), 0, nullptr, out);
    for (int v : out) std::printf("%d ", v);
    std::printf("\n");
  } else if (!std::strcmp(mode, "divergent")) {
    int out[64];
    ::cuemu::launch(divergent_barrier, "divergent", 1024, dim3(1), dim3(64), 0, nullptr, out);
  } else if (!std::strcmp(mode, "uninitialised")) {
    float out[1] = {0.f};
    ::cuemu::launch(read_before_write, "uninitialised", 1024, dim3(1), dim3(32), 0, nullptr, out);
    std::printf("%g\n", out[0]);
  } else if (!std::strcmp(mode, "limits")) {
    float out[1] = {0.f};
    ::cuemu::launch(uses_dynamic, "too_many_threads", 1024, dim3(1), dim3(1056), 0, nullptr, out);
    std::printf("1056 threads: %d\n", static_cast<int>(cudaGetLastError()));
    ::cuemu::launch(uses_dynamic, "no_attribute", 1024, dim3(1), dim3(32), 49 * 1024, nullptr, out);
    std::printf("49 KB without the attribute: %d\n", static_cast<int>(cudaGetLastError()));
    std::printf("attribute above the opt-in: %d\n",
                static_cast<int>(cudaFuncSetAttribute(uses_dynamic, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                      300 * 1024)));
    cudaFuncSetAttribute(uses_dynamic, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
    ::cuemu::launch(uses_dynamic, "with_attribute", 1024, dim3(1), dim3(32), 49 * 1024, nullptr, out);
    std::printf("49 KB with the attribute: %d, base %% 128 = %g\n", static_cast<int>(cudaGetLastError()), out[0]);
    ::cuemu::launch(uses_dynamic, "bounded", 128, dim3(1), dim3(256), 0, nullptr, out);
    std::printf("256 threads, bound 128: %d\n", static_cast<int>(cudaGetLastError()));
  }
  return 0;
}
