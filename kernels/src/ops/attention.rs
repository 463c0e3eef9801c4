//! Memory-bounded causal attention (flash-attention style on CPU) with
//! grouped-query heads and optional packed-sequence segment ids.
//!
//! q: [b, hq, tq, d]; k, v: [b, hkv, tk, d] with hq % hkv == 0 (query head `h` uses
//! key/value head `h / (hq/hkv)`, as `repeat_kv` lays them out). Query `i` sits at
//! position `i + tk - tq` (so a KV-cache decode step works) and sees key `j` when
//! `j <= i + tk - tq` and, with segment ids [b, tk], when `j` lies in the same
//! contiguous run of equal ids. Scores are computed in blocks of `BQ` query rows
//! times a key tile ([`key_tile`]) over the visible key range only, with an online
//! softmax across the tiles (flash attention): nothing of size [hq, tq, tk], nor even
//! a block row against all keys, is ever held, so long sequences stay in L2. The
//! forward saves the per-row log-sum-exp; the backward recomputes the probabilities
//! tile by tile.
//!
//! k and v may be strided views whose (batch, head) planes are each contiguous, such
//! as `narrow(2, 0, len)` of a preallocated KV-cache buffer: the forward reads them
//! in place, so a decode step does not copy the whole cache.
use super::decode_attention::{decode_step, last_run_start, Lanes, RowKv, RowSeq};
use crate::cpu::{bind_f32, exp_shift_sum, f32_view, fast_exp, max_f32, matmul, storage_from_f32, tensor_from_f32, Elem, Mat, Par};
use crate::simd::isa_dispatch;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Mutex;

/// Query rows per block.
const BQ: usize = 128;

pub struct CausalAttention {
    pub scale: f32,
    /// [b, tk] segment ids (contiguous runs), if the rows are packed.
    pub segments: Option<Vec<u32>>,
    /// Per-row log-sum-exp [b, hq, tq] saved by the forward.
    pub lse: Mutex<Option<Vec<f32>>>,
}

/// The sizes of a causal-attention call (shared with the CUDA op).
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) hq: usize,
    pub(crate) hkv: usize,
    pub(crate) tq: usize,
    pub(crate) tk: usize,
    pub(crate) d: usize,
}

/// q [b, hq, tq, d], k and v [b, hkv, tk, d] with hq a multiple of hkv and tq <= tk.
pub(crate) fn dims(q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
    let (&[b, hq, tq, d], &[kb, hkv, tk, kd]) = (q, k) else {
        bail!("causal-attention: q {q:?} and k {k:?} must be 4-d");
    };
    if kb != b || kd != d || k != v || hkv == 0 || hq % hkv != 0 || tq > tk {
        bail!("causal-attention: incompatible q {q:?}, k {k:?}, v {v:?}");
    }
    Ok(Dims { b, hq, hkv, tq, tk, d })
}

impl CausalAttention {
    pub fn new(scale: f32, segments: Option<Vec<u32>>) -> Self {
        CausalAttention { scale, segments, lse: Mutex::new(None) }
    }

    fn segment_starts(&self, b: usize, tk: usize) -> Result<Vec<usize>> {
        segment_starts(self.segments.as_deref(), b, tk)
    }
}

/// For each batch row, `start[j]` = first key of the segment containing key `j`.
fn segment_starts(segments: Option<&[u32]>, b: usize, tk: usize) -> Result<Vec<usize>> {
    let mut start = vec![0usize; b * tk];
    if let Some(seg) = segments {
        if seg.len() != b * tk {
            bail!("causal-attention: segment ids have {} entries, expected {b}x{tk}", seg.len());
        }
        for bi in 0..b {
            for j in 1..tk {
                let i = bi * tk + j;
                start[i] = if seg[i] == seg[i - 1] { start[i - 1] } else { j };
            }
        }
    }
    Ok(start)
}

/// Whether a [b, h, t, d] layout has every (batch, head) plane of t*d elements
/// contiguous (the only thing the forward needs of k and v). The stride of a dimension
/// of size 1 never moves an index, and candle calls such a layout contiguous (its
/// `contiguous()` returns it unchanged): the k/v of a one-token prefill cut from the
/// fused QKV projection arrive as dims [1, 2, 1, 8], strides [64, 8, 64, 1].
pub(crate) fn planes_contiguous(dims: &[usize], stride: &[usize]) -> bool {
    match (dims, stride) {
        ([_, _, t, d], [_, _, s2, s3]) => (*d <= 1 || *s3 == 1) && (*t <= 1 || *s2 == *d),
        _ => false,
    }
}

