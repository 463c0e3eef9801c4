// f32 fused LoRA linear on TF32 tensor cores (mma.sync m16n8k8 .tf32, f32 accumulation),
// used for `--dtype f32` only when the user allows TF32 (LORA_TRAIN_TF32=1; operands
// keep 10 mantissa bits, like PyTorch's allow_tf32). Same arguments, flags and rank
// chunking as lora_linear.cu / lora_f32.cu:
//   forward  (TRANS = false):  Y = X W^T (+ bias) + s (X A^T) B^T,  Z = X A^T
//   backward (TRANS = true):   dX = dY W + s (dY B) A,               Z = dY B
// Block: 128 threads (4 warps, 2 x 2), tile 64 x 64 x 32, each warp 32 x 32 of Y and 32
// ranks of the 64-rank Z chunk. Tiles are stored [row][k] (reduction index contiguous,
// LD = 36 floats: conflict-free fragment loads). Single stage (a second would pass the
// 48 KiB of static shared memory). Grid: (ceil(Nc / 64), ceil(M / 64)).

#define TF_BM 64
#define TF_BN 64
#define TF_BK 32
#define TF_NT 128
#define TF_RC 64
#define TF_LDK (TF_BK + 4)
#define TF_LDR (TF_RC + 4)
#define TF_SMEM_MAIN ((TF_BM + TF_BN + TF_RC) * TF_LDK)
#define TF_SMEM_EPI ((TF_BM + TF_BN) * TF_LDR)
#define TF_SMEM (TF_SMEM_MAIN > TF_SMEM_EPI ? TF_SMEM_MAIN : TF_SMEM_EPI)

