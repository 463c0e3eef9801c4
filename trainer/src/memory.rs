//! The memory model: what a training run holds at its peak, by part, for a model shape,
//! a base storage (dtype or quantization), a micro-batch shape and gradient
//! checkpointing on or off. One estimator serves the sweep planner, `plan-memory`, and
//! the check every run makes before its first step ([`fit_before_training`]).
//!
//! Parts (bytes):
//! - base: the frozen projections as stored (dense dtype, NF4 ~0.52 B, int8 ~1 B, GGUF
//!   blocks as measured) + embeddings/lm_head/norms dense;
//! - lora: LoRA weights, gradients and AdamW moments, f32: 16 B per trainable value;
//! - activations: without checkpointing, every layer's saved tensors per token
//!   (`ACT_VALUES` below) plus, for a quantized base, the dequantized weights the graph
//!   keeps for the input gradient; with checkpointing, the hidden state at each layer
//!   boundary plus one layer's activations and gradients during its rerun;
//! - workspace: the cross-entropy's logit chunk and one layer's dequantized weights
//!   (quantized base), the gradient of the final hidden state;
//! - process: allocator arenas, tokenizer, code (measured ~0.35 GiB on CPU).
use anyhow::{bail, Result};
use lora_models::{BaseQuant, ModelConfig};
use serde::Serialize;

pub const GIB: f64 = (1u64 << 30) as f64;
/// Process overhead (allocator arenas, tokenizer, CUDA context) on top of tensors.
pub const PROCESS_OVERHEAD: f64 = 0.35 * GIB;

/// How the frozen projections are stored, for the estimate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum BaseStorage {
    /// Dense, this many bytes per value.
    Dense(f64),
    Nf4,
    Int8,
    /// Measured bytes of the loaded projections (a GGUF file's blocks).
    Measured(u64),
}

impl BaseStorage {
    pub fn from_quant(quant: BaseQuant, dense_bytes: f64) -> Self {
        match quant {
            BaseQuant::Nf4 => Self::Nf4,
            BaseQuant::Int8 => Self::Int8,
            BaseQuant::None | BaseQuant::Auto => Self::Dense(dense_bytes),
        }
    }
    /// The storage of a loaded model's projections: `stored` bytes for `params` values.
    /// A dense base (any dtype, also one widened or narrowed from the file's) is
    /// `Dense`, so its embeddings count at the base dtype and no dequantized copies are
    /// planned; a quantized one (nf4, int8, GGUF blocks kept) is what was measured.
    pub fn of_loaded(quant: BaseQuant, stored: u64, params: u64) -> Self {
        match quant {
            BaseQuant::None => Self::Dense(stored as f64 / params.max(1) as f64),
            BaseQuant::Nf4 | BaseQuant::Int8 | BaseQuant::Auto => Self::Measured(stored),
        }
    }
    fn quantized(&self) -> bool {
        !matches!(self, Self::Dense(_))
    }
    pub fn label(&self) -> String {
        match self {
            Self::Dense(b) if *b == 2.0 => "bf16".into(),
            Self::Dense(b) if *b == 4.0 => "f32".into(),
            Self::Dense(b) => format!("{b} B/value"),
            Self::Nf4 => "nf4".into(),
            Self::Int8 => "int8".into(),
            Self::Measured(_) => "gguf blocks".into(),
        }
    }
}

/// What a run puts through the model at once.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Workload {
    /// Rows of the largest micro-batch forward (DPO: chosen + rejected, policy and
    /// reference; GRPO: the training rows of a step's rollouts).
    pub rows: usize,
    /// Tokens per row of that micro-batch.
    pub row_len: usize,
    /// Adapters trained at once over the base (a packed sweep group).
    pub adapters: usize,
    /// Extra rows decoded before the step (GRPO rollouts) and their length: their KV
    /// cache, which lives while the rollouts decode (not at the same time as the
    /// training activations).
    pub rollout_rows: usize,
    pub rollout_len: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub base_bytes: u64,
    pub lora_bytes: u64,
    pub activation_bytes: u64,
    pub workspace_bytes: u64,
    pub process_bytes: u64,
    pub rollout_bytes: u64,
    pub lora_parameters: u64,
    pub checkpointing: bool,
    pub storage: String,
}

