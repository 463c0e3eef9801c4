//! Rollout throughput: `Model::rollouts` (what `grpo` and `eval --evaluator` generate
//! with), measured like `benches/torch/generate_bench.py --num-return-sequences G`.
//!
//!     rollout_bench --model PATH --prompt-ids FILE [--group 8] [--max-new-tokens 128]
//!                   [--temperature 1.0] [--repeats 3] [--seed 0] [--dtype f32|bf16]
//!                   [--kv shared|copied] [--base-quant auto|none|nf4|int8]
//!
//! FILE is the JSON list of prompt token-id lists that generate_bench.py `--dump-ids`
//! wrote, so both sides decode from the very same tokens (the chat template is rendered
//! once, by transformers). Stop tokens are disabled so that every row produces exactly
//! --max-new-tokens tokens, as `min_new_tokens` forces on the transformers side: both
//! sides then do the same work whatever the samples say. No adapter (transformers runs
//! the base model too). One warm-up call with 2 new tokens, then --repeats timed calls;
//! the best counts; with LORA_KERNELS_PROFILE=1 the JSON adds where a timed call's time
//! went (`profile_s_per_call`). Prints ONE JSON line: tokens_per_s = prompts x group x max_new_tokens
//! / best_s. `--kv copied` holds each prompt's keys and values once per completion (the
//! layout before shared prompts), for before/after comparisons of time and peak RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use lora_benches::peak_rss_mb;
use lora_models::{KvLayout, RolloutParams};
use std::time::Instant;

fn main() -> Result<()> {
    lora_benches::init_threads();
    let (mut model_ref, mut ids_path) = (String::new(), String::new());
    let (mut group, mut max_new, mut temperature, mut repeats, mut seed) = (8usize, 128usize, 1.0f64, 3usize, 0u64);
    let mut dtype = DType::F32;
    let mut layout = KvLayout::SharedPrompt;
    let mut base_quant = lora_models::BaseQuant::Auto;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--model" => model_ref = v()?,
            "--prompt-ids" => ids_path = v()?,
            "--group" => group = v()?.parse()?,
            "--max-new-tokens" => max_new = v()?.parse()?,
            "--temperature" => temperature = v()?.parse()?,
            "--repeats" => repeats = v()?.parse()?,
            "--seed" => seed = v()?.parse()?,
            "--dtype" => {
                dtype = match v()?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    other => bail!("--dtype {other}: f32 or bf16"),
                }
            }
            // auto: a GGUF keeps its blocks and each projection is dequantized per call
            // (what `lora-train grpo` does by default); none: dense, as transformers runs it.
            "--base-quant" => base_quant = lora_models::BaseQuant::parse(&v()?)?,
            "--kv" => {
                layout = match v()?.as_str() {
                    "shared" => KvLayout::SharedPrompt,
                    "copied" => KvLayout::CopiedPrompt,
                    other => bail!("--kv {other}: shared or copied"),
                }
            }
            _ => bail!("unknown argument {k}"),
        }
    }
    if model_ref.is_empty() || ids_path.is_empty() {
        bail!("--model and --prompt-ids are required");
    }
    let prompts: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(&ids_path).with_context(|| ids_path.clone())?)?;
    let t_load = Instant::now();
    let loaded = lora_models::load_model_quantized(&model_ref, &Device::Cpu, dtype, dtype, base_quant)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let model = &loaded.model;
    let seeds: Vec<u64> = (0..prompts.len() as u64).map(|p| seed.wrapping_add(p)).collect();
    let params = |n: usize| RolloutParams { group, max_new_tokens: n, temperature, top_k: 0, top_p: 1.0 };

    model.rollouts_with(&prompts, &seeds, &params(2), &[], layout)?;
    // LORA_KERNELS_PROFILE=1: where the timed calls' time goes (per call, seconds).
    lora_kernels::profile::reset();
    let mut times = Vec::with_capacity(repeats);
    let mut sample = String::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let out = model.rollouts_with(&prompts, &seeds, &params(max_new), &[], layout)?;
        times.push(t.elapsed().as_secs_f64());
        // The count is the claim: every row must have produced exactly max_new tokens.
        if let Some(c) = out.iter().flatten().find(|c| c.tokens.len() != max_new) {
            bail!("a row produced {} tokens, not {max_new}", c.tokens.len());
        }
        sample = loaded.tokenizer.decode(&out[0][0].tokens, true)?;
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    let tokens = prompts.len() * group * max_new;
    let load1 = std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next().and_then(|x| x.parse::<f64>().ok()));
    println!(
        "{}",
        serde_json::json!({
            "bench": "lora-train Model::rollouts (prefill once per prompt, P x G rows, no autograd)",
            "model": model_ref, "kv": format!("{layout:?}"), "base_quant": format!("{base_quant:?}").to_lowercase(), "dtype": format!("{dtype:?}").to_lowercase(), "prompts": prompts.len(), "group": group,
            "prompt_tokens": prompts.iter().map(Vec::len).collect::<Vec<_>>(),
            "max_new_tokens": max_new, "temperature": temperature, "repeats": repeats,
            "new_tokens": tokens, "seconds_each": times.iter().map(|t| (t * 1e4).round() / 1e4).collect::<Vec<_>>(),
            "best_s": (best * 1e4).round() / 1e4, "tokens_per_s": ((tokens as f64 / best) * 100.0).round() / 100.0,
            "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "threads": rayon::current_num_threads(),
            "sample_completion": sample, "load_average_1m": load1,
            "profile_s_per_call": lora_kernels::profile::totals().into_iter()
                .map(|(name, secs, _)| (name.to_string(), serde_json::json!(((secs / times.len() as f64) * 1e4).round() / 1e4)))
                .collect::<serde_json::Map<_, _>>(),
        })
    );
    Ok(())
}
