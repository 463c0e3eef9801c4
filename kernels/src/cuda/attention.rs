//! CUDA path of [`crate::causal_attention`]: the flash-style kernels of `attention.cu`
//! (forward saves the row log-sum-exp; backward recomputes probabilities tile by tile);
//! and of [`crate::prefix_causal_attention`] (`attn_prefix_fwd_*`, forward only).
//! The forward runs on tensor cores for bf16/f16 with head dim <= 128 (`attn_fwd_tc_*`),
//! on CUDA cores otherwise; the backward on CUDA cores.
//! Segment ids become per-key segment starts on the device (`attn_seg_starts`); no mask
//! of any size is built, on the host or the device. GQA is handled by index (k/v are
//! never repeated) and k/v may be KV-cache views whose (batch, head) planes are
//! contiguous: they are read in place.
use super::ops::{as_cuda, dispatch};
use crate::ops::attention::{dims, planes_contiguous, prefix_checks, Dims};
use super::runtime::{self as rt, ceil_div, cfg, tensor, view};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use std::sync::Mutex;

/// Kernel instance for a head dim: the smallest of 64 / 128 / 256 that holds it.
fn dmax(d: usize) -> Result<usize> {
    match d {
        1..=64 => Ok(64),
        65..=128 => Ok(128),
        129..=256 => Ok(256),
        _ => bail!("causal-attention CUDA: head dim {d} not supported (at most 256)"),
    }
}

/// (batch stride, head stride) of a [b, h, t, d] k/v layout whose planes are contiguous.
fn plane_strides(l: &Layout) -> Result<(i64, i64)> {
    match (l.dims(), l.stride()) {
        (dims, st @ [s0, s1, _, _]) if planes_contiguous(dims, st) => Ok((*s0 as i64, *s1 as i64)),
        (dims, st) => bail!("causal-attention CUDA: k/v planes must be contiguous (dims {dims:?}, strides {st:?})"),
    }
}

/// The storage of a k/v operand from its first element (strides apply from there).
fn plane_view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

pub struct CausalAttentionCuda {
    scale: f32,
    /// [b, tk] u32 first key of each key's segment (None: no segments).
    starts: Option<Tensor>,
    /// [b, hq, tq] f32 row log-sum-exp saved by the forward.
    lse: Mutex<Option<Tensor>>,
}

