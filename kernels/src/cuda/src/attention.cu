// Causal attention, flash style (FlashAttention-2's loop order), forward and backward,
// with grouped-query heads, packed-sequence segments and KV-cache queries. Nothing of
// size [tq, tk] ever exists: scores live in one [BQ x BK] shared-memory tile at a time,
// the forward keeps per-row running max / sum (online softmax) and saves the row
// log-sum-exp, the backward recomputes the probabilities tile by tile.
//
// Shapes: q [b, hq, tq, d] contiguous; k, v [b, hkv, tk, d] with each (batch, head)
// plane of tk x d contiguous and arbitrary batch / head strides (ks0, ks1), so a
// `narrow` of a preallocated KV cache is read in place. Query head h reads kv head
// h / (hq / hkv). Query i sits at position p = i + tk - tq and sees key j iff
// starts[b][p] <= j <= p, where starts[b][p] is the first key of the contiguous run of
// equal segment ids containing p (attn_seg_starts computes it on the device; no
// segments = 0). No mask tensor, host or device.
// attn_prefix_fwd_* (forward only, decoding): the same forward over two planes read in
// place, a shared prompt's then the row's own (see "forward over a prompt").
//
// Math in f32 on CUDA cores (every dtype: bf16/f16/f32 storage, f32 accumulation);
// tiles staged into f32 shared memory. d <= DMAX (64, 128 or 256 instances).
// Block: 256 threads as 16 x 16 (tx, ty); thread-owned tile elements are strided by 16
// (rows ty + 16 i, columns tx + 16 j): broadcast / consecutive shared-memory reads.

#define AT_NT 256
#define AT_BK 32   // keys per tile
#define AT_DC 32   // head-dim chunk of the score GEMMs

// dst[c][r] = src[(row0 + r) * ld + c0 + c] for r < ROWS, c < AT_DC (k-major copy, LD odd
// so the transposing stores are conflict-free); zero outside rows < nrows, cols < ncols.
template <typename T, int ROWS, int LD>
__device__ __forceinline__ void at_stage_t(float* dst, const T* src, i64 ld, int row0, int nrows, int c0, int ncols) {
  for (int idx = threadIdx.x; idx < ROWS * AT_DC; idx += AT_NT) {
    const int r = idx / AT_DC, c = idx % AT_DC;
    const int gr = row0 + r, gc = c0 + c;
    dst[c * LD + r] = (gr < nrows && gc < ncols) ? to_f32(src[gr * ld + gc]) : 0.f;
  }
}
// dst[r][c] = src[(row0 + r) * ld + c] for r < ROWS, c < DMAX (row-major copy).
template <typename T, int ROWS, int DMAX>
__device__ __forceinline__ void at_stage_n(float* dst, const T* src, i64 ld, int row0, int nrows, int ncols) {
  for (int idx = threadIdx.x; idx < ROWS * DMAX; idx += AT_NT) {
    const int r = idx / DMAX, c = idx % DMAX;
    const int gr = row0 + r;
    dst[r * (DMAX + 1) + c] = (gr < nrows && c < ncols) ? to_f32(src[gr * ld + c]) : 0.f;
  }
}

// acc[i][j] += sum_{c < D} A[row0 + ty + 16 i][c] * B[key0 + tx + 16 j][c] over the
// head dim in AT_DC chunks: A rows [BQ], B rows [AT_BK]. `As`, `Bs`: staging buffers.
template <typename T, int BQ, int NI>
__device__ __forceinline__ void at_scores(float (&acc)[NI][2], float* As, float* Bs, const T* A, int arow0, int an,
                                          const T* B, int brow0, int bn, int D) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < NI; ++i) acc[i][0] = acc[i][1] = 0.f;
  for (int c0 = 0; c0 < D; c0 += AT_DC) {
    at_stage_t<T, BQ, BQ + 1>(As, A, D, arow0, an, c0, D);
    at_stage_t<T, AT_BK, AT_BK + 1>(Bs, B, D, brow0, bn, c0, D);
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < AT_DC; ++c) {
      const float b0 = Bs[c * (AT_BK + 1) + tx], b1 = Bs[c * (AT_BK + 1) + tx + 16];
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const float a = As[c * (BQ + 1) + ty + 16 * i];
        acc[i][0] = fmaf(a, b0, acc[i][0]);
        acc[i][1] = fmaf(a, b1, acc[i][1]);
      }
    }
    __syncthreads();
  }
}

