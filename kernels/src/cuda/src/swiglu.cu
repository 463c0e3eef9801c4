// SwiGLU: h = silu(g) * u, silu(g) = g * sigmoid(g). Elementwise over n contiguous elements,
// 8 per thread with 16-byte loads when VEC (n % 8 == 0, aligned), else 1 per thread.
//   backward: dg = dh * u * sig * (1 + g * (1 - sig)),  du = dh * silu(g).
__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + __expf(-g)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd_impl(const T* __restrict__ g, const T* __restrict__ u,
                                                T* __restrict__ h, i64 n, int vec) {
  const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (vec) {
    const i64 j = i * 8;
    if (j >= n) return;
    float a[8], b[8];
    load8<T>(g + j, a); load8<T>(u + j, b);
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] = a[k] * sigmoidf_(a[k]) * b[k];
    store8<T>(h + j, a);
  } else {
    if (i >= n) return;
    const float a = to_f32(g[i]);
    h[i] = from_f32<T>(a * sigmoidf_(a) * to_f32(u[i]));
  }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_impl(const T* __restrict__ g, const T* __restrict__ u,
                                                const T* __restrict__ dh, T* __restrict__ dg, T* __restrict__ du,
                                                i64 n, int vec) {
  const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (vec) {
    const i64 j = i * 8;
    if (j >= n) return;
    float a[8], b[8], d[8], og[8], ou[8];
    load8<T>(g + j, a); load8<T>(u + j, b); load8<T>(dh + j, d);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float s = sigmoidf_(a[k]);
      og[k] = d[k] * b[k] * s * (1.f + a[k] * (1.f - s));
      ou[k] = d[k] * a[k] * s;
    }
    store8<T>(dg + j, og); store8<T>(du + j, ou);
  } else {
    if (i >= n) return;
    const float a = to_f32(g[i]), b = to_f32(u[i]), d = to_f32(dh[i]), s = sigmoidf_(a);
    dg[i] = from_f32<T>(d * b * s * (1.f + a * (1.f - s)));
    du[i] = from_f32<T>(d * a * s);
  }
}

#define INSTANTIATE_SWIGLU(T)                                                                               \
  extern "C" __global__ void swiglu_fwd_##T(const T *g, const T *u, T *h, i64 n, int vec) {                 \
    swiglu_fwd_impl<T>(g, u, h, n, vec);                                                                    \
  }                                                                                                         \
  extern "C" __global__ void swiglu_bwd_##T(const T *g, const T *u, const T *dh, T *dg, T *du, i64 n,       \
                                            int vec) {                                                      \
    swiglu_bwd_impl<T>(g, u, dh, dg, du, n, vec);                                                           \
  }
INSTANTIATE_SWIGLU(bf16)
INSTANTIATE_SWIGLU(f16)
INSTANTIATE_SWIGLU(float)
