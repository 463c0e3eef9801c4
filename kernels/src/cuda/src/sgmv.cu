// Segmented LoRA (Punica's SGMV) for several adapters over one frozen base: the base
// GEMM runs once over all rows elsewhere; these two launches add each segment's
// adapter path on its own rows only.
//   shrink: Z_s = X_s A_j^T        [len_s, r_j] f32, per segment s routed to adapter j
//   expand: Y_s += scale_j Z_s B_j^T  (Y f32, in place)
// Both take the whole segment table at once (one launch over all segments; blockIdx
// picks the segment), so the launch count does not grow with the number of adapters.
// A and B are the concatenations of every adapter's flattened f32 weights; the table
// holds, per segment, SEG_FIELDS i64: first row, rows, rank, offset of A_j, offset of
// B_j, offset of Z_s. Ranks are arbitrary (LoRA ranks are small, so no tensor cores:
// the work is dominated by reading X once and writing Y once).

#define SEG_FIELDS 6

// shrink: one warp per row, SG_WARPS rows per block; each lane accumulates SG_RT ranks
// at a time over a strided slice of K (coalesced reads of X and of A_j's rows), then
// the warp reduces. Grid: (ceil(max rows / SG_WARPS), segments).
#define SG_WARPS 8
#define SG_RT 16

template <typename T>
__device__ __forceinline__ void sgmv_shrink_impl(const T* __restrict__ X, int K, const float* __restrict__ A,
                                                 const i64* __restrict__ table, float* __restrict__ Z) {
  const i64* seg = table + (i64)blockIdx.y * SEG_FIELDS;
  const i64 rows = seg[1];
  const int R = (int)seg[2];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const i64 i = (i64)blockIdx.x * SG_WARPS + warp;
  if (i >= rows) return;  // whole warps leave together: no block-level sync below
  const T* x = X + (seg[0] + i) * K;
  const float* a = A + seg[3];
  float* z = Z + seg[5] + i * R;
  for (int r0 = 0; r0 < R; r0 += SG_RT) {
    float acc[SG_RT];
#pragma unroll
    for (int j = 0; j < SG_RT; ++j) acc[j] = 0.f;
    for (int k = lane; k < K; k += 32) {
      const float xv = to_f32(x[k]);
#pragma unroll
      for (int j = 0; j < SG_RT; ++j)
        if (r0 + j < R) acc[j] += xv * a[(i64)(r0 + j) * K + k];
    }
#pragma unroll
    for (int j = 0; j < SG_RT; ++j) {
      const float s = warp_sum(acc[j]);
      if (lane == 0 && r0 + j < R) z[r0 + j] = s;
    }
  }
}

// expand: one thread per output column, SE_ROWS rows per block; the block stages the
// rows' Z in chunks of SE_RC ranks into shared memory (every thread reads the same
// element: a broadcast) and each thread keeps SE_ROWS accumulators. Grid:
// (ceil(N / SE_NT), ceil(max rows / SE_ROWS), segments).
#define SE_NT 256
#define SE_ROWS 16
#define SE_RC 32

extern "C" __global__ void __launch_bounds__(SE_NT)
    sgmv_expand(const float* __restrict__ Z, const float* __restrict__ B, const i64* __restrict__ table,
                const float* __restrict__ scales, float* __restrict__ Y, int N) {
  __shared__ float zs[SE_ROWS * SE_RC];
  const i64* seg = table + (i64)blockIdx.z * SEG_FIELDS;
  const i64 rows = seg[1];
  const int R = (int)seg[2];
  const i64 i0 = (i64)blockIdx.y * SE_ROWS;
  if (i0 >= rows) return;  // the whole block leaves before any __syncthreads
  const int nr = rows - i0 < SE_ROWS ? (int)(rows - i0) : SE_ROWS;
  const int o = blockIdx.x * SE_NT + threadIdx.x;
  const float* z = Z + seg[5] + i0 * R;
  const float* b = B + seg[4] + (i64)o * R;
  float acc[SE_ROWS];
#pragma unroll
  for (int r = 0; r < SE_ROWS; ++r) acc[r] = 0.f;
  for (int r0 = 0; r0 < R; r0 += SE_RC) {
    const int rc = R - r0 < SE_RC ? R - r0 : SE_RC;
    __syncthreads();
    for (int c = threadIdx.x; c < SE_ROWS * SE_RC; c += SE_NT) {
      const int r = c / SE_RC, j = c % SE_RC;
      zs[c] = (r < nr && j < rc) ? z[(i64)r * R + r0 + j] : 0.f;
    }
    __syncthreads();
    if (o < N) {
      for (int j = 0; j < rc; ++j) {
        const float bv = b[r0 + j];
#pragma unroll
        for (int r = 0; r < SE_ROWS; ++r) acc[r] += zs[r * SE_RC + j] * bv;
      }
    }
  }
  if (o >= N) return;
  const float s = scales[blockIdx.z];
  float* y = Y + (seg[0] + i0) * N + o;
#pragma unroll
  for (int r = 0; r < SE_ROWS; ++r)
    if (r < nr) y[(i64)r * N] += s * acc[r];
}