impl MemoryPlan {
    /// The peak: the training step, or the rollouts' KV cache when that is larger.
    pub fn total(&self) -> u64 {
        self.base_bytes + self.lora_bytes + self.process_bytes + (self.activation_bytes + self.workspace_bytes).max(self.rollout_bytes)
    }
}

/// LoRA parameters of `rank` on `targets` in every layer.
pub fn lora_parameters(m: &ModelConfig, rank: usize, targets: &[String]) -> f64 {
    let (h, i, l) = (m.hidden_size as f64, m.intermediate_size as f64, m.num_hidden_layers as f64);
    let q = (m.num_attention_heads * m.head_dim) as f64;
    let kv = (m.num_key_value_heads * m.head_dim) as f64;
    let dims = |module: &str| -> (f64, f64) {
        match module {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => (0.0, 0.0),
        }
    };
    l * targets.iter().map(|t| dims(t)).map(|(a, b)| rank as f64 * (a + b)).sum::<f64>()
}

/// Values of the seven projections' weights (the part a quantized base stores quantized).
pub fn projection_parameters(m: &ModelConfig) -> f64 {
    let (h, i, l) = (m.hidden_size as f64, m.intermediate_size as f64, m.num_hidden_layers as f64);
    let q = (m.num_attention_heads * m.head_dim) as f64;
    let kv = (m.num_key_value_heads * m.head_dim) as f64;
    l * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i)
}

/// Parameters of the frozen base (embeddings counted once when tied).
pub fn base_parameters(m: &ModelConfig) -> f64 {
    let (h, l) = (m.hidden_size as f64, m.num_hidden_layers as f64);
    let vocab = m.vocab_size as f64 * h;
    projection_parameters(m) + l * 2.0 * h + vocab * if m.tie_word_embeddings { 1.0 } else { 2.0 } + h
}

/// Values one layer keeps for its backward per token (non-checkpointed): the two normed
/// inputs, residual and attention/MLP outputs (6 hidden), q and the attention output
/// (2 x heads*head_dim), k and v (2 x kv_heads*head_dim), gate, up and their product
/// (3 x intermediate).
fn layer_act_values(m: &ModelConfig) -> f64 {
    let (h, i) = (m.hidden_size as f64, m.intermediate_size as f64);
    let q = (m.num_attention_heads * m.head_dim) as f64;
    let kv = (m.num_key_value_heads * m.head_dim) as f64;
    6.0 * h + 2.0 * q + 2.0 * kv + 3.0 * i
}