/// `t` as the forward takes k or v: unchanged when its planes are contiguous (a
/// KV-cache view, read in place), otherwise a contiguous copy.
pub(crate) fn kv_operand(t: &Tensor) -> Result<Tensor> {
    if planes_contiguous(t.dims(), t.stride()) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Where plane (bi, hi) of a [b, h, t, d] tensor lies: `len` = t*d elements from
/// `off + bi * s0 + hi * s1`.
#[derive(Clone, Copy)]
struct PlaneIndex {
    off: usize,
    s0: usize,
    s1: usize,
    len: usize,
}

impl PlaneIndex {
    fn start(&self, bi: usize, hi: usize) -> usize {
        self.off + bi * self.s0 + hi * self.s1
    }
}

/// k or v as f32 planes.
struct Planes<'a> {
    data: Cow<'a, [f32]>,
    at: PlaneIndex,
}

impl Planes<'_> {
    fn plane(&self, bi: usize, hi: usize) -> &[f32] {
        let o = self.at.start(bi, hi);
        &self.data[o..o + self.at.len]
    }
}

/// k or v planes in the storage's own dtype, borrowed where they lie (decode steps).
struct TypedPlanes<'a, T> {
    data: &'a [T],
    at: PlaneIndex,
}

impl<'a, T: Elem> TypedPlanes<'a, T> {
    /// None when the storage does not hold `T`.
    fn new(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<Option<Self>> {
        let Some(data) = T::of_storage(s) else { return Ok(None) };
        let (dims, st) = (l.dims(), l.stride());
        if !planes_contiguous(dims, st) {
            bail!("{op}: k/v planes must be contiguous (dims {dims:?}, strides {st:?})");
        }
        Ok(Some(TypedPlanes { data, at: PlaneIndex { off: l.start_offset(), s0: st[0], s1: st[1], len: dims[2] * dims[3] } }))
    }

    fn plane(&self, bi: usize, hi: usize) -> &'a [T] {
        let o = self.at.start(bi, hi);
        &self.data[o..o + self.at.len]
    }
}

/// Runs `$call::<T>(...)` with T the element type of CPU storage `$s` (f32, bf16 or
/// f16); other dtypes give `Ok(None)`.
macro_rules! by_dtype {
    ($s:expr, $call:ident ( $($arg:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => $call::<f32>($($arg),*),
            CpuStorage::BF16(_) => $call::<half::bf16>($($arg),*),
            CpuStorage::F16(_) => $call::<half::f16>($($arg),*),
            _ => Ok(None),
        }
    };
}

/// f32 storage is borrowed where it lies; bf16/f16 planes are widened into a packed
/// buffer (that pass copies anyway) holding only the viewed positions.
fn planes<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<Planes<'a>> {
    let (dims, st) = (l.dims(), l.stride());
    if !planes_contiguous(dims, st) {
        bail!("{op}: k/v planes must be contiguous (dims {dims:?}, strides {st:?})");
    }
    let (b, h, len) = (dims[0], dims[1], dims[2] * dims[3]);
    let at = PlaneIndex { off: l.start_offset(), s0: st[0], s1: st[1], len };
    let packed = PlaneIndex { off: 0, s0: h * len, s1: len, len };
    Ok(match s {
        CpuStorage::F32(v) => Planes { data: Cow::Borrowed(v.as_slice()), at },
        CpuStorage::BF16(v) => Planes { data: Cow::Owned(widen_planes(v, at, b, h)), at: packed },
        CpuStorage::F16(v) => Planes { data: Cow::Owned(widen_planes(v, at, b, h)), at: packed },
        other => bail!("{op}: unsupported dtype {:?}", other.dtype()),
    })
}

/// The b*h planes of `v` at `at`, widened to f32 and packed one after another.
fn widen_planes<T: Elem>(v: &[T], at: PlaneIndex, b: usize, h: usize) -> Vec<f32> {
    let mut out = crate::cpu::uninit::<f32>(b * h * at.len);
    out.par_chunks_mut(at.len).enumerate().for_each(|(i, o)| {
        let start = at.start(i / h, i % h);
        o.iter_mut().zip(&v[start..start + at.len]).for_each(|(o, x)| *o = x.to_f32());
    });
    out
}

/// Keys per tile: the score tile (`BQ` x this), the K and V tiles and their gradients
/// stay in L2 together (~550 KiB with 128-row blocks at head dim 64 or 128; a 1 MiB L2
/// per core on Zen 4: 128 x 256 measured 4% faster than 64 x 256 at 4096 tokens, 128 x 512
/// no faster).
fn key_tile(d: usize) -> usize {
    (16384 / d.max(1)).clamp(64, 256)
}