__device__ __forceinline__ int at_start(const int* starts, int b, int tk, int pos) {
  return starts != 0 ? starts[(i64)b * tk + pos] : 0;
}

// ------------------------------------------------------------------------------ forward
// Writes O [b, hq, tq, d] and lse [b, hq, tq] (f32). `hp` query heads of one kv head are
// packed into one block's rows (their planes are adjacent, so the hp x tq rows are
// contiguous): hp = 1 for training shapes, hp = hq / hkv for short queries (decoding),
// where one head alone would leave most of the 64 rows idle. Row r of the packed rows
// is query (r % tq) of head h0 + r / tq.
// Grid: (ceil(hp * tq / 64), hq / hp, b).
#define AF_BQ 64

// The keys (and values) of one (batch row, kv head) as two planes read in place, one
// after the other: key j < split is row j of k0 / v0, key j >= split row j - split of
// k1 / v1 (rows of D elements). The plain forward has split = 0 (one plane); the prefix
// forward has the shared prompt's plane first.
template <typename T>
struct AtKeys {
  const T* k0;
  const T* v0;
  int split;
  const T* k1;
  const T* v1;
};

// The CUDA-core forward of one block once its rows' visible keys are set: row r (< nq)
// of the rows starting at q0 of Qp ([rows, D]) sees keys Lo[r]..Hi[r] of `kv` (rows >= nq:
// Lo > Hi, none). Online softmax over key tiles of AT_BK, a tile never spanning the two
// planes; writes rows q0.. of Op and, unless lsep is null, their log-sum-exp. TWO: kv has
// a first plane (the plain forward: false, so split = 0 and its tiles test no plane end).
template <typename T, int DMAX, bool TWO>
__device__ __forceinline__ void attn_fwd_rows(const T* __restrict__ Qp, int q0, int rows, int nq, const AtKeys<T>& kv,
                                              const int* Lo, const int* Hi, int D, float scale, T* __restrict__ Op,
                                              float* __restrict__ lsep) {
  constexpr int NJ = DMAX / 16;
  constexpr int STAGE = AT_DC * (AF_BQ + 1) + AT_DC * (AT_BK + 1);
  constexpr int VBUF = AT_BK * (DMAX + 1);
  __shared__ float buf[STAGE > VBUF ? STAGE : VBUF];
  __shared__ float Ps[AF_BQ * (AT_BK + 1)];
  __shared__ float Ms[AF_BQ], Ls[AF_BQ], Al[AF_BQ];
  __shared__ int Kb[2];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  for (int r = threadIdx.x; r < AF_BQ; r += AT_NT) {
    Ms[r] = NEG_INF;
    Ls[r] = 0.f;
  }
  if (threadIdx.x == 0) {  // the keys any row of the block sees
    int lo = 1 << 30, hi = 0;
    for (int r = 0; r < nq; ++r) {
      lo = min(lo, Lo[r]);
      hi = max(hi, Hi[r]);
    }
    Kb[0] = lo;
    Kb[1] = hi + 1;
  }
  __syncthreads();
  const int kbeg = Kb[0], kend = Kb[1];
  float o[4][NJ];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j) o[i][j] = 0.f;
  for (int k0 = kbeg; k0 < kend;) {
    // the tile's plane: the first while k0 < split, rows k0 - base of it up to key end
    // (rows past it staged as 0 and masked); a tile of the first stops at its end
    const bool first = TWO && k0 < kv.split;
    const int base = first ? 0 : kv.split, end = first ? min(kend, kv.split) : kend;
    float s[4][2];
    at_scores<T, AF_BQ, 4>(s, buf, buf + AT_DC * (AF_BQ + 1), Qp, q0, rows, first ? kv.k0 : kv.k1, k0 - base, end - base, D);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = ty + 16 * i, c = tx + 16 * j, key = k0 + c;
        // (a first-plane tile's columns past its end are the second plane's: masked here)
        const bool vis = key >= Lo[r] && key <= Hi[r] && (!TWO || key < end);
        Ps[r * (AT_BK + 1) + c] = vis ? s[i][j] * scale : NEG_INF;
      }
    __syncthreads();
    {  // online softmax: 4 consecutive lanes per row, 8 columns each
      const int r = threadIdx.x >> 2, part = threadIdx.x & 3;
      float* pr = Ps + r * (AT_BK + 1) + part * 8;
      float mx = NEG_INF;
#pragma unroll
      for (int c = 0; c < 8; ++c) mx = fmaxf(mx, pr[c]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_old = Ms[r], m_new = fmaxf(m_old, mx);
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const float p = (m_new == NEG_INF) ? 0.f : __expf(pr[c] - m_new);
        pr[c] = p;
        sum += p;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      __syncwarp();
      if (part == 0) {
        const float alpha = (m_old == NEG_INF) ? 0.f : __expf(m_old - m_new);
        Al[r] = alpha;
        Ls[r] = Ls[r] * alpha + sum;
        Ms[r] = m_new;
      }
    }
    at_stage_n<T, AT_BK, DMAX>(buf, first ? kv.v0 : kv.v1, D, k0 - base, end - base, D);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
      const float al = Al[r];
#pragma unroll
      for (int j = 0; j < NJ; ++j) o[i][j] *= al;
      for (int c = 0; c < AT_BK; ++c) {
        const float p = Ps[r * (AT_BK + 1) + c];
#pragma unroll
        for (int j = 0; j < NJ; ++j) o[i][j] = fmaf(p, buf[c * (DMAX + 1) + tx + 16 * j], o[i][j]);
      }
    }
    __syncthreads();
    k0 = min(k0 + AT_BK, end);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= nq) continue;
    const float l = Ls[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int c = tx + 16 * j;
      if (c < D) Op[(i64)(q0 + r) * D + c] = from_f32<T>(o[i][j] * inv);
    }
    if (tx == 0 && lsep != 0) lsep[q0 + r] = Ms[r] + __logf(l);
  }
}