/// The estimate. `compute_bytes`: bytes per activation value (f32 4, bf16 2).
pub fn plan(m: &ModelConfig, storage: BaseStorage, compute_bytes: f64, rank: usize, targets: &[String], w: &Workload, checkpointing: bool) -> MemoryPlan {
    let (h, l) = (m.hidden_size as f64, m.num_hidden_layers as f64);
    let proj = projection_parameters(m);
    let other = base_parameters(m) - proj;
    let dense_bytes = match storage {
        BaseStorage::Dense(b) => b,
        _ => compute_bytes,
    };
    let proj_bytes = match storage {
        BaseStorage::Dense(b) => proj * b,
        // 4-bit codes, one 8-bit absmax per 64 values, one f32 per 256 absmax.
        BaseStorage::Nf4 => proj * (0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0)),
        // A byte per value and an f32 per row (~h rows per h*h values).
        BaseStorage::Int8 => proj * (1.0 + 4.0 / h),
        BaseStorage::Measured(b) => b as f64,
    };
    let base_bytes = proj_bytes + other * dense_bytes;
    let lora_params = lora_parameters(m, rank, targets) * w.adapters.max(1) as f64;
    let tokens = (w.rows * w.row_len) as f64;
    let per_layer = layer_act_values(m);
    // One layer's dense weights: what a quantized base dequantizes at a time.
    let layer_weights = proj / l * compute_bytes;
    let (activations, weights_kept) = if checkpointing {
        // One hidden state per layer boundary (a layer's output is the next one's input),
        // plus one layer rerun with its graph and the gradients flowing through it (~2x
        // its saved values).
        (tokens * ((l + 1.0) * h + 2.0 * per_layer) * compute_bytes, 0.0)
    } else {
        let kept = if storage.quantized() { proj * compute_bytes } else { 0.0 };
        // x1.2: the backward allocates each layer's activation gradients while the
        // earlier layers' saved tensors still live, and freed buffers stay mapped for a
        // while (kernels/src/alloc.rs). Calibrated on measured peaks (BENCHMARKS.md,
        // Memory): SmolLM2 sft 4 x 256 2.31 GiB (plan 2.27), dpo 16 x 500 11.2 GiB (plan 11.4).
        (1.2 * tokens * l * per_layer * compute_bytes, kept)
    };
    // Cross-entropy logit chunk (32 MiB of f32) and the final hidden state's gradient.
    let workspace = 32.0 * 1024.0 * 1024.0 + tokens * h * 4.0 + if storage.quantized() { layer_weights } else { 0.0 };
    let kv_per_token = 2.0 * l * (m.num_key_value_heads * m.head_dim) as f64 * compute_bytes;
    let rollout = (w.rollout_rows * w.rollout_len) as f64 * kv_per_token;
    MemoryPlan {
        base_bytes: base_bytes as u64,
        lora_bytes: (lora_params * 16.0) as u64,
        activation_bytes: (activations + weights_kept) as u64,
        workspace_bytes: workspace as u64,
        process_bytes: PROCESS_OVERHEAD as u64,
        rollout_bytes: rollout as u64,
        lora_parameters: lora_params as u64,
        checkpointing,
        storage: storage.label(),
    }
}

/// Memory this process can use on `device` for its whole peak: the CPU's available memory
/// plus what the process already holds (the plan counts the loaded base too), or a GPU's
/// free memory plus `loaded_base` (the weights already on it). None when it cannot be read.
pub fn available_bytes(device: &candle_core::Device, loaded_base: u64) -> Option<u64> {
    match device.location() {
        candle_core::DeviceLocation::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let avail = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
            Some(avail + resident_bytes().unwrap_or(0))
        }
        candle_core::DeviceLocation::Cuda { gpu_id } => {
            let gpu = crate::device::list_gpus().ok()?.into_iter().find(|g| g.index == gpu_id)?;
            Some(gpu.free_memory as u64 + loaded_base)
        }
        _ => None,
    }
}

/// This process's resident set (VmRSS), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

/// What `auto` decides and what a run that does not fit is told, given the plans with
/// and without checkpointing.
#[derive(Debug, PartialEq)]
pub enum FitDecision {
    Fits { checkpointing: bool },
    DoesNotFit(String),
}

/// Decide gradient checkpointing and whether the run fits in `available` bytes.
/// `requested`: Some(on/off) from the flag, None for auto. A quantized base turns it on
/// under auto: without it the graph keeps every dequantized weight.
pub fn decide(off: &MemoryPlan, on: &MemoryPlan, requested: Option<bool>, quantized: bool, available: Option<u64>, hints: &[String]) -> FitDecision {
    let fits = |p: &MemoryPlan| available.is_none_or(|a| p.total() <= a);
    let checkpointing = match requested {
        Some(c) => c,
        None => quantized || !fits(off),
    };
    let chosen = if checkpointing { on } else { off };
    if fits(chosen) {
        return FitDecision::Fits { checkpointing };
    }
    let avail = available.unwrap_or(0);
    let mut msg = format!(
        "this run needs about {} at its peak (base {}, LoRA + optimizer {}, activations {}, workspace {}{}) but {} is available",
        gib(chosen.total()),
        gib(chosen.base_bytes),
        gib(chosen.lora_bytes),
        gib(chosen.activation_bytes),
        gib(chosen.workspace_bytes),
        if chosen.rollout_bytes > 0 { format!(", rollouts {}", gib(chosen.rollout_bytes)) } else { String::new() },
        gib(avail)
    );
    let mut fixes: Vec<String> = Vec::new();
    if !checkpointing {
        fixes.push(format!("--gradient-checkpointing on (peak {})", gib(on.total())));
    }
    fixes.extend(hints.iter().cloned());
    if !fixes.is_empty() {
        msg.push_str(&format!("; what would help: {}", fixes.join("; ")));
    }
    FitDecision::DoesNotFit(msg)
}

