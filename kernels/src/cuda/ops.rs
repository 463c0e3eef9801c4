//! Differentiable tensor functions backed by the lora-kernels CUDA kernels. Each takes
//! tensors on a CUDA device and returns the same results as the CPU ops (up to dtype
//! rounding); `selftest` checks that on a GPU.
use super::runtime::{self as rt, ceil_div, cfg, tensor, view, with_cuda};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{bail, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use half::{bf16, f16};

/// Run `$body` with `$t` bound to the Rust element type of `$dtype` (bf16, f16, f32).
macro_rules! dispatch {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::BF16 => { type $t = bf16; $body }
            DType::F16 => { type $t = f16; $body }
            DType::F32 => { type $t = f32; $body }
            d => bail!("lora-kernels CUDA: unsupported dtype {d:?}"),
        }
    };
}
pub(super) use dispatch;

pub(super) fn as_cuda(s: &candle_core::Storage) -> Result<&CudaStorage> {
    match s {
        candle_core::Storage::Cuda(c) => Ok(c),
        _ => bail!("lora-kernels CUDA: tensor is not on a CUDA device"),
    }
}

pub(super) fn rows_cols(l: &Layout) -> Result<(usize, usize)> {
    let dims = l.shape().dims();
    let cols = *dims.last().ok_or_else(|| candle_core::Error::Msg("scalar input".into()))?;
    Ok((l.shape().elem_count() / cols.max(1), cols))
}

fn threads_for(cols: usize, per: usize) -> u32 {
    ((cols / per).next_power_of_two().clamp(32, 1024)) as u32
}

// ------------------------------------------------------------------------------ RMSNorm

