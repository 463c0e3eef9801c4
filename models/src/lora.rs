//! LoRA: configuration, the adapted linear layer, and PEFT-format save/load.
use anyhow::{bail, Context, Result};
use crate::quant::FrozenWeight;
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// The seven projections PEFT users target; `--target-modules` defaults to all.
pub const ALL_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// Module names as PEFT writes them (`q_proj`, ...).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 16, alpha: 32.0, dropout: 0.0, use_rslora: false, target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect() }
    }
}

impl LoraConfig {
    /// alpha/r, or alpha/sqrt(r) with rsLoRA (as PEFT).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Accepts `q,k,v,o,gate,up,down`, the `_proj` names, or `all`; returns PEFT names.
    pub fn parse_targets(spec: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for raw in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if raw == "all" || raw == "all-linear" {
                return Ok(ALL_TARGETS.iter().map(|s| s.to_string()).collect());
            }
            let name = if raw.ends_with("_proj") { raw.to_string() } else { format!("{raw}_proj") };
            if !ALL_TARGETS.contains(&name.as_str()) {
                bail!("unknown target module `{raw}` (choose from q,k,v,o,gate,up,down or all)");
            }
            if !out.contains(&name) {
                out.push(name);
            }
        }
        if out.is_empty() {
            bail!("--target-modules is empty");
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("LoRA rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }

    /// Fireworks serves r in 4..=64 on the seven projections; outside that we warn, not fail.
    pub fn hosting_warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !(4..=64).contains(&self.rank) {
            w.push(format!("rank {} is outside 4..64, which Fireworks accepts for hosted LoRA", self.rank));
        }
        w
    }
}

/// A contiguous block of batch rows and the adapter they go through (`None` = the frozen
/// base alone: the DPO/GRPO reference rows), with the dropout seed of that adapter's
/// training step (`None` = no dropout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowRoute {
    pub rows: usize,
    pub adapter: Option<usize>,
    pub dropout_seed: Option<u64>,
}

/// How the rows of a batch reach the adapters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Every row, whatever the batch size, through one adapter (or none).
    AllRows { adapter: Option<usize>, dropout_seed: Option<u64> },
    /// Contiguous blocks that must cover the batch exactly.
    Blocks(Vec<RowRoute>),
}

/// State shared by every LoRA layer of a model: how batch rows are routed to adapters,
/// the dropout seed of the default route, and inference mode. Changed only through the
/// guards of [`crate::Model`], which restore the previous state on drop.
#[derive(Debug, Default)]
pub struct LoraSwitch {
    disabled: AtomicBool,
    /// 0 = eval mode (no dropout); otherwise seed + 1.
    dropout_seed: AtomicU64,
    /// No autograd graph: LoRA weights enter the forward detached, dropout is off.
    inference: AtomicBool,
    /// How many adapters the model holds (the default route needs exactly one).
    adapters: AtomicUsize,
    /// Explicit routing; None = every row through the model's only adapter.
    routes: RwLock<Option<Routing>>,
    /// LoRA weights enter the forward detached while dropout and routing stay as in
    /// training: the first, graph-free forward of a checkpointed layer
    /// (`crate::checkpointing`), whose backward reruns the layer with the graph.
    detached: AtomicBool,
}

/// Everything a forward reads from the [`LoraSwitch`], captured so that a checkpointed
/// layer recomputed during the backward routes its rows and draws its dropout masks
/// exactly as its first forward did (the routing guards may be gone by then).
#[derive(Clone, Debug)]
pub struct SwitchState {
    enabled: bool,
    dropout_seed: u64,
    inference: bool,
    routes: Option<Routing>,
    detached: bool,
}

impl SwitchState {
    pub fn set_detached(&mut self, on: bool) {
        self.detached = on;
    }
}

/// A contiguous run of flattened rows (of `x` as [n, in]) through one adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ResolvedSegment {
    start: usize,
    len: usize,
    adapter: usize,
    dropout_seed: Option<u64>,
}

