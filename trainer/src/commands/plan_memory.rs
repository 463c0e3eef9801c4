//! `lora-train plan-memory`: the memory model's breakdown for a model, method, batch
//! shape and device, with and without each saving (gradient checkpointing, a quantized
//! base), and the largest batch and sequence length that fit. Reads only the model's
//! configuration (and a GGUF file's tensor table); loads no weights.
use anyhow::{bail, Context, Result};
use lora_models::BaseQuant;
use serde_json::json;

use crate::config::DTypeArg;
use crate::memory::{self, BaseStorage, MemoryPlan, Workload};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    Sft,
    Dpo,
    Orpo,
    Grpo,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base model: a Hugging Face model directory, a .gguf file, or a hub id (Org/Name).
    #[arg(long)]
    pub model: String,
    /// The training method (DPO puts chosen + rejected rows through the policy and the
    /// reference; GRPO trains on prompts x generations rows).
    #[arg(long, value_enum, default_value_t = MethodArg::Sft)]
    pub method: MethodArg,
    /// Samples per micro-batch (pairs for dpo/orpo, prompts for grpo).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per row (grpo: prompt + completion).
    #[arg(long, default_value_t = 2048)]
    pub max_sequence_length: usize,
    /// GRPO completions per prompt.
    #[arg(long, default_value_t = 8)]
    pub num_generations: usize,
    #[arg(long = "rank", visible_alias = "lora-rank", default_value_t = 16)]
    pub rank: usize,
    /// Adapted projections: q,k,v,o,gate,up,down or all.
    #[arg(long, default_value = "all")]
    pub target_modules: String,
    /// Compute dtype (activations).
    #[arg(long, value_enum, default_value_t = DTypeArg::Bf16)]
    pub dtype: DTypeArg,
    /// Storage dtype of a dense base. [default: --dtype]
    #[arg(long, value_enum)]
    pub base_dtype: Option<DTypeArg>,
    /// nf4, int8, none, or auto (a .gguf keeps its blocks).
    #[arg(long, default_value = "auto", value_parser = |s: &str| BaseQuant::parse(s).map_err(|e| e.to_string()))]
    pub base_quant: BaseQuant,
    /// Memory to plan for: `cpu` (this machine's available memory), or a size such as
    /// 24GiB (a workstation GPU). [default: cpu]
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub json: bool,
}