fn rms_norm_fwd_s(x: &CudaStorage, lx: &Layout, w: &CudaStorage, lw: &Layout, eps: f32) -> Result<CudaStorage> {
    let dev = &x.device;
    let (rows, d) = rows_cols(lx)?;
    dispatch!(x.dtype(), T => {
        let xv = view::<T>(x, lx)?;
        let wv = view::<T>(w, lw)?;
        let mut y = unsafe { dev.alloc::<T>(rows * d)? };
        let vec = (d % 8 == 0 && rt::vec_ok(&xv, dev, d) && rt::vec_ok(&wv, dev, d)) as i32;
        let f = rt::func(dev, "rms_norm", &format!("rms_norm_fwd_{}", rt::suffix(x.dtype())?))?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (d32, null) = (d as i32, 0u64);
        b.arg(&xv).arg(&wv).arg(&mut y).arg(&null).arg(&d32).arg(&eps).arg(&vec);
        unsafe { b.launch(cfg((rows as u32, 1, 1), threads_for(d, 8).min(256))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

fn rms_norm_bwd_t(x: &Tensor, w: &Tensor, g: &Tensor, eps: f32) -> Result<Tensor> {
    let g = g.contiguous()?;
    let (rows, d) = (x.elem_count() / x.dim(D::Minus1)?, x.dim(D::Minus1)?);
    let out = with_cuda(x, |xs, lx| with_cuda(w, |ws, lw| with_cuda(&g, |gs, lg| {
        let dev = &xs.device;
        dispatch!(xs.dtype(), T => {
            let (xv, wv, gv) = (view::<T>(xs, lx)?, view::<T>(ws, lw)?, view::<T>(gs, lg)?);
            let mut dx = unsafe { dev.alloc::<T>(rows * d)? };
            let vec = (d % 8 == 0 && rt::vec_ok(&xv, dev, d) && rt::vec_ok(&wv, dev, d) && rt::vec_ok(&gv, dev, d)) as i32;
            let f = rt::func(dev, "rms_norm", &format!("rms_norm_bwd_{}", rt::suffix(xs.dtype())?))?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let d32 = d as i32;
            b.arg(&gv).arg(&xv).arg(&wv).arg(&mut dx).arg(&d32).arg(&eps).arg(&vec);
            unsafe { b.launch(cfg((rows as u32, 1, 1), threads_for(d, 8).min(256))) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
        })
    })))?;
    Ok(tensor(out, x.shape().clone()))
}

struct RmsNormCuda {
    eps: f32,
}
impl CustomOp2 for RmsNormCuda {
    fn name(&self) -> &'static str {
        "lora-rms-norm-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("lora-rms-norm-cuda is CUDA only")
    }
    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout, w: &CudaStorage, lw: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((rms_norm_fwd_s(x, lx, w, lw, self.eps)?, lx.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Norm weights are frozen in LoRA training: dX only.
        Ok((Some(rms_norm_bwd_t(x, w, g, self.eps)?), None))
    }
}

/// RMSNorm over the last dim (f32 statistics). `weight` is treated as frozen.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let w = weight.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op2(&w, RmsNormCuda { eps: eps as f32 })
}

// --------------------------------------------------------------------------------- RoPE

fn rope_s(x: &CudaStorage, lx: &Layout, cs: &CudaStorage, lc: &Layout, sn: &CudaStorage, ls: &Layout, sign: f32) -> Result<CudaStorage> {
    let dev = &x.device;
    let (b_, h_, t_, d) = lx.shape().dims4()?;
    let st = lx.stride();
    if st[3] != 1 {
        bail!("rope: last dim must be contiguous");
    }
    let half = d / 2;
    dispatch!(x.dtype(), T => {
        let xs = x.as_cuda_slice::<T>()?.slice(lx.start_offset()..);
        let (cv, sv) = (view::<f32>(cs, lc)?, view::<f32>(sn, ls)?);
        let mut out = unsafe { dev.alloc::<T>(b_ * h_ * t_ * d)? };
        let vec = half % 8 == 0 && st[0] % 8 == 0 && st[1] % 8 == 0 && st[2] % 8 == 0 && rt::vec_ok(&xs, dev, 8)
            && rt::vec_ok(&cv, dev, half) && rt::vec_ok(&sv, dev, half);
        let groups = if vec { half / 8 } else { half };
        let total = b_ * h_ * t_ * groups;
        let f = rt::func(dev, "rope", &format!("rope_{}", rt::suffix(x.dtype())?))?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (bi, hi, ti, di) = (b_ as i32, h_ as i32, t_ as i32, d as i32);
        let (sb, sh, stt) = (st[0] as i64, st[1] as i64, st[2] as i64);
        let vec = vec as i32;
        b.arg(&xs).arg(&cv).arg(&sv).arg(&mut out).arg(&bi).arg(&hi).arg(&ti).arg(&di).arg(&sb).arg(&sh).arg(&stt).arg(&sign).arg(&vec);
        unsafe { b.launch(cfg((ceil_div(total, 256), 1, 1), 256)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    })
}

struct RopeCuda {
    sign: f32,
}
impl CustomOp3 for RopeCuda {
    fn name(&self) -> &'static str {
        "lora-rope-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("lora-rope-cuda is CUDA only")
    }
    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout, c: &CudaStorage, lc: &Layout, s: &CudaStorage, ls: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((rope_s(x, lx, c, lc, s, ls, self.sign)?, lx.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, c: &Tensor, s: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = g.contiguous()?.apply_op3_no_bwd(c, s, &RopeCuda { sign: -self.sign })?;
        Ok((Some(dx), None, None))
    }
}

/// RoPE (HF rotate_half). `x`: [b, h, t, d] (any strides, last dim contiguous);
/// `cos`, `sin`: [b, t, d/2] or [t, d/2] (cast to f32). Output contiguous.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    let prep = |c: &Tensor| -> Result<Tensor> {
        let c = c.to_dtype(DType::F32)?;
        let c = if c.rank() == 2 { c.unsqueeze(0)?.expand((b, c.dim(0)?, c.dim(1)?))? } else { c };
        c.contiguous()
    };
    let x = if x.stride()[3] == 1 { x.clone() } else { x.contiguous()? };
    x.apply_op3(&prep(cos)?, &prep(sin)?, RopeCuda { sign: 1.0 })
}

// ------------------------------------------------------------------------------ softmax

fn softmax_fwd_s(x: &CudaStorage, lx: &Layout, tq: usize, scale: f32) -> Result<CudaStorage> {
    let dev = &x.device;
    let (rows, cols) = rows_cols(lx)?;
    dispatch!(x.dtype(), T => {
        let xv = view::<T>(x, lx)?;
        let mut y = unsafe { dev.alloc::<T>(rows * cols)? };
        let vec = (cols % 8 == 0 && rt::vec_ok(&xv, dev, cols)) as i32;
        let f = rt::func(dev, "softmax", &format!("softmax_fwd_{}", rt::suffix(x.dtype())?))?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (c32, tq32) = (cols as i32, tq as i32);
        b.arg(&xv).arg(&mut y).arg(&c32).arg(&tq32).arg(&scale).arg(&vec);
        unsafe { b.launch(cfg((rows as u32, 1, 1), threads_for(cols, 8).min(512))) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

struct SoftmaxCuda {
    tq: usize,
    scale: f32,
}
struct SoftmaxBwdCuda {
    scale: f32,
}
impl CustomOp1 for SoftmaxCuda {
    fn name(&self) -> &'static str {
        "lora-softmax-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("lora-softmax-cuda is CUDA only")
    }
    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((softmax_fwd_s(x, lx, self.tq, self.scale)?, lx.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwdCuda { scale: self.scale })?))
    }
}
impl CustomOp2 for SoftmaxBwdCuda {
    fn name(&self) -> &'static str {
        "lora-softmax-bwd-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("lora-softmax-bwd-cuda is CUDA only")
    }
    fn cuda_fwd(&self, y: &CudaStorage, ly: &Layout, g: &CudaStorage, lg: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &y.device;
        let (rows, cols) = rows_cols(ly)?;
        let out = dispatch!(y.dtype(), T => {
            let (yv, gv) = (view::<T>(y, ly)?, view::<T>(g, lg)?);
            let mut dx = unsafe { dev.alloc::<T>(rows * cols)? };
            let vec = (cols % 8 == 0 && rt::vec_ok(&yv, dev, cols) && rt::vec_ok(&gv, dev, cols)) as i32;
            let f = rt::func(dev, "softmax", &format!("softmax_bwd_{}", rt::suffix(y.dtype())?))?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let c32 = cols as i32;
            b.arg(&yv).arg(&gv).arg(&mut dx).arg(&c32).arg(&self.scale).arg(&vec);
            unsafe { b.launch(cfg((rows as u32, 1, 1), threads_for(cols, 8).min(512))) }.w()?;
            CudaStorage::wrap_cuda_slice(dx, dev.clone())
        });
        Ok((out, ly.shape().clone()))
    }
}

/// Softmax over the last dim (f32 math, output in the input dtype).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxCuda { tq: 0, scale: 1.0 })
}

/// `softmax(scale * scores)` with a causal mask: `scores` [..., tq, tk]; query i sits at
/// position i + tk - tq and sees keys 0..=that position.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let tq = scores.dim(D::Minus2)?;
    scores.contiguous()?.apply_op1(SoftmaxCuda { tq, scale: scale as f32 })
}

// ------------------------------------------------------------------------------- SwiGLU

fn swiglu_launch(kernel: &str, dtype: DType, ins: &[&Tensor], nout: usize) -> Result<Vec<Tensor>> {
    let shape = ins[0].shape().clone();
    let n = shape.elem_count();
    let ins: Vec<Tensor> = ins.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = ins.iter().map(|t| t.storage_and_layout()).collect();
    let mut stores = Vec::new();
    for (st, _) in &guards {
        match &**st {
            candle_core::Storage::Cuda(s) => stores.push(s),
            _ => bail!("swiglu: not a CUDA tensor"),
        }
    }
    let dev = stores[0].device.clone();
    let outs = dispatch!(dtype, T => {
        let views = stores.iter().zip(&guards).map(|(s, (_, l))| view::<T>(s, l)).collect::<Result<Vec<_>>>()?;
        let mut outs = (0..nout).map(|_| unsafe { dev.alloc::<T>(n) }).collect::<Result<Vec<_>>>()?;
        let vec = n % 8 == 0 && views.iter().all(|v| rt::vec_ok(v, &dev, 8));
        let f = rt::func(&dev, "swiglu", &format!("{kernel}_{}", rt::suffix(dtype)?))?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        for v in &views { b.arg(v); }
        for o in outs.iter_mut() { b.arg(o); }
        let (n64, v32) = (n as i64, vec as i32);
        b.arg(&n64).arg(&v32);
        let threads = if vec { n / 8 } else { n };
        unsafe { b.launch(cfg((ceil_div(threads, 256), 1, 1), 256)) }.w()?;
        outs.into_iter().map(|o| CudaStorage::wrap_cuda_slice(o, dev.clone())).collect::<Vec<_>>()
    });
    Ok(outs.into_iter().map(|s| tensor(s, shape.clone())).collect())
}

struct SwigluCuda;
impl CustomOp2 for SwigluCuda {
    fn name(&self) -> &'static str {
        "lora-swiglu-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("lora-swiglu-cuda is CUDA only")
    }
    fn cuda_fwd(&self, g: &CudaStorage, lg: &Layout, u: &CudaStorage, lu: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &g.device;
        let n = lg.shape().elem_count();
        let out = dispatch!(g.dtype(), T => {
            let (gv, uv) = (view::<T>(g, lg)?, view::<T>(u, lu)?);
            let mut h = unsafe { dev.alloc::<T>(n)? };
            let vec = n % 8 == 0 && rt::vec_ok(&gv, dev, 8) && rt::vec_ok(&uv, dev, 8);
            let f = rt::func(dev, "swiglu", &format!("swiglu_fwd_{}", rt::suffix(g.dtype())?))?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (n64, v32) = (n as i64, vec as i32);
            b.arg(&gv).arg(&uv).arg(&mut h).arg(&n64).arg(&v32);
            let threads = if vec { n / 8 } else { n };
            unsafe { b.launch(cfg((ceil_div(threads, 256), 1, 1), 256)) }.w()?;
            CudaStorage::wrap_cuda_slice(h, dev.clone())
        });
        Ok((out, lg.shape().clone()))
    }
    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dh: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut o = swiglu_launch("swiglu_bwd", g.dtype(), &[g, u, dh], 2)?;
        let du = o.pop();
        let dg = o.pop();
        Ok((dg, du))
    }
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let up = up.to_dtype(gate.dtype())?;
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwigluCuda)
}