impl LoraSwitch {
    pub fn set_enabled(&self, on: bool) {
        self.disabled.store(!on, Ordering::Relaxed)
    }
    pub fn enabled(&self) -> bool {
        !self.disabled.load(Ordering::Relaxed)
    }
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        self.dropout_seed.store(seed.map(|s| s.wrapping_add(1)).unwrap_or(0), Ordering::Relaxed)
    }
    fn dropout_seed(&self) -> Option<u64> {
        match self.dropout_seed.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s - 1),
        }
    }
    pub fn set_inference(&self, on: bool) {
        self.inference.store(on, Ordering::Relaxed)
    }
    pub fn inference(&self) -> bool {
        self.inference.load(Ordering::Relaxed)
    }
    pub(crate) fn set_adapter_count(&self, n: usize) {
        self.adapters.store(n, Ordering::Relaxed)
    }
    pub fn routes(&self) -> Option<Routing> {
        self.routes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn set_routes(&self, routes: Option<Routing>) {
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = routes;
    }
    pub fn set_detached(&self, on: bool) {
        self.detached.store(on, Ordering::Relaxed)
    }
    /// Whether the LoRA weights enter the forward without an autograd graph.
    pub fn detached(&self) -> bool {
        self.inference() || self.detached.load(Ordering::Relaxed)
    }
    /// The state every forward reads (see [`SwitchState`]).
    pub fn state(&self) -> SwitchState {
        SwitchState {
            enabled: self.enabled(),
            dropout_seed: self.dropout_seed.load(Ordering::Relaxed),
            inference: self.inference(),
            routes: self.routes(),
            detached: self.detached.load(Ordering::Relaxed),
        }
    }
    /// Put back a captured state; returns the one it replaced.
    pub fn restore(&self, state: SwitchState) -> SwitchState {
        let previous = self.state();
        self.set_enabled(state.enabled);
        self.dropout_seed.store(state.dropout_seed, Ordering::Relaxed);
        self.set_inference(state.inference);
        self.set_routes(state.routes);
        self.set_detached(state.detached);
        previous
    }

    /// The adapter segments of a batch of `batch_rows` rows, each row `row_len` flattened
    /// rows long (`t` for [b, t, in] activations).
    fn segments(&self, batch_rows: usize, row_len: usize) -> candle_core::Result<Vec<ResolvedSegment>> {
        if !self.enabled() {
            return Ok(Vec::new());
        }
        let training = !self.inference();
        let all_rows = |adapter: usize, seed: Option<u64>| {
            vec![ResolvedSegment { start: 0, len: batch_rows * row_len, adapter, dropout_seed: seed.filter(|_| training) }]
        };
        let routes = match self.routes() {
            Some(Routing::Blocks(routes)) => routes,
            Some(Routing::AllRows { adapter: None, .. }) => return Ok(Vec::new()),
            Some(Routing::AllRows { adapter: Some(a), dropout_seed }) => return Ok(all_rows(a, dropout_seed)),
            None => return match self.adapters.load(Ordering::Relaxed) {
                0 => Ok(Vec::new()),
                1 => Ok(all_rows(0, self.dropout_seed())),
                n => candle_core::bail!("the model holds {n} adapters but no row routing was set (Model::route)"),
            },
        };
        let total: usize = routes.iter().map(|r| r.rows).sum();
        if total != batch_rows {
            candle_core::bail!("row routing covers {total} rows but the batch has {batch_rows}");
        }
        let mut out = Vec::new();
        let mut row = 0;
        for r in &routes {
            if let Some(adapter) = r.adapter {
                out.push(ResolvedSegment { start: row * row_len, len: r.rows * row_len, adapter, dropout_seed: r.dropout_seed.filter(|_| training) });
            }
            row += r.rows;
        }
        Ok(out)
    }
}

#[derive(Clone)]
pub struct LoraAdapter {
    /// [r, in], f32 master weight.
    pub a: Var,
    /// [out, r], f32 master weight.
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// A and B as the forward should see them: the trainable variables, or detached
    /// views of the same storage in inference mode (no graph is recorded through them).
    fn weights(&self, inference: bool) -> (Tensor, Tensor) {
        if inference {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        } else {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        }
    }
}

/// A frozen projection with zero or more LoRA adapters (one per adapter of the model
/// that targets this module; indexed like the model's adapter list). Cloning is cheap
/// (tensors and variables share storage): a checkpointed layer keeps a clone to rerun.
#[derive(Clone)]
pub struct Linear {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// Position among all linears, so each gets its own dropout stream.
    pub index: usize,
    /// Dense, or quantized and dequantized for each GEMM (`crate::quant`).
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub adapters: Vec<Option<LoraAdapter>>,
    pub switch: Arc<LoraSwitch>,
}