/// The keys (or values) of one (batch, kv head), `d` floats a position: positions
/// `0..first.len() / d` in `first`, the rest in `second`. One plane has an empty `second`;
/// a row of a shared-prompt cache has its prompt's plane (shared by the prompt's rows)
/// first and its own completion's plane second, both read in place, never joined: a key
/// tile never spans the two (the forward ends a tile where `first` ends).
#[derive(Clone, Copy)]
struct Seq<'a> {
    first: &'a [f32],
    second: &'a [f32],
}

impl<'a> Seq<'a> {
    fn one(plane: &'a [f32]) -> Self {
        Seq { first: plane, second: &[] }
    }

    /// Positions held in `first`.
    #[inline(always)]
    fn split(&self, d: usize) -> usize {
        self.first.len() / d.max(1)
    }

    /// Positions `t0..t1`, all in one of the two parts.
    #[inline(always)]
    fn rows(&self, t0: usize, t1: usize, d: usize) -> &'a [f32] {
        let split = self.split(d);
        if t1 <= split {
            &self.first[t0 * d..t1 * d]
        } else {
            &self.second[(t0 - split) * d..(t1 - split) * d]
        }
    }
}

/// The read-only inputs of one (batch, query head): its query plane, the keys and values
/// of its key/value head, where each key's segment starts, and the query -> key position
/// offset.
struct Head<'a> {
    q: &'a [f32],
    k: Seq<'a>,
    v: Seq<'a>,
    starts: &'a [usize],
    off: usize,
    d: usize,
    scale: f32,
}

impl Head<'_> {
    /// Keys some query in `q0..q1` sees: from the first query's segment start to the
    /// last query's position (exclusive end).
    fn keys(&self, q0: usize, q1: usize) -> (usize, usize) {
        (self.starts[q0 + self.off], q1 + self.off)
    }

    /// The columns of key tile `kt0..kt1` that query `i` sees, if any.
    #[inline(always)]
    fn visible_in(&self, i: usize, kt0: usize, kt1: usize) -> Option<(usize, usize)> {
        let pos = i + self.off;
        let (lo, hi) = (self.starts[pos].max(kt0), (pos + 1).min(kt1));
        (lo < hi).then(|| (lo - kt0, hi - kt0))
    }

    /// `s` (rows x kw) = scale * Q[q0..q1] K[kt0..kt1]^T with the keys a row does not see
    /// set to 0. Returns each row's visible column range (the caller's loop over them
    /// stays in the caller's instruction set: a closure here would not).
    /// `keys`: the tile's keys (kw x d).
    #[inline(always)]
    fn scores_tile(&self, q0: usize, q1: usize, kt0: usize, kt1: usize, keys: &[f32], s: &mut [f32]) -> [(usize, usize); BQ] {
        let (d, kw) = (self.d, kt1 - kt0);
        let qb = Mat::new(&self.q[q0 * d..q1 * d], q1 - q0, d);
        matmul(s, false, qb, Mat::new(keys, kw, d).t(), self.scale, Par::Seq);
        let mut seen = [(0, 0); BQ];
        for (r, row) in s.chunks_exact_mut(kw).enumerate() {
            let (a, e) = self.visible_in(q0 + r, kt0, kt1).unwrap_or((0, 0));
            row[..a].fill(0.0);
            row[e..].fill(0.0);
            seen[r] = (a, e);
        }
        seen
    }
}

/// What the backward reads besides [`Head`]: the forward's output, the output
/// gradient and the per-row log-sum-exp, for the same (batch, query head).
struct HeadGrads<'a> {
    o: &'a [f32],
    go: &'a [f32],
    lse: &'a [f32],
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    tail + acc.iter().sum::<f32>()
}

