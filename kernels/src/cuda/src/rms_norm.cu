// RMSNorm over the last dim, f32 statistics: y = x * rstd * w, rstd = 1/sqrt(mean(x^2)+eps).
// One block (128 threads) per row; 16-byte vector loads when d % 8 == 0 (VEC flag).
// The forward can keep rstd [rows] (f32, for dw); the backward recomputes it:
//   g = dy * w,  dx = rstd * (g - xhat * mean(g * xhat)),  dw = sum_rows dy * xhat.

template <typename T>
__device__ __forceinline__ void rms_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                        float* __restrict__ rstd, int d, float eps, int vec) {
  __shared__ float sh[32];
  const i64 row = blockIdx.x;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  float ss = 0.f;
  if (vec) {
    for (int j = threadIdx.x * 8; j < d; j += blockDim.x * 8) {
      float v[8]; load8<T>(xr + j, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
    }
  } else {
    for (int j = threadIdx.x; j < d; j += blockDim.x) { const float v = to_f32(xr[j]); ss += v * v; }
  }
  ss = block_sum(ss, sh);
  const float rs = rsqrtf(ss / (float)d + eps);
  if (threadIdx.x == 0 && rstd != 0) rstd[row] = rs;
  if (vec) {
    for (int j = threadIdx.x * 8; j < d; j += blockDim.x * 8) {
      float v[8], wv[8]; load8<T>(xr + j, v); load8<T>(w + j, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = v[i] * rs * wv[i];
      store8<T>(yr + j, v);
    }
  } else {
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = from_f32<T>(to_f32(xr[j]) * rs * to_f32(w[j]));
  }
}

template <typename T>
__device__ __forceinline__ void rms_bwd(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                        T* __restrict__ dx, int d, float eps, int vec) {
  // rstd is recomputed in the same pass as sum(g * x), so the forward keeps nothing.
  __shared__ float sh[32];
  const i64 row = blockIdx.x;
  const T* xr = x + row * d;
  const T* gr = dy + row * d;
  T* dxr = dx + row * d;
  float ss = 0.f, gwx = 0.f;
  if (vec) {
    for (int j = threadIdx.x * 8; j < d; j += blockDim.x * 8) {
      float xv[8], gv[8], wv[8];
      load8<T>(xr + j, xv); load8<T>(gr + j, gv); load8<T>(w + j, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) { ss += xv[i] * xv[i]; gwx += gv[i] * wv[i] * xv[i]; }
    }
  } else {
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
      const float xv = to_f32(xr[j]);
      ss += xv * xv; gwx += to_f32(gr[j]) * to_f32(w[j]) * xv;
    }
  }
  ss = block_sum(ss, sh);
  gwx = block_sum(gwx, sh);
  const float rs = rsqrtf(ss / (float)d + eps);
  const float mean = gwx * rs / (float)d;  // mean(g * w * xhat)
  if (vec) {
    for (int j = threadIdx.x * 8; j < d; j += blockDim.x * 8) {
      float xv[8], gv[8], wv[8];
      load8<T>(xr + j, xv); load8<T>(gr + j, gv); load8<T>(w + j, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) xv[i] = rs * (gv[i] * wv[i] - xv[i] * rs * mean);
      store8<T>(dxr + j, xv);
    }
  } else {
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
      const float xh = to_f32(xr[j]) * rs;
      dxr[j] = from_f32<T>(rs * (to_f32(gr[j]) * to_f32(w[j]) - xh * mean));
    }
  }
}

// dw[j] += sum over a slice of rows of dy[r][j] * x[r][j] * rstd[r]; one thread per
// column (coalesced across the block), rows split over gridDim.y, f32 atomics.
template <typename T>
__device__ __forceinline__ void rms_bwd_dw(const T* __restrict__ dy, const T* __restrict__ x,
                                           const float* __restrict__ rstd, float* __restrict__ dw, int rows, int d,
                                           int rchunk) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int r0 = blockIdx.y * rchunk, r1 = min(rows, r0 + rchunk);
  float acc = 0.f;
  for (int r = r0; r < r1; ++r) acc += to_f32(dy[(i64)r * d + j]) * to_f32(x[(i64)r * d + j]) * rstd[r];
  atomicAdd(dw + j, acc);
}

#define INSTANTIATE_RMS(T)                                                                                   \
  extern "C" __global__ void __launch_bounds__(1024) rms_norm_fwd_##T(const T *x, const T *w, T *y,          \
                                                                      float *rstd, int d, float eps, int vec) { \
    rms_fwd<T>(x, w, y, rstd, d, eps, vec);                                                                  \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(1024) rms_norm_bwd_##T(const T *dy, const T *x, const T *w,   \
                                                                      T *dx, int d, float eps, int vec) {   \
    rms_bwd<T>(dy, x, w, dx, d, eps, vec);                                                                  \
  }                                                                                                          \
  extern "C" __global__ void rms_norm_bwd_dw_##T(const T *dy, const T *x, const float *rstd, float *dw,      \
                                                 int rows, int d, int rchunk) {                              \
    rms_bwd_dw<T>(dy, x, rstd, dw, rows, d, rchunk);                                                         \
  }

INSTANTIATE_RMS(bf16)
INSTANTIATE_RMS(f16)
INSTANTIATE_RMS(float)
