//! NVRTC compilation with an on-disk PTX cache, and small launch helpers.
use super::sources::{self, KernelModule};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView, DevicePtr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Device, Layout, Result, Storage, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// Where compiled PTX is cached: `$LORA_TRAIN_CACHE/kernels` (default
/// `~/.cache/lora-train/kernels`). Keys hash the source, options and NVRTC version.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("LORA_TRAIN_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join(".cache/lora-train")
    });
    base.join("kernels")
}

pub fn nvrtc_version() -> (i32, i32) {
    let (mut maj, mut min) = (0i32, 0i32);
    unsafe { candle_core::cuda_backend::cudarc::nvrtc::sys::nvrtcVersion(&mut maj, &mut min) };
    (maj, min)
}

/// `sm_XY` of a candle CUDA device.
pub fn device_arch(dev: &CudaDevice) -> Result<String> {
    let (maj, min) = dev.cuda_stream().context().compute_capability().w()?;
    Ok(format!("sm_{maj}{min}"))
}

static PTX: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

fn module(name: &str) -> Result<&'static KernelModule> {
    sources::MODULES
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| candle_core::Error::Msg(format!("no CUDA module {name}")))
}

/// PTX of `module` for `arch`: memory, then disk cache, then NVRTC.
pub fn ptx_for(module_name: &str, arch: &str) -> Result<(String, String)> {
    let m = module(module_name)?;
    let key = sources::cache_key(m, arch, nvrtc_version());
    let mut guard = PTX.lock().unwrap_or_else(|e| e.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(p) = map.get(&key) {
        return Ok((key, p.clone()));
    }
    let path = cache_dir().join(format!("{key}.ptx"));
    let ptx = match std::fs::read_to_string(&path) {
        Ok(p) if p.contains(".entry") => p,
        _ => {
            use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
            let opts = CompileOptions { options: sources::nvrtc_options(arch), ..Default::default() };
            let ptx = compile_ptx_with_opts(sources::full_source(m), opts)
                .map_err(|e| candle_core::Error::Msg(format!("NVRTC failed for {module_name} ({arch}): {e}")))?
                .to_src();
            if std::fs::create_dir_all(cache_dir()).is_ok() {
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &ptx).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
            ptx
        }
    };
    map.insert(key.clone(), ptx.clone());
    Ok((key, ptx))
}

/// Load (compiling if needed) `kernel` of `module_name` on `dev`.
pub fn func(dev: &CudaDevice, module_name: &str, kernel: &str) -> Result<CudaFunction> {
    let arch = device_arch(dev)?;
    let (key, ptx) = ptx_for(module_name, &arch)?;
    Ok(dev.get_or_load_custom_func(kernel, &key, &ptx)?.into_cuda_function())
}

/// Kernel-name suffix of a dtype.
pub fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::F32 => Ok("float"),
        d => candle_core::bail!("lora-kernels CUDA: unsupported dtype {d:?}"),
    }
}

pub fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

pub fn ceil_div(a: usize, b: usize) -> u32 {
    a.div_ceil(b) as u32
}

/// A contiguous view of a storage (its layout must be contiguous).
pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (o1, o2) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("lora-kernels CUDA: input must be contiguous".into()))?;
    Ok(s.as_cuda_slice::<T>()?.slice(o1..o2))
}

/// Whether a view can be read with 16-byte vector loads given a leading dimension.
pub fn vec_ok<T>(v: &CudaView<'_, T>, dev: &CudaDevice, ld: usize) -> bool {
    let stream = dev.cuda_stream();
    let (ptr, _sync) = v.device_ptr(&stream);
    ptr % 16 == 0 && (ld * std::mem::size_of::<T>()) % 16 == 0
}

/// Run `f` on the CUDA storage and layout of `t`.
pub fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cuda(s) => f(s, l),
        _ => candle_core::bail!("lora-kernels CUDA: tensor is not on a CUDA device"),
    }
}

/// Wrap a fresh CUDA storage as a tensor with no gradient history.
pub fn tensor(s: CudaStorage, shape: impl Into<candle_core::Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape, candle_core::op::BackpropOp::none(), false)
}

pub fn cuda_device(d: &Device) -> Result<&CudaDevice> {
    match d {
        Device::Cuda(c) => Ok(c),
        _ => candle_core::bail!("lora-kernels CUDA: not a CUDA device"),
    }
}
