//! Per-op micro-benchmarks at SmolLM2-135M training shapes (batch 4 x 256 tokens):
//! each fused op (forward + backward) against its composite candle version, plus
//! GFLOP/s for the matmul ops and the machine's 2048^3 sgemm ceiling.
//!
//!     ops_bench [--dtype f32|bf16] [--reps 5]
//!     ops_bench --attention-seq 4096 [--dtype f32|bf16] [--reps 3]
//!
//! `--attention-seq T` times only the fused causal attention (forward, forward +
//! backward) at batch 1 x T tokens, SmolLM2's 9 query / 3 kv heads of 64, against the
//! sgemm ceiling (the composite would hold a 9 x T x T score tensor).
//!
//! Prints one JSON line.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use lora_benches::{gemm_ceiling_gflops, time_best};
use lora_kernels as k;
use lora_kernels::reference as r;

fn randn(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn var(shape: &[usize], dtype: DType) -> Tensor {
    Var::from_tensor(&randn(shape, dtype)).unwrap().as_tensor().clone()
}

/// Forward + backward through `f`, best of `reps` seconds.
fn fb(reps: usize, f: impl Fn() -> candle_core::Result<Tensor>) -> f64 {
    time_best(reps, || {
        let y = f().unwrap();
        let l = y.to_dtype(DType::F32).unwrap().sum_all().unwrap();
        std::hint::black_box(l.backward().unwrap());
    })
}

fn fwd(reps: usize, f: impl Fn() -> candle_core::Result<Tensor>) -> f64 {
    time_best(reps, || {
        std::hint::black_box(f().unwrap());
    })
}

fn main() -> Result<()> {
    lora_benches::init_threads();
    let mut dtype = DType::F32;
    let mut reps = 5usize;
    let mut attention_seq = None;
    let args: Vec<String> = std::env::args().collect();
    for i in 1..args.len() {
        match args[i].as_str() {
            "--dtype" if args.get(i + 1).map(String::as_str) == Some("bf16") => dtype = DType::BF16,
            "--reps" => reps = args[i + 1].parse()?,
            "--attention-seq" => attention_seq = Some(args[i + 1].parse::<usize>()?),
            _ => {}
        }
    }
    if let Some(t) = attention_seq {
        return attention_only(t, dtype, reps);
    }
    let (b, t, h, inter, hq, hkv, d, vocab, rank) = (4usize, 256usize, 576usize, 1536usize, 9usize, 3usize, 64usize, 49152usize, 16usize);
    let n = b * t;
    let ceiling = gemm_ceiling_gflops(2048, 3);
    let mut rows = vec![];
    let mut add = |name: &str, gflop: f64, fused: (f64, f64), reference: (f64, f64)| {
        rows.push(serde_json::json!({
            "op": name,
            "fused_fwd_ms": fused.0 * 1e3, "fused_fwd_bwd_ms": fused.1 * 1e3,
            "composite_fwd_ms": reference.0 * 1e3, "composite_fwd_bwd_ms": reference.1 * 1e3,
            "speedup_fwd_bwd": reference.1 / fused.1,
            "gflop_fwd_bwd": gflop,
            "fused_gflops": if gflop > 0.0 { gflop / fused.1 } else { 0.0 },
            "fused_frac_of_ceiling": if gflop > 0.0 { gflop / fused.1 / ceiling } else { 0.0 },
        }));
    };

    // frozen linear, the MLP down projection shape [1024, 1536] -> 576 (dX only).
    {
        let x = var(&[b, t, inter], dtype);
        let w = randn(&[h, inter], dtype);
        let gf = 4.0 * (n * inter * h) as f64 / 1e9;
        add(
            "frozen_linear 1536->576",
            gf,
            (fwd(reps, || k::frozen_linear(&x, &w, None)), fb(reps, || k::frozen_linear(&x, &w, None))),
            (fwd(reps, || r::frozen_linear(&x, &w, None)), fb(reps, || r::frozen_linear(&x, &w, None))),
        );
    }
    // LoRA linear, gate/up shape 576 -> 1536, r=16, f32 master A/B.
    {
        let x = var(&[b, t, h], dtype);
        let w = randn(&[inter, h], dtype);
        let a = var(&[rank, h], DType::F32);
        let bb = var(&[inter, rank], DType::F32);
        let (a2, b2) = (a.to_dtype(dtype)?, bb.to_dtype(dtype)?);
        let gf = (4.0 * (n * inter * h) as f64 + 6.0 * (n * rank * (h + inter)) as f64) / 1e9;
        add(
            "lora_linear 576->1536 r16",
            gf,
            (fwd(reps, || k::lora_linear(&x, &w, None, &a, &bb, 2.0)), fb(reps, || k::lora_linear(&x, &w, None, &a, &bb, 2.0))),
            (fwd(reps, || r::lora_linear(&x, &w, None, &a2, &b2, 2.0)), fb(reps, || r::lora_linear(&x, &w, None, &a2, &b2, 2.0))),
        );
    }
    // Three adapters at once (mLoRA's BatchLoRA): one segmented op over 3x the rows,
    // in the "composite" columns three separate lora_linear calls over their own rows.
    // Same FLOPs; the gain is one large base GEMM instead of three.
    {
        let x = var(&[3 * b, t, h], dtype);
        let w = randn(&[inter, h], dtype);
        let ab: Vec<(Tensor, Tensor)> = (0..3).map(|_| (var(&[rank, h], DType::F32), var(&[inter, rank], DType::F32))).collect();
        let adapters: Vec<k::AdapterWeights> = ab.iter().map(|(a, bb)| k::AdapterWeights { a, b: bb, scale: 2.0 }).collect();
        let segments: Vec<k::RowSegment> = (0..3).map(|j| k::RowSegment { start: j * n, len: n, adapter: j }).collect();
        let segmented = || k::segmented_lora_linear(&x, &w, None, &adapters, &segments)?.sum_all();
        let separate = || {
            let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
            for (j, (a, bb)) in ab.iter().enumerate() {
                let y = k::lora_linear(&x.narrow(0, j * b, b)?, &w, None, a, bb, 2.0)?;
                total = (total + y.to_dtype(DType::F32)?.sum_all()?)?;
            }
            Ok(total)
        };
        let gf = 3.0 * (4.0 * (n * inter * h) as f64 + 6.0 * (n * rank * (h + inter)) as f64) / 1e9;
        add(
            "segmented_lora_linear 3 adapters x 1024 rows 576->1536 r16 (composite: 3 lora_linear)",
            gf,
            (fwd(reps, segmented), fb(reps, segmented)),
            (fwd(reps, separate), fb(reps, separate)),
        );
    }
    // attention: fused causal GQA vs composite (repeat_kv + mask + softmax).
    {
        let q = var(&[b, hq, t, d], dtype);
        let kk = var(&[b, hkv, t, d], dtype);
        let v = var(&[b, hkv, t, d], dtype);
        let s = 1.0 / (d as f64).sqrt();
        let gf = 6.0 * (t * t * d * hq * b) as f64 / 1e9;
        add(
            "causal_attention 9q/3kv heads T=256",
            gf,
            (fwd(reps, || k::causal_attention(&q, &kk, &v, None, s)), fb(reps, || k::causal_attention(&q, &kk, &v, None, s))),
            (fwd(reps, || r::causal_attention(&q, &kk, &v, None, s)), fb(reps, || r::causal_attention(&q, &kk, &v, None, s))),
        );
    }
    // RMSNorm, RoPE, SwiGLU, softmax.
    {
        let x = var(&[b, t, h], dtype);
        let w = randn(&[h], dtype);
        add(
            "rms_norm [1024,576]",
            0.0,
            (fwd(reps, || k::rms_norm(&x, &w, 1e-5)), fb(reps, || k::rms_norm(&x, &w, 1e-5))),
            (fwd(reps, || r::rms_norm(&x, &w, 1e-5)), fb(reps, || r::rms_norm(&x, &w, 1e-5))),
        );
        let q = var(&[b, hq, t, d], dtype);
        let ang = randn(&[b, t, d / 2], DType::F32);
        let (c, s) = (ang.cos()?, ang.sin()?);
        add(
            "rope [4,9,256,64]",
            0.0,
            (fwd(reps, || k::rope(&q, &c, &s)), fb(reps, || k::rope(&q, &c, &s))),
            (fwd(reps, || r::rope(&q, &c, &s)), fb(reps, || r::rope(&q, &c, &s))),
        );
        let g = var(&[b, t, inter], dtype);
        let u = var(&[b, t, inter], dtype);
        add(
            "swiglu [1024,1536]",
            0.0,
            (fwd(reps, || k::swiglu(&g, &u)), fb(reps, || k::swiglu(&g, &u))),
            (fwd(reps, || r::swiglu(&g, &u)), fb(reps, || r::swiglu(&g, &u))),
        );
        let sc = var(&[b, hq, t, t], DType::F32);
        add(
            "softmax [4,9,256,256]",
            0.0,
            (fwd(reps, || k::softmax_last_dim(&sc)), fb(reps, || k::softmax_last_dim(&sc))),
            (fwd(reps, || r::softmax_last_dim(&sc)), fb(reps, || r::softmax_last_dim(&sc))),
        );
    }
    // linear + cross-entropy over the 49152-token vocabulary.
    {
        let hid = var(&[n, h], dtype);
        let lm = randn(&[vocab, h], dtype);
        let tg = Tensor::from_vec((0..n as u32).map(|i| (i * 7919) % vocab as u32).collect::<Vec<_>>(), n, &Device::Cpu)?;
        let wt = Tensor::ones(n, DType::F32, &Device::Cpu)?;
        let gf = 4.0 * (n * h * vocab) as f64 / 1e9;
        add(
            "linear_cross_entropy vocab 49152",
            gf,
            (fwd(reps, || k::linear_cross_entropy(&hid, &lm, &tg, &wt)), fb(reps, || k::linear_cross_entropy(&hid, &lm, &tg, &wt))),
            (fwd(reps, || r::linear_cross_entropy(&hid, &lm, &tg, &wt)), fb(reps, || r::linear_cross_entropy(&hid, &lm, &tg, &wt))),
        );
    }
    let out = serde_json::json!({
        "dtype": if dtype == DType::F32 { "f32" } else { "bf16" },
        "threads": rayon::current_num_threads(),
        "gemm_gflops": ceiling,
        "ops": rows,
    });
    println!("{out}");
    Ok(())
}

/// `--attention-seq T`: the fused causal attention alone at batch 1 x T tokens.
fn attention_only(t: usize, dtype: DType, reps: usize) -> Result<()> {
    let (hq, hkv, d) = (9usize, 3usize, 64usize);
    let q = var(&[1, hq, t, d], dtype);
    let kk = var(&[1, hkv, t, d], dtype);
    let v = var(&[1, hkv, t, d], dtype);
    let s = 1.0 / (d as f64).sqrt();
    let ceiling = gemm_ceiling_gflops(2048, 3);
    let (f, fb_s) = (fwd(reps, || k::causal_attention(&q, &kk, &v, None, s)), fb(reps, || k::causal_attention(&q, &kk, &v, None, s)));
    // Causal FLOPs: forward 2 T^2 d per head (QK^T and PV over the visible half),
    // backward 5 products (QK^T recomputed, dV, dP, dQ, dK): 7 T^2 d per head in all.
    let (gf_fwd, gf_all) = (2.0 * (t * t * d * hq) as f64 / 1e9, 7.0 * (t * t * d * hq) as f64 / 1e9);
    println!(
        "{}",
        serde_json::json!({
            "op": format!("causal_attention b=1 T={t} {hq}q/{hkv}kv heads d={d}"), "dtype": format!("{dtype:?}"),
            "fwd_ms": f * 1e3, "fwd_bwd_ms": fb_s * 1e3,
            "fwd_gflops": gf_fwd / f, "fwd_bwd_gflops": gf_all / fb_s,
            "sgemm_ceiling_gflops": ceiling, "fwd_bwd_frac_of_ceiling": gf_all / fb_s / ceiling,
            "isa": format!("{:?}", lora_kernels::simd::isa()),
        })
    );
    Ok(())
}
