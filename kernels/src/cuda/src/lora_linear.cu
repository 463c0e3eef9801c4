// Fused LoRA linear on tensor cores (mma.sync m16n8k16, f32 accumulation).
//
// forward  (TRANS = false):  Y = X W^T (+ bias) + s (X A^T) B^T,  Z = X A^T (f32, for backward)
// backward (TRANS = true):  dX = dY W + s (dY B) A,                Z = dY B  (f32, for dA)
// Written as one template: Y[M][Nc] = X[M][Kr] . Wop + (s . X Dop) . Uop where in the
// forward W is [Nc][Kr], D = A is [R][Kr], U = B is [Nc][R] (reduction index contiguous,
// staged directly), and in the backward W is [Kr][Nc], D = B is [Kr][R], U = A is [R][Nc]
// (staged transposed). The down-projection Z for the block's rows is accumulated in the
// same K loop from the same staged X tile, then multiplied by the U tile in the epilogue
// and added to the base accumulators: the [M][Nc] output is written once, the [M][R]
// intermediate never goes through global memory except the f32 copy kept for backward.
//
// Block: 128 threads (4 warps, 2 x 2), tile 64 x 128 x 32; each warp owns 32 x 64 of Y
// (2 x 8 mma tiles) and 32 x 32 of Z (2 x 4 mma tiles). R <= 64 per launch. Two-stage
// pipeline: tile k+1 is copied with cp.async (sm_80+) while tile k is multiplied.
// Grid: (ceil(Nc / 128), ceil(M / 64)). Nc == 0 computes only Z (used to recompute X A^T).

#define LL_BM 64
#define LL_BN 128
#define LL_BK 32
#define LL_NT 128
#define LL_LDK (LL_BK + 8)
#define LL_RMAX 64
#define LL_LDR (LL_RMAX + 8)
#define LL_SMEM_MAIN ((LL_BM + LL_BN + LL_RMAX) * LL_LDK)
#define LL_SMEM_EPI ((LL_BM + LL_BN) * LL_LDR)
// Two K-tile stages (double buffering with cp.async): 2 x 20 KiB, reused by the epilogue.
#define LL_SMEM (2 * LL_SMEM_MAIN > LL_SMEM_EPI ? 2 * LL_SMEM_MAIN : LL_SMEM_EPI)

// vec bit flags: see common.cuh (VEC_X ... VEC_ACC). Ranks above LL_RMAX run as several
// launches over 64-rank chunks: the first with W (and bias), the others with W == 0 and
// VEC_ACC (Y += the chunk's term), each writing its own columns of Z.

