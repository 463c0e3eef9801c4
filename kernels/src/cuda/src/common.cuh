// Shared helpers for every lora-kernels CUDA module. Prepended to each module's source
// before NVRTC compiles it, so the kernels need NO CUDA headers at run time (no
// cuda_fp16.h / cuda_bf16.h / mma.h lookup on the user's machine): 16-bit types are raw
// bit patterns converted with PTX `cvt`, tensor cores are driven with inline `mma.sync`.
// Targets sm_80 (Ampere) and sm_90 (Hopper); everything accumulates in f32.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
#define NEG_INF __int_as_float(0xff800000)

// Flags of the fused linear kernels (lora_linear.cu, lora_f32.cu): operand X/W/D/U may be
// read with 16-byte vectors (leading dimension a multiple of 16 bytes, base 16-byte
// aligned), Y may be written in pairs, and VEC_ACC: add into Y instead of overwriting.
#define VEC_X 1
#define VEC_W 2
#define VEC_D 4
#define VEC_U 8
#define VEC_Y 16
#define VEC_ACC 32

// Storage types: distinct structs so templates can tell bf16 from f16.
struct bf16 { u16 x; };
struct f16 { u16 x; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((u32)v.x) << 16); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
#ifndef LORA_EMU
__device__ __forceinline__ float to_f32(f16 v) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x)); return f;
}
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
  bf16 r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.x) : "f"(v)); return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
  f16 r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(v)); return r;
}
#else
// The CPU emulator (tools/cuda-emu) provides the 16-bit conversions in plain C++.
LORA_EMU_CONVERSIONS
#endif

// Two 16-bit values packed into one 32-bit register (the mma operand format).
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi) {
  return (u32)from_f32<T>(lo).x | ((u32)from_f32<T>(hi).x << 16);
}

// 16-byte vector of elements: 8 x 16-bit or 4 x f32.
template <typename T> struct Vec16 { static const int N = 16 / sizeof(T); };

// Load 8 consecutive 16-bit elements (16 bytes, must be 16-byte aligned).
__device__ __forceinline__ uint4 ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void st16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// Unpack a 16-byte vector into floats (N = 8 for 16-bit types, 4 for f32).
template <typename T> __device__ __forceinline__ void unpack16(uint4 v, float* out) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < Vec16<T>::N; ++i) out[i] = to_f32(e[i]);
}
template <typename T> __device__ __forceinline__ uint4 pack16(const float* in) {
  uint4 v; T* e = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int i = 0; i < Vec16<T>::N; ++i) e[i] = from_f32<T>(in[i]);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide reductions (blockDim.x a multiple of 32, <= 1024). `sh` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  v = (lane < nw) ? sh[lane] : 0.f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  v = (lane < nw) ? sh[lane] : NEG_INF;
  return warp_max(v);
}