/// Null pointer or the starts view as a kernel argument.
fn push_opt<'a, 'b>(b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>, v: Option<&'b CudaView<'b, u32>>, null: &'b u64)
where
    'b: 'a,
{
    match v {
        Some(v) => b.arg(v),
        None => b.arg(null),
    };
}

impl CustomOp3 for CausalAttentionCuda {
    fn name(&self) -> &'static str {
        "causal-attention-cuda"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("causal-attention-cuda is CUDA only")
    }
    fn cuda_fwd(&self, q: &CudaStorage, lq: &Layout, k: &CudaStorage, lk: &Layout, v: &CudaStorage, lv: &Layout) -> Result<(CudaStorage, Shape)> {
        let Dims { b, hq, hkv, tq, tk, d } = dims(lq.dims(), lk.dims(), lv.dims())?;
        let dev = q.device.clone();
        let (ks0, ks1) = plane_strides(lk)?;
        if plane_strides(lv)? != (ks0, ks1) {
            bail!("causal-attention CUDA: k and v must share strides");
        }
        let dm = dmax(d)?;
        let mut lse = dev.alloc_zeros::<f32>((b * hq * tq).max(1))?;
        let starts_g = self.starts.as_ref().map(|t| t.storage_and_layout());
        let out = dispatch!(q.dtype(), T => {
            let qv = view::<T>(q, lq)?;
            let (kv, vv) = (plane_view::<T>(k, lk)?, plane_view::<T>(v, lv)?);
            let sv = match &starts_g { Some((st, l)) => Some(view::<u32>(as_cuda(st)?, l)?), None => None };
            let mut o = unsafe { dev.alloc::<T>((b * hq * tq * d).max(1))? };
            if tq > 0 {
                // bf16/f16 with d <= 128 on tensor cores; f32 and d > 128 on CUDA cores.
                let tc = matches!(q.dtype(), DType::BF16 | DType::F16) && dm <= 128;
                let name = if tc { format!("attn_fwd_tc_{}_d{dm}", rt::suffix(q.dtype())?) } else { format!("attn_fwd_{}_d{dm}", rt::suffix(q.dtype())?) };
                let f = rt::func(&dev, "attention", &name)?;
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(&f);
                let null = 0u64;
                let (hq32, hkv32, tq32, tk32, d32) = (hq as i32, hkv as i32, tq as i32, tk as i32, d as i32);
                l.arg(&qv).arg(&kv).arg(&vv);
                push_opt(&mut l, sv.as_ref(), &null);
                // Short queries (decoding): the heads sharing a kv head fill one block's rows.
                let hp = if tq < 64 { hq / hkv } else { 1 };
                let hp32 = hp as i32;
                l.arg(&mut o).arg(&mut lse).arg(&hq32).arg(&hkv32).arg(&tq32).arg(&tk32).arg(&d32).arg(&ks0).arg(&ks1).arg(&self.scale).arg(&hp32);
                unsafe { l.launch(cfg((ceil_div(hp * tq, 64), (hq / hp) as u32, b as u32), if tc { 128 } else { 256 })) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(o, dev.clone())
        });
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(tensor(CudaStorage::wrap_cuda_slice(lse, dev.clone()), (b * hq * tq).max(1)));
        Ok((out, lq.shape().clone()))
    }
    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !q.track_op() && !k.track_op() && !v.track_op() {
            return Ok((None, None, None));
        }
        let Dims { b, hq, hkv, tq, tk, d } = dims(q.dims(), k.dims(), v.dims())?;
        let lse = match self.lse.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(l) => l,
            None => bail!("causal-attention CUDA backward: forward state missing (backward called twice?)"),
        };
        let dm = dmax(d)?;
        let dev = rt::cuda_device(q.device())?.clone();
        let (g, o) = (grad.contiguous()?, res.contiguous()?);
        let rows = b * hq * tq;
        let mut dq = dev.alloc_zeros::<f32>((rows * d).max(1))?;
        let mut dk = dev.alloc_zeros::<f32>((b * hkv * tk * d).max(1))?;
        let mut dv = dev.alloc_zeros::<f32>((b * hkv * tk * d).max(1))?;
        {
            let (qg, lq) = q.storage_and_layout();
            let (kg, lk) = k.storage_and_layout();
            let (vg, lv) = v.storage_and_layout();
            let (gg, lg) = g.storage_and_layout();
            let (og, lo) = o.storage_and_layout();
            let (lg_, ll) = lse.storage_and_layout();
            let starts_g = self.starts.as_ref().map(|t| t.storage_and_layout());
            let (ks0, ks1) = plane_strides(lk)?;
            if plane_strides(lv)? != (ks0, ks1) {
                bail!("causal-attention CUDA: k and v must share strides");
            }
            let dt = q.dtype();
            dispatch!(dt, T => {
                let qv = view::<T>(as_cuda(&qg)?, lq)?;
                let (kv, vv) = (plane_view::<T>(as_cuda(&kg)?, lk)?, plane_view::<T>(as_cuda(&vg)?, lv)?);
                let (gv, ov) = (view::<T>(as_cuda(&gg)?, lg)?, view::<T>(as_cuda(&og)?, lo)?);
                let lsev = view::<f32>(as_cuda(&lg_)?, ll)?;
                let sv = match &starts_g { Some((st, l)) => Some(view::<u32>(as_cuda(st)?, l)?), None => None };
                let sfx = rt::suffix(dt)?;
                let stream = dev.cuda_stream();
                let mut delta = dev.alloc_zeros::<f32>(rows.max(1))?;
                if rows > 0 {
                    let f = rt::func(&dev, "attention", &format!("attn_bwd_dot_{sfx}"))?;
                    let mut l = stream.launch_builder(&f);
                    let (rows64, d32) = (rows as i64, d as i32);
                    l.arg(&gv).arg(&ov).arg(&mut delta).arg(&rows64).arg(&d32);
                    unsafe { l.launch(cfg((ceil_div(rows, 8), 1, 1), 256)) }.w()?;
                    let f = rt::func(&dev, "attention", &format!("attn_bwd_{sfx}_d{dm}"))?;
                    let mut l = stream.launch_builder(&f);
                    let null = 0u64;
                    let (hq32, hkv32, tq32, tk32) = (hq as i32, hkv as i32, tq as i32, tk as i32);
                    l.arg(&qv).arg(&kv).arg(&vv);
                    push_opt(&mut l, sv.as_ref(), &null);
                    l.arg(&gv).arg(&lsev).arg(&delta).arg(&mut dq).arg(&mut dk).arg(&mut dv);
                    l.arg(&hq32).arg(&hkv32).arg(&tq32).arg(&tk32).arg(&d32).arg(&ks0).arg(&ks1).arg(&self.scale);
                    unsafe { l.launch(cfg((ceil_div(tk, 32), hkv as u32, b as u32), 256)) }.w()?;
                }
                Ok::<(), candle_core::Error>(())
            })?;
        }
        let wrap = |s, n: usize, shape: &Shape, dt: DType| -> Result<Tensor> {
            tensor(CudaStorage::wrap_cuda_slice(s, dev.clone()), n.max(1)).narrow(0, 0, n)?.reshape(shape)?.to_dtype(dt)
        };
        let dq = if q.track_op() { Some(wrap(dq, rows * d, q.shape(), q.dtype())?) } else { None };
        let dk = if k.track_op() { Some(wrap(dk, b * hkv * tk * d, k.shape(), k.dtype())?) } else { None };
        let dv = if v.track_op() { Some(wrap(dv, b * hkv * tk * d, v.shape(), v.dtype())?) } else { None };
        Ok((dq, dk, dv))
    }
}