template <typename T, typename OT, bool TRANS>
__device__ __forceinline__ void lora_fused(const T* __restrict__ X, i64 ldx, const T* __restrict__ W, i64 ldw,
                                           const T* __restrict__ D, i64 ldd, const T* __restrict__ U, i64 ldu,
                                           const T* __restrict__ bias, float scale, OT* __restrict__ Y, i64 ldy,
                                           float* __restrict__ Z, i64 ldz, int M, int Nc, int Kr, int R, int vec) {
  __shared__ __align__(16) u16 smem[LL_SMEM];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp & 1, wn = warp >> 1;
  const int m0 = blockIdx.y * LL_BM, n0 = blockIdx.x * LL_BN;
  const bool main_on = Nc > 0, w_on = Nc > 0 && W != 0;

  float acc[2][8][4];
  float zacc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) zacc[i][j][q] = 0.f;
  }

  // Stage K tile `kt` into buffer `buf`: k-major operands (X always; W and D in the
  // forward) with cp.async, the transposed ones (backward W and D) with plain stores.
  auto stage = [&](int kt, int buf) {
    u16* Xs = smem + buf * LL_SMEM_MAIN;
    u16* Ws = Xs + LL_BM * LL_LDK;
    u16* Ds = Ws + LL_BN * LL_LDK;
    const int k0 = kt * LL_BK;
    stage_kmajor_async<T, LL_BM, LL_BK, LL_LDK, LL_NT>(Xs, X, ldx, m0, M, k0, Kr, vec & VEC_X);
    if (w_on) {
      if (!TRANS) stage_kmajor_async<T, LL_BN, LL_BK, LL_LDK, LL_NT>(Ws, W, ldw, n0, Nc, k0, Kr, vec & VEC_W);
      else stage_trans<T, T, LL_BN, LL_BK, LL_LDK, LL_NT>(Ws, W, ldw, n0, Nc, k0, Kr, vec & VEC_W);
    }
    if (R > 0) {
      if (!TRANS) stage_kmajor_async<T, LL_RMAX, LL_BK, LL_LDK, LL_NT>(Ds, D, ldd, 0, R, k0, Kr, vec & VEC_D);
      else stage_trans<T, T, LL_RMAX, LL_BK, LL_LDK, LL_NT>(Ds, D, ldd, 0, R, k0, Kr, vec & VEC_D);
    }
    cp_async_commit();
  };
  const int nkt = (Kr + LL_BK - 1) / LL_BK;
  if (nkt > 0) stage(0, 0);
  for (int kt = 0; kt < nkt; ++kt) {
    const int cur = kt & 1;
    // Issue the next tile into the other buffer (free: the previous iteration ended with
    // a barrier), then wait only for the current one.
    if (kt + 1 < nkt) {
      stage(kt + 1, cur ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const u16* Xs = smem + cur * LL_SMEM_MAIN;
    const u16* Ws = Xs + LL_BM * LL_LDK;
    const u16* Ds = Ws + LL_BN * LL_LDK;
#pragma unroll
    for (int kk = 0; kk < LL_BK; kk += 16) {
      u32 a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) load_frag_a<LL_LDK>(a[mt], Xs, wm * 32 + mt * 16, kk, lane);
      if (w_on) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          u32 b[2];
          load_frag_b<LL_LDK>(b, Ws, wn * 64 + nt * 8, kk, lane);
          mma16816<T>(acc[0][nt], a[0], b);
          mma16816<T>(acc[1][nt], a[1], b);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        if (wn * 32 + nt * 8 < R) {
          u32 b[2];
          load_frag_b<LL_LDK>(b, Ds, wn * 32 + nt * 8, kk, lane);
          mma16816<T>(zacc[0][nt], a[0], b);
          mma16816<T>(zacc[1][nt], a[1], b);
        }
      }
    }
    __syncthreads();
  }

  const int g = lane >> 2, t = lane & 3;
  if (R > 0) {
    // Z (unscaled, f32) to global once per row block; s * Z as T into shared memory.
    u16* Zs = smem;
    u16* Us = smem + LL_BM * LL_LDR;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = wm * 32 + mt * 16 + g + h * 8, c = wn * 32 + nt * 8 + 2 * t;
          const float z0 = zacc[mt][nt][2 * h], z1 = zacc[mt][nt][2 * h + 1];
          *reinterpret_cast<u32*>(Zs + r * LL_LDR + c) = pack2<T>(scale * z0, scale * z1);
          if (Z != 0 && blockIdx.x == 0 && m0 + r < M) {
            if (c < R) Z[(m0 + r) * ldz + c] = z0;
            if (c + 1 < R) Z[(m0 + r) * ldz + c + 1] = z1;
          }
        }
    if (main_on) {
      if (!TRANS) stage_kmajor<T, T, LL_BN, LL_RMAX, LL_LDR, LL_NT>(Us, U, ldu, n0, Nc, 0, R, vec & VEC_U);
      else stage_trans<T, T, LL_BN, LL_RMAX, LL_LDR, LL_NT>(Us, U, ldu, n0, Nc, 0, R, vec & VEC_U);
    }
    __syncthreads();
    if (main_on) {
      for (int kk = 0; kk < R; kk += 16) {
        u32 a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) load_frag_a<LL_LDR>(a[mt], Zs, wm * 32 + mt * 16, kk, lane);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          u32 b[2];
          load_frag_b<LL_LDR>(b, Us, wn * 64 + nt * 8, kk, lane);
          mma16816<T>(acc[0][nt], a[0], b);
          mma16816<T>(acc[1][nt], a[1], b);
        }
      }
    }
  }
  if (!main_on) return;
  // Epilogue: (+ bias), convert, store. Each thread holds column pairs (2t, 2t+1).
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int c = n0 + wn * 64 + nt * 8 + 2 * t;
    float b0 = 0.f, b1 = 0.f;
    if (bias != 0) {
      if (c < Nc) b0 = to_f32(bias[c]);
      if (c + 1 < Nc) b1 = to_f32(bias[c + 1]);
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + wm * 32 + mt * 16 + g + h * 8;
        if (r >= M) continue;
        float y0 = acc[mt][nt][2 * h] + b0, y1 = acc[mt][nt][2 * h + 1] + b1;
        OT* p = Y + r * ldy + c;
        if (vec & VEC_ACC) {
          if (c < Nc) y0 += to_f32(p[0]);
          if (c + 1 < Nc) y1 += to_f32(p[1]);
        }
        if ((vec & VEC_Y) && sizeof(OT) == 2 && c + 1 < Nc) {
          *reinterpret_cast<u32*>(p) = pack2<T>(y0, y1);
        } else if ((vec & VEC_Y) && sizeof(OT) == 4 && c + 1 < Nc) {
          *reinterpret_cast<float2*>(p) = make_float2(y0, y1);
        } else {
          if (c < Nc) p[0] = from_f32<OT>(y0);
          if (c + 1 < Nc) p[1] = from_f32<OT>(y1);
        }
      }
  }
}