// ---- tensor cores: mma.sync m16n8k16, 16-bit operands, f32 accumulators ----------------
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"): g = lane/4, t = lane%4.
//   A (16x16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8, col):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16x8):       c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
template <typename T> __device__ __forceinline__ void mma16816(float* c, const u32* a, const u32* b);
#ifndef LORA_EMU
template <> __device__ __forceinline__ void mma16816<bf16>(float* c, const u32* a, const u32* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<f16>(float* c, const u32* a, const u32* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// Shared-memory tiles are stored [rows][LD] of 16-bit values with the reduction index
// contiguous. LD = 16*k + 8 keeps the fragment loads below free of bank conflicts.
template <int LD>
__device__ __forceinline__ void load_frag_a(u32* a, const u16* s, int row0, int k0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const u16* p = s + (row0 + g) * LD + k0 + 2 * t;
  a[0] = *reinterpret_cast<const u32*>(p);
  a[1] = *reinterpret_cast<const u32*>(p + 8 * LD);
  a[2] = *reinterpret_cast<const u32*>(p + 8);
  a[3] = *reinterpret_cast<const u32*>(p + 8 * LD + 8);
}
template <int LD>
__device__ __forceinline__ void load_frag_b(u32* b, const u16* s, int col0, int k0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const u16* p = s + (col0 + g) * LD + k0 + 2 * t;
  b[0] = *reinterpret_cast<const u32*>(p);
  b[1] = *reinterpret_cast<const u32*>(p + 8);
}

// Stage a [ROWS x KT] tile of a row-major matrix M[rows][ld] (reduction index contiguous)
// into shared memory as 16-bit T, zero-filling outside [nrows, nk). Source may be f32
// (converted). 16-byte vector loads when `vec` (ld % 8 == 0 and base 16-byte aligned).
template <typename T, typename S, int ROWS, int KT, int LD, int NTHREADS>
__device__ __forceinline__ void stage_kmajor(u16* s, const S* src, i64 ld, int row0, int nrows,
                                             int k0, int nk, bool vec) {
  constexpr int CH = 8;  // elements per chunk (16 bytes of 16-bit output)
  constexpr int CPR = KT / CH;
  for (int c = threadIdx.x; c < ROWS * CPR; c += NTHREADS) {
    const int r = c / CPR, kc = (c % CPR) * CH;
    const int gr = row0 + r, gk = k0 + kc;
    float v[CH];
    if (gr < nrows && vec && sizeof(S) == 2 && gk + CH <= nk) {
      unpack16<S>(ld16(src + gr * ld + gk), v);
    } else if (gr < nrows && vec && sizeof(S) == 4 && gk + CH <= nk) {
      unpack16<S>(ld16(src + gr * ld + gk), v);
      unpack16<S>(ld16(src + gr * ld + gk + 4), v + 4);
    } else {
#pragma unroll
      for (int i = 0; i < CH; ++i) v[i] = (gr < nrows && gk + i < nk) ? to_f32(src[gr * ld + gk + i]) : 0.f;
    }
    st16(s + r * LD + kc, pack16<T>(v));
  }
}
// Stage the transpose: the source is M[k][ld] (rows = reduction index, columns contiguous);
// the tile holds s[col][k] for col in [col0, col0+COLS), k in [k0, k0+KT). Loads are
// 16-byte vectors along the contiguous columns; stores scatter into the transposed tile.
template <typename T, typename S, int COLS, int KT, int LD, int NTHREADS>
__device__ __forceinline__ void stage_trans(u16* s, const S* src, i64 ld, int col0, int ncols,
                                            int k0, int nk, bool vec) {
  constexpr int CH = 16 / sizeof(S);
  constexpr int CPR = COLS / CH;
  for (int c = threadIdx.x; c < KT * CPR; c += NTHREADS) {
    const int kk = c / CPR, cc = (c % CPR) * CH;
    const int gk = k0 + kk, gc = col0 + cc;
    float v[CH];
    if (gk < nk && vec && gc + CH <= ncols) {
      unpack16<S>(ld16(src + gk * ld + gc), v);
    } else {
#pragma unroll
      for (int i = 0; i < CH; ++i) v[i] = (gk < nk && gc + i < ncols) ? to_f32(src[gk * ld + gc + i]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < CH; ++i) s[(cc + i) * LD + kk] = from_f32<T>(v[i]).x;
  }
}

// 8 consecutive elements as floats: one 16-byte load for 16-bit types, two for f32.
// The pointer must be 16-byte aligned.
template <typename T> __device__ __forceinline__ void load8(const T* p, float* v) {
  unpack16<T>(ld16(p), v);
  if (sizeof(T) == 4) unpack16<T>(ld16(p + 4), v + 4);
}
template <typename T> __device__ __forceinline__ void store8(T* p, const float* v) {
  st16(p, pack16<T>(v));
  if (sizeof(T) == 4) st16(p + 4, pack16<T>(v + 4));
}

// ---- cp.async (sm_80+): 16-byte global -> shared copies that bypass registers, so the
// next K tile loads while the current one is multiplied. Below sm_80 a plain copy.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
  u64 s64;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(s64) : "l"(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((u32)s64), "l"(gmem));
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
// stage_kmajor for a 16-bit source of the tile's own type: full 16-byte chunks go
// through cp.async (completion: cp_async_wait + __syncthreads), edges are zero-filled
// with plain stores.
template <typename T, int ROWS, int KT, int LD, int NTHREADS>
__device__ __forceinline__ void stage_kmajor_async(u16* s, const T* src, i64 ld, int row0, int nrows, int k0,
                                                   int nk, bool vec) {
  constexpr int CH = 8;
  constexpr int CPR = KT / CH;
  for (int c = threadIdx.x; c < ROWS * CPR; c += NTHREADS) {
    const int r = c / CPR, kc = (c % CPR) * CH;
    const int gr = row0 + r, gk = k0 + kc;
    if (gr < nrows && vec && gk + CH <= nk) {
      cp_async16(s + r * LD + kc, src + gr * ld + gk);
    } else {
      float v[CH];
#pragma unroll
      for (int i = 0; i < CH; ++i) v[i] = (gr < nrows && gk + i < nk) ? to_f32(src[gr * ld + gk + i]) : 0.f;
      st16(s + r * LD + kc, pack16<T>(v));
    }
  }
}