/// Per-key segment starts [b, tk] u32 from segment ids [b, tk] (any integer/float
/// dtype), computed on the device.
fn segment_starts(seg: &Tensor, b: usize, tk: usize) -> Result<Tensor> {
    if seg.elem_count() != b * tk {
        bail!("causal-attention: segment ids have {} entries, expected {b}x{tk}", seg.elem_count());
    }
    let seg = seg.to_dtype(DType::U32)?.flatten_all()?.contiguous()?;
    let dev = rt::cuda_device(seg.device())?.clone();
    let (sg, ls) = seg.storage_and_layout();
    let sv = view::<u32>(as_cuda(&sg)?, ls)?;
    let mut starts = dev.alloc_zeros::<u32>((b * tk).max(1))?;
    if b * tk > 0 {
        let f = rt::func(&dev, "attention", "attn_seg_starts")?;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        let tk32 = tk as i32;
        l.arg(&sv).arg(&mut starts).arg(&tk32);
        unsafe { l.launch(cfg((b as u32, 1, 1), 1024)) }.w()?;
    }
    tensor(CudaStorage::wrap_cuda_slice(starts, dev), (b * tk).max(1)).narrow(0, 0, b * tk)
}

/// Flash-style causal attention on CUDA (see [`crate::causal_attention`] for the
/// contract). bf16/f16/f32, head dim up to 256.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, segments: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let Dims { b, tk, .. } = dims(q.dims(), k.dims(), v.dims())?;
    let dt = q.dtype();
    let starts = segments.map(|s| segment_starts(s, b, tk)).transpose()?;
    let op = CausalAttentionCuda { scale: scale as f32, starts, lse: Mutex::new(None) };
    q.contiguous()?.apply_op3(&kv_operand(k, dt)?, &kv_operand(v, dt)?, op)
}

/// A k/v operand in dtype `dt`: read in place when its planes are contiguous (a KV-cache
/// view), otherwise copied.
fn kv_operand(t: &Tensor, dt: DType) -> Result<Tensor> {
    let t = t.to_dtype(dt)?;
    if plane_strides(t.layout()).is_ok() { Ok(t) } else { t.contiguous() }
}

/// The CUDA op of [`prefix_causal_attention`] (forward only): q, k, v are the rows' own;
/// the prompt planes, the rows' table and the segment ids ride along.
struct PrefixAttentionCuda {
    scale: f32,
    /// [p, hkv, lp, d] prompt keys / values, planes contiguous.
    prefix_k: Tensor,
    prefix_v: Tensor,
    /// [2 b] u32: each row's prompt row, then its first own position.
    rows: Tensor,
    /// [b (lp + n)] u32 segment ids of prompt then own positions.
    segments: Tensor,
}

