//! Our LoRA training step, measured like `benches/torch/peft_train_bench.py`:
//! random token ids [batch, seq] (a fresh batch each step), causal-LM loss over all
//! positions (mean), backward, AdamW on the LoRA parameters only.
//!
//!     train_step --model PATH [--dtype f32|bf16] [--batch 4] [--seq 256] [--rank 16]
//!                [--alpha 32] [--steps 5] [--warmup 1] [--seed 0] [--profile]
//!
//! Prints ONE JSON line: tokens_per_s, step_s, peak_rss_mb, gemm_gflops (2048^3 f32
//! sgemm measured in-process), model_gflop_per_step, mfu, and with --profile the
//! seconds per step spent in each fused op (the remainder is candle's own ops).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use lora_benches::{bf16_gemm_ceiling_gflops, cpu_info, gemm_ceiling_gflops, peak_rss_mb, StepShape};
use lora_models::lora::LoraConfig;
use std::time::Instant;

struct Args {
    model: String,
    dtype: DType,
    batch: usize,
    seq: usize,
    rank: usize,
    alpha: f64,
    steps: usize,
    warmup: usize,
    seed: u64,
    profile: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        model: String::new(),
        dtype: DType::F32,
        batch: 4,
        seq: 256,
        rank: 16,
        alpha: f64::NAN,
        steps: 5,
        warmup: 1,
        seed: 0,
        profile: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--model" => a.model = v()?,
            "--dtype" => {
                a.dtype = match v()?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    d => bail!("unknown dtype {d}"),
                }
            }
            "--batch" => a.batch = v()?.parse()?,
            "--seq" => a.seq = v()?.parse()?,
            "--rank" => a.rank = v()?.parse()?,
            "--alpha" => a.alpha = v()?.parse()?,
            "--steps" => a.steps = v()?.parse()?,
            "--warmup" => a.warmup = v()?.parse()?,
            "--seed" => a.seed = v()?.parse()?,
            "--profile" => a.profile = true,
            _ => bail!("unknown argument {k}"),
        }
    }
    if a.model.is_empty() {
        bail!("--model is required");
    }
    if a.alpha.is_nan() {
        a.alpha = 2.0 * a.rank as f64;
    }
    Ok(a)
}

/// AdamW with PyTorch's update rule (decoupled weight decay), f32 state.
struct AdamW {
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
}

impl AdamW {
    fn new(params: Vec<Var>) -> Result<Self> {
        let m = params.iter().map(|p| p.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW { params, m, v, t: 0 })
    }

    fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64) -> Result<()> {
        let (b1, b2, eps, wd) = (0.9f64, 0.999f64, 1e-8f64, 0.01f64);
        self.t += 1;
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for ((p, m), v) in self.params.iter().zip(&mut self.m).zip(&mut self.v) {
            let Some(g) = grads.get(p.as_tensor()) else { continue };
            *m = ((&*m * b1)? + (g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let upd = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + eps)?)?;
            let next = ((p.as_tensor() * (1.0 - lr * wd))? - (upd * lr)?)?;
            p.set(&next)?;
        }
        Ok(())
    }
}

/// xorshift64* token ids in [0, vocab).
fn batch_ids(state: &mut u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|_| {
            *state ^= *state >> 12;
            *state ^= *state << 25;
            *state ^= *state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as u32 % vocab as u32
        })
        .collect()
}

