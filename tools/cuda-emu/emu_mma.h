// mma.sync m16n8k16 for the emulator: the warp's lanes publish their fragments, every
// lane rebuilds the 16x16 A and 16x8 B tiles (layout as in common.cuh) and computes its
// four accumulators. Included after common.cuh.
#pragma once
struct EmuMmaSlots { u32 a[32][4]; u32 b[32][2]; };
inline EmuMmaSlots emu_mma_slots[32];
template <typename T> inline float emu_h2f(unsigned short x) { T t; t.x = x; return to_f32(t); }
template <typename T> inline void emu_mma(float* c, const u32* a, const u32* b) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  EmuMmaSlots& S = emu_mma_slots[w];
  for (int i = 0; i < 4; ++i) S.a[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) S.b[lane][i] = b[i];
  emu_warps[w].bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    auto lo = [](u32 v) { return (unsigned short)(v & 0xffff); };
    auto hi = [](u32 v) { return (unsigned short)(v >> 16); };
    A[g][2 * t] = emu_h2f<T>(lo(S.a[l][0]));         A[g][2 * t + 1] = emu_h2f<T>(hi(S.a[l][0]));
    A[g + 8][2 * t] = emu_h2f<T>(lo(S.a[l][1]));     A[g + 8][2 * t + 1] = emu_h2f<T>(hi(S.a[l][1]));
    A[g][2 * t + 8] = emu_h2f<T>(lo(S.a[l][2]));     A[g][2 * t + 9] = emu_h2f<T>(hi(S.a[l][2]));
    A[g + 8][2 * t + 8] = emu_h2f<T>(lo(S.a[l][3])); A[g + 8][2 * t + 9] = emu_h2f<T>(hi(S.a[l][3]));
    B[2 * t][g] = emu_h2f<T>(lo(S.b[l][0]));         B[2 * t + 1][g] = emu_h2f<T>(hi(S.b[l][0]));
    B[2 * t + 8][g] = emu_h2f<T>(lo(S.b[l][1]));     B[2 * t + 9][g] = emu_h2f<T>(hi(S.b[l][1]));
  }
  emu_warps[w].bar.arrive_and_wait();
  const int g = lane >> 2, t = lane & 3;
  for (int k = 0; k < 16; ++k) {
    c[0] += A[g][k] * B[k][2 * t];
    c[1] += A[g][k] * B[k][2 * t + 1];
    c[2] += A[g + 8][k] * B[k][2 * t];
    c[3] += A[g + 8][k] * B[k][2 * t + 1];
  }
}
template <> inline void mma16816<bf16>(float* c, const u32* a, const u32* b) { emu_mma<bf16>(c, a, b); }
template <> inline void mma16816<f16>(float* c, const u32* a, const u32* b) { emu_mma<f16>(c, a, b); }

// TF32 (lora_tf32.cu): cvt.rna.tf32.f32 keeps 10 mantissa bits, rounding half away from
// zero; mma.m16n8k8 .tf32 fragments: a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4],
// a3 = A[g+8][t+4]; b0 = B[t][g], b1 = B[t+4][g]; C as m16n8k16.
inline float to_tf32(float v) {
  unsigned u = __float_as_uint(v);
  u = (u + 0x1000u) & 0xffffe000u;
  return __uint_as_float(u);
}
inline void mma1688_tf32(float* c, const u32* a, const u32* b) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  EmuMmaSlots& S = emu_mma_slots[w];
  for (int i = 0; i < 4; ++i) S.a[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) S.b[lane][i] = b[i];
  emu_warps[w].bar.arrive_and_wait();
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    A[g][t] = __uint_as_float(S.a[l][0]);
    A[g + 8][t] = __uint_as_float(S.a[l][1]);
    A[g][t + 4] = __uint_as_float(S.a[l][2]);
    A[g + 8][t + 4] = __uint_as_float(S.a[l][3]);
    B[t][g] = __uint_as_float(S.b[l][0]);
    B[t + 4][g] = __uint_as_float(S.b[l][1]);
  }
  emu_warps[w].bar.arrive_and_wait();
  const int g = lane >> 2, t = lane & 3;
  for (int k = 0; k < 8; ++k) {
    c[0] += A[g][k] * B[k][2 * t];
    c[1] += A[g][k] * B[k][2 * t + 1];
    c[2] += A[g + 8][k] * B[k][2 * t];
    c[3] += A[g + 8][k] * B[k][2 * t + 1];
  }
}
