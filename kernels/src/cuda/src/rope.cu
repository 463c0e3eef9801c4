// RoPE, Hugging Face rotate_half layout. x: [b, h, t, d] with arbitrary strides for b, h, t
// (last dim contiguous), cos/sin: [b, t, d/2] f32 contiguous, out: [b, h, t, d] contiguous.
//   forward:  o1 = x1 c - x2 s,  o2 = x2 c + x1 s        (x1 = x[..., :d/2], x2 = x[..., d/2:])
//   backward: the inverse rotation, i.e. the forward with sin negated (sign = -1).
// One thread per 8 rotation pairs (16-byte loads of x1, x2; 2 x 16-byte loads of c, s) when
// d/2 % 8 == 0 and x is 16-byte aligned (VEC), else one thread per pair.
template <typename T>
__device__ __forceinline__ void rope_impl(const T* __restrict__ x, const float* __restrict__ cs,
                                          const float* __restrict__ sn, T* __restrict__ out, int B, int H, int Tn,
                                          int d, i64 sb, i64 sh, i64 st, float sign, int vec) {
  const int half = d / 2;
  const int per = vec ? 8 : 1;
  const int groups = half / per;
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const i64 total = (i64)B * H * Tn * groups;
  if (idx >= total) return;
  const int gi = (int)(idx % groups);
  i64 rest = idx / groups;
  const int ti = (int)(rest % Tn); rest /= Tn;
  const int hi = (int)(rest % H);
  const int bi = (int)(rest / H);
  const T* xr = x + bi * sb + hi * sh + ti * st;
  T* orow = out + (((i64)bi * H + hi) * Tn + ti) * d;
  const float* cr = cs + ((i64)bi * Tn + ti) * half;
  const float* sr = sn + ((i64)bi * Tn + ti) * half;
  const int j = gi * per;
  if (vec) {
    float x1[8], x2[8], c[8], s[8], o1[8], o2[8];
    load8<T>(xr + j, x1); load8<T>(xr + half + j, x2);
    load8<float>(cr + j, c); load8<float>(sr + j, s);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float si = sign * s[i];
      o1[i] = x1[i] * c[i] - x2[i] * si;
      o2[i] = x2[i] * c[i] + x1[i] * si;
    }
    store8<T>(orow + j, o1); store8<T>(orow + half + j, o2);
  } else {
    const float a = to_f32(xr[j]), b = to_f32(xr[half + j]), c = cr[j], s = sign * sr[j];
    orow[j] = from_f32<T>(a * c - b * s);
    orow[half + j] = from_f32<T>(b * c + a * s);
  }
}

#define INSTANTIATE_ROPE(T)                                                                                 \
  extern "C" __global__ void rope_##T(const T *x, const float *cs, const float *sn, T *out, int B, int H,   \
                                      int Tn, int d, i64 sb, i64 sh, i64 st, float sign, int vec) {         \
    rope_impl<T>(x, cs, sn, out, B, H, Tn, d, sb, sh, st, sign, vec);                                       \
  }
INSTANTIATE_ROPE(bf16)
INSTANTIATE_ROPE(f16)
INSTANTIATE_ROPE(float)
