// Runs lora-kernels CUDA kernels on the CPU emulator (emu.h) against naive double
// references: flash attention forward + backward (f32 and bf16, GQA, segments, KV-cache
// queries on strided planes, head dims 64 / 80), the segment starts, the forward over
// shared prompt planes then own planes read in place (rollouts' prefix attention), the
// f32 fused LoRA linear (rank 128 = two 64-rank chunks with VEC_ACC, forward and
// backward dX, weight gradients), the bf16 tensor-core LoRA linear (emulated mma, cp.async fallback path),
// the SGMV multi-adapter kernels (forward and backward) and the cross-entropy rows.
// Prints one line per check and exits non-zero on any failure.
// Build and run: bash scripts/cuda/emulate.sh
#include "emu.h"
#include <cstdio>
#include <random>
#include <string>
#include "../../kernels/src/cuda/src/common.cuh"
#include "emu_mma.h"
#include "../../kernels/src/cuda/src/lora_linear.cu"
#include "../../kernels/src/cuda/src/lora_f32.cu"
#include "../../kernels/src/cuda/src/lora_tf32.cu"
#include "../../kernels/src/cuda/src/attention.cu"
#include "../../kernels/src/cuda/src/sgmv.cu"
#include "../../kernels/src/cuda/src/cross_entropy.cu"
#include "../../kernels/src/cuda/src/dequant.cu"

