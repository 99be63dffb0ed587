// cuda_emu: runs this package's CUDA kernels on the CPU, so kernels no GPU has run yet are tested
// where there is none (CI has no GPU). Test infrastructure only; python_tests/cuda_emu.py builds it.
//
// What it models, and why that finds the bugs a first GPU run would find:
// - A block's threads all run before any passes a barrier: __syncthreads() waits for the whole
//   block, __shfl_xor_sync (full mask only) for the warp. A barrier that some thread never
//   reaches (divergent __syncthreads or shuffle) stops the run with a message.
// - Blocks run one after another (a kernel may not rely on blocks running together; ours do
//   not). CUEMU_MAX_GRID caps gridDim.x, so grid-stride loops run several iterations per block
//   and reuse shared memory, as on a GPU with more work than CTAs.
// - Dynamic shared memory is a fresh heap buffer of exactly the launched size, filled with NaN
//   bytes: under AddressSanitizer an access past it fails (compute-sanitizer memcheck's shared
//   check) and a read before any write gives NaN. Global buffers are the driver's exact-size
//   allocations, so global out-of-bounds accesses fail the same way.
// - float2 / float4 carry CUDA's alignment: UndefinedBehaviorSanitizer reports a vector load from
//   a misaligned address (a "misaligned address" fault on a GPU).
// - Launches are checked as the runtime checks them: more than 1024 threads, or dynamic shared
//   memory above the function's cudaFuncAttributeMaxDynamicSharedMemorySize (48 KB unless
//   raised, never above the device's opt-in limit: 227 KB as on an H100, or CUEMU_SMEM_OPTIN)
//   fail with cudaErrorInvalidValue from cudaGetLastError().
// - Races: see the two execution models below (fiber order permutations; ThreadSanitizer).
// - `__shared__` variables are per block (cuda_emu.py rewrites each declaration), NaN bytes until
//   written, exact-size allocations (ASan), and their size counts in the launch limits.
// - __launch_bounds__: cuda_emu.py passes each kernel's maximum to its launches; a larger block
//   fails to launch, as on a GPU.
// Not modelled: timing, warp-synchronous code without __syncwarp, atomics, textures, streams,
// 2-D/3-D launches.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifndef CUEMU_THREADS
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUEMU_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber((save), (bottom), (size))
#define CUEMU_FINISH_SWITCH(save, bottom, size) __sanitizer_finish_switch_fiber((save), (bottom), (size))
#define CUEMU_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define CUEMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define CUEMU_START_SWITCH(save, bottom, size) ((void)0)
#define CUEMU_FINISH_SWITCH(save, bottom, size) ((void)0)
#define CUEMU_POISON(p, n) ((void)0)
#define CUEMU_UNPOISON(p, n) ((void)0)
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::isfinite;
using std::isnan;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };

// ---- fp16 / bf16: storage and conversion to float, what the kernels use -----------------------
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };

inline float __half2float(__half h) {
  const uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);  // zero and subnormals
  } else if (exp == 31) {
    f = man ? NAN : INFINITY;
  } else {
    f = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return (h.bits & 0x8000u) ? -f : f;
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- runtime API subset -----------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

namespace cuemu {

constexpr int kDefaultDynamicSmem = 48 * 1024;

inline int smem_optin() {
  const char* e = std::getenv("CUEMU_SMEM_OPTIN");
  return e ? std::atoi(e) : 232448;  // H100 / H200: 227 KB
}

struct Runtime {
  std::mutex m;
  cudaError_t last = cudaSuccess;
  std::map<const void*, int> max_dynamic_smem;  // per kernel, as cudaFuncSetAttribute sets it
};
inline Runtime& runtime() {
  static Runtime r;
  return r;
}

[[noreturn]] inline void die(const char* msg) {
  std::fprintf(stderr, "cuemu: %s\n", msg);
  std::abort();
}

struct Warp {
  uint64_t slot[32] = {};  // shuffle exchange
  int lanes = 32;
};

// What a block's threads share: shared memory (dynamic and static) and the warps' shuffle slots.
struct BlockMem {
  BlockMem(int threads, size_t smem) {
    for (int w = 0; w < (threads + 31) / 32; ++w) {
      warps.emplace_back();
      warps.back().lanes = std::min(32, threads - 32 * w);
    }
    if (smem) {  // 16 bytes past a 128-byte line (CUDA promises 16); NaN bytes; poisoned around
      padded = (16 + smem + 127) / 128 * 128;
      raw = static_cast<unsigned char*>(std::aligned_alloc(128, padded));
      std::memset(raw, 0xff, padded);
      smem_ptr = raw + 16;
      CUEMU_POISON(raw, 16);
      CUEMU_POISON(smem_ptr + smem, padded - 16 - smem);
    }
  }
  ~BlockMem() {
    CUEMU_UNPOISON(raw, padded);
    std::free(raw);
    for (auto& kv : statics) {
      CUEMU_UNPOISON(kv.second.first, kv.second.second);
      std::free(kv.second.first);
    }
  }
  // A `__shared__` variable of this block (cuda_emu.py rewrites each declaration into a call):
  // its own exact-size allocation, NaN bytes until written, counted for the launch limits.
  template <typename T>
  T& static_var(int site) {
    std::lock_guard<std::mutex> lk(static_mutex);
    auto it = statics.find(site);
    if (it == statics.end()) {
      const size_t bytes = (sizeof(T) + 15) / 16 * 16;
      void* p = std::aligned_alloc(16, bytes);
      std::memset(p, 0xff, bytes);
      CUEMU_POISON(static_cast<unsigned char*>(p) + sizeof(T), bytes - sizeof(T));
      it = statics.emplace(site, std::make_pair(p, bytes)).first;
      static_bytes += bytes;
    }
    return *static_cast<T*>(it->second.first);
  }
  std::vector<Warp> warps;
  unsigned char* raw = nullptr;
  unsigned char* smem_ptr = nullptr;
  size_t padded = 0;
  std::mutex static_mutex;
  std::map<int, std::pair<void*, size_t>> statics;  // site: (allocation, its rounded size)
  size_t static_bytes = 0;
};

struct Ctx {
  dim3 tid, bid, bdim, gdim;
};

// ---- Two ways to run a block's threads ------------------------------------------------------
// Fibers (default): one OS thread switches between the block's threads (ucontext) whenever one
//   waits at a barrier, in the order CUEMU_ORDER gives (forward, reverse, or random:SEED, redrawn
//   every round); a warp whose lanes all reached a shuffle goes on at once, ahead of the other
//   warps. Fast and reproducible; a kernel whose result changes with the order has a race
//   (test_cuda_emu.py shows one across a shuffle). AddressSanitizer is told about every switch.
// Threads (-DCUEMU_THREADS): one OS thread per CUDA thread, barriers of mutex + condition
//   variable, which ThreadSanitizer understands: two threads touching the same word with no
//   barrier between them are reported as a data race (racecheck's hazards). Slow: hundreds of
//   threads on a few cores, so keep its cases small.
#ifdef CUEMU_THREADS

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait(const char* what) {
    std::unique_lock<std::mutex> lk(m_);
    const unsigned long gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lk, std::chrono::seconds(120), [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "cuemu: %s: %d of %d threads arrived in 120 s\n", what, arrived_, n_);
      die("divergent barrier");
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, arrived_ = 0;
  unsigned long gen_ = 0;
};

struct Block : BlockMem {
  Block(int threads, size_t smem) : BlockMem(threads, smem), bar(threads) {
    for (auto& w : warps) warp_bars.emplace_back(new Barrier(w.lanes));
  }
  Barrier bar;
  std::vector<std::unique_ptr<Barrier>> warp_bars;
};

inline thread_local Ctx tctx;
inline thread_local Block* tblock = nullptr;
inline Ctx& ctx() { return tctx; }
inline BlockMem& block() { return *tblock; }
inline void wait_block() { tblock->bar.wait("__syncthreads"); }
inline void wait_warp() { tblock->warp_bars[tctx.tid.x / 32]->wait("__shfl_xor_sync"); }

template <typename F>
size_t run_block(unsigned threads, size_t smem, const Ctx& base, F&& body) {
  Block blk(static_cast<int>(threads), smem);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      tctx = base;
      tctx.tid = dim3(t, 0, 0);
      tblock = &blk;
      body();
      tblock = nullptr;
    });
  }
  for (auto& th : pool) th.join();
  return blk.static_bytes;
}

#else  // fibers

enum class State { Ready, AtBlock, AtWarp, Done };

struct Fiber {
  ucontext_t uc;
  Ctx ctx;
  State state = State::Ready;
  void* fake_stack = nullptr;
  unsigned char* stack = nullptr;
};

constexpr size_t kFiberStack = 256 * 1024;

struct Block : BlockMem {
  Block(int threads, size_t smem) : BlockMem(threads, smem), fibers(threads) {}
  std::vector<Fiber> fibers;
  // zeroed: swapcontext back here (a fiber's yield) makes ASan clear the shadow of this context's
  // uc_stack, which glibc never fills for a saved context; garbage there failed ASan's own CHECK
  // (asan_poisoning.cpp, "AddrIsInMem") at random, as a crashed kernel
  ucontext_t sched{};
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  std::function<void()> body;
};