// Weight gradients with a small dimension, split over the token dimension M:
//   C[P][Q] += s * sum_m L[m][p] * Rt[m][q]       (C is f32, accumulated with atomics)
// dB = s dY^T Z  (L = dY [M][N] as T, Rt = Z [M][R] f32)  -> [N][R]
// dA = s V^T X   (L = V  [M][R] f32, Rt = X [M][K] as T)  -> [R][K]
// Block: 128 threads (2 x 2 warps of 32 x 32), tile 64 x 64 x 32, both operands staged
// transposed with 16-byte loads along their contiguous dimension.
// Grid: (ceil(Q / 64), ceil(P / 64), splits); split z covers rows [z*mchunk, (z+1)*mchunk).
#define WG_BP 64
#define WG_BQ 64
#define WG_BK 32
#define WG_LD (WG_BK + 8)

template <typename T, typename LT, typename RT>
__device__ __forceinline__ void wgrad(const LT* __restrict__ L, i64 ldl, const RT* __restrict__ Rt, i64 ldr,
                                      float scale, float* __restrict__ C, i64 ldc, int M, int P, int Q,
                                      int mchunk, int vec) {
  __shared__ __align__(16) u16 Ls[WG_BP * WG_LD];
  __shared__ __align__(16) u16 Rs[WG_BQ * WG_LD];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wp = warp & 1, wq = warp >> 1;
  const int q0 = blockIdx.x * WG_BQ, p0 = blockIdx.y * WG_BP;
  const int mbeg = blockIdx.z * mchunk;
  const int mend = min(M, mbeg + mchunk);
  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;
  for (int k0 = mbeg; k0 < mend; k0 += WG_BK) {
    stage_trans<T, LT, WG_BP, WG_BK, WG_LD, 128>(Ls, L, ldl, p0, P, k0, mend, vec & 1);
    stage_trans<T, RT, WG_BQ, WG_BK, WG_LD, 128>(Rs, Rt, ldr, q0, Q, k0, mend, vec & 2);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < WG_BK; kk += 16) {
      u32 a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) load_frag_a<WG_LD>(a[mt], Ls, wp * 32 + mt * 16, kk, lane);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        u32 b[2];
        load_frag_b<WG_LD>(b, Rs, wq * 32 + nt * 8, kk, lane);
        mma16816<T>(acc[0][nt], a[0], b);
        mma16816<T>(acc[1][nt], a[1], b);
      }
    }
    __syncthreads();
  }
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int p = p0 + wp * 32 + mt * 16 + g + h * 8, q = q0 + wq * 32 + nt * 8 + 2 * t;
        if (p >= P) continue;
        if (q < Q) atomicAdd(C + p * ldc + q, scale * acc[mt][nt][2 * h]);
        if (q + 1 < Q) atomicAdd(C + p * ldc + q + 1, scale * acc[mt][nt][2 * h + 1]);
      }
}

#define LORA_FUSED_ARGS(T, OT)                                                                              \
  const T *X, i64 ldx, const T *W, i64 ldw, const T *D, i64 ldd, const T *U, i64 ldu, const T *bias,       \
      float scale, OT *Y, i64 ldy, float *Z, i64 ldz, int M, int Nc, int Kr, int R, int vec
#define LORA_FUSED_PASS X, ldx, W, ldw, D, ldd, U, ldu, bias, scale, Y, ldy, Z, ldz, M, Nc, Kr, R, vec

#define INSTANTIATE_LORA(T)                                                                                 \
  extern "C" __global__ void __launch_bounds__(LL_NT) lora_fwd_##T(LORA_FUSED_ARGS(T, T)) {                 \
    lora_fused<T, T, false>(LORA_FUSED_PASS);                                                               \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(LL_NT) lora_fwd_f32out_##T(LORA_FUSED_ARGS(T, float)) {     \
    lora_fused<T, float, false>(LORA_FUSED_PASS);                                                           \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(LL_NT) lora_bwd_dx_##T(LORA_FUSED_ARGS(T, T)) {              \
    lora_fused<T, T, true>(LORA_FUSED_PASS);                                                                \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(LL_NT) lora_bwd_dx_f32out_##T(LORA_FUSED_ARGS(T, float)) {   \
    lora_fused<T, float, true>(LORA_FUSED_PASS);                                                            \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(128)                                                         \
      lora_wgrad_tf_##T(const T *L, i64 ldl, const float *Rt, i64 ldr, float scale, float *C, i64 ldc,      \
                        int M, int P, int Q, int mchunk, int vec) {                                         \
    wgrad<T, T, float>(L, ldl, Rt, ldr, scale, C, ldc, M, P, Q, mchunk, vec);                               \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(128)                                                         \
      lora_wgrad_ft_##T(const float *L, i64 ldl, const T *Rt, i64 ldr, float scale, float *C, i64 ldc,      \
                        int M, int P, int Q, int mchunk, int vec) {                                         \
    wgrad<T, float, T>(L, ldl, Rt, ldr, scale, C, ldc, M, P, Q, mchunk, vec);                               \
  }

INSTANTIATE_LORA(bf16)
INSTANTIATE_LORA(f16)