template <typename T, int DMAX>
__device__ __forceinline__ void attn_fwd_impl(const T* __restrict__ Q, const T* __restrict__ K,
                                              const T* __restrict__ V, const int* __restrict__ starts,
                                              T* __restrict__ O, float* __restrict__ lse, int hq, int hkv, int tq,
                                              int tk, int D, i64 ks0, i64 ks1, float scale, int hp) {
  __shared__ int Lo[AF_BQ], Hi[AF_BQ];
  const int b = blockIdx.z, h0 = blockIdx.y * hp, q0 = blockIdx.x * AF_BQ;
  const int hk = h0 / (hq / hkv), off = tk - tq, rows = hp * tq;
  const i64 plane = ((i64)b * hq + h0) * tq;
  const int nq = min(AF_BQ, rows - q0);
  for (int r = threadIdx.x; r < AF_BQ; r += AT_NT) {
    const int pos = (q0 + r) % tq + off;
    Lo[r] = r < nq ? at_start(starts, b, tk, pos) : 1;
    Hi[r] = r < nq ? pos : 0;
  }
  __syncthreads();
  const AtKeys<T> kv = {0, 0, 0, K + b * ks0 + hk * ks1, V + b * ks0 + hk * ks1};
  attn_fwd_rows<T, DMAX, false>(Q + plane * D, q0, rows, nq, kv, Lo, Hi, D, scale, O + plane * D, lse + plane);
}

