// Fused AdamW over ALL LoRA tensors in one launch (multi-tensor apply), f32 master
// weights, gradients and moments, PyTorch AdamW semantics (decoupled weight decay):
//   p -= lr * wd * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= lr * (m / bc1) / (sqrt(v / bc2) + eps),     g = gscale * grad (clipping factor).
// `table` holds 4 device pointers per tensor (p, g, m, v); block b updates elements
// [bstart[b], bstart[b] + ADAMW_CHUNK) of tensor btensor[b] (host-built tables).
// float4 loads when the tensor's pointers are 16-byte aligned and its size % 4 == 0.
#define ADAMW_CHUNK 4096

extern "C" __global__ void __launch_bounds__(256)
    adamw_multi(const u64* __restrict__ table, const i64* __restrict__ sizes, const int* __restrict__ btensor,
                const i64* __restrict__ bstart, float lr, float b1, float b2, float eps, float wd, float bc1,
                float bc2, float gscale) {
  const int ti = btensor[blockIdx.x];
  const i64 n = sizes[ti];
  const i64 s0 = bstart[blockIdx.x];
  const i64 s1 = min(n, s0 + (i64)ADAMW_CHUNK);
  float* p = reinterpret_cast<float*>(table[4 * ti + 0]);
  const float* g = reinterpret_cast<const float*>(table[4 * ti + 1]);
  float* m = reinterpret_cast<float*>(table[4 * ti + 2]);
  float* v = reinterpret_cast<float*>(table[4 * ti + 3]);
  const bool vec = ((n & 3) == 0) &&
                   ((((u64)p) | ((u64)g) | ((u64)m) | ((u64)v)) & 15) == 0;
  const float ib1 = 1.f - b1, ib2 = 1.f - b2, decay = 1.f - lr * wd;
  const float step = lr / bc1, ibc2 = 1.f / bc2;
  if (vec) {
    for (i64 i = s0 + threadIdx.x * 4; i < s1; i += blockDim.x * 4) {
      float4 pv = *reinterpret_cast<float4*>(p + i);
      float4 gv = *reinterpret_cast<const float4*>(g + i);
      float4 mv = *reinterpret_cast<float4*>(m + i);
      float4 vv = *reinterpret_cast<float4*>(v + i);
      float* pp = &pv.x; float* gg = &gv.x; float* mm = &mv.x; float* ww = &vv.x;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float gk = gscale * gg[k];
        mm[k] = b1 * mm[k] + ib1 * gk;
        ww[k] = b2 * ww[k] + ib2 * gk * gk;
        pp[k] = pp[k] * decay - step * mm[k] / (sqrtf(ww[k] * ibc2) + eps);
      }
      *reinterpret_cast<float4*>(p + i) = pv;
      *reinterpret_cast<float4*>(m + i) = mv;
      *reinterpret_cast<float4*>(v + i) = vv;
    }
  } else {
    for (i64 i = s0 + threadIdx.x; i < s1; i += blockDim.x) {
      const float gk = gscale * g[i];
      const float mk = b1 * m[i] + ib1 * gk;
      const float vk = b2 * v[i] + ib2 * gk * gk;
      m[i] = mk; v[i] = vk;
      p[i] = p[i] * decay - step * mk / (sqrtf(vk * ibc2) + eps);
    }
  }
}

// Sum of squares of all gradients (for global-norm clipping) into out[0] (zeroed by the
// caller); same block tables as adamw_multi, pointer slot 1 (g) is read.
extern "C" __global__ void __launch_bounds__(256)
    sqnorm_multi(const u64* __restrict__ table, const i64* __restrict__ sizes, const int* __restrict__ btensor,
                 const i64* __restrict__ bstart, float* __restrict__ out) {
  __shared__ float sh[32];
  const int ti = btensor[blockIdx.x];
  const i64 n = sizes[ti];
  const i64 s0 = bstart[blockIdx.x];
  const i64 s1 = min(n, s0 + (i64)ADAMW_CHUNK);
  const float* g = reinterpret_cast<const float*>(table[4 * ti + 1]);
  float acc = 0.f;
  for (i64 i = s0 + threadIdx.x; i < s1; i += blockDim.x) acc += g[i] * g[i];
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) atomicAdd(out, acc);
}