// ------------------------------------------------------------------- fused LoRA linear

/// Ranks per launch of the fused kernels (their Z tile); larger ranks run as chunks.
const RANK_CHUNK: usize = 64;

/// Module holding a fused-linear kernel: `*_float` kernels are the f32 FMA ones,
/// `*_tf32` the f32 tensor-core ones.
fn linear_module(kernel: &str) -> &'static str {
    if kernel.ends_with("_float") {
        "lora_f32"
    } else if kernel.ends_with("_tf32") {
        "lora_tf32"
    } else {
        "lora_linear"
    }
}

/// Whether f32 linears may run on TF32 tensor cores (10-bit mantissa operands, f32
/// accumulation): only when the user sets `LORA_TRAIN_TF32=1`, like PyTorch's
/// `allow_tf32`; otherwise f32 stays exact (FMA kernels).
pub fn tf32_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    match TF32_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => *ALLOWED.get_or_init(|| matches!(std::env::var("LORA_TRAIN_TF32").as_deref(), Ok("1") | Ok("true"))),
    }
}

static TF32_OVERRIDE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Force TF32 on or off for this process (`None`: back to `LORA_TRAIN_TF32`); `selftest`
/// uses it to check both f32 kernels.
pub fn set_tf32_override(allowed: Option<bool>) {
    let v = match allowed {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    };
    TF32_OVERRIDE.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The kernel that runs an f32 fused-linear launch: the TF32 one when allowed.
fn f32_kernel_choice(kernel: &str) -> &str {
    if !kernel.ends_with("_float") || kernel.starts_with("lora_wgrad") || !tf32_allowed() {
        kernel
    } else if kernel.starts_with("lora_bwd_dx") {
        "lora_bwd_dx_tf32"
    } else {
        "lora_fwd_tf32"
    }
}

type View<'a, T> = candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>;
type Slice<T> = candle_core::cuda_backend::cudarc::driver::CudaSlice<T>;

/// Launch `lora_fwd*` / `lora_bwd_dx*` on raw views. Returns (Y, Z). Any rank: ranks
/// above [`RANK_CHUNK`] run as one launch per 64-rank chunk, the first with W and bias,
/// the others adding their term into Y (VEC_ACC) and writing their own columns of Z.
/// bf16/f16 run on tensor cores (`lora_linear.cu`), f32 on FMA (`lora_f32.cu`) or, with
/// [`tf32_allowed`], on TF32 tensor cores (`lora_tf32.cu`, 64-column tiles, 128 threads).
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_main<T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr, O: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &candle_core::cuda_backend::CudaDevice,
    kernel: &str,
    x: &View<'_, T>,
    w: Option<&View<'_, T>>,
    d: Option<&View<'_, T>>,
    u: Option<&View<'_, T>>,
    bias: Option<&View<'_, T>>,
    scale: f32,
    m: usize, nc: usize, kr: usize, r: usize, trans: bool, want_z: bool,
) -> Result<(Option<Slice<O>>, Option<Slice<f32>>)> {
    let kernel = f32_kernel_choice(kernel);
    let f = rt::func(dev, linear_module(kernel), kernel)?;
    let mut y = if nc > 0 { Some(unsafe { dev.alloc::<O>(m * nc)? }) } else { None };
    let mut z = if want_z && r > 0 { Some(dev.alloc_zeros::<f32>(m * r)?) } else { None };
    // leading dimensions (elements) of each operand in its stored layout
    let (ldw, ldd, ldu) = if trans { (nc, r, nc) } else { (kr, kr, r) };
    let null = 0u64;
    let stream = dev.cuda_stream();
    let (grid_n, threads) = match linear_module(kernel) {
        "lora_f32" => (64, 256),
        "lora_tf32" => (64, 128),
        _ => (128, 128),
    };
    let grid = (ceil_div(nc.max(1), grid_n), ceil_div(m, 64), 1);
    let chunks: Vec<(usize, usize)> = if r == 0 { vec![(0, 0)] } else { (0..r).step_by(RANK_CHUNK).map(|c| (c, RANK_CHUNK.min(r - c))).collect() };
    for (ci, &(c0, rc)) in chunks.iter().enumerate() {
        // This chunk's ranks: forward D = A [r][K] rows, U = B [N][r] columns;
        // backward D = B [N][r] columns, U = A [r][K] rows.
        let dc = d.map(|v| if trans { v.slice(c0..) } else { v.slice(c0 * kr..(c0 + rc) * kr) });
        let uc = u.map(|v| if trans { v.slice(c0 * nc..(c0 + rc) * nc) } else { v.slice(c0..) });
        let (wc, bc) = if ci == 0 { (w, bias) } else { (None, None) };
        let mut vec = 0i32;
        if rt::vec_ok(x, dev, kr) { vec |= 1; }
        if wc.map_or(true, |v| rt::vec_ok(v, dev, ldw)) { vec |= 2; }
        if dc.as_ref().map_or(true, |v| rt::vec_ok(v, dev, ldd)) { vec |= 4; }
        if uc.as_ref().map_or(true, |v| rt::vec_ok(v, dev, ldu)) { vec |= 8; }
        if nc % 8 == 0 { vec |= 16; }
        if ci > 0 { vec |= 32; }
        let (ldx, ldw, ldd, ldu, ldy, ldz) = (kr as i64, ldw as i64, ldd as i64, ldu as i64, nc as i64, r as i64);
        let (m32, nc32, kr32, r32) = (m as i32, nc as i32, kr as i32, rc as i32);
        let mut zc = z.as_mut().map(|z| z.slice_mut(c0..));
        let mut b = stream.launch_builder(&f);
        b.arg(x).arg(&ldx);
        match wc { Some(v) => b.arg(v), None => b.arg(&null) }.arg(&ldw);
        match dc.as_ref() { Some(v) => b.arg(v), None => b.arg(&null) }.arg(&ldd);
        match uc.as_ref() { Some(v) => b.arg(v), None => b.arg(&null) }.arg(&ldu);
        match bc { Some(v) => b.arg(v), None => b.arg(&null) };
        b.arg(&scale);
        match y.as_mut() { Some(v) => b.arg(v), None => b.arg(&null) }.arg(&ldy);
        match zc.as_mut() { Some(v) => b.arg(v), None => b.arg(&null) }.arg(&ldz);
        b.arg(&m32).arg(&nc32).arg(&kr32).arg(&r32).arg(&vec);
        unsafe { b.launch(LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }) }.w()?;
    }
    Ok((y, z))
}