// ------------------------------------------------------------------ forward over a prompt
// Decoding rows that continue shared prompts (`lora_kernels::prefix_causal_attention`):
// batch row b's keys are prompt row rows_of[b]'s plane of PK / PV ([p, hkv, lp, D], planes
// contiguous, strides ps0 / ps1), then its own plane of K / V ([b, hkv, n, D], strides
// ks0 / ks1) from position from = rows_of[nb + b] on (nb = gridDim.z; positions before were
// written before the row joined), both read in place: the joined sequence has
// tk = lp + n - from keys, the queries are its last tq. seg [b, lp + n] (u32) holds the
// segment ids of prompt then own positions; a query sees the keys of the contiguous run
// of equal ids (in the joined sequence, skipped positions left out) that ends at it, so
// the prompt's left padding (id 0) is never read. Forward only (no lse): Q, O, grid and
// head packing as attn_fwd_impl.
template <typename T, int DMAX>
__device__ __forceinline__ void attn_prefix_fwd_impl(const T* __restrict__ Q, const T* __restrict__ K,
                                                     const T* __restrict__ V, const T* __restrict__ PK,
                                                     const T* __restrict__ PV, const u32* __restrict__ rows_of,
                                                     const u32* __restrict__ seg, T* __restrict__ O, int hq, int hkv,
                                                     int tq, int n, int lp, int D, i64 ks0, i64 ks1, i64 ps0, i64 ps1,
                                                     float scale, int hp) {
  __shared__ int Lo[AF_BQ], Hi[AF_BQ];
  __shared__ int Brk;
  // in shared memory, read where used: four more pointers live in registers would spill
  // the d256 instance (at its 128-register bound like attn_fwd_*_d256)
  __shared__ AtKeys<T> kv;
  const int b = blockIdx.z, h0 = blockIdx.y * hp, q0 = blockIdx.x * AF_BQ;
  const int hk = h0 / (hq / hkv), rows = hp * tq;
  const int from = (int)rows_of[gridDim.z + b], tk = lp + n - from, off = tk - tq;
  const i64 plane = ((i64)b * hq + h0) * tq;
  const int nq = min(AF_BQ, rows - q0);
  // id of joined key j: the prompt's j, or own position from + (j - lp)
  const u32* sg = seg + (i64)b * (lp + n);
#define AP_ID(j) sg[(j) < lp ? (j) : (j) + from]
  // Every query is at or after `off`: the last change of id at or before it bounds them
  // all (a strided scan and a shared max: tk ids per block, against tk x D keys); each
  // row then scans its own few positions.
  if (threadIdx.x == 0) Brk = 0;
  __syncthreads();
  int brk = 0;
  for (int j = 1 + threadIdx.x; j <= off; j += AT_NT)
    if (AP_ID(j) != AP_ID(j - 1)) brk = j;
  if (brk > 0) atomicMax(&Brk, brk);
  __syncthreads();
  for (int r = threadIdx.x; r < AF_BQ; r += AT_NT) {
    const int pos = (q0 + r) % tq + off;
    int lo = Brk;
    for (int j = off + 1; j <= pos; ++j)
      if (AP_ID(j) != AP_ID(j - 1)) lo = j;
    Lo[r] = r < nq ? lo : 1;
    Hi[r] = r < nq ? pos : 0;
  }
#undef AP_ID
  if (threadIdx.x == 0) {
    const i64 pp = (i64)rows_of[b] * ps0 + hk * ps1, own = b * ks0 + hk * ks1 + (i64)from * D;
    kv = {PK + pp, PV + pp, lp, K + own, V + own};
  }
  __syncthreads();
  attn_fwd_rows<T, DMAX, true>(Q + plane * D, q0, rows, nq, kv, Lo, Hi, D, scale, O + plane * D, 0);
}

// ------------------------------------------------------------- forward on tensor cores
// bf16/f16, head dim <= 128: the same contract and grid rows as attn_fwd_impl, computed
// FlashAttention-2 style with mma.sync m16n8k16 (f32 accumulation): 4 warps, each owning
// 16 of the block's 64 query rows; Q fragments stay in registers, key tiles of 64 are
// staged as K [key][d] and V^T [d][key] (16-bit); S = Q K^T and O += P V on tensor cores,
// the online softmax on the accumulator fragments (row statistics reduced over the 4
// lanes of a quad; P is rounded to T before P V, as in FlashAttention-2).
// Grid: (ceil(hp * tq / 64), hq / hp, b), 128 threads.
#define TC_BK 64

