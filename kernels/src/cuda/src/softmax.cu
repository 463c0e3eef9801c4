// Attention softmax over the last dim with an optional causal mask, f32 math.
// x, y: [rows, cols] contiguous. With causal tq > 0, row i is query (i % tq) whose absolute
// position is (i % tq) + cols - tq; keys after it get probability 0 (their logits are
// never read). y = softmax(scale * x);  backward: dx = scale * y * (dy - sum(dy * y)).
// One block (128..1024 threads) per row; 16-byte vector loads when cols % 8 == 0 (VEC).
template <typename T>
__device__ __forceinline__ void softmax_fwd_impl(const T* __restrict__ x, T* __restrict__ y, int cols, int tq,
                                                 float scale, int vec) {
  __shared__ float sh[32];
  const i64 row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const int valid = tq > 0 ? (int)(row % tq) + cols - tq + 1 : cols;
  float mx = NEG_INF;
  if (vec) {
    for (int j = threadIdx.x * 8; j < valid; j += blockDim.x * 8) {
      float v[8]; load8<T>(xr + j, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) if (j + i < valid) mx = fmaxf(mx, v[i] * scale);
    }
  } else {
    for (int j = threadIdx.x; j < valid; j += blockDim.x) mx = fmaxf(mx, to_f32(xr[j]) * scale);
  }
  mx = block_max(mx, sh);
  float sum = 0.f;
  if (vec) {
    for (int j = threadIdx.x * 8; j < valid; j += blockDim.x * 8) {
      float v[8]; load8<T>(xr + j, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) if (j + i < valid) sum += __expf(v[i] * scale - mx);
    }
  } else {
    for (int j = threadIdx.x; j < valid; j += blockDim.x) sum += __expf(to_f32(xr[j]) * scale - mx);
  }
  const float inv = 1.f / block_sum(sum, sh);
  if (vec) {
    for (int j = threadIdx.x * 8; j < cols; j += blockDim.x * 8) {
      float v[8]; load8<T>(xr + j, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = (j + i < valid) ? __expf(v[i] * scale - mx) * inv : 0.f;
      store8<T>(yr + j, v);
    }
  } else {
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
      yr[j] = from_f32<T>(j < valid ? __expf(to_f32(xr[j]) * scale - mx) * inv : 0.f);
  }
}

template <typename T>
__device__ __forceinline__ void softmax_bwd_impl(const T* __restrict__ y, const T* __restrict__ dy,
                                                 T* __restrict__ dx, int cols, float scale, int vec) {
  __shared__ float sh[32];
  const i64 row = blockIdx.x;
  const T* yr = y + row * cols;
  const T* gr = dy + row * cols;
  T* dr = dx + row * cols;
  float dot = 0.f;
  if (vec) {
    for (int j = threadIdx.x * 8; j < cols; j += blockDim.x * 8) {
      float a[8], b[8]; load8<T>(yr + j, a); load8<T>(gr + j, b);
#pragma unroll
      for (int i = 0; i < 8; ++i) dot += a[i] * b[i];
    }
  } else {
    for (int j = threadIdx.x; j < cols; j += blockDim.x) dot += to_f32(yr[j]) * to_f32(gr[j]);
  }
  dot = block_sum(dot, sh);
  if (vec) {
    for (int j = threadIdx.x * 8; j < cols; j += blockDim.x * 8) {
      float a[8], b[8]; load8<T>(yr + j, a); load8<T>(gr + j, b);
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = scale * a[i] * (b[i] - dot);
      store8<T>(dr + j, a);
    }
  } else {
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
      dr[j] = from_f32<T>(scale * to_f32(yr[j]) * (to_f32(gr[j]) - dot));
  }
}

#define INSTANTIATE_SOFTMAX(T)                                                                              \
  extern "C" __global__ void __launch_bounds__(1024)                                                        \
      softmax_fwd_##T(const T *x, T *y, int cols, int tq, float scale, int vec) {                           \
    softmax_fwd_impl<T>(x, y, cols, tq, scale, vec);                                                        \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(1024)                                                        \
      softmax_bwd_##T(const T *y, const T *dy, T *dx, int cols, float scale, int vec) {                     \
    softmax_bwd_impl<T>(y, dy, dx, cols, scale, vec);                                                       \
  }
INSTANTIATE_SOFTMAX(bf16)
INSTANTIATE_SOFTMAX(f16)
INSTANTIATE_SOFTMAX(float)
