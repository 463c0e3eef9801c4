// Row-wise cross-entropy over one chunk of f32 logits (the chunked linear cross-entropy
// computes logits = H W^T chunk by chunk with lora_fwd_f32out (R = 0), runs this kernel,
// then dH = dlogits W with lora_bwd_dx (R = 0); the full [tokens, vocab] logits and their
// gradient never exist at once).
//   loss[r] = w[r] * (logsumexp(logits[r]) - logits[r][target[r]])
//   dlogits[r] = gscale * w[r] * (softmax(logits[r]) - onehot(target[r]))   (if dlogits != 0)
// A target >= V (e.g. an ignore index) gives loss 0 and gradient 0.
// One block (256 threads) per row; float4 loads when V % 4 == 0 (VEC).
template <typename T>
__device__ __forceinline__ void ce_rows_impl(const float* __restrict__ logits, const u32* __restrict__ targets,
                                             const float* __restrict__ weights, float* __restrict__ loss,
                                             T* __restrict__ dlogits, int V, float gscale, int vec) {
  __shared__ float sh[32];
  const i64 row = blockIdx.x;
  const float* lr = logits + row * V;
  const u32 tgt = targets[row];
  const float w = (tgt < (u32)V) ? weights[row] : 0.f;
  float mx = NEG_INF;
  if (vec) {
    for (int j = threadIdx.x * 4; j < V; j += blockDim.x * 4) {
      const float4 v = *reinterpret_cast<const float4*>(lr + j);
      mx = fmaxf(mx, fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w)));
    }
  } else {
    for (int j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, lr[j]);
  }
  mx = block_max(mx, sh);
  float sum = 0.f;
  if (vec) {
    for (int j = threadIdx.x * 4; j < V; j += blockDim.x * 4) {
      const float4 v = *reinterpret_cast<const float4*>(lr + j);
      sum += __expf(v.x - mx) + __expf(v.y - mx) + __expf(v.z - mx) + __expf(v.w - mx);
    }
  } else {
    for (int j = threadIdx.x; j < V; j += blockDim.x) sum += __expf(lr[j] - mx);
  }
  sum = block_sum(sum, sh);
  const float lse = mx + __logf(sum);
  if (threadIdx.x == 0) loss[row] = (w != 0.f) ? w * (lse - lr[tgt]) : 0.f;
  if (dlogits == 0) return;
  T* dr = dlogits + row * V;
  const float gw = gscale * w;
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    const float p = __expf(lr[j] - lse);
    dr[j] = from_f32<T>(gw * (p - ((u32)j == tgt ? 1.f : 0.f)));
  }
}

#define INSTANTIATE_CE(T)                                                                                   \
  extern "C" __global__ void __launch_bounds__(1024)                                                        \
      ce_rows_##T(const float *logits, const u32 *targets, const float *weights, float *loss, T *dlogits,   \
                  int V, float gscale, int vec) {                                                           \
    ce_rows_impl<T>(logits, targets, weights, loss, dlogits, V, gscale, vec);                               \
  }
INSTANTIATE_CE(bf16)
INSTANTIATE_CE(f16)
INSTANTIATE_CE(float)