isa_dispatch! {
    /// Output rows `q0..q1` of one head (`o`: their rows x d block, `lse`: their rows):
    /// flash attention's online softmax over key tiles, so only a BQ x key-tile block
    /// of scores exists at a time whatever the sequence length.
    fn forward_block(h: &Head<'_>, q0: usize, q1: usize, o: &mut [f32], lse: &mut [f32]) {
        let (d, rows) = (h.d, q1 - q0);
        let (k_lo, k_hi) = h.keys(q0, q1);
        let bk = key_tile(d).min(k_hi - k_lo);
        let mut s = vec![0f32; rows * bk];
        let mut max = [f32::NEG_INFINITY; BQ];
        let mut sum = [0f32; BQ];
        // A shared prompt's keys end a tile (the online softmax takes any tiling), so
        // that every tile is read in place from one plane.
        let split = h.k.split(d);
        o.fill(0.0);
        let mut kt0 = k_lo;
        while kt0 < k_hi {
            let mut kt1 = (kt0 + bk).min(k_hi);
            if kt0 < split && split < kt1 {
                kt1 = split;
            }
            let kw = kt1 - kt0;
            let sb = &mut s[..rows * kw];
            let seen = h.scores_tile(q0, q1, kt0, kt1, h.k.rows(kt0, kt1, d), sb);
            for (r, &(a, e)) in seen[..rows].iter().enumerate().filter(|(_, (a, e))| a < e) {
                let row = &mut sb[r * kw + a..r * kw + e];
                let m = max[r].max(max_f32(row));
                // Rescale what earlier tiles summed to the new max (0 on the first tile).
                let alpha = fast_exp(max[r] - m);
                sum[r] = sum[r] * alpha + exp_shift_sum(row, m);
                if alpha != 1.0 {
                    o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= alpha);
                }
                max[r] = m;
            }
            matmul(o, true, Mat::new(sb, rows, kw), Mat::new(h.v.rows(kt0, kt1, d), kw, d), 1.0, Par::Seq);
            kt0 = kt1;
        }
        for r in 0..rows {
            let inv = 1.0 / sum[r];
            o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
            lse[r] = max[r] + sum[r].ln();
        }
    }
}

isa_dispatch! {
    /// Gradients from output rows `q0..q1` of one head: writes their dQ rows (`dq`, a
    /// rows x d block) and adds into the head's dK/dV planes, key tile by key tile,
    /// recomputing the probabilities from the saved log-sum-exp.
    fn backward_block(h: &Head<'_>, g: &HeadGrads<'_>, q0: usize, q1: usize, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let (d, rows, scale) = (h.d, q1 - q0, h.scale);
        let (k_lo, k_hi) = h.keys(q0, q1);
        let bk = key_tile(d).min(k_hi - k_lo);
        let mut p = vec![0f32; rows * bk];
        let mut dp = vec![0f32; rows * bk];
        // D_i = rowsum(dO_i o O_i): the softmax backward's correction term.
        let mut di = [0f32; BQ];
        for r in 0..rows {
            let i = q0 + r;
            di[r] = dot(&g.go[i * d..(i + 1) * d], &g.o[i * d..(i + 1) * d]);
        }
        dq.fill(0.0);
        let qb = Mat::new(&h.q[q0 * d..q1 * d], rows, d);
        let gb = Mat::new(&g.go[q0 * d..q1 * d], rows, d);
        let mut kt0 = k_lo;
        while kt0 < k_hi {
            let kt1 = (kt0 + bk).min(k_hi);
            let kw = kt1 - kt0;
            let (pb, dpb) = (&mut p[..rows * kw], &mut dp[..rows * kw]);
            // The backward runs on one plane (`CausalAttention`): `first` is all of it.
            let kb = Mat::new(&h.k.first[kt0 * d..kt1 * d], kw, d);
            let vb = Mat::new(&h.v.first[kt0 * d..kt1 * d], kw, d);
            let seen = h.scores_tile(q0, q1, kt0, kt1, &h.k.first[kt0 * d..kt1 * d], pb);
            for (r, &(a, e)) in seen[..rows].iter().enumerate() {
                let l = g.lse[q0 + r];
                pb[r * kw + a..r * kw + e].iter_mut().for_each(|x| *x = fast_exp(*x - l));
            }
            // dV += P^T dO
            matmul(&mut dv[kt0 * d..kt1 * d], true, Mat::new(pb, rows, kw).t(), gb, 1.0, Par::Seq);
            // dP = dO V^T ; dS = P o (dP - D)
            matmul(dpb, false, gb, vb.t(), 1.0, Par::Seq);
            for r in 0..rows {
                let (pr, dr) = (&pb[r * kw..(r + 1) * kw], &mut dpb[r * kw..(r + 1) * kw]);
                dr.iter_mut().zip(pr).for_each(|(g, p)| *g = p * (*g - di[r]));
            }
            // dQ += scale dS K ; dK += scale dS^T Q
            matmul(dq, true, Mat::new(dpb, rows, kw), kb, scale, Par::Seq);
            matmul(&mut dk[kt0 * d..kt1 * d], true, Mat::new(dpb, rows, kw).t(), qb, scale, Par::Seq);
            kt0 = kt1;
        }
    }
}