/// C[P][Q] = s * L^T R (f32), L: [M][P], R: [M][Q], split over M.
#[allow(clippy::too_many_arguments)]
fn lora_wgrad<LT: candle_core::cuda_backend::cudarc::driver::DeviceRepr, RT: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &candle_core::cuda_backend::CudaDevice,
    kernel: &str,
    l: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, LT>,
    r: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, RT>,
    scale: f32, m: usize, p: usize, q: usize,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>> {
    // f32 has one weight-gradient kernel for both operand orders.
    let f32_kernel = kernel.ends_with("_float");
    let f = if f32_kernel { rt::func(dev, "lora_f32", "lora_wgrad_float")? } else { rt::func(dev, "lora_linear", kernel)? };
    let mut c = dev.alloc_zeros::<f32>(p * q)?;
    let tiles = (ceil_div(q, 64) * ceil_div(p, 64)) as usize;
    // enough blocks for ~2 waves on a 132-SM GPU, at least 256 rows per split
    let splits = (264 / tiles.max(1)).clamp(1, m.div_ceil(256).max(1));
    let mchunk = m.div_ceil(splits).div_ceil(32) * 32;
    let splits = m.div_ceil(mchunk.max(1)).max(1);
    let mut vec = 0i32;
    if rt::vec_ok(l, dev, p) { vec |= 1; }
    if rt::vec_ok(r, dev, q) { vec |= 2; }
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let (ldl, ldr, ldc) = (p as i64, q as i64, q as i64);
    let (m32, p32, q32, mc32) = (m as i32, p as i32, q as i32, mchunk as i32);
    b.arg(l).arg(&ldl).arg(r).arg(&ldr).arg(&scale).arg(&mut c).arg(&ldc).arg(&m32).arg(&p32).arg(&q32).arg(&mc32).arg(&vec);
    let grid = (ceil_div(q, 64), ceil_div(p, 64), splits as u32);
    let threads = if f32_kernel { 256 } else { 128 };
    unsafe { b.launch(LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }) }.w()?;
    Ok(c)
}

fn f32_tensor(dev: &candle_core::cuda_backend::CudaDevice, s: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>, shape: impl Into<Shape>) -> Tensor {
    tensor(CudaStorage::wrap_cuda_slice(s, dev.clone()), shape)
}

/// The fused LoRA linear as a custom op over (x, A, B); W and bias frozen inside.
struct LoraLinearCuda {
    w: Tensor,
    bias: Option<Tensor>,
    scale: f32,
}