#ifndef LORA_EMU
__device__ __forceinline__ float to_tf32(float v) {
  u32 r; asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v)); return __uint_as_float(r);
}
__device__ __forceinline__ void mma1688_tf32(float* c, const u32* a, const u32* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// dst[r][k] = tf32(src[(row0 + r) * ld + k0 + k]) for a ROWS x KT tile, zero outside.
template <int ROWS, int KT, int LD>
__device__ __forceinline__ void tf_stage_rk(float* dst, const float* src, i64 ld, int row0, int nrows, int k0, int nk,
                                            bool vec) {
  constexpr int CPR = KT / 4;
  for (int c = threadIdx.x; c < ROWS * CPR; c += TF_NT) {
    const int r = c / CPR, kc = (c % CPR) * 4;
    const int gr = row0 + r, gk = k0 + kc;
    float v[4];
    if (gr < nrows && vec && gk + 4 <= nk) {
      const float4 q = *reinterpret_cast<const float4*>(src + gr * ld + gk);
      v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = (gr < nrows && gk + i < nk) ? src[gr * ld + gk + i] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[r * LD + kc + i] = to_tf32(v[i]);
  }
}
// dst[c][k] = tf32(src[(k0 + k) * ld + col0 + c]) (source column-contiguous: transpose).
template <int COLS, int KT, int LD>
__device__ __forceinline__ void tf_stage_ck(float* dst, const float* src, i64 ld, int col0, int ncols, int k0, int nk) {
  for (int i = threadIdx.x; i < COLS * KT; i += TF_NT) {
    const int kk = i / COLS, c = i % COLS;
    const int gk = k0 + kk, gc = col0 + c;
    dst[c * LD + kk] = to_tf32((gk < nk && gc < ncols) ? src[gk * ld + gc] : 0.f);
  }
}

template <int LD>
__device__ __forceinline__ void tf_frag_a(u32* a, const float* s, int row0, int k0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const float* p = s + (row0 + g) * LD + k0 + t;
  a[0] = __float_as_uint(p[0]);
  a[1] = __float_as_uint(p[8 * LD]);
  a[2] = __float_as_uint(p[4]);
  a[3] = __float_as_uint(p[8 * LD + 4]);
}
template <int LD>
__device__ __forceinline__ void tf_frag_b(u32* b, const float* s, int col0, int k0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const float* p = s + (col0 + g) * LD + k0 + t;
  b[0] = __float_as_uint(p[0]);
  b[1] = __float_as_uint(p[4]);
}

template <bool TRANS>
__device__ __forceinline__ void lora_fused_tf32(const float* __restrict__ X, i64 ldx, const float* __restrict__ W,
                                                i64 ldw, const float* __restrict__ D, i64 ldd,
                                                const float* __restrict__ U, i64 ldu, const float* __restrict__ bias,
                                                float scale, float* __restrict__ Y, i64 ldy, float* __restrict__ Z,
                                                i64 ldz, int M, int Nc, int Kr, int R, int vec) {
  __shared__ __align__(16) float smem[TF_SMEM];
  float* Xs = smem;
  float* Ws = Xs + TF_BM * TF_LDK;
  float* Ds = Ws + TF_BN * TF_LDK;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp & 1, wn = warp >> 1;
  const int m0 = blockIdx.y * TF_BM, n0 = blockIdx.x * TF_BN;
  const bool main_on = Nc > 0, w_on = Nc > 0 && W != 0;
  float acc[2][4][4], zacc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = zacc[i][j][q] = 0.f;

  for (int k0 = 0; k0 < Kr; k0 += TF_BK) {
    tf_stage_rk<TF_BM, TF_BK, TF_LDK>(Xs, X, ldx, m0, M, k0, Kr, vec & VEC_X);
    if (w_on) {
      if (!TRANS) tf_stage_rk<TF_BN, TF_BK, TF_LDK>(Ws, W, ldw, n0, Nc, k0, Kr, vec & VEC_W);
      else tf_stage_ck<TF_BN, TF_BK, TF_LDK>(Ws, W, ldw, n0, Nc, k0, Kr);
    }
    if (R > 0) {
      if (!TRANS) tf_stage_rk<TF_RC, TF_BK, TF_LDK>(Ds, D, ldd, 0, R, k0, Kr, vec & VEC_D);
      else tf_stage_ck<TF_RC, TF_BK, TF_LDK>(Ds, D, ldd, 0, R, k0, Kr);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TF_BK; kk += 8) {
      u32 a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) tf_frag_a<TF_LDK>(a[mt], Xs, wm * 32 + mt * 16, kk, lane);
      if (w_on) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          u32 b[2];
          tf_frag_b<TF_LDK>(b, Ws, wn * 32 + nt * 8, kk, lane);
          mma1688_tf32(acc[0][nt], a[0], b);
          mma1688_tf32(acc[1][nt], a[1], b);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        if (wn * 32 + nt * 8 < R) {
          u32 b[2];
          tf_frag_b<TF_LDK>(b, Ds, wn * 32 + nt * 8, kk, lane);
          mma1688_tf32(zacc[0][nt], a[0], b);
          mma1688_tf32(zacc[1][nt], a[1], b);
        }
      }
    }
    __syncthreads();
  }

  const int g = lane >> 2, t = lane & 3;
  if (R > 0) {
    float* Zs = smem;                  // [row][rank]
    float* Us = smem + TF_BM * TF_LDR;  // [col][rank]
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = wm * 32 + mt * 16 + g + h * 8, c = wn * 32 + nt * 8 + 2 * t;
          const float z0 = zacc[mt][nt][2 * h], z1 = zacc[mt][nt][2 * h + 1];
          Zs[r * TF_LDR + c] = to_tf32(scale * z0);
          Zs[r * TF_LDR + c + 1] = to_tf32(scale * z1);
          if (Z != 0 && blockIdx.x == 0 && m0 + r < M) {
            if (c < R) Z[(m0 + r) * ldz + c] = z0;
            if (c + 1 < R) Z[(m0 + r) * ldz + c + 1] = z1;
          }
        }
    if (main_on) {
      if (!TRANS) tf_stage_rk<TF_BN, TF_RC, TF_LDR>(Us, U, ldu, n0, Nc, 0, R, vec & VEC_U);
      else tf_stage_ck<TF_BN, TF_RC, TF_LDR>(Us, U, ldu, n0, Nc, 0, R);
    }
    __syncthreads();
    if (main_on) {
      for (int kk = 0; kk < R; kk += 8) {
        u32 a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) tf_frag_a<TF_LDR>(a[mt], Zs, wm * 32 + mt * 16, kk, lane);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          u32 b[2];
          tf_frag_b<TF_LDR>(b, Us, wn * 32 + nt * 8, kk, lane);
          mma1688_tf32(acc[0][nt], a[0], b);
          mma1688_tf32(acc[1][nt], a[1], b);
        }
      }
    }
  }
  if (!main_on) return;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int c = n0 + wn * 32 + nt * 8 + 2 * t;
    const float b0 = (bias != 0 && c < Nc) ? bias[c] : 0.f;
    const float b1 = (bias != 0 && c + 1 < Nc) ? bias[c + 1] : 0.f;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + wm * 32 + mt * 16 + g + h * 8;
        if (r >= M) continue;
        float* p = Y + r * ldy + c;
        const float y0 = acc[mt][nt][2 * h] + b0, y1 = acc[mt][nt][2 * h + 1] + b1;
        if (c < Nc) p[0] = (vec & VEC_ACC) ? p[0] + y0 : y0;
        if (c + 1 < Nc) p[1] = (vec & VEC_ACC) ? p[1] + y1 : y1;
      }
  }
}

#define LORA_TF32_ARGS                                                                                      \
  const float *X, i64 ldx, const float *W, i64 ldw, const float *D, i64 ldd, const float *U, i64 ldu,       \
      const float *bias, float scale, float *Y, i64 ldy, float *Z, i64 ldz, int M, int Nc, int Kr, int R,   \
      int vec
#define LORA_TF32_PASS X, ldx, W, ldw, D, ldd, U, ldu, bias, scale, Y, ldy, Z, ldz, M, Nc, Kr, R, vec

extern "C" __global__ void __launch_bounds__(TF_NT) lora_fwd_tf32(LORA_TF32_ARGS) { lora_fused_tf32<false>(LORA_TF32_PASS); }
extern "C" __global__ void __launch_bounds__(TF_NT) lora_bwd_dx_tf32(LORA_TF32_ARGS) { lora_fused_tf32<true>(LORA_TF32_PASS); }