static int failures = 0;
static std::mt19937 rng(7);
static std::vector<float> randv(size_t n, float s = 1.f) {
  std::normal_distribution<float> d(0.f, s);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
static double rel(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}
static void check(const std::string& what, double err, double tol) {
  const bool ok = err <= tol;
  if (!ok) ++failures;
  std::printf("%-58s rel err %.2e (tol %.0e) %s\n", what.c_str(), err, tol, ok ? "pass" : "FAIL");
}
template <typename T> static std::vector<T> cvt(const std::vector<float>& v) {
  std::vector<T> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = from_f32<T>(v[i]);
  return o;
}
template <typename T> static std::vector<float> back(const std::vector<T>& v) {
  std::vector<float> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = to_f32(v[i]);
  return o;
}

// ---------------------------------------------------------------------------- attention
struct AttnCase { int b, hq, hkv, tq, tk, d; std::vector<int> runs; int pad; };

template <typename T>
static void attention_case(const AttnCase& c, double tol) {
  const int b = c.b, hq = c.hq, hkv = c.hkv, tq = c.tq, tk = c.tk, d = c.d, off = tk - tq, rep = hq / hkv;
  const int tkp = tk + c.pad;  // cache planes of tkp rows, the first tk viewed
  const long long ks1 = (long long)tkp * d, ks0 = ks1 * hkv;
  auto qf = randv((size_t)b * hq * tq * d), kf = randv((size_t)b * hkv * tkp * d), vf = randv((size_t)b * hkv * tkp * d);
  auto go = randv((size_t)b * hq * tq * d);
  // round inputs to T so the reference sees what the kernel sees
  qf = back(cvt<T>(qf)); kf = back(cvt<T>(kf)); vf = back(cvt<T>(vf)); go = back(cvt<T>(go));
  std::vector<int> seg(b * tk, 0), starts(b * tk, 0);
  for (int bi = 0; bi < b; ++bi) {
    int j = 0;
    for (size_t r = 0; r < c.runs.size(); ++r)
      for (int n = 0; n < c.runs[r]; ++n) seg[bi * tk + j++] = 3 + (int)r;
  }
  const bool has_seg = !c.runs.empty();
  // device segment starts
  std::vector<u32> segu(seg.begin(), seg.end());
  std::vector<int> dstarts(b * tk, -1);
  if (has_seg) {
    emu_launch({(unsigned)b, 1, 1}, 1024, [&] { attn_seg_starts(segu.data(), dstarts.data(), tk); });
    for (int bi = 0; bi < b; ++bi)
      for (int j = 0; j < tk; ++j) starts[bi * tk + j] = (j > 0 && seg[bi * tk + j] == seg[bi * tk + j - 1]) ? starts[bi * tk + j - 1] : j;
    int bad = 0;
    for (int i = 0; i < b * tk; ++i) bad += dstarts[i] != starts[i];
    check("attn_seg_starts", bad, 0);
  }
  const double scale = 1.0 / std::sqrt((double)d);
  auto K = [&](int bi, int h, int j, int x) { return (double)kf[bi * ks0 + h * ks1 + (long long)j * d + x]; };
  auto V = [&](int bi, int h, int j, int x) { return (double)vf[bi * ks0 + h * ks1 + (long long)j * d + x]; };
  // reference forward + backward in double
  std::vector<double> O((size_t)b * hq * tq * d), L((size_t)b * hq * tq), dQ(O.size(), 0.0), dK((size_t)b * hkv * tk * d, 0.0), dV(dK.size(), 0.0);
  for (int bi = 0; bi < b; ++bi)
    for (int h = 0; h < hq; ++h)
      for (int i = 0; i < tq; ++i) {
        const int pos = i + off, lo = starts[bi * tk + pos], hk = h / rep;
        const double* dummy = nullptr; (void)dummy;
        const size_t row = ((size_t)bi * hq + h) * tq + i;
        std::vector<double> s(tk, -INFINITY), p(tk, 0.0);
        double mx = -INFINITY;
        for (int j = lo; j <= pos; ++j) {
          double acc = 0;
          for (int x = 0; x < d; ++x) acc += qf[row * d + x] * K(bi, hk, j, x);
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int j = lo; j <= pos; ++j) sum += std::exp(s[j] - mx);
        L[row] = mx + std::log(sum);
        for (int j = lo; j <= pos; ++j) p[j] = std::exp(s[j] - L[row]);
        for (int x = 0; x < d; ++x) {
          double acc = 0;
          for (int j = lo; j <= pos; ++j) acc += p[j] * V(bi, hk, j, x);
          O[row * d + x] = acc;
        }
        double delta = 0;
        for (int x = 0; x < d; ++x) delta += go[row * d + x] * O[row * d + x];
        for (int j = lo; j <= pos; ++j) {
          double dp = 0;
          for (int x = 0; x < d; ++x) dp += go[row * d + x] * V(bi, hk, j, x);
          const double ds = p[j] * (dp - delta);
          const size_t kr = (((size_t)bi * hkv + hk) * tk + j) * d;
          for (int x = 0; x < d; ++x) {
            dV[kr + x] += p[j] * go[row * d + x];
            dK[kr + x] += scale * ds * qf[row * d + x];
            dQ[row * d + x] += scale * ds * K(bi, hk, j, x);
          }
        }
      }
  auto q = cvt<T>(qf), k = cvt<T>(kf), v = cvt<T>(vf), g = cvt<T>(go);
  std::vector<T> o((size_t)b * hq * tq * d);
  std::vector<float> lse((size_t)b * hq * tq), dq(o.size(), 0.f), dk(dK.size(), 0.f), dv(dV.size(), 0.f), delta(lse.size());
  const int* sp = has_seg ? dstarts.data() : nullptr;
  const float sc = (float)scale;
  const int dm = d <= 64 ? 64 : d <= 128 ? 128 : 256;
  const int hp = tq < 64 ? rep : 1;  // as the host packs heads for short queries
  emu_launch({(unsigned)((hp * tq + 63) / 64), (unsigned)(hq / hp), (unsigned)b}, 256, [&] {
    if (dm == 64) attn_fwd_impl<T, 64>(q.data(), k.data(), v.data(), sp, o.data(), lse.data(), hq, hkv, tq, tk, d, ks0, ks1, sc, hp);
    else attn_fwd_impl<T, 128>(q.data(), k.data(), v.data(), sp, o.data(), lse.data(), hq, hkv, tq, tk, d, ks0, ks1, sc, hp);
  });
  const long long rows = (long long)b * hq * tq;
  emu_launch({(unsigned)((rows + 7) / 8), 1, 1}, 256, [&] { attn_bwd_dot_impl<T>(g.data(), o.data(), delta.data(), rows, d); });
  emu_launch({(unsigned)((tk + 31) / 32), (unsigned)hkv, (unsigned)b}, 256, [&] {
    if (dm == 64) attn_bwd_impl<T, 64, 64>(q.data(), k.data(), v.data(), sp, g.data(), lse.data(), delta.data(), dq.data(), dk.data(), dv.data(), hq, hkv, tq, tk, d, ks0, ks1, sc);
    else attn_bwd_impl<T, 128, 64>(q.data(), k.data(), v.data(), sp, g.data(), lse.data(), delta.data(), dq.data(), dk.data(), dv.data(), hq, hkv, tq, tk, d, ks0, ks1, sc);
  });
  char name[160];
  std::snprintf(name, sizeof name, "attention %s b%d h%d/%d t%d/%d d%d%s%s", sizeof(T) == 4 ? "f32" : "bf16", b, hq, hkv, tq, tk, d,
                has_seg ? " seg" : "", c.pad ? " cache-view" : "");
  if constexpr (sizeof(T) == 2) {  // the tensor-core forward (bf16/f16, d <= 128), same grid rows
    std::vector<T> o2(o.size());
    std::vector<float> lse2(lse.size());
    emu_launch({(unsigned)((hp * tq + 63) / 64), (unsigned)(hq / hp), (unsigned)b}, 128, [&] {
      if (dm == 64) attn_fwd_tc_impl<T, 64>(q.data(), k.data(), v.data(), sp, o2.data(), lse2.data(), hq, hkv, tq, tk, d, ks0, ks1, sc, hp);
      else attn_fwd_tc_impl<T, 128>(q.data(), k.data(), v.data(), sp, o2.data(), lse2.data(), hq, hkv, tq, tk, d, ks0, ks1, sc, hp);
    });
    check(std::string(name) + " O (tensor cores)", rel(back(o2), O), tol);
    check(std::string(name) + " lse (tensor cores)", rel(lse2, L), tol);
  }
  check(std::string(name) + " O", rel(back(o), O), tol);
  check(std::string(name) + " lse", rel(lse, L), tol);
  check(std::string(name) + " dQ", rel(dq, dQ), tol);
  check(std::string(name) + " dK", rel(dk, dK), tol);
  check(std::string(name) + " dV", rel(dv, dV), tol);
}

// ------------------------------------------------------------- attention over a prompt
// attn_prefix_fwd: rows continuing shared prompts (left-padded, id 0), each prompt's KV
// plane read in place followed by the row's own from its start (positions before it get
// the prompt's id, so reading them would show); checked against a naive double reference
// on the joined sequence. `switch_at`: own position from which row 1's ids change (a
// query there sees only its new run; -1: none); the last row is finished (its query id 0).
struct PrefixCase {
  int hq, hkv, tq, n, lp, d;
  std::vector<int> prompt_len, of_row, own_start;
  int pad, switch_at;
};

template <typename T>
static void prefix_case(const PrefixCase& c, double tol) {
  const int b = (int)c.of_row.size(), p = (int)c.prompt_len.size(), hq = c.hq, hkv = c.hkv, tq = c.tq, n = c.n, lp = c.lp, d = c.d;
  const int rep = hq / hkv, tkf = lp + n;
  // both planes are views of longer buffers (pad more rows) when c.pad > 0
  const long long ps1 = (long long)(lp + c.pad) * d, ps0 = ps1 * hkv, ks1 = (long long)(n + c.pad) * d, ks0 = ks1 * hkv;
  auto qf = back(cvt<T>(randv((size_t)b * hq * tq * d))), kf = back(cvt<T>(randv((size_t)b * ks0))), vf = back(cvt<T>(randv((size_t)b * ks0)));
  auto pkf = back(cvt<T>(randv((size_t)p * ps0))), pvf = back(cvt<T>(randv((size_t)p * ps0)));
  std::vector<u32> seg((size_t)b * tkf), rows_of(2 * b);
  for (int r = 0; r < b; ++r) {
    const int pr = c.of_row[r];
    rows_of[r] = pr;
    rows_of[b + r] = c.own_start[r];
    for (int j = 0; j < lp; ++j) seg[r * tkf + j] = j >= lp - c.prompt_len[pr] ? 1 : 0;
    for (int j = 0; j < n; ++j) seg[r * tkf + lp + j] = (r == 1 && c.switch_at >= 0 && j >= c.switch_at) ? 2 : 1;
  }
  seg[(size_t)(b - 1) * tkf + tkf - 1] = 0;
  const double scale = 1.0 / std::sqrt((double)d);
  std::vector<double> O((size_t)b * hq * tq * d);
  for (int r = 0; r < b; ++r) {
    // the joined sequence: prompt keys 0..lp, own keys from own_start on
    const int from = c.own_start[r], tk = lp + n - from;
    std::vector<u32> ids(tk);
    std::vector<int> start(tk, 0);
    for (int j = 0; j < tk; ++j) ids[j] = seg[r * tkf + (j < lp ? j : j + from)];
    for (int j = 1; j < tk; ++j) start[j] = ids[j] == ids[j - 1] ? start[j - 1] : j;
    auto key = [&](const std::vector<float>& pl, const std::vector<float>& own, int hk, int j, int x) {
      return (double)(j < lp ? pl[c.of_row[r] * ps0 + hk * ps1 + (long long)j * d + x] : own[r * ks0 + hk * ks1 + (long long)(j - lp + from) * d + x]);
    };
    for (int h = 0; h < hq; ++h)
      for (int i = 0; i < tq; ++i) {
        const int pos = tk - tq + i, lo = start[pos], hk = h / rep;
        const size_t row = ((size_t)r * hq + h) * tq + i;
        std::vector<double> s(tk, -INFINITY);
        double mx = -INFINITY, sum = 0;
        for (int j = lo; j <= pos; ++j) {
          double acc = 0;
          for (int x = 0; x < d; ++x) acc += qf[row * d + x] * key(pkf, kf, hk, j, x);
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        for (int j = lo; j <= pos; ++j) sum += std::exp(s[j] - mx);
        for (int x = 0; x < d; ++x) {
          double acc = 0;
          for (int j = lo; j <= pos; ++j) acc += std::exp(s[j] - mx) / sum * key(pvf, vf, hk, j, x);
          O[row * d + x] = acc;
        }
      }
  }
  auto q = cvt<T>(qf), k = cvt<T>(kf), v = cvt<T>(vf), pk = cvt<T>(pkf), pv = cvt<T>(pvf);
  std::vector<T> o((size_t)b * hq * tq * d);
  const float sc = (float)scale;
  const int dm = d <= 64 ? 64 : d <= 128 ? 128 : 256;
  const int hp = tq < 64 ? rep : 1;  // as the host packs heads for short queries
  emu_launch({(unsigned)((hp * tq + 63) / 64), (unsigned)(hq / hp), (unsigned)b}, 256, [&] {
    if (dm == 64) attn_prefix_fwd_impl<T, 64>(q.data(), k.data(), v.data(), pk.data(), pv.data(), rows_of.data(), seg.data(), o.data(), hq, hkv, tq, n, lp, d, ks0, ks1, ps0, ps1, sc, hp);
    else attn_prefix_fwd_impl<T, 128>(q.data(), k.data(), v.data(), pk.data(), pv.data(), rows_of.data(), seg.data(), o.data(), hq, hkv, tq, n, lp, d, ks0, ks1, ps0, ps1, sc, hp);
  });
  char name[160];
  std::snprintf(name, sizeof name, "prefix attention %s b%d/p%d h%d/%d tq%d lp%d n%d d%d%s%s", sizeof(T) == 4 ? "f32" : "bf16", b, p, hq, hkv, tq, lp, n, d,
                c.pad ? " views" : "", c.switch_at >= 0 ? " seg-switch" : "");
  check(std::string(name) + " O", rel(back(o), O), tol);
}

// --------------------------------------------------------------------------- LoRA linear
// Y = X W^T + s (X A^T) B^T, dX = dY W + s (dY B) A, dA = s (dY B)^T X, dB = s dY^T (X A^T),
// launched as the host does (64-rank chunks, VEC_ACC after the first).
template <typename T, bool TF = false>
static void lora_case(int m, int k, int n, int r, double tol) {
  const bool f32 = sizeof(T) == 4;
  auto xf = back(cvt<T>(randv((size_t)m * k))), wf = back(cvt<T>(randv((size_t)n * k, 0.1f)));
  auto af = back(cvt<T>(randv((size_t)r * k, 0.1f))), bf = back(cvt<T>(randv((size_t)n * r, 0.2f)));
  auto gf = back(cvt<T>(randv((size_t)m * n)));
  const float s = 1.5f;
  std::vector<double> Y((size_t)m * n), Z((size_t)m * r), dX((size_t)m * k), V((size_t)m * r);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < r; ++j) { double a = 0; for (int x = 0; x < k; ++x) a += xf[i * k + x] * af[j * k + x]; Z[i * r + j] = a; }
    for (int o = 0; o < n; ++o) {
      double a = 0; for (int x = 0; x < k; ++x) a += xf[i * k + x] * wf[o * k + x];
      double l = 0; for (int j = 0; j < r; ++j) l += Z[i * r + j] * bf[o * r + j];
      Y[i * n + o] = a + s * l;
    }
    for (int j = 0; j < r; ++j) { double a = 0; for (int o = 0; o < n; ++o) a += gf[i * n + o] * bf[o * r + j]; V[i * r + j] = a; }
    for (int x = 0; x < k; ++x) {
      double a = 0; for (int o = 0; o < n; ++o) a += gf[i * n + o] * wf[o * k + x];
      double l = 0; for (int j = 0; j < r; ++j) l += V[i * r + j] * af[j * k + x];
      dX[i * k + x] = a + s * l;
    }
  }
  auto X = cvt<T>(xf), W = cvt<T>(wf), A = cvt<T>(af), B = cvt<T>(bf), G = cvt<T>(gf);
  std::vector<T> y((size_t)m * n), dx((size_t)m * k);
  std::vector<float> z((size_t)m * r, 0.f), v((size_t)m * r, 0.f);
  const unsigned bn = f32 ? 64 : 128, nt = f32 && !TF ? 256 : 128;
  for (int c0 = 0; c0 < r; c0 += 64) {
    const int rc = std::min(64, r - c0);
    const int vec = (f32 ? 0 : 0) | 1 | 2 | 4 | 8 | (n % 8 == 0 ? 16 : 0) | (c0 > 0 ? 32 : 0);
    const int vecx = (k % 8 == 0 ? 1 : 0) | (k % 8 == 0 ? 2 : 0) | (k % 8 == 0 ? 4 : 0) | (r % 8 == 0 ? 8 : 0) | (n % 8 == 0 ? 16 : 0) | (c0 > 0 ? 32 : 0);
    (void)vec;
    const T* Wp = c0 == 0 ? W.data() : nullptr;
    // forward: D = A rows c0.., U = B columns c0..
    emu_launch({(unsigned)((n + bn - 1) / bn), (unsigned)((m + 63) / 64), 1}, nt, [&] {
      if constexpr (TF)
        lora_fused_tf32<false>(X.data(), k, Wp, k, A.data() + (size_t)c0 * k, k, B.data() + c0, r, nullptr, s, y.data(), n, z.data() + c0, r, m, n, k, rc, vecx);
      else if constexpr (sizeof(T) == 4)
        lora_fused_f32<false>(X.data(), k, Wp, k, A.data() + (size_t)c0 * k, k, B.data() + c0, r, nullptr, s, y.data(), n, z.data() + c0, r, m, n, k, rc, vecx);
      else
        lora_fused<T, T, false>(X.data(), k, Wp, k, A.data() + (size_t)c0 * k, k, B.data() + c0, r, nullptr, s, y.data(), n, z.data() + c0, r, m, n, k, rc, vecx);
    });
    // backward dX: X := dY [m][n], W [n][k] (ld k), D = B [n][r] cols, U = A [r][k] rows
    const int vecb = (n % 8 == 0 ? 1 : 0) | (k % 8 == 0 ? 2 : 0) | (r % 8 == 0 ? 4 : 0) | (k % 8 == 0 ? 8 : 0) | (k % 8 == 0 ? 16 : 0) | (c0 > 0 ? 32 : 0);
    emu_launch({(unsigned)((k + bn - 1) / bn), (unsigned)((m + 63) / 64), 1}, nt, [&] {
      if constexpr (TF)
        lora_fused_tf32<true>(G.data(), n, Wp, k, B.data() + c0, r, A.data() + (size_t)c0 * k, k, nullptr, s, dx.data(), k, v.data() + c0, r, m, k, n, rc, vecb);
      else if constexpr (sizeof(T) == 4)
        lora_fused_f32<true>(G.data(), n, Wp, k, B.data() + c0, r, A.data() + (size_t)c0 * k, k, nullptr, s, dx.data(), k, v.data() + c0, r, m, k, n, rc, vecb);
      else
        lora_fused<T, T, true>(G.data(), n, Wp, k, B.data() + c0, r, A.data() + (size_t)c0 * k, k, nullptr, s, dx.data(), k, v.data() + c0, r, m, k, n, rc, vecb);
    });
  }
  char name[120];
  std::snprintf(name, sizeof name, "lora_linear %s M%d K%d N%d r%d", TF ? "tf32" : f32 ? "f32" : "bf16", m, k, n, r);
  check(std::string(name) + " Y", rel(back(y), Y), tol);
  check(std::string(name) + " Z = X A^T", rel(z, Z), tol);
  check(std::string(name) + " dX", rel(back(dx), dX), tol);
  check(std::string(name) + " V = dY B", rel(v, V), tol);
  if constexpr (sizeof(T) == 4 && !TF) {
    // dA = s V^T X [r][k] via the f32 weight-gradient kernel, two row splits
    std::vector<double> dA((size_t)r * k, 0.0);
    for (int j = 0; j < r; ++j) for (int x = 0; x < k; ++x) { double a = 0; for (int i = 0; i < m; ++i) a += V[i * r + j] * xf[i * k + x]; dA[j * k + x] = s * a; }
    std::vector<float> da((size_t)r * k, 0.f);
    const int mchunk = ((m + 1) / 2 + 31) / 32 * 32;
    emu_launch({(unsigned)((k + 63) / 64), (unsigned)((r + 63) / 64), (unsigned)((m + mchunk - 1) / mchunk)}, 256,
               [&] { wgrad_f32(v.data(), r, X.data(), k, s, da.data(), k, m, r, k, mchunk, 0); });
    check(std::string(name) + " dA (wgrad)", rel(da, dA), tol);
  }
}