/// The rows a method puts through the model for `batch` samples.
fn rows_for(method: MethodArg, batch: usize, generations: usize) -> usize {
    match method {
        MethodArg::Sft => batch,
        // chosen + rejected through the policy, and again through the reference.
        MethodArg::Dpo => 4 * batch,
        MethodArg::Orpo => 2 * batch,
        MethodArg::Grpo => batch * generations,
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.batch_size == 0 || args.max_sequence_length == 0 {
        bail!("--batch-size and --max-sequence-length must be at least 1");
    }
    let m = lora_models::load_model_config(&args.model)?;
    let targets = lora_models::LoraConfig::parse_targets(&args.target_modules)?;
    let compute = args.dtype.to_candle().size_in_bytes() as f64;
    let dense = args.base_dtype.unwrap_or(args.dtype).to_candle().size_in_bytes() as f64;
    let storage = match args.base_quant {
        BaseQuant::Auto => gguf_projection_bytes(&args.model)?.map(BaseStorage::Measured).unwrap_or(BaseStorage::Dense(dense)),
        q => BaseStorage::from_quant(q, dense),
    };
    let available = match args.device.as_str() {
        "cpu" => memory::available_bytes(&candle_core::Device::Cpu, 0).context("cannot read this machine's available memory")?,
        size => crate::sweep::plan::parse_bytes(size).with_context(|| format!("--device: `{size}` is neither cpu nor a size like 24GiB"))?,
    };
    let workload = |batch: usize, len: usize| Workload {
        rows: rows_for(args.method, batch, args.num_generations),
        row_len: len,
        adapters: 1,
        rollout_rows: if args.method == MethodArg::Grpo { batch * args.num_generations } else { 0 },
        rollout_len: if args.method == MethodArg::Grpo { len } else { 0 },
    };
    let plan_of = |s: BaseStorage, on: bool, batch: usize, len: usize| memory::plan(&m, s, compute, args.rank, &targets, &workload(batch, len), on);
    let mut variants: Vec<(String, BaseStorage)> = vec![(storage.label(), storage)];
    if !matches!(storage, BaseStorage::Nf4) {
        variants.push(("nf4".into(), BaseStorage::Nf4));
    }
    let mut rows = Vec::new();
    for (label, s) in &variants {
        for on in [false, true] {
            let p = plan_of(*s, on, args.batch_size, args.max_sequence_length);
            let longest = largest(|len| plan_of(*s, on, args.batch_size, len).total() <= available, 64, 1 << 20);
            let widest = largest(|b| plan_of(*s, on, b, args.max_sequence_length).total() <= available, 1, 4096);
            rows.push((label.clone(), on, p, longest, widest));
        }
    }
    if args.json {
        let items: Vec<_> = rows
            .iter()
            .map(|(label, on, p, longest, widest)| {
                json!({"base": label, "gradient_checkpointing": on, "plan": p, "total_bytes": p.total(), "fits": p.total() <= available,
                       "longest_row_that_fits": longest, "largest_batch_that_fits": widest})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json!({"model": args.model, "available_bytes": available, "plans": items}))?);
        return Ok(());
    }
    println!(
        "{} ({} layers, hidden {}), {:?}, {} x {} tokens, LoRA r{} on {}; {} available",
        args.model,
        m.num_hidden_layers,
        m.hidden_size,
        args.method,
        args.batch_size,
        args.max_sequence_length,
        args.rank,
        targets.len(),
        memory::gib(available)
    );
    println!("| base | checkpointing | base | LoRA + AdamW | activations | workspace | rollouts | total | fits | longest row at batch {} | largest batch at {} tokens |", args.batch_size, args.max_sequence_length);
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (label, on, p, longest, widest) in &rows {
        print_row(label, *on, p, available, *longest, *widest);
    }
    Ok(())
}

fn print_row(label: &str, on: bool, p: &MemoryPlan, available: u64, longest: usize, widest: usize) {
    let g = memory::gib;
    let fit = |n: usize| if n == 0 { "none".to_string() } else { n.to_string() };
    println!(
        "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        if on { "on" } else { "off" },
        g(p.base_bytes),
        g(p.lora_bytes),
        g(p.activation_bytes),
        g(p.workspace_bytes),
        g(p.rollout_bytes),
        g(p.total()),
        if p.total() <= available { "yes" } else { "no" },
        fit(longest),
        fit(widest)
    );
}

/// The largest n in [step, max] (a multiple of `step`) with `fits(n)`, or 0; `fits` is
/// monotone (more tokens never need less memory).
fn largest(fits: impl Fn(usize) -> bool, step: usize, max: usize) -> usize {
    if !fits(step) {
        return 0;
    }
    let (mut lo, mut hi) = (1, max / step);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid * step) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo * step
}

/// Bytes of a GGUF file's quantized projection tensors (None for other models).
fn gguf_projection_bytes(model: &str) -> Result<Option<u64>> {
    if !model.ends_with(".gguf") {
        return Ok(None);
    }
    let src = lora_models::weights::GgufSource::open(std::path::Path::new(model))?;
    let projections = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
    let mut bytes = 0u64;
    for (name, info) in &src.content().tensor_infos {
        if projections.iter().any(|p| name.ends_with(&format!("{p}.weight"))) {
            let t = info.ggml_dtype;
            bytes += (info.shape.elem_count() / t.block_size() * t.type_size()) as u64;
        }
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_finds_the_boundary() {
        assert_eq!(largest(|n| n <= 1000, 64, 1 << 20), 960);
        assert_eq!(largest(|n| n <= 10, 64, 1 << 20), 0);
        assert_eq!(largest(|_| true, 1, 4096), 4096);
    }
}
