//! Memory-bounded causal attention (flash-attention style on CPU) with
//! grouped-query heads and optional packed-sequence segment ids.
//!
//! q: [b, hq, tq, d]; k, v: [b, hkv, tk, d] with hq % hkv == 0 (query head `h` uses
//! key/value head `h / (hq/hkv)`, as `repeat_kv` lays them out). Query `i` sits at
//! position `i + tk - tq` (so a KV-cache decode step works) and sees key `j` when
//! `j <= i + tk - tq` and, with segment ids [b, tk], when `j` lies in the same
//! contiguous run of equal ids. Scores are computed in blocks of `BQ` query rows and
//! only over the visible key range; nothing of size [hq, tq, tk] is ever held. The
//! forward saves the per-row log-sum-exp; the backward recomputes the probabilities
//! block by block.
//!
//! k and v may be strided views whose (batch, head) planes are each contiguous, such
//! as `narrow(2, 0, len)` of a preallocated KV-cache buffer: the forward reads them
//! in place, so a decode step does not copy the whole cache.
use crate::cpu::{bind_f32, exp_shift_sum, f32_view, fast_exp, max_f32, matmul, matmul_ld, storage_from_f32, tensor_from_f32, Elem, Mat, Par};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Mutex;

/// Query rows per block.
const BQ: usize = 64;

pub struct CausalAttention {
    pub scale: f32,
    /// [b, tk] segment ids (contiguous runs), if the rows are packed.
    pub segments: Option<Vec<u32>>,
    /// Per-row log-sum-exp [b, hq, tq] saved by the forward.
    pub lse: Mutex<Option<Vec<f32>>>,
}

struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

impl CausalAttention {
    pub fn new(scale: f32, segments: Option<Vec<u32>>) -> Self {
        CausalAttention { scale, segments, lse: Mutex::new(None) }
    }

    fn dims(q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
        let (&[b, hq, tq, d], &[kb, hkv, tk, kd]) = (q, k) else {
            bail!("causal-attention: q {q:?} and k {k:?} must be 4-d");
        };
        if kb != b || kd != d || k != v || hkv == 0 || hq % hkv != 0 || tq > tk {
            bail!("causal-attention: incompatible q {q:?}, k {k:?}, v {v:?}");
        }
        Ok(Dims { b, hq, hkv, tq, tk, d })
    }