impl CustomOp3 for LoraLinearCuda {
    fn name(&self) -> &'static str {
        "lora-linear-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("lora-linear-cuda is CUDA only")
    }
    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout, a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device.clone();
        let (m, k) = rows_cols(lx)?;
        let n = self.w.dim(0)?;
        let r = la.shape().dims()[0];
        let mut out_dims = lx.shape().dims().to_vec();
        *out_dims.last_mut().unwrap() = n;
        let y = with_cuda(&self.w, |ws, lw| {
            let bias_g = self.bias.as_ref().map(|t| t.storage_and_layout());
            dispatch!(x.dtype(), T => {
                let (xv, wv, av, bv) = (view::<T>(x, lx)?, view::<T>(ws, lw)?, view::<T>(a, la)?, view::<T>(b, lb)?);
                let biasv = match &bias_g {
                    Some((st, l)) => match &**st {
                        candle_core::Storage::Cuda(s) => Some(view::<T>(s, l)?),
                        _ => bail!("bias not on CUDA"),
                    },
                    None => None,
                };
                let kern = format!("lora_fwd_{}", rt::suffix(x.dtype())?);
                let (y, _) = lora_main::<T, T>(&dev, &kern, &xv, Some(&wv), Some(&av), Some(&bv), biasv.as_ref(), self.scale, m, n, k, r, false, false)?;
                Ok(CudaStorage::wrap_cuda_slice(y.unwrap(), dev.clone()))
            })
        })?;
        Ok((y, Shape::from(out_dims)))
    }
    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, db) = lora_linear_bwd(x, &self.w, a, b, self.scale, &g.contiguous()?)?;
        Ok((Some(dx), Some(da.to_dtype(a.dtype())?), Some(db.to_dtype(b.dtype())?)))
    }
}

/// Backward of the fused LoRA linear on raw tensors (all contiguous, bf16/f16):
/// returns (dX [.., K] in x's dtype, dA [r, K] f32, dB [N, r] f32).
/// Recomputes Z = X A^T (rank-only launch), then one fused dX launch (which also writes
/// V = dY B), then the two split-M weight-gradient launches.
pub fn lora_linear_bwd(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f32, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let k = x.dim(D::Minus1)?;
    let m = x.elem_count() / k;
    let (n, r) = b.dims2()?;
    let dev = rt::cuda_device(x.device())?.clone();
    let (xg, lx) = x.storage_and_layout();
    let (wg, lw) = w.storage_and_layout();
    let (ag, la) = a.storage_and_layout();
    let (bg, lb) = b.storage_and_layout();
    let (gg, lg) = g.storage_and_layout();
    let (xs, ws, as_, bs, gs) = (as_cuda(&xg)?, as_cuda(&wg)?, as_cuda(&ag)?, as_cuda(&bg)?, as_cuda(&gg)?);
    let (dx, da, db) = dispatch!(x.dtype(), T => {
        let (xv, wv, av, bv, gv) = (view::<T>(xs, lx)?, view::<T>(ws, lw)?, view::<T>(as_, la)?, view::<T>(bs, lb)?, view::<T>(gs, lg)?);
        let sfx = rt::suffix(x.dtype())?;
        // Z = X A^T  [M, r] f32
        let (_, z) = lora_main::<T, T>(&dev, &format!("lora_fwd_{sfx}"), &xv, None, Some(&av), None, None, 1.0, m, 0, k, r, false, true)?;
        // dX = dY W + s (dY B) A, V = dY B  [M, r] f32
        let (dx, v) = lora_main::<T, T>(&dev, &format!("lora_bwd_dx_{sfx}"), &gv, Some(&wv), Some(&bv), Some(&av), None, scale, m, k, n, r, true, true)?;
        let (z, v) = (z.unwrap(), v.unwrap());
        // dB = s dY^T Z [N, r];  dA = s V^T X [r, K]
        let db = lora_wgrad::<T, f32>(&dev, &format!("lora_wgrad_tf_{sfx}"), &gv, &z.slice(..), scale, m, n, r)?;
        let da = lora_wgrad::<f32, T>(&dev, &format!("lora_wgrad_ft_{sfx}"), &v.slice(..), &xv, scale, m, r, k)?;
        (CudaStorage::wrap_cuda_slice(dx.unwrap(), dev.clone()), da, db)
    });
    Ok((tensor(dx, x.shape().clone()), f32_tensor(&dev, da, (r, k)), f32_tensor(&dev, db, (n, r))))
}

/// `x W^T (+ bias) + scale (x A^T) B^T`: bf16/f16 on tensor cores, f32 on FMA, any
/// rank (64-rank chunks). A/B may be f32 masters: they are cast to x's dtype (the cast
/// is differentiable).
pub fn lora_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let op = LoraLinearCuda {
        w: w.detach().to_dtype(dt)?.contiguous()?,
        bias: bias.map(|t| t.detach().to_dtype(dt).and_then(|t| t.contiguous())).transpose()?,
        scale: scale as f32,
    };
    x.contiguous()?.apply_op3(&a.to_dtype(dt)?.contiguous()?, &b.to_dtype(dt)?.contiguous()?, op)
}

struct FrozenLinearCuda {
    w: Tensor,
    bias: Option<Tensor>,
}
impl CustomOp1 for FrozenLinearCuda {
    fn name(&self) -> &'static str {
        "lora-frozen-linear-cuda"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("lora-frozen-linear-cuda is CUDA only")
    }
    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device.clone();
        let (m, k) = rows_cols(lx)?;
        let n = self.w.dim(0)?;
        let mut out_dims = lx.shape().dims().to_vec();
        *out_dims.last_mut().unwrap() = n;
        let y = with_cuda(&self.w, |ws, lw| {
            let bias_g = self.bias.as_ref().map(|t| t.storage_and_layout());
            dispatch!(x.dtype(), T => {
                let (xv, wv) = (view::<T>(x, lx)?, view::<T>(ws, lw)?);
                let biasv = match &bias_g {
                    Some((st, l)) => match &**st {
                        candle_core::Storage::Cuda(s) => Some(view::<T>(s, l)?),
                        _ => bail!("bias not on CUDA"),
                    },
                    None => None,
                };
                let kern = format!("lora_fwd_{}", rt::suffix(x.dtype())?);
                let (y, _) = lora_main::<T, T>(&dev, &kern, &xv, Some(&wv), None, None, biasv.as_ref(), 0.0, m, n, k, 0, false, false)?;
                Ok(CudaStorage::wrap_cuda_slice(y.unwrap(), dev.clone()))
            })
        })?;
        Ok((y, Shape::from(out_dims)))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let k = x.dim(D::Minus1)?;
        let n = self.w.dim(0)?;
        let m = x.elem_count() / k;
        let dev = rt::cuda_device(x.device())?.clone();
        let dx = with_cuda(&g, |gs, lg| with_cuda(&self.w, |ws, lw| {
            dispatch!(x.dtype(), T => {
                let (gv, wv) = (view::<T>(gs, lg)?, view::<T>(ws, lw)?);
                let kern = format!("lora_bwd_dx_{}", rt::suffix(x.dtype())?);
                let (dx, _) = lora_main::<T, T>(&dev, &kern, &gv, Some(&wv), None, None, None, 0.0, m, k, n, 0, true, false)?;
                Ok(CudaStorage::wrap_cuda_slice(dx.unwrap(), dev.clone()))
            })
        }))?;
        Ok(Some(tensor(dx, x.shape().clone())))
    }
}