impl Linear {
    pub fn out_features(&self) -> usize {
        self.weight.dims2().0
    }
    pub fn in_features(&self) -> usize {
        self.weight.dims2().1
    }
    /// Short module name: `q_proj`, ...
    pub fn module(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }
    /// The adapter with index `i`, when it targets this module.
    pub fn adapter(&self, i: usize) -> Option<&LoraAdapter> {
        self.adapters.get(i).and_then(Option::as_ref)
    }

    /// `x W^T (+ bias)` for every row, plus each routed adapter's LoRA term on its rows.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let bias = self.bias.as_ref();
        let batch_rows = x.dim(0)?;
        let row_len = x.elem_count() / (batch_rows.max(1) * self.in_features().max(1));
        let mut segments = self.switch.segments(batch_rows, row_len)?;
        segments.retain(|s| self.adapter(s.adapter).is_some() && s.len > 0);
        let inference = self.switch.detached();
        let n_rows = batch_rows * row_len;
        let dropout_on = |s: &ResolvedSegment| s.dropout_seed.is_some() && self.adapter(s.adapter).is_some_and(|l| l.dropout > 0.0);
        let weight = self.weight.dense()?;
        match segments.as_slice() {
            [] => lora_kernels::frozen_linear(x, &weight, bias),
            // One adapter over every row: the fused op. It takes f32 A/B next to bf16 x/W
            // and returns f32 gradients, so the master weights are never cast.
            [s] if s.len == n_rows && !dropout_on(s) => {
                let (a, b) = self.adapter(s.adapter).map(|l| l.weights(inference)).expect("retained above");
                let scale = self.adapter(s.adapter).map_or(1.0, |l| l.scale);
                lora_kernels::lora_linear(x, &weight, bias, &a, &b, scale)
            }
            segs if segs.iter().any(dropout_on) => self.forward_composite(x, &weight, segs, n_rows, inference),
            // Several adapters (or one on part of the rows): the base GEMM once over all
            // rows, each adapter's LoRA on its own rows, in one op.
            segs => {
                let weights: Vec<(Tensor, Tensor, f64)> = segs
                    .iter()
                    .map(|s| {
                        let l = self.adapter(s.adapter).expect("retained above");
                        let (a, b) = l.weights(inference);
                        (a, b, l.scale)
                    })
                    .collect();
                let adapters: Vec<lora_kernels::AdapterWeights> =
                    weights.iter().map(|(a, b, scale)| lora_kernels::AdapterWeights { a, b, scale: *scale }).collect();
                let rows: Vec<lora_kernels::RowSegment> =
                    segs.iter().enumerate().map(|(i, s)| lora_kernels::RowSegment { start: s.start, len: s.len, adapter: i }).collect();
                lora_kernels::segmented_lora_linear(x, &weight, bias, &adapters, &rows)
            }
        }
    }

    /// How this projection's forward on `x` would run, when it is the frozen GEMM
    /// alone (`Some(None)`) or the frozen GEMM plus one adapter over every row
    /// without dropout (`Some(Some((A, B, scale)))`, A/B as the forward sees them);
    /// None for anything else (several adapters, partial rows, dropout). The
    /// decoder's fused projections (q/k/v, gate/up as one GEMM) take only these paths.
    pub fn plain_path(&self, x: &Tensor) -> candle_core::Result<Option<Option<(Tensor, Tensor, f64)>>> {
        let batch_rows = x.dim(0)?;
        let row_len = x.elem_count() / (batch_rows.max(1) * self.in_features().max(1));
        let mut segments = self.switch.segments(batch_rows, row_len)?;
        segments.retain(|s| self.adapter(s.adapter).is_some() && s.len > 0);
        Ok(match segments.as_slice() {
            [] => Some(None),
            [s] if s.len == batch_rows * row_len => {
                let l = self.adapter(s.adapter).expect("retained above");
                if s.dropout_seed.is_some() && l.dropout > 0.0 {
                    None
                } else {
                    let (a, b) = l.weights(self.switch.detached());
                    Some(Some((a, b, l.scale)))
                }
            }
            _ => None,
        })
    }

    /// Base GEMM once over all rows, then each segment's LoRA term (with PEFT's dropout on
    /// the LoRA input) from candle ops, stitched back in row order with zeros between.
    /// With one segment over all rows this is exactly the single-adapter dropout path.
    fn forward_composite(&self, x: &Tensor, weight: &Tensor, segs: &[ResolvedSegment], n_rows: usize, inference: bool) -> candle_core::Result<Tensor> {
        let base = lora_kernels::frozen_linear(x, weight, self.bias.as_ref())?;
        let out = self.out_features();
        let flat = x.reshape((n_rows, self.in_features()))?;
        let zeros = |rows: usize| Tensor::zeros((rows, out), x.dtype(), x.device());
        let mut pieces = Vec::new();
        let mut row = 0;
        for s in segs {
            if s.start > row {
                pieces.push(zeros(s.start - row)?);
            }
            let lora = self.adapter(s.adapter).expect("segments name adapters of this module");
            let (a, b) = lora.weights(inference);
            let (a, b) = (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
            let xs = flat.narrow(0, s.start, s.len)?;
            // PEFT: base(x) + B(A(dropout(x))) * scale; dropout only on the LoRA path.
            let xs = match s.dropout_seed.filter(|_| lora.dropout > 0.0) {
                Some(seed) => dropout(&xs, lora.dropout, seed ^ (self.index as u64).wrapping_mul(crate::rng::GOLDEN_GAMMA))?,
                None => xs,
            };
            pieces.push((xs.matmul(&a.t()?)?.matmul(&b.t()?)? * lora.scale)?);
            row = s.start + s.len;
        }
        if row < n_rows {
            pieces.push(zeros(n_rows - row)?);
        }
        let delta = Tensor::cat(&pieces, 0)?.reshape(base.shape())?;
        base + delta
    }

    /// PEFT init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    pub fn new_adapter(&self, cfg: &LoraConfig, rng: &mut impl Rng, device: &Device) -> Result<LoraAdapter> {
        let (out, inp, r) = (self.out_features(), self.in_features(), cfg.rank);
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
        let a = Tensor::from_vec(a, (r, inp), device)?;
        let b = Tensor::zeros((out, r), DType::F32, device)?;
        Ok(LoraAdapter { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, scale: cfg.scale(), dropout: cfg.dropout })
    }

    /// W + scale * B A of adapter `i`, in the weight's dtype (for `merge`). A quantized
    /// weight is merged into its dequantized values, as PEFT merges into a 4-bit base.
    pub fn merged_weight(&self, i: usize) -> Result<Tensor> {
        let weight = self.weight.dense()?;
        match self.adapter(i) {
            None => Ok(weight),
            Some(l) => {
                let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
                Ok((weight.to_dtype(DType::F32)? + delta)?.to_dtype(weight.dtype())?)
            }
        }
    }
}