// ------------------------------------------------------------------------------- SGMV
// Two adapters (ranks 8 and 20), three segments with a gap, adapter 1 used twice;
// launched as cuda/segmented.rs does (forward: shrink + expand; backward: shrink with
// B^T + expand with A^T for dX, one wgrad launch each for dA and dB).
static void sgmv_case() {
  const int m = 50, k = 40, n = 36;
  const int ranks[2] = {8, 20};
  const float scales_a[2] = {1.5f, 0.5f};
  struct Seg { int start, len, ad; } segs[3] = {{0, 10, 1}, {10, 20, 0}, {35, 15, 1}};
  const int a_off[2] = {0, ranks[0] * k}, b_off[2] = {0, n * ranks[0]};
  const int a_len = (ranks[0] + ranks[1]) * k, b_len = n * (ranks[0] + ranks[1]);
  auto x = randv((size_t)m * k), g = randv((size_t)m * n), A = randv(a_len, 0.2f), B = randv(b_len, 0.2f);
  std::vector<long long> table, swapped;
  std::vector<float> scales;
  int z_len = 0;
  for (auto& sg : segs) {
    const int r = ranks[sg.ad];
    table.insert(table.end(), {sg.start, sg.len, r, a_off[sg.ad], b_off[sg.ad], z_len});
    swapped.insert(swapped.end(), {sg.start, sg.len, r, b_off[sg.ad], a_off[sg.ad], z_len});
    scales.push_back(scales_a[sg.ad]);
    z_len += sg.len * r;
  }
  std::vector<float> At(a_len), Bt(b_len);
  for (int j = 0; j < 2; ++j) {
    const int r = ranks[j];
    for (int a = 0; a < r; ++a) for (int c = 0; c < k; ++c) At[a_off[j] + c * r + a] = A[a_off[j] + a * k + c];
    for (int o = 0; o < n; ++o) for (int a = 0; a < r; ++a) Bt[b_off[j] + a * n + o] = B[b_off[j] + o * r + a];
  }
  // references
  std::vector<double> Y((size_t)m * n, 0.0), dX((size_t)m * k, 0.0), dA(a_len, 0.0), dB(b_len, 0.0);
  for (auto& sg : segs) {
    const int j = sg.ad, r = ranks[j];
    const double s = scales_a[j];
    for (int i = sg.start; i < sg.start + sg.len; ++i) {
      std::vector<double> z(r), v(r);
      for (int a = 0; a < r; ++a) {
        double zz = 0, vv = 0;
        for (int c = 0; c < k; ++c) zz += x[i * k + c] * A[a_off[j] + a * k + c];
        for (int o = 0; o < n; ++o) vv += g[i * n + o] * B[b_off[j] + o * r + a];
        z[a] = zz; v[a] = vv;
      }
      for (int o = 0; o < n; ++o) for (int a = 0; a < r; ++a) { Y[i * n + o] += s * z[a] * B[b_off[j] + o * r + a]; dB[b_off[j] + o * r + a] += s * g[i * n + o] * z[a]; }
      for (int c = 0; c < k; ++c) for (int a = 0; a < r; ++a) { dX[i * k + c] += s * v[a] * A[a_off[j] + a * k + c]; dA[a_off[j] + a * k + c] += s * v[a] * x[i * k + c]; }
    }
  }
  const unsigned nseg = 3, longest = 20;
  std::vector<float> z(z_len, 0.f), v(z_len, 0.f), y((size_t)m * n, 0.f), dx((size_t)m * k, 0.f), da(a_len, 0.f), db(b_len, 0.f), z2(z_len, 0.f);
  emu_launch({(longest + SG_WARPS - 1) / SG_WARPS, nseg, 1}, SG_WARPS * 32, [&] { sgmv_shrink_impl<float>(x.data(), k, A.data(), table.data(), z.data()); });
  emu_launch({(unsigned)((n + SE_NT - 1) / SE_NT), (longest + SE_ROWS - 1) / SE_ROWS, nseg}, SE_NT, [&] { sgmv_expand(z.data(), B.data(), table.data(), scales.data(), y.data(), n); });
  check("sgmv forward (shrink + expand) Y", rel(y, Y), 1e-5);
  emu_launch({(longest + SG_WARPS - 1) / SG_WARPS, nseg, 1}, SG_WARPS * 32, [&] { sgmv_shrink_impl<float>(g.data(), n, Bt.data(), swapped.data(), v.data()); });
  emu_launch({(unsigned)((k + SE_NT - 1) / SE_NT), (longest + SE_ROWS - 1) / SE_ROWS, nseg}, SE_NT, [&] { sgmv_expand(v.data(), At.data(), swapped.data(), scales.data(), dx.data(), k); });
  check("sgmv backward dX (adapter part)", rel(dx, dX), 1e-5);
  emu_launch({1, nseg, (longest + SW_ROWS - 1) / SW_ROWS}, 256, [&] { sgmv_wgrad_impl<float, true>(x.data(), k, v.data(), table.data(), scales.data(), da.data()); });
  check("sgmv backward dA (all segments, one launch)", rel(da, dA), 1e-5);
  emu_launch({(longest + SG_WARPS - 1) / SG_WARPS, nseg, 1}, SG_WARPS * 32, [&] { sgmv_shrink_impl<float>(x.data(), k, A.data(), table.data(), z2.data()); });
  emu_launch({1, nseg, (longest + SW_ROWS - 1) / SW_ROWS}, 256, [&] { sgmv_wgrad_impl<float, false>(g.data(), n, z2.data(), table.data(), scales.data(), db.data()); });
  check("sgmv backward dB (all segments, one launch)", rel(db, dB), 1e-5);
}