inline Block* g_block = nullptr;
inline Fiber* g_fiber = nullptr;
inline Ctx& ctx() { return g_fiber->ctx; }
inline BlockMem& block() { return *g_block; }

inline void yield(State s) {
  Fiber* f = g_fiber;
  f->state = s;
  CUEMU_START_SWITCH(&f->fake_stack, g_block->sched_bottom, g_block->sched_size);
  swapcontext(&f->uc, &g_block->sched);
  CUEMU_FINISH_SWITCH(f->fake_stack, nullptr, nullptr);
}
inline void wait_block() { yield(State::AtBlock); }
inline void wait_warp() { yield(State::AtWarp); }

inline void fiber_entry() {
  CUEMU_FINISH_SWITCH(nullptr, &g_block->sched_bottom, &g_block->sched_size);
  g_block->body();
  g_fiber->state = State::Done;
  CUEMU_START_SWITCH(nullptr, g_block->sched_bottom, g_block->sched_size);  // this stack is done
}  // returns into uc_link: the scheduler

// The fibers' order in each round: CUEMU_ORDER = forward (default), reverse or random:SEED.
inline void order_round(std::vector<unsigned>& order, uint64_t& rng) {
  static const char* e = std::getenv("CUEMU_ORDER");
  const unsigned n = static_cast<unsigned>(order.size());
  for (unsigned i = 0; i < n; ++i) order[i] = i;
  if (e && std::strcmp(e, "reverse") == 0) {
    std::reverse(order.begin(), order.end());
  } else if (e && std::strncmp(e, "random:", 7) == 0) {
    if (rng == 0) rng = 0x9e3779b97f4a7c15ull ^ std::strtoull(e + 7, nullptr, 10);
    for (unsigned i = n - 1; i > 0; --i) {  // Fisher-Yates with xorshift64
      rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
      std::swap(order[i], order[rng % (i + 1)]);
    }
  }
}

template <typename F>
size_t run_block(unsigned threads, size_t smem, const Ctx& base, F&& body) {
  static std::vector<std::unique_ptr<unsigned char[]>> stacks;  // reused by every block
  while (stacks.size() < threads) stacks.emplace_back(new unsigned char[kFiberStack]);
  Block blk(static_cast<int>(threads), smem);
  blk.body = body;
  g_block = &blk;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = blk.fibers[t];
    f.ctx = base;
    f.ctx.tid = dim3(t, 0, 0);
    f.stack = stacks[t].get();
    CUEMU_UNPOISON(f.stack, kFiberStack);
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kFiberStack;
    f.uc.uc_link = &blk.sched;
    makecontext(&f.uc, fiber_entry, 0);
  }
  std::vector<unsigned> order(threads);
  static uint64_t rng = 0;
  auto run = [&](Fiber& f) {  // up to its next barrier or its end
    g_fiber = &f;
    void* fake = nullptr;
    CUEMU_START_SWITCH(&fake, f.stack, kFiberStack);
    swapcontext(&blk.sched, &f.uc);
    CUEMU_FINISH_SWITCH(fake, nullptr, nullptr);
    g_fiber = nullptr;
  };
  // A warp whose lanes all wait at a shuffle goes on at once, ahead of the other warps (depth
  // first), as a GPU warp may: whatever it reads after the shuffle that another warp writes
  // later without a __syncthreads between them reads NaN in this order (a race).
  auto drain = [&](size_t w) {
    const unsigned first = static_cast<unsigned>(32 * w), lanes = static_cast<unsigned>(blk.warps[w].lanes);
    for (;;) {
      for (unsigned l = 0; l < lanes; ++l)
        if (blk.fibers[first + l].state != State::AtWarp) return;
      for (unsigned l = 0; l < lanes; ++l) blk.fibers[first + l].state = State::Ready;
      for (unsigned t : order)
        if (t >= first && t < first + lanes && blk.fibers[t].state == State::Ready) run(blk.fibers[t]);
    }
  };
  for (;;) {
    order_round(order, rng);
    bool ran = false;
    for (unsigned t : order) {
      Fiber& f = blk.fibers[t];
      if (f.state != State::Ready) continue;
      run(f);
      ran = true;
      if (f.state == State::AtWarp) drain(t / 32);
    }
    if (ran) continue;
    // Nobody can run: a warp partly at a shuffle never completes it; else the whole block must
    // be at __syncthreads (released together) or done.
    for (size_t w = 0; w < blk.warps.size(); ++w) {
      int at = 0;
      for (int l = 0; l < blk.warps[w].lanes; ++l) at += blk.fibers[32 * w + l].state == State::AtWarp;
      if (at > 0) {
        std::fprintf(stderr, "cuemu: warp %zu: %d of %d lanes at a shuffle\n", w, at, blk.warps[w].lanes);
        die("divergent shuffle (lanes of a full-mask shuffle wait elsewhere or have exited)");
      }
    }
    unsigned done = 0, at_block = 0;
    for (const Fiber& f : blk.fibers) done += f.state == State::Done, at_block += f.state == State::AtBlock;
    if (done == threads) break;
    if (at_block != threads) {
      std::fprintf(stderr, "cuemu: %u of %u threads at __syncthreads, %u exited\n", at_block, threads, done);
      die("divergent __syncthreads");
    }
    for (Fiber& f : blk.fibers) f.state = State::Ready;
  }
  g_block = nullptr;
  return blk.static_bytes;
}

