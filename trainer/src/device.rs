//! `--device cpu | cuda | cuda:N | auto` -> a candle `Device`, with clear errors (never a
//! panic) when the build has no CUDA support, the driver is missing, or the GPU index
//! does not exist. `auto` picks the first GPU when there is one, else the CPU.
use anyhow::{anyhow, bail, Result};
use candle_core::Device;

/// What `--device` asked for, before any driver call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Auto,
}

pub fn parse_spec(spec: &str) -> Result<DeviceSpec> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(DeviceSpec::Cpu),
        "auto" => Ok(DeviceSpec::Auto),
        "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
        _ => {
            let idx = s.strip_prefix("cuda:").or_else(|| s.strip_prefix("gpu:"));
            match idx.map(|i| i.parse::<usize>()) {
                Some(Ok(i)) => Ok(DeviceSpec::Cuda(i)),
                _ => bail!("unknown device '{spec}': expected cpu, cuda, cuda:N or auto"),
            }
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The CUDA driver's view of the machine, or why there is none.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub free_memory: usize,
}

/// Number of CUDA GPUs, or a human-readable reason why none can be used.
pub fn cuda_device_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::result;
        let r = std::panic::catch_unwind(|| -> std::result::Result<usize, String> {
            result::init().map_err(|e| describe_driver_error(&format!("{e:?}")))?;
            result::device::get_count().map(|c| c as usize).map_err(|e| format!("{e:?}"))
        });
        match r {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(anyhow!("no usable CUDA driver: {e}")),
            Err(_) => Err(anyhow!("no usable CUDA driver: the CUDA driver library (libcuda) could not be loaded")),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(anyhow!("{}", NOT_BUILT))
    }
}

pub const NOT_BUILT: &str = "this lora-train was built without the cuda feature; rebuild with \
    `cargo build --release --features cuda` (README, GPU section) to use a GPU";

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn describe_driver_error(e: &str) -> String {
    if e.contains("STUB_LIBRARY") {
        format!("{e}: only the CUDA stub library is installed (no NVIDIA driver on this machine)")
    } else if e.contains("NO_DEVICE") {
        format!("{e}: the driver sees no GPU")
    } else if e.contains("INSUFFICIENT_DRIVER") {
        format!("{e}: the NVIDIA driver is older than the CUDA version this binary was built with")
    } else {
        e.to_string()
    }
}

/// Name, compute capability and memory of every GPU.
pub fn list_gpus() -> Result<Vec<GpuInfo>> {
    let n = cuda_device_count()?;
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        let mut out = Vec::with_capacity(n);
        for index in 0..n {
            let ctx = CudaContext::new(index).map_err(|e| anyhow!("GPU {index}: {e:?}"))?;
            let name = ctx.name().map_err(|e| anyhow!("GPU {index}: {e:?}"))?;
            let compute_capability = ctx.compute_capability().map_err(|e| anyhow!("GPU {index}: {e:?}"))?;
            let total_memory = ctx.total_mem().map_err(|e| anyhow!("GPU {index}: {e:?}"))?;
            let (free_memory, _) = ctx.mem_get_info().map_err(|e| anyhow!("GPU {index}: {e:?}"))?;
            out.push(GpuInfo { index, name, compute_capability, total_memory, free_memory });
        }
        Ok(out)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = n;
        Ok(Vec::new())
    }
}

/// `--device` as a list of replicas: `cuda:0,cuda:1` trains one run data-parallel over
/// both (`sft` only); a single device is a list of one. Every entry is checked here.
pub fn device_list(spec: &str) -> Result<Vec<String>> {
    let list: Vec<String> = spec.split(',').map(|d| d.trim().to_string()).collect();
    for d in &list {
        parse_spec(d).map_err(|e| anyhow!("--device {spec}: {e}"))?;
    }
    if list.len() > 1 && list.iter().any(|d| parse_spec(d).ok() == Some(DeviceSpec::Auto)) {
        bail!("--device {spec}: name each device of a data-parallel run (cpu, cuda:N), not auto");
    }
    Ok(list)
}

/// Parse `--device` into a candle device. Errors (never panics) when CUDA is asked for
/// and cannot be had; `auto` falls back to the CPU silently except for a log line.
pub fn parse_device(spec: &str) -> Result<Device> {
    if spec.contains(',') {
        bail!("--device {spec}: several devices (data-parallel training) are supported by `sft` only; give one device");
    }
    match parse_spec(spec)? {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(i) => cuda_device(i).map_err(|e| anyhow!("--device {spec}: {e}")),
        DeviceSpec::Auto => match cuda_device_count() {
            Ok(n) if n > 0 => cuda_device(0),
            Ok(_) => {
                tracing::info!("--device auto: no GPU found, using the CPU");
                Ok(Device::Cpu)
            }
            // A CPU-only build choosing the CPU is the expected case: not worth a log line.
            Err(e) if !cfg!(feature = "cuda") => {
                tracing::debug!("--device auto: using the CPU ({e})");
                Ok(Device::Cpu)
            }
            Err(e) => {
                tracing::info!("--device auto: using the CPU ({e})");
                Ok(Device::Cpu)
            }
        },
    }
}

fn cuda_device(i: usize) -> Result<Device> {
    let n = cuda_device_count()?;
    if i >= n {
        bail!("GPU {i} does not exist ({n} CUDA device{} found)", if n == 1 { "" } else { "s" });
    }
    #[cfg(feature = "cuda")]
    {
        std::panic::catch_unwind(|| Device::new_cuda(i))
            .map_err(|_| anyhow!("creating CUDA device {i} panicked (CUDA libraries missing?)"))?
            .map_err(|e| anyhow!("creating CUDA device {i}: {e}"))
    }
    #[cfg(not(feature = "cuda"))]
    {
        bail!("{NOT_BUILT}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse_spec("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(parse_spec("CUDA:3").unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(parse_spec("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(parse_spec("auto").unwrap(), DeviceSpec::Auto);
        assert!(parse_spec("tpu").is_err());
        assert!(parse_spec("cuda:x").is_err());
    }

    #[test]
    fn cpu_and_auto_never_fail() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        // auto: the CPU here (no GPU in CI), a GPU elsewhere; never an error.
        parse_device("auto").unwrap();
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let e = parse_device("cuda:0").unwrap_err().to_string();
        assert!(e.contains("built without the cuda feature"), "{e}");
    }
}