template <typename T, int DMAX>
__device__ __forceinline__ void attn_fwd_tc_impl(const T* __restrict__ Q, const T* __restrict__ K,
                                                 const T* __restrict__ V, const int* __restrict__ starts,
                                                 T* __restrict__ O, float* __restrict__ lse, int hq, int hkv, int tq,
                                                 int tk, int D, i64 ks0, i64 ks1, float scale, int hp) {
  constexpr int LDK = DMAX + 8, LDV = TC_BK + 8;
  constexpr int NK = DMAX / 16, ND = DMAX / 8, NT = TC_BK / 8;
  __shared__ __align__(16) u16 Ks[TC_BK * LDK];
  __shared__ __align__(16) u16 Vt[DMAX * LDV];
  __shared__ int Lo[64], Hi[64];
  __shared__ int Kb[2];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, h0 = blockIdx.y * hp, q0 = blockIdx.x * 64;
  const int hk = h0 / (hq / hkv), off = tk - tq, rows = hp * tq;
  const T* Qp = Q + ((i64)b * hq + h0) * tq * D;
  const T* Kp = K + b * ks0 + hk * ks1;
  const T* Vp = V + b * ks0 + hk * ks1;
  const int nq = min(64, rows - q0);
  for (int r = threadIdx.x; r < 64; r += 128) {
    const int pos = (q0 + r) % tq + off;
    Lo[r] = r < nq ? at_start(starts, b, tk, pos) : 1;
    Hi[r] = r < nq ? pos : 0;
  }
  // Q tile through Ks into registers (A fragments of the warp's 16 rows)
  stage_kmajor<T, T, 64, DMAX, LDK, 128>(Ks, Qp, D, q0, rows, 0, D, false);
  __syncthreads();
  if (threadIdx.x == 0) {
    int lo = tk, hi = 0;
    for (int r = 0; r < nq; ++r) {
      lo = min(lo, Lo[r]);
      hi = max(hi, Hi[r]);
    }
    Kb[0] = lo;
    Kb[1] = hi + 1;
  }
  u32 qf[NK][4];
#pragma unroll
  for (int kk = 0; kk < NK; ++kk) load_frag_a<LDK>(qf[kk], Ks, warp * 16, kk * 16, lane);
  __syncthreads();
  const int kbeg = Kb[0], kend = Kb[1];
  const int r0 = warp * 16 + g, r1 = r0 + 8;  // this lane's two rows
  const int lo0 = Lo[r0], hi0 = Hi[r0], lo1 = Lo[r1], hi1 = Hi[r1];
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
  float o[ND][4];
#pragma unroll
  for (int j = 0; j < ND; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  for (int k0 = kbeg; k0 < kend; k0 += TC_BK) {
    stage_kmajor<T, T, TC_BK, DMAX, LDK, 128>(Ks, Kp, D, k0, tk, 0, D, false);
    stage_trans<T, T, DMAX, TC_BK, LDV, 128>(Vt, Vp + (i64)k0 * D, D, 0, D, 0, tk - k0, false);
    __syncthreads();
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < NK; ++kk) {
        u32 bf[2];
        load_frag_b<LDK>(bf, Ks, nt * 8, kk * 16, lane);
        mma16816<T>(s[nt], qf[kk], bf);
      }
    }
    // mask, scale, running max
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * t + (e & 1);
        const bool vis = (e < 2) ? (key >= lo0 && key <= hi0) : (key >= lo1 && key <= hi1);
        s[nt][e] = vis ? s[nt][e] * scale : NEG_INF;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
      }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);
      alpha[h] = (m[h] == NEG_INF) ? 0.f : __expf(m[h] - m_new);
      m[h] = m_new;
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float mh = m[e >> 1];
        const float p = (mh == NEG_INF) ? 0.f : __expf(s[nt][e] - mh);
        s[nt][e] = p;
        l[e >> 1] += p;
      }
#pragma unroll
    for (int j = 0; j < ND; ++j) {
      o[j][0] *= alpha[0]; o[j][1] *= alpha[0];
      o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
    }
    // O += P V: the S accumulators of n-tiles 2j, 2j+1 are the A fragment of keys 16j..16j+15
#pragma unroll
    for (int j = 0; j < NT / 2; ++j) {
      u32 pa[4];
      pa[0] = pack2<T>(s[2 * j][0], s[2 * j][1]);
      pa[1] = pack2<T>(s[2 * j][2], s[2 * j][3]);
      pa[2] = pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]);
      pa[3] = pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3]);