    /// For each batch row, `start[j]` = first key of the segment containing key `j`.
    fn segment_starts(&self, b: usize, tk: usize) -> Result<Vec<usize>> {
        let mut start = vec![0usize; b * tk];
        if let Some(seg) = &self.segments {
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
}

/// Whether a [b, h, t, d] layout has every (batch, head) plane of t*d elements
/// contiguous (the only thing the forward needs of k and v).
fn planes_contiguous(dims: &[usize], stride: &[usize]) -> bool {
    matches!((dims, stride), ([_, _, _, d], [_, _, s2, 1]) if s2 == d)
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

/// Fill `s` ([rows, kw], keys from `k0`) with probabilities: scale*qk^T already in `s`,
/// masked outside [start, pos], normalised with `lse` (backward) or computing it (forward).
#[inline]
fn probs_row(s: &mut [f32], k0: usize, lo: usize, hi: usize, lse: Option<f32>) -> f32 {
    // visible keys: lo..=hi (absolute), so columns lo-k0 ..= hi-k0
    let (a, e) = (lo - k0, hi - k0 + 1);
    s[..a].fill(0.0);
    s[e..].fill(0.0);
    let row = &mut s[a..e];
    match lse {
        Some(l) => {
            row.iter_mut().for_each(|v| *v = fast_exp(*v - l));
            l
        }
        None => {
            let m = max_f32(row);
            let sum = exp_shift_sum(row, m);
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
            m + sum.ln()
        }
    }
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
        let Dims { b, hq, hkv, tq, tk, d } = Self::dims(lq.dims(), lk.dims(), lv.dims())?;
        let q = f32_view(sq, lq, op)?;
        let k = planes(sk, lk, op)?;
        let v = planes(sv, lv, op)?;
        let starts = self.segment_starts(b, tk)?;
        let (rep, off, scale) = (hq / hkv, tk - tq, self.scale);
        let mut out = crate::cpu::uninit::<f32>(b * hq * tq * d);
        let mut lse = vec![0f32; b * hq * tq];
        out.par_chunks_mut(tq * d).zip(lse.par_chunks_mut(tq)).enumerate().for_each(|(bh, (o, l))| {
            let (bi, hi) = (bh / hq, bh % hq);
            let qp = &q[bh * tq * d..(bh + 1) * tq * d];
            let kp = k.plane(bi, hi / rep);
            let vp = v.plane(bi, hi / rep);
            let st = &starts[bi * tk..(bi + 1) * tk];
            let mut s = vec![0f32; BQ * tk];
            for q0 in (0..tq).step_by(BQ) {
                let q1 = (q0 + BQ).min(tq);
                let rows = q1 - q0;
                let (k0, k1) = (st[q0 + off], q1 - 1 + off + 1);
                let kw = k1 - k0;
                let sb = &mut s[..rows * kw];
                matmul(
                    sb,
                    false,
                    Mat::new(&qp[q0 * d..q1 * d], rows, d),
                    Mat::new(&kp[k0 * d..k1 * d], kw, d).t(),
                    scale,
                    Par::Seq,
                );
                for r in 0..rows {
                    let pos = q0 + r + off;
                    l[q0 + r] = probs_row(&mut sb[r * kw..(r + 1) * kw], k0, st[pos], pos, None);
                }
                matmul(&mut o[q0 * d..q1 * d], false, Mat::new(sb, rows, kw), Mat::new(&vp[k0 * d..k1 * d], kw, d), 1.0, Par::Seq);
            }
        });
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
        let Dims { b, hq, hkv, tq, tk, d } = Self::dims(q.dims(), k.dims(), v.dims())?;
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
        let mut dq = crate::cpu::uninit::<f32>(b * hq * tq * d);
        // One task per (batch, query head), each with its own dK/dV partial, summed over
        // the query heads of a kv head afterwards. One task per kv head instead leaves a
        // core idle at batch 1 (3 kv heads on 2 cores: 2/3 of the machine); the partials
        // cost rep x the dK/dV memory (18 MiB at 4096 tokens, SmolLM2).
        let mut dkh = vec![0f32; b * hq * tk * d];
        let mut dvh = vec![0f32; b * hq * tk * d];
        dq.par_chunks_mut(tq * d)
            .zip(dkh.par_chunks_mut(tk * d).zip(dvh.par_chunks_mut(tk * d)))
            .enumerate()
            .for_each(|(bh, (dqp, (dkp, dvp)))| {
                let bi = bh / hq;
                let bkv = bi * hkv + (bh % hq) / rep;
                let kp = &kv[bkv * tk * d..(bkv + 1) * tk * d];
                let vp = &vv[bkv * tk * d..(bkv + 1) * tk * d];
                let st = &starts[bi * tk..(bi + 1) * tk];
                let mut p = vec![0f32; BQ * tk];
                let mut dp = vec![0f32; BQ * tk];
                let qp = &qv[bh * tq * d..(bh + 1) * tq * d];
                let op_ = &ov[bh * tq * d..(bh + 1) * tq * d];
                let gp = &gv[bh * tq * d..(bh + 1) * tq * d];
                let lp = &lse[bh * tq..(bh + 1) * tq];
                for q0 in (0..tq).step_by(BQ) {
                    let q1 = (q0 + BQ).min(tq);
                    let rows = q1 - q0;
                    let (k0, k1) = (st[q0 + off], q1 - 1 + off + 1);
                    let kw = k1 - k0;
                    let pb = &mut p[..rows * kw];
                    let dpb = &mut dp[..rows * kw];
                    let qb = Mat::new(&qp[q0 * d..q1 * d], rows, d);
                    let gb = Mat::new(&gp[q0 * d..q1 * d], rows, d);
                    let kb = Mat::new(&kp[k0 * d..k1 * d], kw, d);
                    let vb = Mat::new(&vp[k0 * d..k1 * d], kw, d);
                    matmul(pb, false, qb, kb.t(), scale, Par::Seq);
                    for r in 0..rows {
                        let pos = q0 + r + off;
                        probs_row(&mut pb[r * kw..(r + 1) * kw], k0, st[pos], pos, Some(lp[q0 + r]));
                    }
                    // dV += P^T dO
                    matmul(&mut dvp[k0 * d..k1 * d], true, Mat::new(pb, rows, kw).t(), gb, 1.0, Par::Seq);
                    // dP = dO V^T ; dS = P (dP - rowsum(dO o))
                    matmul(dpb, false, gb, vb.t(), 1.0, Par::Seq);
                    for r in 0..rows {
                        let i = q0 + r;
                        let di: f32 = gp[i * d..(i + 1) * d].iter().zip(&op_[i * d..(i + 1) * d]).map(|(a, b)| a * b).sum();
                        let pr = &pb[r * kw..(r + 1) * kw];
                        dpb[r * kw..(r + 1) * kw].iter_mut().zip(pr).for_each(|(g, p)| *g = p * (*g - di));
                    }
                    // dQ = scale dS K ; dK += scale dS^T Q
                    matmul_ld(&mut dqp[q0 * d..q1 * d], d, false, Mat::new(dpb, rows, kw), kb, scale, Par::Seq);
                    matmul(&mut dkp[k0 * d..k1 * d], true, Mat::new(dpb, rows, kw).t(), qb, scale, Par::Seq);
                }
            });
        let (dk, dv) = (sum_groups(dkh, rep, tk * d), sum_groups(dvh, rep, tk * d));
        let dq = if q.track_op() { Some(tensor_from_f32(dq, q.shape(), q.dtype())?) } else { None };
        let dk = if k.track_op() { Some(tensor_from_f32(dk, k.shape(), k.dtype())?) } else { None };
        let dv = if v.track_op() { Some(tensor_from_f32(dv, v.shape(), v.dtype())?) } else { None };
        Ok((dq, dk, dv))
    }
}

/// Sum each run of `rep` consecutive planes of `plane` elements (the query heads of one
/// kv head) into one plane.
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
