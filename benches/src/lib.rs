//! Shared helpers of the benchmark binaries: peak RSS, the machine's GEMM ceiling,
//! FLOP counts of a LoRA training step.
use std::time::Instant;

/// See [`lora_kernels::configure_cpu`].
pub fn init_threads() {
    lora_kernels::configure_cpu();
}

/// Peak resident set size of this process in MiB (VmHWM).
pub fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// CPU seconds (user + system) this process has used so far (/proc/self/stat; its
/// clock ticks are 100 per second on Linux).
pub fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14, 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    if f.len() < 13 {
        return f64::NAN;
    }
    (f[11] + f[12]) / 100.0
}

/// Best-of-`reps` f32 GEMM throughput (GFLOP/s) of an n^3 product through the
/// `gemm` crate on all rayon threads: this machine's practical FLOP ceiling.
pub fn gemm_ceiling_gflops(n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7 % 13) as f32) * 0.01).collect();
    let b = a.clone();
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        unsafe {
            gemm::gemm(
                n, n, n, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, n as isize, b.as_ptr(), 1, n as isize, 0.0, 1.0,
                false, false, false, par,
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n as f64).powi(3) / best / 1e9
}

/// Best-of-`reps` bf16 x bf16 -> f32 GEMM throughput (GFLOP/s) of an n^3 product
/// through `lora_kernels::gemm_bf16` (AVX512-BF16, packing included), or None where
/// the CPU has no bf16 dot product (bf16 matmuls then run the f32 GEMM).
pub fn bf16_gemm_ceiling_gflops(n: usize, reps: usize) -> Option<f64> {
    use lora_kernels::gemm_bf16::{matmul, AnyMat, Src};
    if !lora_kernels::gemm_bf16::available() {
        return None;
    }
    let a: Vec<half::bf16> = (0..n * n).map(|i| half::bf16::from_f32(((i * 7 % 13) as f32) * 0.01)).collect();
    let mut c = vec![0f32; n * n];
    let best = time_best(reps, || {
        matmul(&mut c, n, false, AnyMat::new(Src::Bf16(&a), n, n), AnyMat::new(Src::Bf16(&a), n, n), 1.0);
    });
    std::hint::black_box(&c);
    Some(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// What the benchmark ran on: CPU model and the SIMD features that pick our kernels.
pub fn cpu_info() -> serde_json::Value {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let num = |name: &str| field(name).parse::<u32>().ok();
    serde_json::json!({
        "model": field("model name"),
        // AMD: family 25 = Zen 3/4 (model 17 = Genoa, Zen 4: 512-bit ops on 256-bit
        // units), 26 = Zen 5 (full 512-bit units, ~2x the AVX-512 FLOP rate).
        "family": num("cpu family"), "model_number": num("model"), "stepping": num("stepping"),
        "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "avx2": has("avx2"), "fma": has("fma"), "avx512f": has("avx512f"),
        "avx512_bf16": has("avx512_bf16"), "amx_bf16": has("amx_bf16"), "amx_tile": has("amx_tile"),
    })
}

/// Shapes needed to count the FLOPs of a step.
pub struct StepShape {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rank: usize,
    pub batch: usize,
    pub seq: usize,
}

impl StepShape {
    /// (in, out) of the seven projections of one layer.
    pub fn projections(&self) -> [(usize, usize); 7] {
        let (h, i) = (self.hidden, self.intermediate);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    }

    /// Model FLOPs of one LoRA training step (frozen base): every base matmul runs
    /// forward (2 P) and input-gradient (2 P) per token, no weight gradient; LoRA
    /// paths cost ~6 r (in + out) per token; causal attention 6 T^2 d per head and
    /// sequence (forward QK^T, PV on the lower triangle; backward dV, dP, dQ, dK).
    /// Recomputation (attention scores in backward) is not counted.
    pub fn flops(&self) -> f64 {
        let tokens = (self.batch * self.seq) as f64;
        let proj = self.projections();
        let p_layer: usize = proj.iter().map(|(i, o)| i * o).sum();
        let lora_layer: usize = proj.iter().map(|(i, o)| i + o).sum::<usize>() * self.rank;
        let p = (p_layer * self.layers + self.hidden * self.vocab) as f64;
        let lora = (lora_layer * self.layers) as f64;
        let attn = 6.0 * (self.seq as f64).powi(2) * (self.head_dim * self.heads) as f64 * (self.batch * self.layers) as f64;
        4.0 * p * tokens + 6.0 * lora * tokens + attn
    }
}

/// Seconds of `f` (best of `reps` after one warm-up call).
pub fn time_best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}
