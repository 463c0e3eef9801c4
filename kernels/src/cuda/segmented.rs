//! CUDA path of [`crate::segmented_lora_linear`]: the base `x W^T (+ bias)` once over
//! all rows on the tensor-core kernel (`lora_fwd_f32out_*`, rank 0, f32 output), then the
//! SGMV pair of `sgmv.cu` adds every segment's adapter path in two launches (shrink,
//! expand) whatever the number of segments, and one cast gives x's dtype.
//!
//! The backward uses composite candle ops (cuBLAS), shared with every other device:
//! [`crate::ops::segmented::composite_bwd`]. Its cost is the base dX GEMM plus rank-r
//! GEMMs per segment, the same FLOPs as a fused version would spend.
use super::ops::{as_cuda, dispatch, lora_main, rows_cols};
use super::runtime::{self as rt, ceil_div, view, with_cuda};
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
    let nseg = plan.segments.len();
    if nseg == 0 {
        return Ok(());
    }
    if nseg > 65535 {
        bail!("segmented-lora CUDA: {nseg} segments, at most 65535 per call");
    }
    let (table, scales, longest) = segment_table(plan);
    let stream = dev.cuda_stream();
    let table = stream.clone_htod(&table).w()?;
    let scales = stream.clone_htod(&scales).w()?;
    let mut z = dev.alloc_zeros::<f32>(plan.xa_len.max(1))?;
    let shrink = rt::func(dev, "sgmv", &format!("sgmv_shrink_{suffix}"))?;
    {
        let k32 = plan.k as i32;
        let mut l = stream.launch_builder(&shrink);
        l.arg(x).arg(&k32).arg(a).arg(&table).arg(&mut z);
        let grid = (ceil_div(longest, SHRINK_ROWS), nseg as u32, 1);
        unsafe { l.launch(LaunchConfig { grid_dim: grid, block_dim: (32 * SHRINK_ROWS as u32, 1, 1), shared_mem_bytes: 0 }) }.w()?;
    }
    let expand = rt::func(dev, "sgmv", "sgmv_expand")?;
    {
        let n32 = plan.out as i32;
        let mut l = stream.launch_builder(&expand);
        l.arg(&z).arg(b).arg(&table).arg(&scales).arg(&mut *y).arg(&n32);
        let grid = (ceil_div(plan.out, EXPAND_THREADS), ceil_div(longest, EXPAND_ROWS), nseg as u32);
        unsafe { l.launch(LaunchConfig { grid_dim: grid, block_dim: (EXPAND_THREADS as u32, 1, 1), shared_mem_bytes: 0 }) }.w()?;
    }
    Ok(())
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
        composite_bwd(&self.plan, &self.w, x, a, b, &g.contiguous()?)
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