/// Check a plan's inputs: a workload with no rows is a caller's bug, not the user's.
pub fn check_workload(w: &Workload) -> Result<()> {
    if w.rows == 0 || w.row_len == 0 {
        bail!("memory plan: an empty micro-batch ({} rows x {} tokens)", w.rows, w.row_len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        ModelConfig {
            architecture: lora_models::Architecture::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_llama3: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            raw: None,
        }
    }

    fn all() -> Vec<String> {
        lora_models::ALL_TARGETS.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn checkpointing_and_nf4_shrink_their_parts() {
        let m = smollm2();
        let w = Workload { rows: 16, row_len: 512, adapters: 1, rollout_rows: 0, rollout_len: 0 };
        let off = plan(&m, BaseStorage::Dense(4.0), 4.0, 16, &all(), &w, false);
        let on = plan(&m, BaseStorage::Dense(4.0), 4.0, 16, &all(), &w, true);
        assert!(on.activation_bytes * 5 < off.activation_bytes, "{on:?} vs {off:?}");
        let nf4 = plan(&m, BaseStorage::Nf4, 4.0, 16, &all(), &w, true);
        assert!(nf4.base_bytes < on.base_bytes / 2);
        assert_eq!(on.lora_bytes, nf4.lora_bytes);
    }

    /// A run plans its loaded base: a dense bf16 base under f32 compute is dense (the
    /// same plan as `plan-memory --base-dtype bf16`), not a quantized one whose
    /// dequantized weights the graph keeps (that mistake planned the Qwen2.5-1.5B bf16 run
    /// at 19.2 GiB for a 14.5 GiB peak).
    #[test]
    fn a_loaded_dense_base_plans_like_its_dtype_and_a_quantized_one_like_its_bytes() {
        let m = smollm2();
        let w = Workload { rows: 1, row_len: 2048, adapters: 1, rollout_rows: 0, rollout_len: 0 };
        let params = projection_parameters(&m) as u64;
        let loaded = BaseStorage::of_loaded(BaseQuant::None, 2 * params, params);
        assert_eq!(loaded, BaseStorage::Dense(2.0));
        assert_eq!(plan(&m, loaded, 4.0, 16, &all(), &w, false), plan(&m, BaseStorage::Dense(2.0), 4.0, 16, &all(), &w, false));
        for quant in [BaseQuant::Nf4, BaseQuant::Int8, BaseQuant::Auto] {
            assert_eq!(BaseStorage::of_loaded(quant, params / 2, params), BaseStorage::Measured(params / 2));
        }
    }

    #[test]
    fn auto_turns_checkpointing_on_only_when_needed_and_explains_a_misfit() {
        let m = smollm2();
        let w = Workload { rows: 16, row_len: 512, adapters: 1, rollout_rows: 0, rollout_len: 0 };
        let off = plan(&m, BaseStorage::Dense(4.0), 4.0, 16, &all(), &w, false);
        let on = plan(&m, BaseStorage::Dense(4.0), 4.0, 16, &all(), &w, true);
        assert_eq!(decide(&off, &on, None, false, Some(off.total() + 1), &[]), FitDecision::Fits { checkpointing: false });
        assert_eq!(decide(&off, &on, None, false, Some(on.total() + 1), &[]), FitDecision::Fits { checkpointing: true });
        assert_eq!(decide(&off, &on, None, true, None, &[]), FitDecision::Fits { checkpointing: true });
        match decide(&off, &on, Some(false), false, Some(on.total() + 1), &["--base-quant nf4".into()]) {
            FitDecision::DoesNotFit(msg) => assert!(msg.contains("--gradient-checkpointing on") && msg.contains("--base-quant nf4"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
}
