// A CPU emulator for the lora-kernels CUDA sources: just enough of CUDA C++ to run a
// kernel on the host, one block at a time, with one std::thread per CUDA thread
// (__syncthreads = a block barrier, warp shuffles = a warp barrier + slots, __shared__ =
// static storage shared by the block's threads). Slow (only for small shapes) and not a
// GPU model (no memory model, no timing), but it runs the kernels' exact index math,
// tiling, masking and synchronisation structure, which is what a GPU-less machine can
// check. Included before kernels/src/cuda/src/common.cuh; see emulate.cpp.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define LORA_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local emu_dim3 threadIdx;
inline emu_dim3 blockIdx, blockDim, gridDim;

struct EmuWarp {
  std::barrier<> bar{32};
  float slots[32];
};
inline std::barrier<>* emu_block_barrier = nullptr;
inline EmuWarp* emu_warps = nullptr;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp() { emu_warps[threadIdx.x / 32].bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  EmuWarp& w = emu_warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  w.slots[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.slots[lane ^ o];
  w.bar.arrive_and_wait();
  return r;
}
inline float __expf(float x) { return std::exp(x); }
// Round-to-nearest float ops that NVCC never contracts into an FMA (the emulator is built
// without FMA, so plain operators round each step too).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __logf(float x) { return std::log(x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __int_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
using std::fmaf;
using std::fmaxf;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline std::mutex emu_atomic_mutex;
inline float atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> g(emu_atomic_mutex);
  const float old = *p;
  *p = old + v;
  return old;
}
inline int atomicMax(int* p, int v) {
  std::lock_guard<std::mutex> g(emu_atomic_mutex);
  const int old = *p;
  if (v > old) *p = v;
  return old;
}

// 16-bit conversions in plain C++ (round to nearest even), expanded inside common.cuh
// where the bf16 / f16 structs are defined.
#define LORA_EMU_CONVERSIONS                                                             \
  inline float to_f32(f16 v) { _Float16 h; std::memcpy(&h, &v.x, 2); return (float)h; }  \
  template <> inline bf16 from_f32<bf16>(float v) {                                      \
    unsigned u; std::memcpy(&u, &v, 4);                                                  \
    u += 0x7fffu + ((u >> 16) & 1u);                                                     \
    bf16 r; r.x = (unsigned short)(u >> 16); return r;                                   \
  }                                                                                      \
  template <> inline f16 from_f32<f16>(float v) {                                        \
    _Float16 h = (_Float16)v; f16 r; std::memcpy(&r.x, &h, 2); return r;                 \
  }

struct emu_grid { unsigned x = 1, y = 1, z = 1; };

// Run `kernel` (a callable running one CUDA thread's body) over grid x block.
inline void emu_launch(emu_grid grid, unsigned block, const std::function<void()>& kernel) {
  gridDim = {grid.x, grid.y, grid.z};
  blockDim = {block, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        std::barrier<> bar(block);
        std::unique_ptr<EmuWarp[]> warps(new EmuWarp[(block + 31) / 32]);
        emu_block_barrier = &bar;
        emu_warps = warps.get();
        std::vector<std::thread> ts;
        ts.reserve(block);
        for (unsigned t = 0; t < block; ++t)
          ts.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            kernel();
            // a thread that returned early must not block the others' barriers
            bar.arrive_and_drop();
            emu_warps[t / 32].bar.arrive_and_drop();
          });
        for (auto& th : ts) th.join();
      }
}