// Backward weight gradients of every segment in one launch (f32 atomics, so several
// segments of one adapter and several row chunks of one segment add up):
//   A mode: dA_j[r][k] += s_j sum_i V_s[i][r] X[start + i][k]     (V_s = dY_s B_j, f32)
//   B mode: dB_j[o][r] += s_j sum_i dY[start + i][o] Z_s[i][r]   (Z_s = X_s A_j^T, f32)
// `Xr` is the [m][ld] row-major activation (x in A mode, dY in B mode), `Zb` the f32
// per-segment buffer (V or Z, rows of R at the segment's Z offset), `G` dA_all / dB_all.
// 64 x 64 tile of the [P][Q] gradient per block over SW_ROWS rows of the segment;
// 256 threads as 16 x 16, each 4 x 4 (strided by 16). Grid: (max tiles over segments,
// segments, ceil(longest segment / SW_ROWS)).
#define SW_ROWS 256
#define SW_BK 16
#define SW_LD 68

template <typename T, bool AMODE>
__device__ __forceinline__ void sgmv_wgrad_impl(const T* __restrict__ Xr, int ld, const float* __restrict__ Zb,
                                                const i64* __restrict__ table, const float* __restrict__ scales,
                                                float* __restrict__ G) {
  __shared__ float Ls[SW_BK * SW_LD];
  __shared__ float Rs[SW_BK * SW_LD];
  const i64* seg = table + (i64)blockIdx.y * SEG_FIELDS;
  const i64 start = seg[0], rows = seg[1];
  const int R = (int)seg[2];
  const int P = AMODE ? R : ld, Q = AMODE ? ld : R;
  const int tiles_q = (Q + 63) / 64;
  if ((int)blockIdx.x >= ((P + 63) / 64) * tiles_q) return;  // whole block: before any barrier
  const i64 i_beg = (i64)blockIdx.z * SW_ROWS;
  if (i_beg >= rows) return;
  const i64 i_end = rows - i_beg < SW_ROWS ? rows : i_beg + SW_ROWS;
  const int p0 = (blockIdx.x / tiles_q) * 64, q0 = (blockIdx.x % tiles_q) * 64;
  const float* z = Zb + seg[5];
  float* C = G + (AMODE ? seg[3] : seg[4]);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (i64 k0 = i_beg; k0 < i_end; k0 += SW_BK) {
    for (int idx = threadIdx.x; idx < SW_BK * 64; idx += 256) {
      const int kk = idx / 64, c = idx % 64;
      const i64 i = k0 + kk;
      const bool in = i < i_end;
      // L[i][p] and R[i][q] of this mode
      const int p = p0 + c, q = q0 + c;
      float lv = 0.f, rv = 0.f;
      if (in && p < P) lv = AMODE ? z[i * R + p] : to_f32(Xr[(start + i) * ld + p]);
      if (in && q < Q) rv = AMODE ? to_f32(Xr[(start + i) * ld + q]) : z[i * R + q];
      Ls[kk * SW_LD + c] = lv;
      Rs[kk * SW_LD + c] = rv;
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < SW_BK; ++kk) {
      float a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Ls[kk * SW_LD + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float b = Rs[kk * SW_LD + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i][j] = fmaf(a[i], b, acc[i][j]);
      }
    }
    __syncthreads();
  }
  const float s = scales[blockIdx.y];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int p = p0 + ty + 16 * i;
    if (p >= P) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = q0 + tx + 16 * j;
      if (q < Q) atomicAdd(C + (i64)p * Q + q, s * acc[i][j]);
    }
  }
}

#define INSTANTIATE_SGMV(T)                                                                                \
  extern "C" __global__ void __launch_bounds__(SG_WARPS * 32)                                              \
      sgmv_shrink_##T(const T *X, int K, const float *A, const i64 *table, float *Z) {                     \
    sgmv_shrink_impl<T>(X, K, A, table, Z);                                                                \
  }                                                                                                        \
  extern "C" __global__ void __launch_bounds__(256) sgmv_wgrad_a_##T(                                      \
      const T *X, int ld, const float *Zb, const i64 *table, const float *scales, float *G) {              \
    sgmv_wgrad_impl<T, true>(X, ld, Zb, table, scales, G);                                                 \
  }                                                                                                        \
  extern "C" __global__ void __launch_bounds__(256) sgmv_wgrad_b_##T(                                      \
      const T *X, int ld, const float *Zb, const i64 *table, const float *scales, float *G) {              \
    sgmv_wgrad_impl<T, false>(X, ld, Zb, table, scales, G);                                                \
  }

INSTANTIATE_SGMV(bf16)
INSTANTIATE_SGMV(f16)
INSTANTIATE_SGMV(float)
