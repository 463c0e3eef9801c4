//! Segmented multi-adapter LoRA linear (mLoRA's BatchLoRA, Punica's SGMV) on CPU.
//!
//! The op's inputs are `x` and the 1-D concatenations `A_all` / `B_all` of every
//! adapter's flattened A and B: candle's `cat` is differentiable, so the gradient of
//! `A_all` flows back to each adapter's own `Var`, and one custom op serves any number
//! of adapters. The frozen `W`/bias, the segment table, ranks and scales live in the op
//! ([`Plan`]). The base GEMM runs once over all rows; each segment then adds its
//! adapter's low-rank path on its own rows only.
use super::linear::{base_forward, out_shape};
use crate::cpu::{bind_f32, f32_view, matmul, storage_from_f32, tensor_from_f32, Mat, Par};
use crate::{AdapterWeights, RowSegment};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Where one adapter's weights sit inside `A_all` / `B_all`.
#[derive(Clone, Debug)]
pub struct Slot {
    pub rank: usize,
    pub scale: f32,
    pub a_off: usize,
    pub b_off: usize,
}

/// A validated segment table: the non-empty segments sorted by first row, each with
/// the offset of its `x A^T` block ([len, rank] f32) in the saved buffer.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Rows of `x` flattened to [n, in].
    pub n: usize,
    pub k: usize,
    pub out: usize,
    pub slots: Vec<Slot>,
    pub segments: Vec<RowSegment>,
    pub xa_off: Vec<usize>,
    pub xa_len: usize,
    pub a_len: usize,
    pub b_len: usize,
}

impl Plan {
    /// Checks shapes, adapter indices, bounds and overlaps; returns an Err (never
    /// panics) on any of them, since segment tables come from batch construction code.
    pub fn new(x: &Tensor, w: &Tensor, adapters: &[AdapterWeights], segments: &[RowSegment]) -> Result<Plan> {
        let k = x.dim(candle_core::D::Minus1)?;
        let n = if k == 0 { 0 } else { x.elem_count() / k };
        let (out, w_in) = w.dims2()?;
        if w_in != k {
            bail!("segmented-lora: x has {k} features but the weight expects {w_in}");
        }
        let mut slots = Vec::with_capacity(adapters.len());
        let (mut a_len, mut b_len) = (0, 0);
        for (j, ad) in adapters.iter().enumerate() {
            let (rank, a_in) = ad.a.dims2()?;
            let (b_out, b_r) = ad.b.dims2()?;
            if a_in != k || b_out != out || b_r != rank {
                bail!(
                    "segmented-lora: adapter {j} has A {:?} and B {:?}; expected [r, {k}] and [{out}, r]",
                    ad.a.dims(),
                    ad.b.dims()
                );
            }
            slots.push(Slot { rank, scale: ad.scale as f32, a_off: a_len, b_off: b_len });
            a_len += rank * k;
            b_len += out * rank;
        }
        let mut sorted: Vec<RowSegment> = Vec::with_capacity(segments.len());
        for s in segments {
            if s.adapter >= adapters.len() {
                bail!("segmented-lora: segment {s:?} names adapter {} of {}", s.adapter, adapters.len());
            }
            if s.start.checked_add(s.len).map_or(true, |end| end > n) {
                bail!("segmented-lora: segment {s:?} reaches past the {n} rows of x");
            }
            if s.len > 0 {
                sorted.push(s.clone());
            }
        }
        sorted.sort_by_key(|s| s.start);
        for pair in sorted.windows(2) {
            if pair[0].start + pair[0].len > pair[1].start {
                bail!("segmented-lora: segments {:?} and {:?} overlap", pair[0], pair[1]);
            }
        }
        let mut xa_off = Vec::with_capacity(sorted.len());
        let mut xa_len = 0;
        for s in &sorted {
            xa_off.push(xa_len);
            xa_len += s.len * slots[s.adapter].rank;
        }
        Ok(Plan { n, k, out, slots, segments: sorted, xa_off, xa_len, a_len, b_len })
    }

    /// Indices of the segments routed to each adapter (in row order).
    fn segments_by_adapter(&self) -> Vec<Vec<usize>> {
        let mut by = vec![Vec::new(); self.slots.len()];
        for (i, s) in self.segments.iter().enumerate() {
            by[s.adapter].push(i);
        }
        by
    }
}