/// `x W^T (+ bias)` with frozen W (backward: dX only), on the fused kernels with rank 0
/// (bf16/f16 tensor cores, f32 FMA).
pub fn frozen_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dt = x.dtype();
    let op = FrozenLinearCuda {
        w: w.detach().to_dtype(dt)?.contiguous()?,
        bias: bias.map(|t| t.detach().to_dtype(dt).and_then(|t| t.contiguous())).transpose()?,
    };
    x.contiguous()?.apply_op1(op)
}

// ------------------------------------------------------- chunked linear cross-entropy

/// Sum over rows of `weights[r] * CE(hidden[r] lm_head^T, targets[r])`, computed in
/// chunks of rows so only [chunk, vocab] f32 logits exist at a time; the gradient
/// w.r.t. `hidden` is computed in the same pass (Liger's idea) and scaled by the
/// upstream gradient in the backward. `hidden` [n, h] bf16/f16/f32, `lm_head` [v, h],
/// `targets` [n] u32, `weights` [n] f32.
pub fn linear_cross_entropy(hidden: &Tensor, lm_head: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let weights = weights.to_dtype(DType::F32)?.contiguous()?;
    let (rows, dh) = chunked_ce(hidden, lm_head, targets, &weights)?;
    let total = rows.sum_all()?;
    match dh {
        None => Ok(total),
        // d total / d hidden = dh (times the upstream scalar gradient).
        Some(dh) => hidden.apply_op1(PrecomputedGrad { value: total, grad: dh }),
    }
}

/// Per-row cross-entropies [n] f32 (minus the target log-probabilities), the same
/// chunked kernels as [`linear_cross_entropy`] with unit weights; differentiable w.r.t.
/// `hidden` (row i's gradient is scaled by the upstream gradient's element i).
pub fn linear_cross_entropy_rows(hidden: &Tensor, lm_head: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = hidden.dim(0)?;
    let ones = Tensor::ones(n, DType::F32, hidden.device())?;
    let (rows, dh) = chunked_ce(hidden, lm_head, targets, &ones)?;
    match dh {
        None => Ok(rows),
        Some(dh) => hidden.apply_op1(PrecomputedGrad { value: rows, grad: dh }),
    }
}

/// Rows of logits per chunk: the f32 logits chunk (and its 16-bit or f32 gradient)
/// stays under ~256 MiB + ~128 MiB whatever the vocabulary.
fn ce_chunk_rows(n: usize, v: usize) -> usize {
    ((64usize << 20) / v.max(1)).clamp(64, 4096).min(n.max(1))
}

/// The chunked pass: per-row weighted losses [n] f32 and, when `hidden` is tracked,
/// d(loss_i)/d(hidden_i) [n, h] in hidden's dtype. Per chunk: logits = H_c W^T (f32
/// output), `ce_rows_*` (losses, dlogits in place of a softmax), dH_c = dlogits W.
fn chunked_ce(hidden: &Tensor, lm_head: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let dt = hidden.dtype();
    let (n, h) = hidden.dims2()?;
    let (v, lh) = lm_head.dims2()?;
    if lh != h || targets.elem_count() != n || weights.elem_count() != n {
        bail!("linear-cross-entropy: hidden [{n}, {h}], lm_head {:?}, {} targets, {} weights", lm_head.dims(), targets.elem_count(), weights.elem_count());
    }
    let w = lm_head.detach().to_dtype(dt)?.contiguous()?;
    let hid = hidden.detach().contiguous()?;
    let targets = targets.to_dtype(DType::U32)?.flatten_all()?.contiguous()?;
    let want_grad = hidden.track_op();
    let dev = rt::cuda_device(hidden.device())?.clone();
    let chunk = ce_chunk_rows(n, v);
    let (hg, lh_) = hid.storage_and_layout();
    let (wg, lw) = w.storage_and_layout();
    let (tg, lt) = targets.storage_and_layout();
    let (eg, le) = weights.storage_and_layout();
    let (hs, ws, ts, es) = (as_cuda(&hg)?, as_cuda(&wg)?, as_cuda(&tg)?, as_cuda(&eg)?);
    dispatch!(dt, T => {
        let sfx = rt::suffix(dt)?;
        let (hv, wv, tv, ev) = (view::<T>(hs, lh_)?, view::<T>(ws, lw)?, view::<u32>(ts, lt)?, view::<f32>(es, le)?);
        let mut loss_s = dev.alloc_zeros::<f32>(n.max(1))?;
        let mut dh_s = if want_grad { Some(dev.alloc_zeros::<T>((n * h).max(1))?) } else { None };
        let ce = rt::func(&dev, "cross_entropy", &format!("ce_rows_{sfx}"))?;
        let stream = dev.cuda_stream();
        let mut r0 = 0;
        while r0 < n {
            let rows = chunk.min(n - r0);
            let hc = hv.slice(r0 * h..(r0 + rows) * h);
            let (logits, _) = lora_main::<T, f32>(&dev, &format!("lora_fwd_f32out_{sfx}"), &hc, Some(&wv), None, None, None, 0.0, rows, v, h, 0, false, false)?;
            let logits = logits.expect("logits with v > 0");
            let mut dl = if want_grad { Some(unsafe { dev.alloc::<T>(rows * v)? }) } else { None };
            {
                let (tc, ec) = (tv.slice(r0..r0 + rows), ev.slice(r0..r0 + rows));
                let mut lc = loss_s.slice_mut(r0..r0 + rows);
                let mut b = stream.launch_builder(&ce);
                let (v32, gs, vec) = (v as i32, 1.0f32, (v % 4 == 0) as i32);
                let null = 0u64;
                b.arg(&logits).arg(&tc).arg(&ec).arg(&mut lc);
                match dl.as_mut() { Some(d) => b.arg(d), None => b.arg(&null) };
                b.arg(&v32).arg(&gs).arg(&vec);
                unsafe { b.launch(cfg((rows as u32, 1, 1), 256)) }.w()?;
            }
            if let (Some(dl), Some(dh_s)) = (dl, dh_s.as_mut()) {
                let (dhc, _) = lora_main::<T, T>(&dev, &format!("lora_bwd_dx_{sfx}"), &dl.slice(..), Some(&wv), None, None, None, 0.0, rows, h, v, 0, true, false)?;
                let mut dst = dh_s.slice_mut(r0 * h..(r0 + rows) * h);
                dev.memcpy_dtod(&dhc.expect("dH with h > 0"), &mut dst)?;
            }
            r0 += rows;
        }
        let loss = tensor(CudaStorage::wrap_cuda_slice(loss_s, dev.clone()), n.max(1)).narrow(0, 0, n)?;
        let dh = match dh_s {
            Some(d) => Some(tensor(CudaStorage::wrap_cuda_slice(d, dev.clone()), (n * h).max(1)).narrow(0, 0, n * h)?.reshape((n, h))?),
            None => None,
        };
        Ok((loss, dh))
    })
}