/// Cuts query blocks `0..nqb` into at most `parts` contiguous runs of about equal
/// causal work (block `i` sees about `(i + 1) * BQ + off` keys). Returns the bounds.
fn split_blocks(nqb: usize, parts: usize, off: usize) -> Vec<usize> {
    let work = |i: usize| ((i + 1) * BQ + off) as f64;
    let total: f64 = (0..nqb).map(work).sum();
    let mut bounds = vec![0];
    let mut acc = 0.0;
    for i in 0..nqb {
        acc += work(i);
        let target = total * bounds.len() as f64 / parts as f64;
        if acc >= target && i + 1 < nqb && bounds.len() < parts {
            bounds.push(i + 1);
        }
    }
    bounds.push(nqb);
    bounds
}

/// One backward task: a run of query blocks of one (batch, query head), the dQ rows
/// they own, and a dK/dV partial of its own (summed per kv head afterwards).
struct BackwardTask<'a> {
    bh: usize,
    blocks: std::ops::Range<usize>,
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let op = self.name();
        let Dims { b, hq, hkv, tq, tk, d } = dims(lq.dims(), lk.dims(), lv.dims())?;
        let q = f32_view(sq, lq, op)?;
        if tq == 1 {
            if let Some((out, lse)) = by_dtype!(sk, causal_decode(self, &q, Dims { b, hq, hkv, tq, tk, d }, sk, lk, sv, lv))? {
                *self.lse.lock().unwrap() = Some(lse);
                return Ok((storage_from_f32(out, sq.dtype())?, lq.shape().clone()));
            }
        }
        let k = planes(sk, lk, op)?;
        let v = planes(sv, lv, op)?;
        let starts = self.segment_starts(b, tk)?;
        let dims = Dims { b, hq, hkv, tq, tk, d };
        let row_at: Vec<usize> = (0..=b).map(|r| r * tk).collect();
        let (out, lse) = forward_heads(&q, &dims, &starts, &row_at, self.scale, |bi, kv| (Seq::one(k.plane(bi, kv)), Seq::one(v.plane(bi, kv))));
        *self.lse.lock().unwrap() = Some(lse);
        Ok((storage_from_f32(out, sq.dtype())?, lq.shape().clone()))
    }

    // No cuda_fwd: on CUDA, `lora_kernels::causal_attention` runs its own op,
    // `cuda::attention::CausalAttentionCuda` (flash-style kernels of cuda/src/attention.cu).

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !q.device().is_cpu() {
            bail!("causal-attention: no backward for {:?} yet", q.device());
        }
        if !q.track_op() && !k.track_op() && !v.track_op() {
            return Ok((None, None, None));
        }
        let op = "causal-attention-bwd";
        let _p = crate::profile::scope(op);
        let Dims { b, hq, hkv, tq, tk, d } = dims(q.dims(), k.dims(), v.dims())?;
        let lse = match self.lse.lock().unwrap().take() {
            Some(l) => l,
            None => bail!("{op}: forward state missing (backward called twice?)"),
        };
        bind_f32!(qv = q, op);
        bind_f32!(kv = k, op);
        bind_f32!(vv = v, op);
        bind_f32!(ov = res, op);
        bind_f32!(gv = grad, op);
        let starts = self.segment_starts(b, tk)?;
        let (rep, off, scale) = (hq / hkv, tk - tq, self.scale);
        // Tasks: runs of query blocks of one (batch, query head), each with its own dK/dV
        // partial, summed over the runs and the query heads of a kv head afterwards.
        // One run per head while there are >= 4 heads per thread; at batch 1 (9 heads
        // on 2 threads) each head is cut into runs of equal causal work so no core idles.
        let nqb = tq.div_ceil(BQ);
        let threads = rayon::current_num_threads();
        let parts = if b * hq >= 4 * threads { 1 } else { (4 * threads).div_ceil(b * hq).min(nqb).max(1) };
        let bounds = split_blocks(nqb, parts, off);
        let parts = bounds.len() - 1;
        let mut dq = crate::cpu::uninit::<f32>(b * hq * tq * d);
        let mut dkh = vec![0f32; b * hq * parts * tk * d];
        let mut dvh = vec![0f32; b * hq * parts * tk * d];
        let mut tasks = Vec::with_capacity(b * hq * parts);
        for (bh, ((dqp, dkp), dvp)) in dq.chunks_mut(tq * d).zip(dkh.chunks_mut(parts * tk * d)).zip(dvh.chunks_mut(parts * tk * d)).enumerate() {
            let mut rest = dqp;
            for ((pi, dk), dv) in (0..parts).zip(dkp.chunks_mut(tk * d)).zip(dvp.chunks_mut(tk * d)) {
                let blocks = bounds[pi]..bounds[pi + 1];
                let rows = (blocks.end * BQ).min(tq) - blocks.start * BQ;
                let (mine, tail) = rest.split_at_mut(rows * d);
                rest = tail;
                tasks.push(BackwardTask { bh, blocks, dq: mine, dk, dv });
            }
        }
        tasks.into_par_iter().for_each(|t| {
            let bi = t.bh / hq;
            let bkv = bi * hkv + (t.bh % hq) / rep;
            let span = |n: usize, i: usize| i * n..(i + 1) * n;
            let head = Head {
                q: &qv[span(tq * d, t.bh)],
                k: Seq::one(&kv[span(tk * d, bkv)]),
                v: Seq::one(&vv[span(tk * d, bkv)]),
                starts: &starts[bi * tk..(bi + 1) * tk],
                off,
                d,
                scale,
            };
            let grads = HeadGrads { o: &ov[span(tq * d, t.bh)], go: &gv[span(tq * d, t.bh)], lse: &lse[span(tq, t.bh)] };
            let first_row = t.blocks.start * BQ;
            for qb in t.blocks.clone() {
                let (q0, q1) = (qb * BQ, ((qb + 1) * BQ).min(tq));
                backward_block(&head, &grads, q0, q1, &mut t.dq[(q0 - first_row) * d..(q1 - first_row) * d], t.dk, t.dv);
            }
        });
        let (dk, dv) = (sum_groups(dkh, rep * parts, tk * d), sum_groups(dvh, rep * parts, tk * d));
        let dq = if q.track_op() { Some(tensor_from_f32(dq, q.shape(), q.dtype())?) } else { None };
        let dk = if k.track_op() { Some(tensor_from_f32(dk, k.shape(), k.dtype())?) } else { None };
        let dv = if v.track_op() { Some(tensor_from_f32(dv, v.shape(), v.dtype())?) } else { None };
        Ok((dq, dk, dv))
    }
}