/// `A_all` and `B_all`: every adapter's A and B flattened and concatenated, in f32 (the
/// compute dtype; the differentiable cast hands each gradient back in its own dtype).
pub fn concat_adapters(adapters: &[AdapterWeights]) -> Result<(Tensor, Tensor)> {
    let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all();
    let a: Vec<Tensor> = adapters.iter().map(|ad| flat(ad.a)).collect::<Result<_>>()?;
    let b: Vec<Tensor> = adapters.iter().map(|ad| flat(ad.b)).collect::<Result<_>>()?;
    Ok((Tensor::cat(&a, 0)?, Tensor::cat(&b, 0)?))
}

/// Split `buf` into the disjoint, ascending `(offset, len)` ranges given.
fn carve<'a>(mut buf: &'a mut [f32], ranges: impl IntoIterator<Item = (usize, usize)>) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::new();
    let mut pos = 0;
    for (off, len) in ranges {
        let (_, rest) = std::mem::take(&mut buf).split_at_mut(off - pos);
        let (part, rest) = rest.split_at_mut(len);
        parts.push(part);
        buf = rest;
        pos = off + len;
    }
    parts
}

/// Run `f` on every item: across threads with single-threaded gemms when there are
/// enough items to occupy every thread, else one after another with parallel gemms.
fn for_each<T: Send>(items: Vec<T>, f: impl Fn(T, Par) + Sync + Send) {
    if items.len() > 1 && items.len() >= rayon::current_num_threads() {
        items.into_par_iter().for_each(|it| f(it, Par::Seq));
    } else {
        items.into_iter().for_each(|it| f(it, Par::All));
    }
}

/// Forward op of [`crate::segmented_lora_linear`]: inputs `x` [..., in], `A_all`, `B_all`.
pub struct SegmentedLora {
    pub w: Tensor,
    pub bias: Option<Tensor>,
    pub plan: Plan,
    /// Every segment's `x A^T` (f32, at `plan.xa_off`), saved by the forward for dB.
    pub xa: Mutex<Option<Vec<f32>>>,
}

impl SegmentedLora {
    pub fn new(w: Tensor, bias: Option<Tensor>, plan: Plan) -> Self {
        SegmentedLora { w, bias, plan, xa: Mutex::new(None) }
    }

    /// Every segment's `x_s A_j^T` into one buffer laid out by `plan.xa_off`.
    fn down_projections(&self, x: &[f32], a: &[f32]) -> Vec<f32> {
        let p = &self.plan;
        let mut xa = crate::cpu::uninit::<f32>(p.xa_len);
        let parts = carve(&mut xa, p.segments.iter().zip(&p.xa_off).map(|(s, &o)| (o, s.len * p.slots[s.adapter].rank)));
        for_each(p.segments.iter().zip(parts).collect(), |(s, za), par| {
            let slot = &p.slots[s.adapter];
            let xs = &x[s.start * p.k..(s.start + s.len) * p.k];
            let a_j = Mat::new(&a[slot.a_off..slot.a_off + slot.rank * p.k], slot.rank, p.k);
            matmul(za, false, Mat::new(xs, s.len, p.k), a_j.t(), 1.0, par);
        });
        xa
    }
}