#pragma unroll
      for (int dt = 0; dt < ND; ++dt) {
        u32 bf[2];
        load_frag_b<LDV>(bf, Vt, dt * 8, j * 16, lane);
        mma16816<T>(o[dt], pa, bf);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  T* Op = O + ((i64)b * hq + h0) * tq * D;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = h == 0 ? r0 : r1;
    if (r >= nq) continue;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
#pragma unroll
    for (int dt = 0; dt < ND; ++dt) {
      const int c = dt * 8 + 2 * t;
      if (c < D) Op[(i64)(q0 + r) * D + c] = from_f32<T>(o[dt][2 * h] * inv);
      if (c + 1 < D) Op[(i64)(q0 + r) * D + c + 1] = from_f32<T>(o[dt][2 * h + 1] * inv);
    }
    if (t == 0) lse[((i64)b * hq + h0) * tq + q0 + r] = m[h] + __logf(l[h]);
  }
}

// ----------------------------------------------------------------------------- backward
// Delta[row] = sum_c dO[row][c] * O[row][c] (f32), one warp per row, 8 rows per block.
template <typename T>
__device__ __forceinline__ void attn_bwd_dot_impl(const T* __restrict__ dO, const T* __restrict__ O,
                                                  float* __restrict__ delta, i64 rows, int D) {
  const i64 row = (i64)blockIdx.x * 8 + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  float s = 0.f;
  for (int c = lane; c < D; c += 32) s += to_f32(dO[row * D + c]) * to_f32(O[row * D + c]);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// One block per (key tile of 32, kv head, batch): loops over the query heads of its
// group and the query tiles that can see its keys; accumulates dK, dV for its keys in
// registers and adds scale * dS K into the f32 dQ accumulator with atomics.
// dK, dV: [b, hkv, tk, d] f32 (contiguous). dQ: [b, hq, tq, d] f32, zeroed by the host.
// Grid: (ceil(tk / 32), hkv, b).
template <typename T, int DMAX, int BQ>
__device__ __forceinline__ void attn_bwd_impl(const T* __restrict__ Q, const T* __restrict__ K,
                                              const T* __restrict__ V, const int* __restrict__ starts,
                                              const T* __restrict__ dO, const float* __restrict__ lse,
                                              const float* __restrict__ delta, float* __restrict__ dQ,
                                              float* __restrict__ dK, float* __restrict__ dV, int hq, int hkv,
                                              int tq, int tk, int D, i64 ks0, i64 ks1, float scale) {
  constexpr int NJ = DMAX / 16;
  constexpr int NI = BQ / 16;
  constexpr int STAGE = AT_DC * (BQ + 1) + AT_DC * (AT_BK + 1);
  constexpr int RBUF = 32 * (DMAX + 1);
  __shared__ float buf[STAGE > RBUF ? STAGE : RBUF];
  __shared__ float Ps[BQ * (AT_BK + 1)];
  __shared__ float dSs[BQ * (AT_BK + 1)];
  __shared__ float Lse[BQ], Dl[BQ];
  __shared__ int Lo[BQ], Hi[BQ];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int b = blockIdx.z, hk = blockIdx.y, k0 = blockIdx.x * AT_BK;
  const int rep = hq / hkv, off = tk - tq;
  const T* Kp = K + b * ks0 + hk * ks1;
  const T* Vp = V + b * ks0 + hk * ks1;
  const int klast = min(k0 + AT_BK, tk) - 1;
  float dk[2][NJ], dv[2][NJ];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j) dk[i][j] = dv[i][j] = 0.f;
  // queries before position k0 see none of these keys
  const int qbeg = max(0, k0 - off);
  for (int g = 0; g < rep; ++g) {
    const int h = hk * rep + g;
    const i64 plane = ((i64)b * hq + h) * tq;
    const T* Qp = Q + plane * D;
    const T* dOp = dO + plane * D;
    for (int q0 = qbeg - qbeg % BQ; q0 < tq; q0 += BQ) {
      // starts are non-decreasing: once a tile's first query starts after our last
      // key, so do all later ones (a later segment).
      if (at_start(starts, b, tk, q0 + off) > klast) break;
      const int nq = min(BQ, tq - q0);
      __syncthreads();
      for (int r = threadIdx.x; r < BQ; r += AT_NT) {
        const int pos = q0 + r + off;
        Lo[r] = r < nq ? at_start(starts, b, tk, pos) : 1;
        Hi[r] = r < nq ? pos : 0;
        Lse[r] = r < nq ? lse[plane + q0 + r] : 0.f;
        Dl[r] = r < nq ? delta[plane + q0 + r] : 0.f;
      }
      __syncthreads();
      float s[NI][2];
      at_scores<T, BQ, NI>(s, buf, buf + AT_DC * (BQ + 1), Qp, q0, tq, Kp, k0, tk, D);
#pragma unroll
      for (int i = 0; i < NI; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int r = ty + 16 * i, c = tx + 16 * j, key = k0 + c;
          s[i][j] = (key >= Lo[r] && key <= Hi[r]) ? __expf(s[i][j] * scale - Lse[r]) : 0.f;
          Ps[r * (AT_BK + 1) + c] = s[i][j];
        }
      float dp[NI][2];
      at_scores<T, BQ, NI>(dp, buf, buf + AT_DC * (BQ + 1), dOp, q0, tq, Vp, k0, tk, D);
#pragma unroll
      for (int i = 0; i < NI; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int r = ty + 16 * i, c = tx + 16 * j;
          dSs[r * (AT_BK + 1) + c] = s[i][j] * (dp[i][j] - Dl[r]);
        }
      // dV[key] += sum_q P[q][key] dO[q];  dK[key] += scale sum_q dS[q][key] Q[q]
      // (query rows staged 32 at a time into buf)
      for (int pass = 0; pass < 2; ++pass) {
        const T* src = pass == 0 ? dOp : Qp;
        const float* coef = pass == 0 ? Ps : dSs;
        for (int r0 = 0; r0 < BQ; r0 += 32) {
          __syncthreads();
          at_stage_n<T, 32, DMAX>(buf, src, D, q0 + r0, tq, D);
          __syncthreads();
          for (int r = 0; r < 32; ++r) {
            const float c0 = coef[(r0 + r) * (AT_BK + 1) + ty], c1 = coef[(r0 + r) * (AT_BK + 1) + ty + 16];
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
              const float x = buf[r * (DMAX + 1) + tx + 16 * j];
              if (pass == 0) {
                dv[0][j] = fmaf(c0, x, dv[0][j]);
                dv[1][j] = fmaf(c1, x, dv[1][j]);
              } else {
                dk[0][j] = fmaf(c0, x, dk[0][j]);
                dk[1][j] = fmaf(c1, x, dk[1][j]);
              }
            }
          }
        }
      }
      // dQ[q] += scale sum_key dS[q][key] K[key]
      __syncthreads();
      at_stage_n<T, AT_BK, DMAX>(buf, Kp, D, k0, tk, D);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int r = ty + 16 * i;
        float acc[NJ];
#pragma unroll
        for (int j = 0; j < NJ; ++j) acc[j] = 0.f;
        for (int c = 0; c < AT_BK; ++c) {
          const float ds = dSs[r * (AT_BK + 1) + c];
#pragma unroll
          for (int j = 0; j < NJ; ++j) acc[j] = fmaf(ds, buf[c * (DMAX + 1) + tx + 16 * j], acc[j]);
        }
        if (r < nq) {
          float* dq = dQ + (plane + q0 + r) * D;
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
            const int c = tx + 16 * j;
            if (c < D && acc[j] != 0.f) atomicAdd(dq + c, scale * acc[j]);
          }
        }
      }
    }
  }
  const i64 kplane = ((i64)b * hkv + hk) * tk;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int key = k0 + ty + 16 * i;
    if (key >= tk) continue;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int c = tx + 16 * j;
      if (c < D) {
        dK[(kplane + key) * D + c] = scale * dk[i][j];
        dV[(kplane + key) * D + c] = dv[i][j];
      }
    }
  }
}