/// Inverted dropout with a mask drawn from `seed` (deterministic, so a resumed run
/// replays the same masks without saving RNG state). SplitMix64 gives 64 random bits
/// per element at a few cycles each (a ChaCha-based StdRng was the bottleneck of a
/// dropout step); a 24-bit uniform is plenty for a keep/drop decision.
fn dropout(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
    let keep_scale = (1.0 / (1.0 - p)) as f32;
    let threshold = ((1.0 - p) * (1u64 << 24) as f64) as u64;
    let mut state = seed;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if (crate::rng::splitmix64(&mut state) >> 40) < threshold { keep_scale } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// `model.layers.3.self_attn.q_proj` -> PEFT keys for A and B.
pub fn peft_keys(module_path: &str) -> (String, String) {
    (
        format!("base_model.model.{module_path}.lora_A.weight"),
        format!("base_model.model.{module_path}.lora_B.weight"),
    )
}

/// The `adapter_config.json` PEFT and vLLM read.
pub fn adapter_config_json(cfg: &LoraConfig, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "base_model_name_or_path": base_model,
        "revision": null,
        "use_dora": false,
    })
}

pub fn parse_adapter_config(path: &std::path::Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read adapter config", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let field = |k: &str| v.get(k).with_context(|| format!("{}: missing field `{k}`", path.display()));
    if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            bail!("{}: peft_type `{t}` is not LORA", path.display());
        }
    }
    reject_unsupported_peft_features(&v).with_context(|| format!("{}", path.display()))?;
    let rank = field("r")?.as_u64().with_context(|| format!("{}: field `r` is not an integer", path.display()))? as usize;
    let alpha = field("lora_alpha")?.as_f64().with_context(|| format!("{}: field `lora_alpha` is not a number", path.display()))?;
    let targets = match field("target_modules")? {
        serde_json::Value::Array(a) => a.iter().filter_map(|s| s.as_str().map(String::from)).collect::<Vec<_>>(),
        serde_json::Value::String(s) => LoraConfig::parse_targets(s)?,
        _ => bail!("{}: field `target_modules` must be a list", path.display()),
    };
    for t in &targets {
        if !ALL_TARGETS.contains(&t.as_str()) {
            bail!("{}: target module `{t}` is not supported (supported: {})", path.display(), ALL_TARGETS.join(", "));
        }
    }
    Ok(LoraConfig {
        rank,
        alpha,
        dropout: v.get("lora_dropout").and_then(|d| d.as_f64()).unwrap_or(0.0),
        use_rslora: v.get("use_rslora").and_then(|d| d.as_bool()).unwrap_or(false),
        target_modules: targets,
    })
}