/// Returns `value` in the forward; its backward is `grad * upstream` for the input.
struct PrecomputedGrad {
    value: Tensor,
    grad: Tensor,
}
impl CustomOp1 for PrecomputedGrad {
    fn name(&self) -> &'static str {
        "lora-precomputed-grad"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
        bail!("lora-precomputed-grad is CUDA only")
    }
    fn cuda_fwd(&self, _s: &CudaStorage, _l: &Layout) -> Result<(CudaStorage, Shape)> {
        let value = self.value.contiguous()?;
        with_cuda(&value, |s, l| {
            let dev = &s.device;
            let src = view::<f32>(s, l)?;
            let mut dst = unsafe { dev.alloc::<f32>(src.len().max(1))? };
            if !src.is_empty() {
                dev.memcpy_dtod(&src, &mut dst)?;
            }
            Ok((CudaStorage::wrap_cuda_slice(dst, dev.clone()), value.shape().clone()))
        })
    }
    /// A scalar value (the summed loss) scales every row by the upstream scalar; a
    /// per-row value [n] scales row i of `grad` [n, h] by the upstream element i.
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(self.grad.dtype())?;
        let g = if g.rank() == 1 { g.unsqueeze(1)? } else { g };
        Ok(Some(self.grad.broadcast_mul(&g)?))
    }
}

// ------------------------------------------------------------------------------- AdamW

/// Fused AdamW over all LoRA tensors (f32 params, grads and moments on one CUDA device),
/// one kernel launch per step; PyTorch AdamW semantics.
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
}

struct Tables {
    table: candle_core::cuda_backend::cudarc::driver::CudaSlice<u64>,
    sizes: candle_core::cuda_backend::cudarc::driver::CudaSlice<i64>,
    btensor: candle_core::cuda_backend::cudarc::driver::CudaSlice<i32>,
    bstart: candle_core::cuda_backend::cudarc::driver::CudaSlice<i64>,
    nblocks: usize,
}

const ADAMW_CHUNK: usize = 4096;

fn build_tables(params: &[(&Tensor, &Tensor, &Tensor, &Tensor)]) -> Result<(candle_core::cuda_backend::CudaDevice, Tables)> {
    let dev = rt::cuda_device(params.first().map(|p| p.0.device()).ok_or_else(|| candle_core::Error::Msg("no params".into()))?)?.clone();
    let stream = dev.cuda_stream();
    let mut ptrs: Vec<u64> = Vec::new();
    let mut sizes: Vec<i64> = Vec::new();
    let mut btensor: Vec<i32> = Vec::new();
    let mut bstart: Vec<i64> = Vec::new();
    for (i, (p, g, m, v)) in params.iter().enumerate() {
        let n = p.elem_count();
        for t in [p, g, m, v] {
            if t.dtype() != DType::F32 || t.elem_count() != n || !t.is_contiguous() {
                bail!("adamw: tensor {i} must be contiguous f32 with {n} elements");
            }
            let ptr = with_cuda(t, |s, l| {
                let v = view::<f32>(s, l)?;
                let (ptr, _sync) = candle_core::cuda_backend::cudarc::driver::DevicePtr::device_ptr(&v, &stream);
                Ok(ptr)
            })?;
            ptrs.push(ptr);
        }
        sizes.push(n as i64);
        for s in (0..n).step_by(ADAMW_CHUNK) {
            btensor.push(i as i32);
            bstart.push(s as i64);
        }
    }
    let tables = Tables {
        table: stream.clone_htod(&ptrs).w()?,
        sizes: stream.clone_htod(&sizes).w()?,
        btensor: stream.clone_htod(&btensor).w()?,
        bstart: stream.clone_htod(&bstart).w()?,
        nblocks: btensor.len(),
    };
    Ok((dev, tables))
}