/// The forward of every (batch, query head): `kv(bi, kv_head)` gives the keys and values
/// a batch row's kv head reads, `starts[row_at[bi]..row_at[bi + 1]]` where each of its
/// keys' segment starts (rows may hold different numbers of keys; `dims.tk` is unused).
/// Returns the output [b, hq, tq, d] and the per-row log-sum-exp [b, hq, tq].
fn forward_heads<'a>(q: &[f32], dims: &Dims, starts: &[usize], row_at: &[usize], scale: f32, kv: impl Fn(usize, usize) -> (Seq<'a>, Seq<'a>) + Sync) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, hq, hkv, tq, d, .. } = *dims;
    let rep = hq / hkv;
    let mut out = crate::cpu::uninit::<f32>(b * hq * tq * d);
    let mut lse = vec![0f32; b * hq * tq];
    // One task per (batch, query head, query block): independent in the forward.
    out.par_chunks_mut(tq * d).zip(lse.par_chunks_mut(tq)).enumerate().for_each(|(bh, (o, l))| {
        let (bi, hi) = (bh / hq, bh % hq);
        let (k, v) = kv(bi, hi / rep);
        let starts = &starts[row_at[bi]..row_at[bi + 1]];
        let head = Head { q: &q[bh * tq * d..(bh + 1) * tq * d], k, v, starts, off: starts.len() - tq, d, scale };
        o.par_chunks_mut(BQ * d).zip(l.par_chunks_mut(BQ)).enumerate().for_each(|(qb, (ob, lb))| {
            let q0 = qb * BQ;
            forward_block(&head, q0, q0 + lb.len(), ob, lb);
        });
    });
    (out, lse)
}

/// Causal attention of rows that continue a shared prompt (decoding only, no backward):
/// batch row `r`'s keys and values are its prompt's, `prefix_k`/`prefix_v` row
/// `prefix_of_row[r]` ([p, hkv, lp, d], shared by every row of that prompt), followed by
/// its own from position `own_start[r]` on (the op's k and v, [b, hkv, n, d]: positions
/// before a row's start were written before it joined and are skipped). Everything else
/// is [`CausalAttention`] on the joined sequence (`segments`: [b, lp + n], the entries of
/// skipped positions ignored), except that a key tile ends where the prompt ends: the
/// result equals that of the prompt copied into every row to float rounding (the
/// softmax's partial sums are grouped differently), not bit for bit.
pub struct PrefixAttention {
    pub scale: f32,
    pub segments: Vec<u32>,
    pub prefix_k: Tensor,
    pub prefix_v: Tensor,
    pub prefix_of_row: Vec<usize>,
    /// Per row, the first own position it reads (empty: 0 for every row).
    pub own_start: Vec<usize>,
}

