//! CUDA path of [`crate::segmented_lora_linear`]: the base `x W^T (+ bias)` once over
//! all rows on the tensor-core kernel (`lora_fwd_f32out_*`, rank 0, f32 output), then the
//! SGMV pair of `sgmv.cu` adds every segment's adapter path in two launches (shrink,
//! expand) whatever the number of segments, and one cast gives x's dtype.
//!
//! The backward is SGMV too: the base dX GEMM (f32 output), one shrink with the
//! transposed B's and one expand with the transposed A's for the adapter part of dX, one
//! recomputing shrink for x A^T, and one launch each for all dA_j and all dB_j (f32
//! atomics). Only a call with no segment at all uses the composite version.
use super::ops::{as_cuda, dispatch, lora_main, rows_cols};
use super::runtime::{self as rt, ceil_div, tensor, view, with_cuda};
use crate::ops::segmented::{composite_bwd, concat_adapters, Plan};
use crate::AdapterWeights;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// Rows per block of `sgmv_shrink_*` (one warp each) and of `sgmv_expand`; threads per
/// block of each (see sgmv.cu).
const SHRINK_ROWS: usize = 8;
const EXPAND_ROWS: usize = 16;
const EXPAND_THREADS: usize = 256;

/// The segment table of sgmv.cu (per segment: first row, rows, rank, A offset, B
/// offset, Z offset), the per-segment scales, and the longest segment.
fn segment_table(plan: &Plan) -> (Vec<i64>, Vec<f32>, usize) {
    let mut table = Vec::with_capacity(plan.segments.len() * 6);
    let mut scales = Vec::with_capacity(plan.segments.len());
    for (s, &z_off) in plan.segments.iter().zip(&plan.xa_off) {
        let slot = &plan.slots[s.adapter];
        table.extend([s.start, s.len, slot.rank, slot.a_off, slot.b_off, z_off].map(|v| v as i64));
        scales.push(slot.scale);
    }
    let longest = plan.segments.iter().map(|s| s.len).max().unwrap_or(0);
    (table, scales, longest)
}

/// The segment tables on the device: `fwd` as [`segment_table`], `swapped` with the A and
/// B offsets exchanged (the backward reads B_j^T where the forward reads A_j and A_j^T
/// where it reads B_j; the transposed concatenations have the same offsets).
struct Tables {
    fwd: CudaSlice<i64>,
    swapped: CudaSlice<i64>,
    scales: CudaSlice<f32>,
    nseg: usize,
    longest: usize,
}

fn tables(dev: &CudaDevice, plan: &Plan) -> Result<Tables> {
    let nseg = plan.segments.len();
    if nseg > 65535 {
        bail!("segmented-lora CUDA: {nseg} segments, at most 65535 per call");
    }
    let (table, scales, longest) = segment_table(plan);
    let mut swapped = table.clone();
    for row in swapped.chunks_mut(6) {
        row.swap(3, 4);
    }
    let stream = dev.cuda_stream();
    Ok(Tables {
        fwd: stream.clone_htod(&table).w()?,
        swapped: stream.clone_htod(&swapped).w()?,
        scales: stream.clone_htod(&scales).w()?,
        nseg,
        longest,
    })
}

/// `z_s = x_s M_j^T` for every segment (M_j at the table's A offset, rows of `k`).
fn shrink<T: CudaDType + DeviceRepr>(dev: &CudaDevice, suffix: &str, x: &CudaView<'_, T>, k: usize, m: &CudaView<'_, f32>, table: &CudaSlice<i64>, t: &Tables, len: usize) -> Result<CudaSlice<f32>> {
    let mut z = dev.alloc_zeros::<f32>(len.max(1))?;
    let f = rt::func(dev, "sgmv", &format!("sgmv_shrink_{suffix}"))?;
    let stream = dev.cuda_stream();
    let k32 = k as i32;
    let mut l = stream.launch_builder(&f);
    l.arg(x).arg(&k32).arg(m).arg(table).arg(&mut z);
    let grid = (ceil_div(t.longest, SHRINK_ROWS), t.nseg as u32, 1);
    unsafe { l.launch(LaunchConfig { grid_dim: grid, block_dim: (32 * SHRINK_ROWS as u32, 1, 1), shared_mem_bytes: 0 }) }.w()?;
    Ok(z)
}

/// `y[rows of s] += scale_j z_s M_j^T` for every segment (M_j at the table's B offset,
/// [out][rank]); `y` [m, out] f32.
#[allow(clippy::too_many_arguments)]
fn expand(dev: &CudaDevice, z: &CudaSlice<f32>, m: &CudaView<'_, f32>, table: &CudaSlice<i64>, t: &Tables, out: usize, y: &mut CudaSlice<f32>) -> Result<()> {
    let f = rt::func(dev, "sgmv", "sgmv_expand")?;
    let stream = dev.cuda_stream();
    let n32 = out as i32;
    let mut l = stream.launch_builder(&f);
    l.arg(z).arg(m).arg(table).arg(&t.scales).arg(y).arg(&n32);
    let grid = (ceil_div(out, EXPAND_THREADS), ceil_div(t.longest, EXPAND_ROWS), t.nseg as u32);
    unsafe { l.launch(LaunchConfig { grid_dim: grid, block_dim: (EXPAND_THREADS as u32, 1, 1), shared_mem_bytes: 0 }) }.w()?;
    Ok(())
}

