//! `lora-train devices [--json]`: the CPU's threads and the vector code our CPU kernels
//! run (AVX-512 / AVX2 / baseline, and whether bf16 matmuls have the AVX512-BF16 dot
//! product), then every GPU with name, compute capability, total and free memory, or
//! one clear line saying why there is none. Always exits 0 (listing nothing is an
//! answer, not an error).
use crate::device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Our own loops' instruction set (`LORA_KERNELS_ISA` caps it) and whether bf16
/// matmuls run the AVX512-BF16 kernel (`LORA_KERNELS_NO_BF16_DOT` turns it off).
fn cpu_kernels() -> (&'static str, bool) {
    let isa = match lora_kernels::simd::isa() {
        lora_kernels::simd::Isa::Avx512 => "avx512",
        lora_kernels::simd::Isa::Avx2 => "avx2",
        lora_kernels::simd::Isa::Baseline => "baseline",
    };
    (isa, lora_kernels::gemm_bf16::available())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let gpus = device::list_gpus();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (isa, bf16_dot) = cpu_kernels();
    if args.json {
        let (list, reason) = match &gpus {
            Ok(g) => (g.clone(), if g.is_empty() { Some("no CUDA GPU found".to_string()) } else { None }),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let obj = serde_json::json!({
            "cuda_feature": device::CUDA_BUILT,
            "cpu_threads": cpus,
            "cpu_vector_isa": isa,
            "cpu_bf16_dot": bf16_dot,
            "gpus": list.iter().map(|g| serde_json::json!({
                "index": g.index,
                "device": format!("cuda:{}", g.index),
                "name": g.name,
                "compute_capability": format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
                "total_memory_bytes": g.total_memory,
                "free_memory_bytes": g.free_memory,
            })).collect::<Vec<_>>(),
            "no_gpu_reason": reason,
        });
        println!("{obj}");
        return Ok(());
    }
    let bf16 = if bf16_dot { "bf16 matmuls on the AVX512-BF16 kernel" } else { "bf16 matmuls widen to f32 (no AVX512-BF16 dot product)" };
    println!("cpu: {cpus} threads, vector code {isa}, {bf16}");
    match gpus {
        Ok(g) if g.is_empty() => println!("no CUDA GPU found"),
        Ok(g) => {
            for d in g {
                println!(
                    "cuda:{}  {}  compute {}.{}  memory {:.1} GiB total, {:.1} GiB free",
                    d.index, d.name, d.compute_capability.0, d.compute_capability.1, gib(d.total_memory), gib(d.free_memory)
                );
            }
        }
        Err(e) => println!("no GPU: {e}"),
    }
    Ok(())
}