impl CustomOp3 for SegmentedLora {
    fn name(&self) -> &'static str {
        "segmented-lora"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope(self.name());
        let op = self.name();
        let p = &self.plan;
        if la.shape().elem_count() != p.a_len || lb.shape().elem_count() != p.b_len {
            bail!("{op}: A_all/B_all have {}/{} elements, the plan expects {}/{}", la.shape().elem_count(), lb.shape().elem_count(), p.a_len, p.b_len);
        }
        let x = f32_view(sx, lx, op)?;
        let a = f32_view(sa, la, op)?;
        let b = f32_view(sb, lb, op)?;
        let mut y = base_forward(&x, p.n, p.k, &self.w, self.bias.as_ref(), sx.dtype(), op)?;
        let xa = self.down_projections(&x, &a);
        let rows = carve(&mut y, p.segments.iter().map(|s| (s.start * p.out, s.len * p.out)));
        let items: Vec<_> = p.segments.iter().zip(&p.xa_off).zip(rows).collect();
        for_each(items, |((s, &off), ys), par| {
            let slot = &p.slots[s.adapter];
            let za = Mat::new(&xa[off..off + s.len * slot.rank], s.len, slot.rank);
            let b_j = Mat::new(&b[slot.b_off..slot.b_off + p.out * slot.rank], p.out, slot.rank);
            matmul(ys, true, za, b_j.t(), slot.scale, par);
        });
        *self.xa.lock().unwrap() = Some(xa);
        Ok((storage_from_f32(y, sx.dtype())?, out_shape(lx, p.out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a_all: &Tensor,
        b_all: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xa = self.xa.lock().unwrap().take();
        if !grad.device().is_cpu() {
            return composite_bwd(&self.plan, &self.w, x, a_all, b_all, grad);
        }
        self.cpu_bwd(x, a_all, b_all, grad, xa)
    }
}

impl SegmentedLora {
    fn cpu_bwd(
        &self,
        x: &Tensor,
        a_all: &Tensor,
        b_all: &Tensor,
        grad: &Tensor,
        xa: Option<Vec<f32>>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "segmented-lora-bwd";
        let _p = crate::profile::scope(op);
        let p = &self.plan;
        let (n, k, out) = (p.n, p.k, p.out);
        bind_f32!(g = grad, op);
        bind_f32!(xv = x, op);
        bind_f32!(av = a_all, op);
        bind_f32!(bv = b_all, op);
        // gx_s = s_j dY_s B_j [len, r_j]: the gradient reaching each segment's x A^T
        // (same layout as the saved x A^T).
        let mut gx = crate::cpu::uninit::<f32>(p.xa_len);
        {
            let parts = carve(&mut gx, p.segments.iter().zip(&p.xa_off).map(|(s, &o)| (o, s.len * p.slots[s.adapter].rank)));
            for_each(p.segments.iter().zip(parts).collect(), |(s, gxs), par| {
                let slot = &p.slots[s.adapter];
                let gs = Mat::new(&g[s.start * out..(s.start + s.len) * out], s.len, out);
                let b_j = Mat::new(&bv[slot.b_off..slot.b_off + out * slot.rank], out, slot.rank);
                matmul(gxs, false, gs, b_j, slot.scale, par);
            });
        }
        let dx = if x.track_op() {
            let mut dx = crate::cpu::uninit::<f32>(n * k);
            crate::cpu::frozen_matmul(&mut dx, false, &g, n, &self.w, crate::cpu::WProd::GW, grad.dtype(), op)?;
            let rows = carve(&mut dx, p.segments.iter().map(|s| (s.start * k, s.len * k)));
            let items: Vec<_> = p.segments.iter().zip(&p.xa_off).zip(rows).collect();
            for_each(items, |((s, &off), dxs), par| {
                let slot = &p.slots[s.adapter];
                let a_j = Mat::new(&av[slot.a_off..slot.a_off + slot.rank * k], slot.rank, k);
                matmul(dxs, true, Mat::new(&gx[off..off + s.len * slot.rank], s.len, slot.rank), a_j, 1.0, par);
            });
            Some(tensor_from_f32(dx, x.shape(), x.dtype())?)
        } else {
            None
        };
        let by_adapter = p.segments_by_adapter();
        // dA_j = sum over j's segments of gx_s^T x_s; zeros when j has no rows.
        let da = if a_all.track_op() {
            let mut da = vec![0f32; p.a_len];
            let parts = carve(&mut da, p.slots.iter().map(|s| (s.a_off, s.rank * k)));
            for_each(p.slots.iter().zip(&by_adapter).zip(parts).collect(), |((slot, segs), da_j), par| {
                for &i in segs {
                    let (s, off) = (&p.segments[i], p.xa_off[i]);
                    let gxs = Mat::new(&gx[off..off + s.len * slot.rank], s.len, slot.rank);
                    let xs = Mat::new(&xv[s.start * k..(s.start + s.len) * k], s.len, k);
                    matmul(da_j, true, gxs.t(), xs, 1.0, par);
                }
            });
            Some(tensor_from_f32(da, p.a_len, a_all.dtype())?)
        } else {
            None
        };
        // dB_j = sum over j's segments of s_j dY_s^T (x_s A_j^T).
        let db = if b_all.track_op() {
            let xa = match xa {
                Some(v) => v,
                None => self.down_projections(&xv, &av),
            };
            let mut db = vec![0f32; p.b_len];
            let parts = carve(&mut db, p.slots.iter().map(|s| (s.b_off, out * s.rank)));
            for_each(p.slots.iter().zip(&by_adapter).zip(parts).collect(), |((slot, segs), db_j), par| {
                for &i in segs {
                    let (s, off) = (&p.segments[i], p.xa_off[i]);
                    let gs = Mat::new(&g[s.start * out..(s.start + s.len) * out], s.len, out);
                    let xas = Mat::new(&xa[off..off + s.len * slot.rank], s.len, slot.rank);
                    matmul(db_j, true, gs.t(), xas, slot.scale, par);
                }
            });
            Some(tensor_from_f32(db, p.b_len, b_all.dtype())?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// Device-generic backward from candle tensor ops (f32 compute), for devices without
/// their own: dX = dY W + per segment s_j (dY_s B_j) A_j; dA_all / dB_all hold each
/// adapter's summed per-segment gradients (zeros for an adapter with no rows).
/// `x A^T` is recomputed rather than saved: it is a rank-r GEMM.
pub fn composite_bwd(
    plan: &Plan,
    w: &Tensor,
    x: &Tensor,
    a_all: &Tensor,
    b_all: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    use DType::F32;
    let (n, k, out) = (plan.n, plan.k, plan.out);
    let dev = x.device();
    let g = grad.reshape((n, out))?.to_dtype(F32)?;
    let xf = x.reshape((n, k))?.to_dtype(F32)?;
    let (af, bf) = (a_all.to_dtype(F32)?, b_all.to_dtype(F32)?);
    let a_of = |slot: &Slot| af.narrow(0, slot.a_off, slot.rank * k)?.reshape((slot.rank, k));
    let b_of = |slot: &Slot| bf.narrow(0, slot.b_off, out * slot.rank)?.reshape((out, slot.rank));
    let mut da: Vec<Tensor> = plan.slots.iter().map(|s| Tensor::zeros((s.rank, k), F32, dev)).collect::<Result<_>>()?;
    let mut db: Vec<Tensor> = plan.slots.iter().map(|s| Tensor::zeros((out, s.rank), F32, dev)).collect::<Result<_>>()?;
    let mut dx_rows = Vec::with_capacity(plan.segments.len());
    for s in &plan.segments {
        let slot = &plan.slots[s.adapter];
        let (a_j, b_j) = (a_of(slot)?, b_of(slot)?);
        let gs = g.narrow(0, s.start, s.len)?;
        let xs = xf.narrow(0, s.start, s.len)?;
        let gx = (gs.matmul(&b_j)? * slot.scale as f64)?;
        da[s.adapter] = (&da[s.adapter] + gx.t()?.matmul(&xs)?)?;
        let xa = xs.matmul(&a_j.t()?)?;
        db[s.adapter] = (&db[s.adapter] + (gs.t()?.matmul(&xa)? * slot.scale as f64)?)?;
        dx_rows.push((s.start, gx.matmul(&a_j)?));
    }
    let dx = if x.track_op() {
        let base = g.matmul(&w.to_dtype(F32)?)?;
        let dx = (base + scatter_rows(n, k, dx_rows, dev)?)?;
        Some(dx.reshape(x.shape())?.to_dtype(x.dtype())?)
    } else {
        None
    };
    let flat = |parts: Vec<Tensor>, like: &Tensor| -> Result<Tensor> {
        let parts: Vec<Tensor> = parts.iter().map(|t| t.flatten_all()).collect::<Result<_>>()?;
        Tensor::cat(&parts, 0)?.to_dtype(like.dtype())
    };
    let da = if a_all.track_op() { Some(flat(da, a_all)?) } else { None };
    let db = if b_all.track_op() { Some(flat(db, b_all)?) } else { None };
    Ok((dx, da, db))
}

/// An [n, width] f32 tensor holding each `(start, rows)` block at its first row and
/// zeros elsewhere, built with `cat` (differentiable). Blocks ascending, disjoint.
pub fn scatter_rows(n: usize, width: usize, blocks: Vec<(usize, Tensor)>, dev: &candle_core::Device) -> Result<Tensor> {
    let zeros = |rows: usize, dtype: DType| Tensor::zeros((rows, width), dtype, dev);
    let dtype = blocks.first().map_or(DType::F32, |(_, t)| t.dtype());
    let mut parts = Vec::with_capacity(2 * blocks.len() + 1);
    let mut pos = 0;
    for (start, t) in blocks {
        if start > pos {
            parts.push(zeros(start - pos, dtype)?);
        }
        pos = start + t.dim(0)?;
        parts.push(t);
    }
    if pos < n || parts.is_empty() {
        parts.push(zeros(n - pos, dtype)?);
    }
    Tensor::cat(&parts, 0)
}