/// `y[rows of s] += scale_j (x_s A_j^T) B_j^T` for every segment `s` (adapter `j`):
/// `x` [m, k] in T, `a`/`b` the f32 concatenated adapters, `y` [m, out] f32.
fn sgmv<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    suffix: &str,
    x: &CudaView<'_, T>,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    plan: &Plan,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    if plan.segments.is_empty() {
        return Ok(());
    }
    let t = tables(dev, plan)?;
    let z = shrink(dev, suffix, x, plan.k, a, &t.fwd, &t, plan.xa_len)?;
    expand(dev, &z, b, &t.fwd, &t, plan.out, y)
}

/// One adapter-gradient launch (`sgmv_wgrad_a_*` / `_b_*`) over every segment.
#[allow(clippy::too_many_arguments)]
fn wgrad<T: CudaDType + DeviceRepr>(dev: &CudaDevice, kernel: &str, x: &CudaView<'_, T>, ld: usize, zb: &CudaSlice<f32>, t: &Tables, max_tiles: usize, g: &mut CudaSlice<f32>) -> Result<()> {
    let f = rt::func(dev, "sgmv", kernel)?;
    let stream = dev.cuda_stream();
    let ld32 = ld as i32;
    let mut l = stream.launch_builder(&f);
    l.arg(x).arg(&ld32).arg(zb).arg(&t.fwd).arg(&t.scales).arg(g);
    let grid = (max_tiles as u32, t.nseg as u32, ceil_div(t.longest, WGRAD_ROWS));
    unsafe { l.launch(LaunchConfig { grid_dim: grid, block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
    Ok(())
}

/// Rows per block of `sgmv_wgrad_*` (SW_ROWS in sgmv.cu).
const WGRAD_ROWS: usize = 256;

/// Every adapter's [rank][in] A or [out][rank] B transposed, flattened and concatenated in
/// slot order: the same offsets as the untransposed concatenation.
fn transposed_all(all: &Tensor, plan: &Plan, a_side: bool) -> Result<Tensor> {
    let parts: Vec<Tensor> = plan
        .slots
        .iter()
        .map(|s| {
            let (off, rows, cols) = if a_side { (s.a_off, s.rank, plan.k) } else { (s.b_off, plan.out, s.rank) };
            all.narrow(0, off, rows * cols)?.reshape((rows, cols))?.t()?.contiguous()?.flatten_all()
        })
        .collect::<Result<_>>()?;
    Tensor::cat(&parts, 0)
}

/// The SGMV backward: dX = dY W + per segment s_j (dY_s B_j) A_j (base GEMM with f32
/// output, then shrink with B^T and expand with A^T), dA_j and dB_j from one launch each
/// over all segments (Z_s = x_s A_j^T recomputed by one shrink). Launch count does not
/// grow with the number of segments or adapters.
fn sgmv_bwd(op: &SegmentedLoraCuda, x: &Tensor, a_all: &Tensor, b_all: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let plan = &op.plan;
    let (m, k, n) = (plan.n, plan.k, plan.out);
    let dev = rt::cuda_device(x.device())?.clone();
    let dt = x.dtype();
    let (at_all, bt_all) = (transposed_all(a_all, plan, true)?, transposed_all(b_all, plan, false)?);
    let x = x.contiguous()?;
    let g = g.to_dtype(dt)?.contiguous()?;
    let t = tables(&dev, plan)?;
    let max_tiles = |p_of: &dyn Fn(usize) -> (usize, usize)| {
        plan.segments.iter().map(|s| p_of(plan.slots[s.adapter].rank)).map(|(p, q)| p.div_ceil(64) * q.div_ceil(64)).max().unwrap_or(1)
    };
    let (dx, da, db) = {
        let (xg, lx) = x.storage_and_layout();
        let (gg, lg) = g.storage_and_layout();
        let (ag, la) = a_all.storage_and_layout();
        let (atg, lat) = at_all.storage_and_layout();
        let (btg, lbt) = bt_all.storage_and_layout();
        let (wg, lw) = op.w.storage_and_layout();
        let (av, atv, btv) = (view::<f32>(as_cuda(&ag)?, la)?, view::<f32>(as_cuda(&atg)?, lat)?, view::<f32>(as_cuda(&btg)?, lbt)?);
        dispatch!(dt, T => {
            let sfx = rt::suffix(dt)?;
            let (xv, gv, wv) = (view::<T>(as_cuda(&xg)?, lx)?, view::<T>(as_cuda(&gg)?, lg)?, view::<T>(as_cuda(&wg)?, lw)?);
            // V_s = dY_s B_j  (B_j^T rows at the swapped table's "A" offset)
            let v = shrink(&dev, sfx, &gv, n, &btv, &t.swapped, &t, plan.xa_len)?;
            let dx = if x.track_op() {
                let (dx, _) = lora_main::<T, f32>(&dev, &format!("lora_bwd_dx_f32out_{sfx}"), &gv, Some(&wv), None, None, None, 0.0, m, k, n, 0, true, false)?;
                let mut dx = dx.expect("dX with k > 0");
                expand(&dev, &v, &atv, &t.swapped, &t, k, &mut dx)?;
                Some(dx)
            } else {
                None
            };
            let da = if a_all.track_op() {
                let mut da = dev.alloc_zeros::<f32>(plan.a_len.max(1))?;
                wgrad(&dev, &format!("sgmv_wgrad_a_{sfx}"), &xv, k, &v, &t, max_tiles(&|r| (r, k)), &mut da)?;
                Some(da)
            } else {
                None
            };
            let db = if b_all.track_op() {
                let z = shrink(&dev, sfx, &xv, k, &av, &t.fwd, &t, plan.xa_len)?;
                let mut db = dev.alloc_zeros::<f32>(plan.b_len.max(1))?;
                wgrad(&dev, &format!("sgmv_wgrad_b_{sfx}"), &gv, n, &z, &t, max_tiles(&|r| (n, r)), &mut db)?;
                Some(db)
            } else {
                None
            };
            (dx, da, db)
        })
    };
    let wrap = |s: CudaSlice<f32>, len: usize| tensor(CudaStorage::wrap_cuda_slice(s, dev.clone()), len.max(1)).narrow(0, 0, len);
    let dx = match dx {
        Some(d) => Some(wrap(d, m * k)?.reshape(x.shape())?.to_dtype(dt)?),
        None => None,
    };
    let da = match da {
        Some(d) => Some(wrap(d, plan.a_len)?.to_dtype(a_all.dtype())?),
        None => None,
    };
    let db = match db {
        Some(d) => Some(wrap(d, plan.b_len)?.to_dtype(b_all.dtype())?),
        None => None,
    };
    Ok((dx, da, db))
}

/// The segmented op over (x, A_all, B_all); W, bias and the segment table inside.
struct SegmentedLoraCuda {
    w: Tensor,
    bias: Option<Tensor>,
    plan: Plan,
}

impl CustomOp3 for SegmentedLoraCuda {
    fn name(&self) -> &'static str {
        "segmented-lora-cuda"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("segmented-lora-cuda is CUDA only")
    }
    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device.clone();
        let (m, k) = rows_cols(lx)?;
        let n = self.plan.out;
        let (av, bv) = (view::<f32>(a, la)?, view::<f32>(b, lb)?);
        let y = with_cuda(&self.w, |ws, lw| {
            let bias_g = self.bias.as_ref().map(|t| t.storage_and_layout());
            dispatch!(x.dtype(), T => {
                let (xv, wv) = (view::<T>(x, lx)?, view::<T>(ws, lw)?);
                let biasv = match &bias_g {
                    Some((st, l)) => Some(view::<T>(as_cuda(st)?, l)?),
                    None => None,
                };
                let sfx = rt::suffix(x.dtype())?;
                let (y, _) = lora_main::<T, f32>(&dev, &format!("lora_fwd_f32out_{sfx}"), &xv, Some(&wv), None, None, biasv.as_ref(), 0.0, m, n, k, 0, false, false)?;
                let mut y = y.expect("base output with n > 0");
                sgmv::<T>(&dev, sfx, &xv, &av, &bv, &self.plan, &mut y)?;
                Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
            })
        })?;
        let mut out_dims = lx.shape().dims().to_vec();
        *out_dims.last_mut().unwrap() = n;
        Ok((y.to_dtype(&Layout::contiguous((m, n)), x.dtype())?, Shape::from(out_dims)))
    }
    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.plan.segments.is_empty() {
            // base rows only: the adapters get zero gradients, dX is the frozen GEMM's
            return composite_bwd(&self.plan, &self.w, x, a, b, &g.contiguous()?);
        }
        sgmv_bwd(self, x, a, b, g)
    }
}

/// The SGMV kernels for bf16/f16/f32 x (A/B read as f32 masters, f32 accumulation). An
/// empty input or output has nothing to launch: the composite version returns its
/// (empty) result.
pub fn segmented_lora_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, adapters: &[AdapterWeights], plan: Plan) -> Result<Tensor> {
    let dt = x.dtype();
    if plan.n == 0 || plan.out == 0 {
        return crate::reference::segmented_lora_linear(x, w, bias, adapters, &plan.segments);
    }
    let (a_all, b_all) = concat_adapters(adapters)?;
    let op = SegmentedLoraCuda {
        w: w.detach().to_dtype(dt)?.contiguous()?,
        bias: bias.map(|t| t.detach().to_dtype(dt).and_then(|t| t.contiguous())).transpose()?,
        plan,
    };
    x.contiguous()?.apply_op3(&a_all.contiguous()?, &b_all.contiguous()?, op)
}