impl CustomOp3 for PrefixAttentionCuda {
    fn name(&self) -> &'static str {
        "prefix-attention-cuda"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("prefix-attention-cuda is CUDA only")
    }
    fn cuda_fwd(&self, q: &CudaStorage, lq: &Layout, k: &CudaStorage, lk: &Layout, v: &CudaStorage, lv: &Layout) -> Result<(CudaStorage, Shape)> {
        let Dims { b, hq, hkv, tq, tk: n, d } = dims(lq.dims(), lk.dims(), lv.dims())?;
        let dev = q.device.clone();
        let (pkg, lpk) = self.prefix_k.storage_and_layout();
        let (pvg, lpv) = self.prefix_v.storage_and_layout();
        let ((ks0, ks1), (ps0, ps1)) = (plane_strides(lk)?, plane_strides(lpk)?);
        if plane_strides(lv)? != (ks0, ks1) || plane_strides(lpv)? != (ps0, ps1) {
            bail!("prefix-attention CUDA: k and v (and the prompt's) must share strides");
        }
        let lp = lpk.dims()[2];
        let dm = dmax(d)?;
        let (rg, lr) = self.rows.storage_and_layout();
        let (sg, ls) = self.segments.storage_and_layout();
        let out = dispatch!(q.dtype(), T => {
            let qv = view::<T>(q, lq)?;
            let (kv, vv) = (plane_view::<T>(k, lk)?, plane_view::<T>(v, lv)?);
            let (pkv, pvv) = (plane_view::<T>(as_cuda(&pkg)?, lpk)?, plane_view::<T>(as_cuda(&pvg)?, lpv)?);
            let (rv, sv) = (view::<u32>(as_cuda(&rg)?, lr)?, view::<u32>(as_cuda(&sg)?, ls)?);
            let mut o = unsafe { dev.alloc::<T>((b * hq * tq * d).max(1))? };
            if b * tq > 0 {
                let f = rt::func(&dev, "attention", &format!("attn_prefix_fwd_{}_d{dm}", rt::suffix(q.dtype())?))?;
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(&f);
                let (hq32, hkv32, tq32, n32, lp32, d32) = (hq as i32, hkv as i32, tq as i32, n as i32, lp as i32, d as i32);
                // Short queries (decoding): the heads sharing a kv head fill one block's rows.
                let hp = if tq < 64 { hq / hkv } else { 1 };
                let hp32 = hp as i32;
                l.arg(&qv).arg(&kv).arg(&vv).arg(&pkv).arg(&pvv).arg(&rv).arg(&sv).arg(&mut o);
                l.arg(&hq32).arg(&hkv32).arg(&tq32).arg(&n32).arg(&lp32).arg(&d32).arg(&ks0).arg(&ks1).arg(&ps0).arg(&ps1).arg(&self.scale).arg(&hp32);
                unsafe { l.launch(cfg((ceil_div(hp * tq, 64), (hq / hp) as u32, b as u32), 256)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(o, dev.clone())
        });
        Ok((out, lq.shape().clone()))
    }
}

/// [`crate::prefix_causal_attention`] on CUDA (see there for the contract): one launch of
/// `attn_prefix_fwd_*`, which reads each row's prompt planes and its own (from its start)
/// in place, with the segment ids as they are on the device; nothing is gathered or
/// joined. Forward only; bf16/f16/f32 on CUDA cores, head dim up to 256.
#[allow(clippy::too_many_arguments)]
pub fn prefix_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, prefix_k: &Tensor, prefix_v: &Tensor, prefix_of_row: &[u32], own_start: &[u32], segments: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = dims(q.dims(), k.dims(), v.dims())?;
    let to_usize = |s: &[u32]| s.iter().map(|&x| x as usize).collect::<Vec<_>>();
    let (_, own_start) = prefix_checks("prefix-attention", &dims, prefix_k.dims(), prefix_v.dims(), &to_usize(prefix_of_row), &to_usize(own_start), segments.elem_count())?;
    let b = dims.b;
    let dt = q.dtype();
    let rows: Vec<u32> = prefix_of_row.iter().copied().chain(own_start.iter().map(|&s| s as u32)).collect();
    let op = PrefixAttentionCuda {
        scale: scale as f32,
        prefix_k: kv_operand(prefix_k, dt)?,
        prefix_v: kv_operand(prefix_v, dt)?,
        rows: Tensor::from_vec(rows, 2 * b, q.device())?,
        segments: segments.to_device(q.device())?.to_dtype(DType::U32)?.flatten_all()?.contiguous()?,
    };
    q.contiguous()?.apply_op3(&kv_operand(k, dt)?, &kv_operand(v, dt)?, op)
}