#endif  // CUEMU_THREADS

inline void* dynamic_smem() { return block().smem_ptr; }

template <typename T>
T& static_shared(int site) {
  return block().static_var<T>(site);
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  if (mask != 0xffffffffu) die("only full-warp shuffles are modelled");
  const unsigned tid = ctx().tid.x;
  Warp& w = block().warps[tid / 32];
  if (w.lanes != 32) die("shuffle in a partial warp");
  const int lane = static_cast<int>(tid % 32);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[lane] = bits;
  wait_warp();
  const uint64_t got = w.slot[(lane ^ lane_mask) & 31];
  wait_warp();  // everyone has read before the slots are written again
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline void fail_launch(const char* why) {
  std::fprintf(stderr, "cuemu: launch failed: %s\n", why);
  std::lock_guard<std::mutex> lk(runtime().m);
  runtime().last = cudaErrorInvalidValue;
}

// kernel<<<grid, block, smem, stream>>>(args...): blocks in turn, each with all its threads.
// `name` is the kernel's source text, printed for the tests ("cuemu: launch NAME ...").
// `max_threads` is the kernel's __launch_bounds__ (1024 without one).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const char* name, long long max_threads, dim3 grid, dim3 block, size_t smem,
            cudaStream_t, Args&&... args) {
  std::fprintf(stderr, "cuemu: launch %s grid %u block %u smem %zu\n", name, grid.x, block.x, smem);
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1) return fail_launch("only 1-D launches modelled");
  if (threads < 1 || threads > 1024) return fail_launch("threads per block outside [1, 1024]");
  if (threads > max_threads) return fail_launch("more threads than the kernel's __launch_bounds__");
  if (grid.x < 1) return fail_launch("empty grid");
  int attr = -1;  // cudaFuncAttributeMaxDynamicSharedMemorySize as set, or unset
  {
    std::lock_guard<std::mutex> lk(runtime().m);
    auto it = runtime().max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
    if (it != runtime().max_dynamic_smem.end()) attr = it->second;
  }
  if (static_cast<long long>(smem) > (attr < 0 ? kDefaultDynamicSmem : attr))
    return fail_launch("dynamic shared memory above the function's limit");
  unsigned blocks = grid.x;
  if (const char* cap = std::getenv("CUEMU_MAX_GRID")) blocks = std::min<unsigned>(blocks, std::atoi(cap));
  for (unsigned bx = 0; bx < blocks; ++bx) {
    Ctx base;
    base.bid = dim3(bx, 0, 0);
    base.bdim = block;
    base.gdim = dim3(blocks);
    const size_t static_bytes = run_block(block.x, smem, base, [&] { kernel(args...); });
    // The static __shared__ size is known once a block has run: the runtime's rules with it
    // (the default dynamic limit is 48 KB minus the static part; a raised attribute may not pass
    // the opt-in limit minus the static part). A failed launch reports an error; the outputs
    // written by the emulated block are not to be used.
    if (bx == 0) {
      const long long st = static_cast<long long>(static_bytes);
      if (attr < 0 && static_cast<long long>(smem) + st > kDefaultDynamicSmem)
        return fail_launch("static + dynamic shared memory above 48 KB without the opt-in attribute");
      if (attr >= 0 && attr > smem_optin() - st)
        return fail_launch("cudaFuncAttributeMaxDynamicSharedMemorySize above the opt-in limit minus static");
    }
  }
}

}  // namespace cuemu

#define threadIdx (::cuemu::ctx().tid)
#define blockIdx (::cuemu::ctx().bid)
#define blockDim (::cuemu::ctx().bdim)
#define gridDim (::cuemu::ctx().gdim)
#define __syncthreads() ::cuemu::wait_block()
#define __shfl_xor_sync(mask, v, o) ::cuemu::shfl_xor((mask), (v), (o))

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = cuemu::smem_optin();
  return cudaSuccess;
}

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > cuemu::smem_optin()) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(cuemu::runtime().m);
  cuemu::runtime().max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lk(cuemu::runtime().m);
  const cudaError_t e = cuemu::runtime().last;
  cuemu::runtime().last = cudaSuccess;
  return e;
}
