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

#define INSTANTIATE_SGMV(T)                                                                                \
  extern "C" __global__ void __launch_bounds__(SG_WARPS * 32)                                              \
      sgmv_shrink_##T(const T *X, int K, const float *A, const i64 *table, float *Z) {                     \
    sgmv_shrink_impl<T>(X, K, A, table, Z);                                                                \
  }

INSTANTIATE_SGMV(bf16)
INSTANTIATE_SGMV(f16)
INSTANTIATE_SGMV(float)