impl CustomOp3 for PrefixAttention {
    fn name(&self) -> &'static str {
        "prefix-attention"
    }

    fn cpu_fwd(&self, sq: &CpuStorage, lq: &Layout, sk: &CpuStorage, lk: &Layout, sv: &CpuStorage, lv: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let op = self.name();
        let dims = dims(lq.dims(), lk.dims(), lv.dims())?;
        let Dims { b, hq, hkv, tq, tk: n, d } = dims;
        let (pk_g, pv_g) = (self.prefix_k.storage_and_layout(), self.prefix_v.storage_and_layout());
        let (lp, own_start) = prefix_checks(op, &dims, pk_g.1.dims(), pv_g.1.dims(), &self.prefix_of_row, &self.own_start, self.segments.len())?;
        let tk = lp + n;
        let q = f32_view(sq, lq, op)?;
        if tq == 1 {
            let (pk, pv) = ((&*pk_g.0, pk_g.1), (&*pv_g.0, pv_g.1));
            if let Some((out, _lse)) = by_dtype!(sk, prefix_decode(self, &q, Dims { b, hq, hkv, tq, tk, d }, &own_start, (sk, lk), (sv, lv), pk, pv))? {
                return Ok((storage_from_f32(out, sq.dtype())?, lq.shape().clone()));
            }
        }
        let (k, v) = (planes(sk, lk, op)?, planes(sv, lv, op)?);
        let pk = planes(crate::cpu::cpu_storage(&pk_g.0, op)?, pk_g.1, op)?;
        let pv = planes(crate::cpu::cpu_storage(&pv_g.0, op)?, pv_g.1, op)?;
        // Each row's keys: the prompt's lp, then its own from its start.
        let (mut starts, mut row_at) = (Vec::with_capacity(b * tk), vec![0]);
        for (r, &from) in own_start.iter().enumerate() {
            let seg = &self.segments[r * tk..(r + 1) * tk];
            let joined: Vec<u32> = seg[..lp].iter().chain(&seg[lp + from..]).copied().collect();
            starts.extend(segment_starts(Some(&joined), 1, joined.len())?);
            row_at.push(starts.len());
        }
        let dims = Dims { b, hq, hkv, tq, tk, d };
        let rows = &self.prefix_of_row;
        let (out, _lse) = forward_heads(&q, &dims, &starts, &row_at, self.scale, |bi, kv| {
            let own = own_start[bi] * d;
            (Seq { first: pk.plane(rows[bi], kv), second: &k.plane(bi, kv)[own..] }, Seq { first: pv.plane(rows[bi], kv), second: &v.plane(bi, kv)[own..] })
        });
        Ok((storage_from_f32(out, sq.dtype())?, lq.shape().clone()))
    }

    // No cuda_fwd and no bwd: `lora_kernels::prefix_causal_attention` runs this op only on
    // CPU and without a graph; CUDA has its own op (`cuda::attention`, the same contract),
    // other devices join the planes and run `causal_attention`.
}

/// A decode step of [`CausalAttention`] (one query per row) on k/v of dtype `T`: see
/// `decode_attention`. None when v or the segment ids do not fit (the general path
/// then reports it).
#[allow(clippy::too_many_arguments)]
fn causal_decode<T: Elem + Lanes>(op: &CausalAttention, q: &[f32], dims: Dims, sk: &CpuStorage, lk: &Layout, sv: &CpuStorage, lv: &Layout) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    let name = op.name();
    let (Some(k), Some(v)) = (TypedPlanes::<T>::new(sk, lk, name)?, TypedPlanes::<T>::new(sv, lv, name)?) else { return Ok(None) };
    let tk = dims.tk;
    let segments = op.segments.as_deref();
    if segments.is_some_and(|s| s.len() != dims.b * tk) {
        return Ok(None);
    }
    Ok(Some(decode_step(q, &dims, op.scale, |bi, g| RowKv {
        k: RowSeq::own(k.plane(bi, g)),
        v: RowSeq::own(v.plane(bi, g)),
        lo: segments.map_or(0, |s| last_run_start(&[], &s[bi * tk..(bi + 1) * tk])),
        hi: tk,
    })))
}

type StorageAt<'a> = (&'a Storage, &'a Layout);