fn main() -> Result<()> {
    lora_benches::init_threads();
    let a = parse()?;
    let dev = Device::Cpu;
    let gemm_gflops = gemm_ceiling_gflops(2048, 3);
    let bf16_gflops = bf16_gemm_ceiling_gflops(2048, 3);
    let t_load = Instant::now();
    let mut loaded = lora_models::load_model(&a.model, &dev, a.dtype)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let rss_after_load_mb = peak_rss_mb();
    let lcfg = LoraConfig { rank: a.rank, alpha: a.alpha, ..LoraConfig::default() };
    loaded.model.add_lora(&lcfg, a.seed)?;
    let model = &loaded.model;
    let cfg = model.config().clone();
    let params: Vec<Var> = model.lora_parameters().into_iter().map(|(_, v)| v).collect();
    let n_params: usize = params.iter().map(|p| p.elem_count()).sum();
    let mut opt = AdamW::new(params.clone())?;
    let (b, t) = (a.batch, a.seq);
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let positions = Tensor::from_vec(positions, (b, t), &dev)?;
    let mask = Tensor::ones((b, t), DType::F32, &dev)?;
    let mut rng = a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut each = vec![];
    let (mut fwd_s, mut bwd_s, mut opt_s) = (0.0, 0.0, 0.0);
    let mut last_loss = f32::NAN;
    let mut cpu_s = 0.0;
    let mut grads_ok = true;
    for step in 0..a.warmup + a.steps {
        let timed = step >= a.warmup;
        if timed && a.profile {
            lora_kernels::profile::set_enabled(true);
        }
        let ids = Tensor::from_vec(batch_ids(&mut rng, b * t, cfg.vocab_size), (b, t), &dev)?;
        let t0 = Instant::now();
        let c0 = lora_benches::process_cpu_s();
        let hidden = model.forward_hidden(&ids, &positions, None)?;
        let loss = (model.loss_sum(&hidden, &ids, &mask)? / (b * (t - 1)) as f64)?;
        last_loss = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        if step == 0 {
            // A's gradient is zero while B is zero at init; B's must not be.
            grads_ok = params.iter().all(|p| grads.get(p.as_tensor()).is_some());
        }
        opt.step(&grads, 1e-4)?;
        drop(grads);
        let t3 = Instant::now();
        if timed {
            each.push((t3 - t0).as_secs_f64());
            cpu_s += lora_benches::process_cpu_s() - c0;
            fwd_s += (t1 - t0).as_secs_f64();
            bwd_s += (t2 - t1).as_secs_f64();
            opt_s += (t3 - t2).as_secs_f64();
        }
    }
    // The ceiling again after the run; keep the better one (other jobs share the cores).
    let gemm_gflops = gemm_gflops.max(gemm_ceiling_gflops(2048, 3));
    let bf16_gflops = bf16_gflops.zip(bf16_gemm_ceiling_gflops(2048, 3)).map(|(a, b)| a.max(b));
    // The ceiling of the GEMM this run's frozen matmuls use: the bf16 kernel for bf16
    // weights where the CPU has it, the f32 sgemm otherwise.
    let ceiling = match (a.dtype, bf16_gflops) {
        (DType::BF16, Some(g)) => g,
        _ => gemm_gflops,
    };
    let steps = a.steps.max(1) as f64;
    let step_s = each.iter().sum::<f64>() / steps;
    let shape = StepShape {
        layers: cfg.num_hidden_layers,
        hidden: cfg.hidden_size,
        intermediate: cfg.intermediate_size,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        vocab: cfg.vocab_size,
        rank: a.rank,
        batch: b,
        seq: t,
    };
    let flops = shape.flops();
    let mut profile = serde_json::Map::new();
    let mut in_ops = 0.0;
    for (name, secs, calls) in lora_kernels::profile::totals() {
        if !lora_kernels::profile::is_part(name) {
            in_ops += secs;
        }
        profile.insert(name.to_string(), serde_json::json!({"s_per_step": secs / steps, "calls_per_step": calls as f64 / steps}));
    }
    let out = serde_json::json!({
        "impl": "lora-train (candle + lora-kernels)",
        "model": a.model,
        "dtype": if a.dtype == DType::F32 { "f32" } else { "bf16" },
        "batch": b, "seq": t, "rank": a.rank, "alpha": a.alpha,
        "steps": a.steps, "warmup": a.warmup,
        "threads": rayon::current_num_threads(),
        "lora_params": n_params,
        "grads_ok": grads_ok,
        "loss": last_loss,
        "tokens_per_s": (b * t) as f64 / step_s,
        "step_s": step_s,
        "step_s_each": each,
        // On a shared machine: how much of its threads' cores the step got (1.0 = all),
        // and tokens per CPU-second (comparable across loads, like the PyTorch side's).
        "cpu_share": cpu_s / (each.iter().sum::<f64>() * rayon::current_num_threads() as f64),
        "tokens_per_cpu_s": (b * t) as f64 * steps / cpu_s,
        "fwd_s": fwd_s / steps, "bwd_s": bwd_s / steps, "opt_s": opt_s / steps,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_after_load_mb": rss_after_load_mb,
        "cpu": cpu_info(),
        "bf16_dot": lora_kernels::gemm_bf16::available(),
        "gemm_gflops": gemm_gflops,
        "bf16_gemm_gflops": bf16_gflops,
        "ceiling_gflops": ceiling,
        "model_gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / 1e9 / step_s,
        "mfu": flops / 1e9 / step_s / ceiling,
        "floor_step_s": flops / 1e9 / ceiling,
        "profile": if a.profile { serde_json::Value::Object(profile) } else { serde_json::Value::Null },
        "profile_other_s_per_step": if a.profile { serde_json::json!(step_s - in_ops / steps) } else { serde_json::Value::Null },
    });
    println!("{out}");
    Ok(())
}