// ------------------------------------------------------------------------ cross-entropy
static void ce_case() {
  const int rows = 9, V = 1003;
  auto lg = randv((size_t)rows * V, 3.f);
  std::vector<u32> tg(rows);
  std::vector<float> w(rows);
  for (int r = 0; r < rows; ++r) { tg[r] = (u32)((r * 379) % V); w[r] = r % 4 == 0 ? 0.f : 1.f + 0.1f * r; }
  tg[5] = V + 3;  // an ignore index: loss and gradient 0
  std::vector<double> L(rows, 0.0), dL((size_t)rows * V, 0.0);
  for (int r = 0; r < rows; ++r) {
    if (tg[r] >= (u32)V || w[r] == 0.f) continue;
    double mx = -INFINITY, sum = 0;
    for (int j = 0; j < V; ++j) mx = std::max(mx, (double)lg[r * V + j]);
    for (int j = 0; j < V; ++j) sum += std::exp(lg[r * V + j] - mx);
    const double lse = mx + std::log(sum);
    L[r] = w[r] * (lse - lg[r * V + tg[r]]);
    for (int j = 0; j < V; ++j) dL[r * V + j] = w[r] * (std::exp(lg[r * V + j] - lse) - (j == (int)tg[r] ? 1.0 : 0.0));
  }
  std::vector<float> loss(rows, -1.f), dl((size_t)rows * V, -1.f);
  emu_launch({(unsigned)rows, 1, 1}, 256, [&] { ce_rows_impl<float>(lg.data(), tg.data(), w.data(), loss.data(), dl.data(), V, 1.f, 0); });
  check("ce_rows loss (weights, ignore index)", rel(loss, L), 1e-5);
  check("ce_rows dlogits", rel(dl, dL), 1e-5);
}