/// A decode step of [`PrefixAttention`]: each row's prompt planes, then its own from its
/// start, read in place in dtype `T`. None when an operand is not `T`.
#[allow(clippy::too_many_arguments)]
fn prefix_decode<T: Elem + Lanes>(op: &PrefixAttention, q: &[f32], dims: Dims, own_start: &[usize], k: (&CpuStorage, &Layout), v: (&CpuStorage, &Layout), pk: StorageAt<'_>, pv: StorageAt<'_>) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    let name = op.name();
    let (Some(k), Some(v)) = (TypedPlanes::<T>::new(k.0, k.1, name)?, TypedPlanes::<T>::new(v.0, v.1, name)?) else { return Ok(None) };
    let (pks, pvs) = (crate::cpu::cpu_storage(pk.0, name)?, crate::cpu::cpu_storage(pv.0, name)?);
    let (Some(pk), Some(pv)) = (TypedPlanes::<T>::new(pks, pk.1, name)?, TypedPlanes::<T>::new(pvs, pv.1, name)?) else { return Ok(None) };
    let (d, tk) = (dims.d, dims.tk);
    let lp = pk.at.len / d.max(1);
    let rows = &op.prefix_of_row;
    Ok(Some(decode_step(q, &dims, op.scale, |bi, g| {
        let own = own_start[bi];
        let seg = &op.segments[bi * tk..(bi + 1) * tk];
        RowKv {
            k: RowSeq { first: pk.plane(rows[bi], g), second: &k.plane(bi, g)[own * d..] },
            v: RowSeq { first: pv.plane(rows[bi], g), second: &v.plane(bi, g)[own * d..] },
            lo: last_run_start(&seg[..lp], &seg[lp + own..]),
            hi: tk - own,
        }
    })))
}

/// Checks a prefix attention's operands against q/k/v's `dims` (tk = the rows' own
/// positions n): prompt keys and values [p, hkv, lp, d], one prompt row per batch row,
/// own starts (empty: all 0) that leave room for the queries, b x (lp + n) segment ids.
/// Returns lp and the own starts. Shared by the CPU op and the CUDA path.
pub(crate) fn prefix_checks(op: &str, dims: &Dims, pk: &[usize], pv: &[usize], prefix_of_row: &[usize], own_start: &[usize], n_segments: usize) -> Result<(usize, Vec<usize>)> {
    let Dims { b, hkv, tq, tk: n, d, .. } = *dims;
    let &[p, phkv, lp, pd] = pk else { bail!("{op}: prefix keys {pk:?} must be 4-d") };
    if pk != pv || phkv != hkv || pd != d {
        bail!("{op}: prefix keys {pk:?} / values {pv:?} do not fit keys [{b}, {hkv}, {n}, {d}]");
    }
    if prefix_of_row.len() != b || prefix_of_row.iter().any(|&r| r >= p) {
        bail!("{op}: {} prefix rows for {b} batch rows of {p} prefixes", prefix_of_row.len());
    }
    let own_start = if own_start.is_empty() { vec![0; b] } else { own_start.to_vec() };
    if own_start.len() != b || own_start.iter().any(|&s| s + tq > n) {
        bail!("{op}: own starts {own_start:?} for {b} rows of {n} positions and {tq} queries");
    }
    if n_segments != b * (lp + n) {
        bail!("{op}: segment ids have {n_segments} entries, expected {b}x{}", lp + n);
    }
    Ok((lp, own_start))
}

/// Sum each run of `rep` consecutive planes of `plane` elements (the partials of the
/// query heads of one kv head) into one plane.
fn sum_groups(parts: Vec<f32>, rep: usize, plane: usize) -> Vec<f32> {
    if rep == 1 {
        return parts;
    }
    let groups = parts.len() / (rep * plane);
    let mut out = crate::cpu::uninit::<f32>(groups * plane);
    out.par_chunks_mut(plane).enumerate().for_each(|(g, o)| {
        o.copy_from_slice(&parts[g * rep * plane..(g * rep + 1) * plane]);
        for j in 1..rep {
            let src = &parts[(g * rep + j) * plane..(g * rep + j + 1) * plane];
            o.iter_mut().zip(src).for_each(|(o, s)| *o += s);
        }
    });
    out
}

/// Segment ids as a host vector (u32 / i64 / f32 tensors accepted).
pub(crate) fn segments_vec(t: &Tensor) -> Result<Vec<u32>> {
    let t = t.to_device(&candle_core::Device::Cpu)?;
    Ok(match t.dtype() {
        DType::U32 => t.flatten_all()?.to_vec1::<u32>()?,
        _ => t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?.into_iter().map(|v| v as u32).collect(),
    })
}