// starts[b][j] = first key of the contiguous run of equal segment ids containing j.
// One block of 1024 threads per batch row: chunk-local scan, block scan of the chunk
// maxima (Hillis-Steele), chunk rescan with the carry.
extern "C" __global__ void __launch_bounds__(1024) attn_seg_starts(const u32* __restrict__ seg, int* __restrict__ starts, int tk) {
  __shared__ int carry[1024];
  const u32* s = seg + (i64)blockIdx.x * tk;
  int* out = starts + (i64)blockIdx.x * tk;
  const int per = (tk + 1023) / 1024;
  const int j0 = threadIdx.x * per, j1 = min(tk, j0 + per);
  int m = 0;
  for (int j = j0; j < j1; ++j)
    if (j > 0 && s[j] != s[j - 1]) m = j;
  carry[threadIdx.x] = m;
  __syncthreads();
  for (int o = 1; o < 1024; o <<= 1) {
    const int v = threadIdx.x >= o ? carry[threadIdx.x - o] : 0;
    __syncthreads();
    carry[threadIdx.x] = max(carry[threadIdx.x], v);
    __syncthreads();
  }
  m = threadIdx.x > 0 ? carry[threadIdx.x - 1] : 0;
  for (int j = j0; j < j1; ++j) {
    if (j > 0 && s[j] != s[j - 1]) m = j;
    out[j] = m;
  }
}

