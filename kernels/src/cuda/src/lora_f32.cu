// f32 fused LoRA linear on CUDA cores (FMA, f32 throughout: no TF32 rounding, so a
// `--dtype f32` run on the GPU computes what the CPU computes up to summation order).
// Same arguments and semantics as lora_linear.cu's lora_fused (see there):
//   forward  (TRANS = false):  Y = X W^T (+ bias) + s (X A^T) B^T,  Z = X A^T
//   backward (TRANS = true):   dX = dY W + s (dY B) A,               Z = dY B
// plus two flags shared with the 16-bit kernel for ranks above one chunk (the host
// splits the rank into chunks of 64 and launches once per chunk):
//   W == 0 with Nc > 0: no base GEMM (only the adapter chunk's term);
//   vec & VEC_ACC: Y += result (read-modify-write) instead of Y = result.
//
// Block: 256 threads as 16 x 16; tile 64 x 64 x 16; thread (tx, ty) owns rows ty + 16 i
// and columns tx + 16 j (i, j < 4) of Y and of the 64-rank Z chunk. The strided
// ownership makes the shared-memory reads broadcasts (rows) or consecutive (columns)
// and the global stores coalesced. Tiles are stored k-major ([k][row]) so one k step
// is 4 + 4 (+ 4) shared loads for 16 (+ 16) FMAs.
// Grid: (ceil(Nc / 64), ceil(M / 64)).

#define LF_BM 64
#define LF_BN 64
#define LF_BK 16
#define LF_NT 256
#define LF_RC 64
#define LF_LD (64 + 4)
#define LF_SMEM_MAIN (3 * LF_BK * LF_LD)
#define LF_SMEM_EPI (2 * LF_RC * LF_LD)

// dst[k][r] = src[row0 + r][k0 + k] for a ROWS x KT tile (src k-contiguous, leading
// dimension ld), zero outside [nrows) x [nk). float4 loads along k when `vec`.
template <int ROWS, int KT>
__device__ __forceinline__ void lf_stage_rk(float* dst, const float* src, i64 ld, int row0, int nrows, int k0,
                                            int nk, bool vec) {
  constexpr int CPR = KT / 4;
  for (int c = threadIdx.x; c < ROWS * CPR; c += LF_NT) {
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
    for (int i = 0; i < 4; ++i) dst[(kc + i) * LF_LD + r] = v[i];
  }
}
// dst[k][c] = src[k0 + k][col0 + c] for a KT x COLS tile (src column-contiguous).
template <int COLS, int KT>
__device__ __forceinline__ void lf_stage_kc(float* dst, const float* src, i64 ld, int col0, int ncols, int k0,
                                            int nk, bool vec) {
  constexpr int CPR = COLS / 4;
  for (int c = threadIdx.x; c < KT * CPR; c += LF_NT) {
    const int kk = c / CPR, cc = (c % CPR) * 4;
    const int gk = k0 + kk, gc = col0 + cc;
    float4 q;
    if (gk < nk && vec && gc + 4 <= ncols) {
      q = *reinterpret_cast<const float4*>(src + gk * ld + gc);
    } else {
      q.x = (gk < nk && gc < ncols) ? src[gk * ld + gc] : 0.f;
      q.y = (gk < nk && gc + 1 < ncols) ? src[gk * ld + gc + 1] : 0.f;
      q.z = (gk < nk && gc + 2 < ncols) ? src[gk * ld + gc + 2] : 0.f;
      q.w = (gk < nk && gc + 3 < ncols) ? src[gk * ld + gc + 3] : 0.f;
    }
    *reinterpret_cast<float4*>(dst + kk * LF_LD + cc) = q;
  }
}