// ------------------------------------------------------------------ dequantization
// NF4 (double-quantized absmax) and int8 weights: every value equal, bit for bit, to the
// CPU dequantization's formula (models/src/quant.rs), each product and sum rounded alone.
static void dequant_case() {
  const i64 rows = 6, cols = 512, n = rows * cols, blocks = n / 64;
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<unsigned char> packed(n / 2), qabsmax(blocks);
  for (auto& b : packed) b = (unsigned char)byte(rng);
  for (auto& b : qabsmax) b = (unsigned char)byte(rng);
  auto scale = randv((blocks + 255) / 256, 2.f), dmap = randv(256), code16 = randv(16);
  const float offset = 0.0123f;
  std::vector<float> got(n, -1.f), want(n);
  for (i64 i = 0; i < n; ++i) {
    const i64 b = i / 64;
    const float am = dmap[qabsmax[b]] * scale[b / 256] + offset;
    const unsigned char p = packed[i / 2];
    want[i] = code16[i % 2 == 0 ? p >> 4 : p & 15] * am;
  }
  emu_launch({(unsigned)((n / 2 + 255) / 256), 1, 1}, 256, [&] {
    nf4_dequant_impl<float>(packed.data(), qabsmax.data(), scale.data(), dmap.data(), code16.data(), offset, got.data(), n);
  });
  check("nf4 dequant (bit for bit)", got == want ? 0.0 : 1.0, 0.0);
  std::vector<signed char> codes(n);
  for (auto& c : codes) c = (signed char)(byte(rng) - 128);
  auto row_absmax = randv(rows, 3.f);
  std::vector<float> got8(n, -1.f), want8(n);
  for (i64 i = 0; i < n; ++i) want8[i] = (float)codes[i] * (row_absmax[i / cols] / 127.f);
  emu_launch({(unsigned)((n + 255) / 256), 1, 1}, 256, [&] { int8_dequant_impl<float>(codes.data(), row_absmax.data(), got8.data(), rows, cols); });
  check("int8 dequant (bit for bit)", got8 == want8 ? 0.0 : 1.0, 0.0);
}