impl AdamW {
    /// Global L2 norm of all gradients (one launch + one 4-byte copy).
    pub fn grad_norm(params: &[(&Tensor, &Tensor, &Tensor, &Tensor)]) -> Result<f32> {
        let (dev, t) = build_tables(params)?;
        let f = rt::func(&dev, "adamw", "sqnorm_multi")?;
        let mut out = dev.alloc_zeros::<f32>(1)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&t.table).arg(&t.sizes).arg(&t.btensor).arg(&t.bstart).arg(&mut out);
        unsafe { b.launch(cfg((t.nblocks as u32, 1, 1), 256)) }.w()?;
        Ok(dev.clone_dtoh(&out)?[0].sqrt())
    }

    /// One step over `(param, grad, m, v)` tuples; `grad_scale` multiplies every
    /// gradient (global-norm clipping). Increments `self.step` first.
    pub fn step(&mut self, params: &[(&Tensor, &Tensor, &Tensor, &Tensor)], grad_scale: f32) -> Result<()> {
        if params.is_empty() {
            return Ok(());
        }
        self.step += 1;
        let (dev, t) = build_tables(params)?;
        let f = rt::func(&dev, "adamw", "adamw_multi")?;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        let a = [self.lr as f32, self.beta1 as f32, self.beta2 as f32, self.eps as f32, self.weight_decay as f32, bc1 as f32, bc2 as f32, grad_scale];
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&t.table).arg(&t.sizes).arg(&t.btensor).arg(&t.bstart);
        for x in &a {
            b.arg(x);
        }
        unsafe { b.launch(cfg((t.nblocks as u32, 1, 1), 256)) }.w()?;
        Ok(())
    }
}

// ------------------------------------------------------------------- dequantization

/// The CUDA storage and layout of each tensor (all on one device), held for a launch.
fn cuda_inputs<'a, G: std::ops::Deref<Target = candle_core::Storage>>(guards: &'a [(G, &'a Layout)]) -> Result<Vec<(&'a CudaStorage, &'a Layout)>> {
    guards.iter().map(|(s, l)| Ok((as_cuda(s)?, *l))).collect()
}

/// NF4 weights as bitsandbytes stores them (double-quantized absmax: `models/src/quant.rs`)
/// dequantized on the device into a dense `[rows, cols]` tensor of `dtype`, equal bit for
/// bit to the CPU dequantization (in f32; bf16/f16 round that once). `packed`: `rows*cols/2`
/// bytes (u8); `qabsmax`: one u8 per 64 values; `absmax_scale`: one f32 per 256 absmax
/// values; `dmap`: the 256-entry dynamic map; `code16`: the 16 NF4 values.
#[allow(clippy::too_many_arguments)]
pub fn nf4_dequantize(packed: &Tensor, qabsmax: &Tensor, absmax_scale: &Tensor, dmap: &Tensor, code16: &Tensor, offset: f32, rows: usize, cols: usize, dtype: DType) -> Result<Tensor> {
    let n = rows * cols;
    if n % 64 != 0 || packed.elem_count() * 2 != n || qabsmax.elem_count() != n / 64 || code16.elem_count() != 16 || dmap.elem_count() != 256 {
        bail!("nf4_dequantize: inconsistent buffers for a {rows} x {cols} weight");
    }
    let ins = [packed, qabsmax, absmax_scale, dmap, code16].map(|t| t.contiguous()).into_iter().collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ins.iter().map(|t| t.storage_and_layout()).collect();
    let st = cuda_inputs(&guards)?;
    let dev = st[0].0.device.clone();
    let out = dispatch!(dtype, T => {
        let (p, q) = (view::<u8>(st[0].0, st[0].1)?, view::<u8>(st[1].0, st[1].1)?);
        let (sc, dm, c16) = (view::<f32>(st[2].0, st[2].1)?, view::<f32>(st[3].0, st[3].1)?, view::<f32>(st[4].0, st[4].1)?);
        let mut o = unsafe { dev.alloc::<T>(n)? };
        let f = rt::func(&dev, "dequant", &format!("nf4_dequant_{}", rt::suffix(dtype)?))?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let n64 = n as i64;
        b.arg(&p).arg(&q).arg(&sc).arg(&dm).arg(&c16).arg(&offset).arg(&mut o).arg(&n64);
        unsafe { b.launch(cfg((ceil_div(n / 2, 256), 1, 1), 256)) }.w()?;
        CudaStorage::wrap_cuda_slice(o, dev.clone())
    });
    Ok(tensor(out, (rows, cols)))
}

/// int8 weights as bitsandbytes' `int8_vectorwise_quant` stores them (`codes`: `rows*cols`
/// i8 as u8 bytes; `row_absmax`: one f32 a row) dequantized on the device, bit for bit the
/// CPU dequantization.
pub fn int8_dequantize(codes: &Tensor, row_absmax: &Tensor, rows: usize, cols: usize, dtype: DType) -> Result<Tensor> {
    let n = rows * cols;
    if codes.elem_count() != n || row_absmax.elem_count() != rows {
        bail!("int8_dequantize: inconsistent buffers for a {rows} x {cols} weight");
    }
    let ins = [codes, row_absmax].map(|t| t.contiguous()).into_iter().collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ins.iter().map(|t| t.storage_and_layout()).collect();
    let st = cuda_inputs(&guards)?;
    let dev = st[0].0.device.clone();
    let out = dispatch!(dtype, T => {
        let (c, am) = (view::<u8>(st[0].0, st[0].1)?, view::<f32>(st[1].0, st[1].1)?);
        let mut o = unsafe { dev.alloc::<T>(n)? };
        let f = rt::func(&dev, "dequant", &format!("int8_dequant_{}", rt::suffix(dtype)?))?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (r64, c64) = (rows as i64, cols as i64);
        b.arg(&c).arg(&am).arg(&mut o).arg(&r64).arg(&c64);
        unsafe { b.launch(cfg((ceil_div(n, 256), 1, 1), 256)) }.w()?;
        CudaStorage::wrap_cuda_slice(o, dev.clone())
    });
    Ok(tensor(out, (rows, cols)))
}