template <bool TRANS>
__device__ __forceinline__ void lora_fused_f32(const float* __restrict__ X, i64 ldx, const float* __restrict__ W,
                                               i64 ldw, const float* __restrict__ D, i64 ldd,
                                               const float* __restrict__ U, i64 ldu, const float* __restrict__ bias,
                                               float scale, float* __restrict__ Y, i64 ldy, float* __restrict__ Z,
                                               i64 ldz, int M, int Nc, int Kr, int R, int vec) {
  __shared__ __align__(16) float smem[LF_SMEM_MAIN > LF_SMEM_EPI ? LF_SMEM_MAIN : LF_SMEM_EPI];
  float* Xs = smem;
  float* Ws = Xs + LF_BK * LF_LD;
  float* Ds = Ws + LF_BK * LF_LD;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int m0 = blockIdx.y * LF_BM, n0 = blockIdx.x * LF_BN;
  const bool main_on = Nc > 0, w_on = Nc > 0 && W != 0;
  const int nzj = (R + 15) / 16;  // Z column groups in use (R <= 64)
  float acc[4][4], zacc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = zacc[i][j] = 0.f;

  for (int k0 = 0; k0 < Kr; k0 += LF_BK) {
    lf_stage_rk<LF_BM, LF_BK>(Xs, X, ldx, m0, M, k0, Kr, vec & VEC_X);
    if (w_on) {
      if (!TRANS) lf_stage_rk<LF_BN, LF_BK>(Ws, W, ldw, n0, Nc, k0, Kr, vec & VEC_W);
      else lf_stage_kc<LF_BN, LF_BK>(Ws, W, ldw, n0, Nc, k0, Kr, vec & VEC_W);
    }
    if (R > 0) {
      if (!TRANS) lf_stage_rk<LF_RC, LF_BK>(Ds, D, ldd, 0, R, k0, Kr, vec & VEC_D);
      else lf_stage_kc<LF_RC, LF_BK>(Ds, D, ldd, 0, R, k0, Kr, vec & VEC_D);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < LF_BK; ++kk) {
      float a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Xs[kk * LF_LD + ty + 16 * i];
      if (w_on) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float b = Ws[kk * LF_LD + tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i][j] = fmaf(a[i], b, acc[i][j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j < nzj) {
          const float d = Ds[kk * LF_LD + tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i) zacc[i][j] = fmaf(a[i], d, zacc[i][j]);
        }
      }
    }
    __syncthreads();
  }

  if (R > 0) {
    // Z (unscaled) to global once per row block; s Z k-major into shared memory.
    float* Zs = smem;                  // [rank][row]
    float* Us = smem + LF_RC * LF_LD;  // [rank][col]
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = ty + 16 * i, c = tx + 16 * j;
        Zs[c * LF_LD + r] = scale * zacc[i][j];
        if (Z != 0 && blockIdx.x == 0 && m0 + r < M && c < R) Z[(m0 + r) * ldz + c] = zacc[i][j];
      }
    if (main_on) {
      if (!TRANS) lf_stage_rk<LF_BN, LF_RC>(Us, U, ldu, n0, Nc, 0, R, vec & VEC_U);
      else lf_stage_kc<LF_BN, LF_RC>(Us, U, ldu, n0, Nc, 0, R, vec & VEC_U);
    }
    __syncthreads();
    if (main_on) {
      for (int kk = 0; kk < R; ++kk) {
        float a[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = Zs[kk * LF_LD + ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float b = Us[kk * LF_LD + tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i][j] = fmaf(a[i], b, acc[i][j]);
        }
      }
    }
  }
  if (!main_on) return;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = n0 + tx + 16 * j;
    if (c >= Nc) continue;
    const float bj = bias != 0 ? bias[c] : 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = m0 + ty + 16 * i;
      if (r >= M) continue;
      float* p = Y + r * ldy + c;
      const float y = acc[i][j] + bj;
      *p = (vec & VEC_ACC) ? *p + y : y;
    }
  }
}

// C[P][Q] += s * sum_{m in split} L[m][p] * Rt[m][q]   (f32; L [M][P], Rt [M][Q]),
// tile 64 x 64 x 16, grid (ceil(Q / 64), ceil(P / 64), splits), atomics across splits.
__device__ __forceinline__ void wgrad_f32(const float* __restrict__ L, i64 ldl, const float* __restrict__ Rt,
                                          i64 ldr, float scale, float* __restrict__ C, i64 ldc, int M, int P, int Q,
                                          int mchunk, int vec) {
  __shared__ __align__(16) float Ls[LF_BK * LF_LD];
  __shared__ __align__(16) float Rs[LF_BK * LF_LD];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int q0 = blockIdx.x * 64, p0 = blockIdx.y * 64;
  const int mbeg = blockIdx.z * mchunk;
  const int mend = min(M, mbeg + mchunk);
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int k0 = mbeg; k0 < mend; k0 += LF_BK) {
    lf_stage_kc<64, LF_BK>(Ls, L, ldl, p0, P, k0, mend, vec & 1);
    lf_stage_kc<64, LF_BK>(Rs, Rt, ldr, q0, Q, k0, mend, vec & 2);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < LF_BK; ++kk) {
      float a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Ls[kk * LF_LD + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float b = Rs[kk * LF_LD + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i][j] = fmaf(a[i], b, acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int p = p0 + ty + 16 * i;
    if (p >= P) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = q0 + tx + 16 * j;
      if (q < Q) atomicAdd(C + p * ldc + q, scale * acc[i][j]);
    }
  }
}

#define LORA_F32_ARGS                                                                                       \
  const float *X, i64 ldx, const float *W, i64 ldw, const float *D, i64 ldd, const float *U, i64 ldu,       \
      const float *bias, float scale, float *Y, i64 ldy, float *Z, i64 ldz, int M, int Nc, int Kr, int R,   \
      int vec
#define LORA_F32_PASS X, ldx, W, ldw, D, ldd, U, ldu, bias, scale, Y, ldy, Z, ldz, M, Nc, Kr, R, vec

extern "C" __global__ void __launch_bounds__(LF_NT, 2) lora_fwd_float(LORA_F32_ARGS) {
  lora_fused_f32<false>(LORA_F32_PASS);
}
// The f32-output forward of the 16-bit kernels is the plain forward here (used by the
// chunked cross-entropy and the segmented base GEMM under one name per dtype).
extern "C" __global__ void __launch_bounds__(LF_NT, 2) lora_fwd_f32out_float(LORA_F32_ARGS) {
  lora_fused_f32<false>(LORA_F32_PASS);
}
extern "C" __global__ void __launch_bounds__(LF_NT, 2) lora_bwd_dx_float(LORA_F32_ARGS) {
  lora_fused_f32<true>(LORA_F32_PASS);
}
extern "C" __global__ void __launch_bounds__(LF_NT, 2) lora_bwd_dx_f32out_float(LORA_F32_ARGS) {
  lora_fused_f32<true>(LORA_F32_PASS);
}
extern "C" __global__ void __launch_bounds__(LF_NT)
    lora_wgrad_float(const float *L, i64 ldl, const float *Rt, i64 ldr, float scale, float *C, i64 ldc, int M,
                     int P, int Q, int mchunk, int vec) {
  wgrad_f32(L, ldl, Rt, ldr, scale, C, ldc, M, P, Q, mchunk, vec);
}