int main() {
  attention_case<float>({2, 4, 2, 70, 70, 64, {20, 30, 20}, 0}, 1e-5);
  attention_case<float>({1, 4, 2, 5, 45, 80, {30, 15}, 7}, 1e-5);
  attention_case<float>({2, 2, 1, 1, 40, 64, {}, 3}, 1e-5);
  attention_case<float>({1, 8, 2, 20, 90, 64, {50, 40}, 5}, 1e-5);
  attention_case<bf16>({1, 2, 1, 37, 37, 64, {}, 0}, 2e-2);
  attention_case<bf16>({2, 4, 2, 150, 150, 128, {60, 90}, 0}, 2e-2);
  attention_case<bf16>({1, 8, 2, 3, 100, 80, {40, 60}, 6}, 2e-2);
  prefix_case<float>({4, 2, 1, 9, 40, 64, {40, 23}, {0, 0, 1, 1}, {0, 3, 0, 5}, 0, -1}, 1e-5);
  prefix_case<float>({8, 2, 3, 20, 37, 80, {12, 37}, {1, 0, 1}, {0, 0, 4}, 6, 18}, 1e-5);
  prefix_case<bf16>({6, 2, 2, 40, 70, 128, {70, 5, 44}, {2, 0, 1, 2, 0}, {0, 10, 0, 0, 37}, 3, -1}, 2e-2);
  prefix_case<bf16>({4, 1, 30, 45, 50, 64, {33}, {0, 0}, {0, 10}, 0, 20}, 2e-2);
  lora_case<float>(70, 96, 72, 128, 1e-5);
  lora_case<float>(33, 40, 20, 8, 1e-5);
  lora_case<bf16>(70, 96, 136, 16, 2e-2);
  lora_case<float, true>(70, 96, 136, 16, 3e-3);
  lora_case<float, true>(40, 100, 72, 80, 3e-3);
  lora_case<bf16>(40, 64, 72, 80, 2e-2);
  sgmv_case();
  ce_case();
  dequant_case();
  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