/// PEFT options that change what the adapter computes or which weights it holds. We
/// load plain LoRA only; anything else must fail here, not later as a shape mismatch or
/// as an adapter that silently computes something else than it did under PEFT.
fn reject_unsupported_peft_features(v: &serde_json::Value) -> Result<()> {
    use serde_json::Value;
    let set = |k: &str| match v.get(k) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    let unsupported = [
        ("use_dora", "DoRA (`use_dora: true`)"),
        ("rank_pattern", "per-module ranks (`rank_pattern`)"),
        ("alpha_pattern", "per-module alphas (`alpha_pattern`)"),
        ("layers_to_transform", "adapting only some layers (`layers_to_transform`)"),
        ("modules_to_save", "fully trained extra modules (`modules_to_save`)"),
    ];
    let found: Vec<&str> = unsupported.iter().filter(|(k, _)| set(k)).map(|(_, what)| *what).collect();
    if !found.is_empty() {
        bail!("this adapter uses {}, which lora-train does not support (plain LoRA only)", found.join(", "));
    }
    Ok(())
}

pub use crate::io::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_keeps_the_expected_fraction_scaled_and_is_deterministic() -> candle_core::Result<()> {
        let x = Tensor::ones((64, 512), DType::F32, &Device::Cpu)?;
        let a = dropout(&x, 0.25, 42)?.flatten_all()?.to_vec1::<f32>()?;
        let b = dropout(&x, 0.25, 42)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        let kept = a.iter().filter(|v| **v > 0.0).count() as f64 / a.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
        let c = dropout(&x, 0.25, 43)?.flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(a, c);
        Ok(())
    }

    fn parse(json: &str) -> Result<LoraConfig> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("adapter_config.json");
        std::fs::write(&path, json)?;
        parse_adapter_config(&path)
    }

    #[test]
    fn adapter_configs_with_unsupported_peft_features_are_refused() {
        let base = r#""peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]"#;
        // What PEFT itself writes for a plain LoRA (the features present but off) loads.
        let plain = parse(&format!(
            r#"{{{base}, "use_dora": false, "rank_pattern": {{}}, "alpha_pattern": {{}}, "layers_to_transform": null, "modules_to_save": null}}"#
        ))
        .unwrap();
        assert_eq!((plain.rank, plain.alpha), (8, 16.0));
        for (extra, needle) in [
            (r#""use_dora": true"#, "DoRA"),
            (r#""rank_pattern": {"q_proj": 16}"#, "rank_pattern"),
            (r#""alpha_pattern": {"v_proj": 4}"#, "alpha_pattern"),
            (r#""layers_to_transform": [0, 1]"#, "layers_to_transform"),
            (r#""layers_to_transform": 3"#, "layers_to_transform"),
            (r#""modules_to_save": ["lm_head"]"#, "modules_to_save"),
        ] {
            let err = format!("{:#}", parse(&format!("{{{base}, {extra}}}")).unwrap_err());
            assert!(err.contains(needle) && err.contains("not support") && err.contains("adapter_config.json"), "{extra}: {err}");
        }
    }

    #[test]
    fn dropout_mask_is_pinned() -> candle_core::Result<()> {
        // Masks are part of a run's identity (resume replays them): these 64 keep/drop
        // decisions for seed 42, p = 0.25 must never change.
        let x = Tensor::ones(64, DType::F32, &Device::Cpu)?;
        let kept = dropout(&x, 0.25, 42)?.to_vec1::<f32>()?;
        let bits = kept.iter().enumerate().fold(0u64, |acc, (i, v)| if *v > 0.0 { acc | 1 << i } else { acc });
        assert_eq!(bits, 0xdb7d_f7bd_27ef_ff5f);
        Ok(())
    }
}