#define AT_FWD(T, DM)                                                                                       \
  extern "C" __global__ void __launch_bounds__(AT_NT, 2) attn_fwd_##T##_d##DM(                                 \
      const T *Q, const T *K, const T *V, const int *starts, T *O, float *lse, int hq, int hkv, int tq,       \
      int tk, int D, i64 ks0, i64 ks1, float scale, int hp) {                                               \
    attn_fwd_impl<T, DM>(Q, K, V, starts, O, lse, hq, hkv, tq, tk, D, ks0, ks1, scale, hp);                 \
  }
#define AT_BWD(T, DM, BQ)                                                                                   \
  extern "C" __global__ void __launch_bounds__(AT_NT) attn_bwd_##T##_d##DM(                                 \
      const T *Q, const T *K, const T *V, const int *starts, const T *dO, const float *lse,                 \
      const float *delta, float *dQ, float *dK, float *dV, int hq, int hkv, int tq, int tk, int D, i64 ks0, \
      i64 ks1, float scale) {                                                                               \
    attn_bwd_impl<T, DM, BQ>(Q, K, V, starts, dO, lse, delta, dQ, dK, dV, hq, hkv, tq, tk, D, ks0, ks1,     \
                             scale);                                                                        \
  }
#define AT_FWD_TC(T, DM)                                                                                    \
  extern "C" __global__ void __launch_bounds__(128) attn_fwd_tc_##T##_d##DM(                                \
      const T *Q, const T *K, const T *V, const int *starts, T *O, float *lse, int hq, int hkv, int tq,       \
      int tk, int D, i64 ks0, i64 ks1, float scale, int hp) {                                               \
    attn_fwd_tc_impl<T, DM>(Q, K, V, starts, O, lse, hq, hkv, tq, tk, D, ks0, ks1, scale, hp);              \
  }
#define AT_PREFIX(T, DM)                                                                                    \
  extern "C" __global__ void __launch_bounds__(AT_NT, 2) attn_prefix_fwd_##T##_d##DM(                          \
      const T *Q, const T *K, const T *V, const T *PK, const T *PV, const u32 *rows_of, const u32 *seg, T *O, \
      int hq, int hkv, int tq, int n, int lp, int D, i64 ks0, i64 ks1, i64 ps0, i64 ps1, float scale, int hp) { \
    attn_prefix_fwd_impl<T, DM>(Q, K, V, PK, PV, rows_of, seg, O, hq, hkv, tq, n, lp, D, ks0, ks1, ps0, ps1,  \
                                scale, hp);                                                                 \
  }
#define AT_ALL(T)                                                                                           \
  AT_FWD(T, 64) AT_FWD(T, 128) AT_FWD(T, 256)                                                               \
  AT_PREFIX(T, 64) AT_PREFIX(T, 128) AT_PREFIX(T, 256)                                                      \
  AT_BWD(T, 64, 64) AT_BWD(T, 128, 64) AT_BWD(T, 256, 32)                                                   \
  extern "C" __global__ void __launch_bounds__(256)                                                         \
      attn_bwd_dot_##T(const T *dO, const T *O, float *delta, i64 rows, int D) {                            \
    attn_bwd_dot_impl<T>(dO, O, delta, rows, D);                                                            \
  }

AT_ALL(bf16)
AT_ALL(f16)
AT_ALL(float)
AT_FWD_TC(bf16, 64) AT_FWD_TC(bf16, 128)
AT_FWD_TC(f16, 64) AT_FWD_TC(f16, 128)
