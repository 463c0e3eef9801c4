// Dequantize a frozen base weight on the device, right before its GEMM (QLoRA): the packed
// weight stays in GPU memory at ~0.56 bytes a parameter and only the projection at hand
// exists densely, in the compute dtype.
//
// NF4 as bitsandbytes stores it with double quantization (models/src/quant.rs, Nf4Matrix):
// two 4-bit codes a byte (first element in the high nibble), one absmax per 64 values,
// itself stored as an 8-bit index into the 256-entry dynamic map, times one f32 scale per
// 256 absmax values, plus one offset:
//     absmax[b] = dmap[qabsmax[b]] * scale[b / 256] + offset        (b = i / 64)
//     w[i]      = code16[nibble(i)] * absmax[b]
// int8 as bitsandbytes' int8_vectorwise_quant: w[r, c] = codes[r, c] * (row_absmax[r] / 127).
// Every product and sum is rounded on its own (__fmul_rn, __fadd_rn, __fdiv_rn: no FMA
// contraction), so the weights equal the CPU dequantization bit for bit.

template <typename T>
__device__ __forceinline__ void nf4_dequant_impl(const unsigned char* __restrict__ packed, const unsigned char* __restrict__ qabsmax,
                                                 const float* __restrict__ absmax_scale, const float* __restrict__ dmap,
                                                 const float* __restrict__ code16, float offset, T* __restrict__ out, i64 n) {
  // One packed byte (two values) a thread; blocks of 64 values never straddle a byte.
  const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (2 * p >= n) return;
  const i64 b = (2 * p) / 64;
  const float am = __fadd_rn(__fmul_rn(dmap[qabsmax[b]], absmax_scale[b / 256]), offset);
  const unsigned char byte = packed[p];
  out[2 * p] = from_f32<T>(__fmul_rn(code16[byte >> 4], am));
  out[2 * p + 1] = from_f32<T>(__fmul_rn(code16[byte & 15], am));
}

template <typename T>
__device__ __forceinline__ void int8_dequant_impl(const signed char* __restrict__ codes, const float* __restrict__ row_absmax,
                                                  T* __restrict__ out, i64 rows, i64 cols) {
  const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const float s = __fdiv_rn(row_absmax[i / cols], 127.f);
  out[i] = from_f32<T>(__fmul_rn((float)codes[i], s));
}

#define INSTANTIATE_DEQUANT(T)                                                                                   \
  extern "C" __global__ void nf4_dequant_##T(const unsigned char *packed, const unsigned char *qabsmax,          \
                                             const float *absmax_scale, const float *dmap, const float *code16,  \
                                             float offset, T *out, i64 n) {                                      \
    nf4_dequant_impl<T>(packed, qabsmax, absmax_scale, dmap, code16, offset, out, n);                            \
  }                                                                                                              \
  extern "C" __global__ void int8_dequant_##T(const signed char *codes, const float *row_absmax, T *out,         \
                                              i64 rows, i64 cols) {                                              \
    int8_dequant_impl<T>(codes, row_absmax, out, rows, cols);                                                    \
  }
INSTANTIATE_DEQUANT(bf16)
INSTANTIATE_DEQUANT(f16)
INSTANTIATE_DEQUANT(float)
