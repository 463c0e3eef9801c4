//! The shared training configuration of every method (`sft`, `sweep`, and the methods
//! built on the engine): command-line flags over an optional TOML file (`--config FILE`)
//! over built-in defaults. Every option is `Option<T>` in [`TrainOptions`] so that "not
//! given" is visible and the three layers merge key by key; [`TrainConfig`] is the resolved
//! result, written to `RUN/run.json`. Adding a flag touches two places: its field in
//! [`TrainOptions`] (flag, doc, TOML key) and its field + default in [`TrainConfig`] /
//! [`TrainOptions::resolve`].
//!
//! TOML keys are the flag names with underscores: `learning_rate = 2e-4`, `lora_rank = 16`,
//! `target_modules = ["q_proj", "v_proj"]` (or a comma-separated string).
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::schedule::SchedulerKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    F32,
    Bf16,
}

impl DTypeArg {
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            DTypeArg::F32 => candle_core::DType::F32,
            DTypeArg::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// `--gradient-checkpointing`: keep only each decoder layer's input for the backward and
/// recompute the layer there (same gradients, one more forward).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointingArg {
    /// On when the memory plan says the run would not fit otherwise, or when the base is
    /// stored as nf4/int8 (whose savings need it).
    #[default]
    Auto,
    On,
    Off,
}

fn parse_base_quant(s: &str) -> Result<lora_models::BaseQuant, String> {
    lora_models::BaseQuant::parse(s).map_err(|e| e.to_string())
}

/// Where a run's metrics go besides `metrics.jsonl` (transformers' `--report_to`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    /// Nothing else (the default).
    None,
    /// TensorBoard event files in `RUN/runs/<name>/` (see `tensorboard.rs`).
    Tensorboard,
}

/// The resolved `--report-to` list: `none` alone means nothing, and `none` beside another
/// target is refused (it would be unclear which one wins).
fn resolve_report_to(given: Option<Vec<ReportTo>>, errors: &mut Vec<String>) -> Vec<ReportTo> {
    let mut targets = given.unwrap_or_default();
    if targets.contains(&ReportTo::None) && targets.len() > 1 {
        errors.push("--report-to: `none` cannot be combined with another target".into());
    }
    targets.retain(|t| *t != ReportTo::None);
    targets.dedup();
    targets
}

/// Accepts a TOML list or a comma-separated string for `report_to`.
fn de_report_to<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<ReportTo>>, D::Error> {
    let Some(names) = de_modules(d)? else { return Ok(None) };
    names
        .iter()
        .map(|n| <ReportTo as clap::ValueEnum>::from_str(n, true).map_err(|_| serde::de::Error::custom(format!("report_to: unknown target `{n}` (none, tensorboard)"))))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn parse_eval_split(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_nan() || v < 0.0 || (v >= 1.0 && v.fract() != 0.0) {
        return Err(format!("`{s}`: give a fraction in (0, 1), a whole number of samples >= 1, or 0 for no evaluation"));
    }
    Ok(v)
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// Accepts a TOML list or a comma-separated string for `target_modules`.
fn de_modules<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum M {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<M>::deserialize(d)? {
        None => None,
        Some(M::One(s)) => Some(s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()),
        Some(M::Many(v)) => Some(v),
    })
}

/// Every shared training flag, flattened into each method's arguments. Defaults are
/// applied in [`TrainOptions::resolve`].
#[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOptions {
    /// Base model: a Hugging Face model directory, a .gguf file, or a hub id (Org/Name).
    #[arg(long, help_heading = "Data and model")]
    pub model: Option<String>,
    /// Training data: chat JSONL (`{"messages": [...]}` per line).
    #[arg(long, help_heading = "Data and model")]
    pub dataset: Option<PathBuf>,
    /// Held-out data for evaluation (chat JSONL). Mutually exclusive with --eval-split.
    #[arg(long, help_heading = "Data and model", conflicts_with = "eval_split")]
    pub eval_dataset: Option<PathBuf>,
    /// Hold out part of --dataset for evaluation: a fraction in (0, 1), a number of
    /// samples, or 0 for no evaluation. [default: 0.2 when no --eval-dataset is given]
    #[arg(long, help_heading = "Data and model", value_parser = parse_eval_split)]
    pub eval_split: Option<f64>,
    /// Train on a random subsample of this many training samples (drawn with --seed after
    /// the held-out split). [default: all]
    #[arg(long, help_heading = "Data and model", value_parser = parse_positive)]
    pub max_train_samples: Option<usize>,
    /// Run directory: final adapter, checkpoints/, metrics.jsonl, run.json, report.md.
    #[arg(long, short = 'o', help_heading = "Data and model")]
    pub output: Option<PathBuf>,
    /// Longest sequence in tokens; longer samples are truncated (and counted). [default: 2048]
    #[arg(long, help_heading = "Data and model", value_parser = parse_positive)]
    pub max_sequence_length: Option<usize>,
    /// Pack several samples into each row of --max-sequence-length tokens (attention never
    /// crosses sample boundaries). [default: off]
    #[arg(long, help_heading = "Data and model", num_args = 0..=1, default_missing_value = "true")]
    pub packing: Option<bool>,
    /// Without packing, put samples of similar length in the same batch to waste less
    /// padding (transformers' group_by_length). [default: off]
    #[arg(long, help_heading = "Data and model", num_args = 0..=1, default_missing_value = "true")]
    pub group_by_length: Option<bool>,
    /// Model dtype: f32 or bf16 (LoRA weights and optimizer state stay f32). [default: f32]
    #[arg(long, help_heading = "Data and model", value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Storage dtype of the frozen base weights: bf16 halves their memory while compute
    /// stays in --dtype. [default: --dtype]
    #[arg(long, help_heading = "Data and model", value_enum)]
    pub base_dtype: Option<DTypeArg>,
    /// How the frozen base is stored: nf4 (QLoRA's 4-bit NormalFloat with double-quantized
    /// absmax, as bitsandbytes), int8 (row-wise absmax), none (dense in --base-dtype), or
    /// auto (a .gguf model keeps its quantized blocks; others none). PEFT's load_in_4bit /
    /// load_in_8bit are accepted. Dequantized one projection at a time. [default: auto]
    #[arg(long, help_heading = "Data and model", value_parser = parse_base_quant)]
    pub base_quant: Option<lora_models::BaseQuant>,
    /// Device: cpu, cuda, cuda:N, or auto (the first GPU if there is one). A list
    /// (cuda:0,cuda:1): `sft` trains data-parallel replicas sharing each step's
    /// micro-batches; `sweep` and `run` place candidates on the listed devices (auto: every
    /// GPU found, else cpu) and a workflow's final run trains on them. [default: auto]
    // `--devices`, the old name on `sweep` and `run`, stays a hidden alias for one release.
    #[arg(long, alias = "devices", help_heading = "Data and model")]
    pub device: Option<String>,

    /// Optimizer steps to run (overrides --epochs).
    #[arg(long, help_heading = "Training", conflicts_with = "epochs", value_parser = parse_positive)]
    pub steps: Option<usize>,
    /// Passes over the training data. [default: min(5, ceil(2500 / training samples))]
    #[arg(long, help_heading = "Training", value_parser = parse_positive)]
    pub epochs: Option<usize>,
    /// Samples (rows, with --packing) per micro-batch. [default: 4]
    #[arg(long, help_heading = "Training", value_parser = parse_positive)]
    pub batch_size: Option<usize>,
    /// Keep only each decoder layer's input for the backward and recompute the layer there
    /// (transformers' gradient_checkpointing; same gradients, about 1.3x the step time):
    /// on, off, or auto (on when the memory plan says the run would not fit otherwise, or
    /// with an nf4/int8 base). [default: auto]
    #[arg(long, help_heading = "Training", value_enum)]
    pub gradient_checkpointing: Option<CheckpointingArg>,
    /// Micro-batches per optimizer step; the loss is normalised by the loss tokens of all of
    /// them together, so batch 4 equals batch 2 x accumulation 2. [default: 1]
    #[arg(long, help_heading = "Training", value_parser = parse_positive)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Peak learning rate of AdamW. [default: 2e-4]
    #[arg(long, visible_alias = "lr", help_heading = "Training")]
    pub learning_rate: Option<f64>,
    /// Learning-rate schedule after warmup. [default: cosine]
    #[arg(long, help_heading = "Training", value_enum)]
    pub lr_scheduler: Option<SchedulerKind>,
    /// Fraction of the steps spent warming the learning rate up linearly from 0. [default: 0.03]
    #[arg(long, help_heading = "Training")]
    pub warmup_ratio: Option<f64>,
    /// AdamW decoupled weight decay. [default: 0.0]
    #[arg(long, help_heading = "Training")]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this value (0 disables). [default: 1.0]
    #[arg(long, help_heading = "Training")]
    pub max_grad_norm: Option<f64>,
    /// Seed for LoRA init, data order and dropout. [default: 42]
    #[arg(long, help_heading = "Training")]
    pub seed: Option<u64>,

    /// LoRA rank r. [default: 8]
    #[arg(long, visible_alias = "rank", help_heading = "LoRA", value_parser = parse_positive)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with --use-rslora).
    /// [default: 2 x rank]
    #[arg(long, help_heading = "LoRA")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input (PEFT default 0; the dropout path is slower). [default: 0.0]
    #[arg(long, help_heading = "LoRA")]
    pub lora_dropout: Option<f64>,
    /// Comma-separated modules to adapt, or `all-linear`.
    /// [default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]
    #[arg(long, help_heading = "LoRA", value_delimiter = ',')]
    #[serde(default, deserialize_with = "de_modules")]
    pub target_modules: Option<Vec<String>>,
    /// Rank-stabilised LoRA scaling alpha / sqrt(r). [default: off]
    #[arg(long, help_heading = "LoRA", num_args = 0..=1, default_missing_value = "true")]
    pub use_rslora: Option<bool>,

    /// Save a resumable checkpoint every N optimizer steps (and always at the end).
    /// [default: 100]
    #[arg(long, help_heading = "Checkpoints and evaluation", value_parser = parse_positive)]
    pub checkpoint_interval: Option<usize>,
    /// Keep only the N most recent checkpoints (0 keeps all). [default: 3]
    #[arg(long, help_heading = "Checkpoints and evaluation")]
    pub save_total_limit: Option<usize>,
    /// Evaluate on the held-out set every N optimizer steps (also before the first and
    /// after the last step). [default: about 10 evaluations per run]
    #[arg(long, help_heading = "Checkpoints and evaluation", value_parser = parse_positive)]
    pub eval_interval: Option<usize>,
    /// Also log every metrics row to: `tensorboard` (event files in RUN/runs/NAME/, under
    /// transformers' tags) or `none`; a comma-separated list. [default: none]
    #[arg(long, help_heading = "Checkpoints and evaluation", value_enum, value_delimiter = ',')]
    #[serde(default, deserialize_with = "de_report_to")]
    pub report_to: Option<Vec<ReportTo>>,
}

/// `hi`'s given keys over `lo`'s, through serde (every field is an `Option`, skipped
/// when None), so a new flag needs no entry in a merge list.
fn overlay<T: Serialize + serde::de::DeserializeOwned>(hi: T, lo: T) -> T {
    let (Ok(serde_json::Value::Object(hi_map)), Ok(serde_json::Value::Object(mut merged))) = (serde_json::to_value(&hi), serde_json::to_value(&lo)) else {
        return hi;
    };
    for (k, v) in hi_map {
        if !v.is_null() {
            merged.insert(k, v);
        }
    }
    serde_json::from_value(serde_json::Value::Object(merged)).unwrap_or(hi)
}

impl TrainOptions {
    /// `self` (the command line) wins over `lower` (the config file). `--steps` on the
    /// command line also removes `epochs` from the file, and vice versa.
    pub fn over(self, lower: TrainOptions) -> TrainOptions {
        let mut lower = lower;
        if self.steps.is_some() {
            lower.epochs = None;
        }
        if self.epochs.is_some() {
            lower.steps = None;
        }
        if self.eval_split.is_some() {
            lower.eval_dataset = None;
        }
        if self.eval_dataset.is_some() {
            lower.eval_split = None;
        }
        overlay(self, lower)
    }

    /// Apply defaults and check ranges. Every problem is reported, not only the first.
    pub fn resolve(self) -> Result<TrainConfig> {
        let mut errors = Vec::new();
        let mut need = |name: &str, present: bool| {
            if !present {
                errors.push(format!("missing --{name} (on the command line or as `{}` in --config)", name.replace('-', "_")));
            }
        };
        need("model", self.model.is_some());
        need("dataset", self.dataset.is_some());
        need("output", self.output.is_some());
        if self.steps.is_some() && self.epochs.is_some() {
            errors.push("give --steps or --epochs, not both".into());
        }
        if self.eval_split.is_some() && self.eval_dataset.is_some() {
            errors.push("give --eval-dataset or --eval-split, not both".into());
        }
        let rank = self.lora_rank.unwrap_or(8);
        let target_modules: Vec<String> = match self.target_modules {
            None => lora_models::ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            Some(v) => match lora_models::LoraConfig::parse_targets(&v.join(",")) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!("--target-modules: {e:#}"));
                    Vec::new()
                }
            },
        };
        // Managed fine-tuning services hold out 20% when no eval file is given; so do we.
        let eval_split = match (self.eval_dataset.as_ref(), self.eval_split) {
            (Some(_), _) => None,
            (None, Some(v)) if v == 0.0 => None,
            (None, Some(v)) => Some(v),
            (None, None) => Some(lora_datasets::DEFAULT_EVAL_FRACTION),
        };
        let cfg = TrainConfig {
            model: self.model.unwrap_or_default(),
            dataset: self.dataset.unwrap_or_default(),
            eval_dataset: self.eval_dataset,
            eval_split,
            max_train_samples: self.max_train_samples,
            output: self.output.unwrap_or_default(),
            max_sequence_length: self.max_sequence_length.unwrap_or(2048),
            packing: self.packing.unwrap_or(false),
            group_by_length: self.group_by_length.unwrap_or(false),
            dtype: self.dtype.unwrap_or(DTypeArg::F32),
            base_dtype: self.base_dtype.or(self.dtype).unwrap_or(DTypeArg::F32),
            base_quant: self.base_quant.unwrap_or_default(),
            gradient_checkpointing: self.gradient_checkpointing.unwrap_or_default(),
            device: self.device.unwrap_or_else(|| "auto".into()),
            steps: self.steps,
            epochs: self.epochs,
            batch_size: self.batch_size.unwrap_or(4),
            gradient_accumulation_steps: self.gradient_accumulation_steps.unwrap_or(1),
            learning_rate: self.learning_rate.unwrap_or(2e-4),
            lr_scheduler: self.lr_scheduler.unwrap_or(SchedulerKind::Cosine),
            warmup_ratio: self.warmup_ratio.unwrap_or(0.03),
            weight_decay: self.weight_decay.unwrap_or(0.0),
            max_grad_norm: self.max_grad_norm.unwrap_or(1.0),
            seed: self.seed.unwrap_or(42),
            lora_rank: rank,
            lora_alpha: self.lora_alpha.unwrap_or(2.0 * rank as f64),
            lora_dropout: self.lora_dropout.unwrap_or(0.0),
            target_modules,
            use_rslora: self.use_rslora.unwrap_or(false),
            checkpoint_interval: self.checkpoint_interval.unwrap_or(100),
            save_total_limit: self.save_total_limit.unwrap_or(3),
            eval_interval: self.eval_interval,
            report_to: resolve_report_to(self.report_to, &mut errors),
        };
        if !(cfg.learning_rate > 0.0 && cfg.learning_rate.is_finite()) {
            errors.push(format!("--learning-rate must be a positive number, got {}", cfg.learning_rate));
        }
        if !(0.0..1.0).contains(&cfg.warmup_ratio) {
            errors.push(format!("--warmup-ratio must be in [0, 1), got {}", cfg.warmup_ratio));
        }
        if !(0.0..1.0).contains(&cfg.lora_dropout) {
            errors.push(format!("--lora-dropout must be in [0, 1), got {}", cfg.lora_dropout));
        }
        if cfg.weight_decay.is_nan() || cfg.weight_decay < 0.0 {
            errors.push(format!("--weight-decay must be >= 0, got {}", cfg.weight_decay));
        }
        if cfg.max_grad_norm.is_nan() || cfg.max_grad_norm < 0.0 {
            errors.push(format!("--max-grad-norm must be >= 0 (0 disables clipping), got {}", cfg.max_grad_norm));
        }
        if cfg.lora_alpha.is_nan() || cfg.lora_alpha <= 0.0 {
            errors.push(format!("--lora-alpha must be positive, got {}", cfg.lora_alpha));
        }
        if cfg.max_sequence_length < 2 {
            errors.push("--max-sequence-length must be at least 2".into());
        }
        if !errors.is_empty() {
            bail!("invalid configuration:\n  {}", errors.join("\n  "));
        }
        for warning in cfg.lora_config().hosting_warnings() {
            tracing::warn!("{warning}");
        }
        Ok(cfg)
    }
}

/// The resolved SFT configuration (`RUN/run.json` holds it under `"config"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: String,
    pub dataset: PathBuf,
    pub eval_dataset: Option<PathBuf>,
    pub eval_split: Option<f64>,
    #[serde(default)]
    pub max_train_samples: Option<usize>,
    pub output: PathBuf,
    pub max_sequence_length: usize,
    pub packing: bool,
    pub group_by_length: bool,
    pub dtype: DTypeArg,
    /// Storage dtype of the frozen base weights.
    pub base_dtype: DTypeArg,
    /// How the frozen projections are stored (older run.json files: auto).
    #[serde(default)]
    pub base_quant: lora_models::BaseQuant,
    #[serde(default)]
    pub gradient_checkpointing: CheckpointingArg,
    pub device: String,
    pub steps: Option<usize>,
    pub epochs: Option<usize>,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler: SchedulerKind,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub checkpoint_interval: usize,
    pub save_total_limit: usize,
    pub eval_interval: Option<usize>,
    /// Where metrics go besides `metrics.jsonl` (empty: nowhere). Runs written before the
    /// flag existed have no such key.
    #[serde(default)]
    pub report_to: Vec<ReportTo>,
}

impl TrainConfig {
    /// The LoRA part of the configuration, as `lora-models` takes it.
    pub fn lora_config(&self) -> lora_models::LoraConfig {
        lora_models::LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            target_modules: self.target_modules.clone(),
        }
    }

    /// Default epochs for a dataset size: min(5, ceil(2500 / samples)).
    pub fn default_epochs(train_samples: usize) -> usize {
        (2500usize.div_ceil(train_samples.max(1))).clamp(1, 5)
    }

    /// Fields whose change makes a checkpoint meaningless to resume from (everything but
    /// where outputs go and how often they are written).
    pub fn resume_relevant(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            // Checkpointing changes memory and time, not the gradients.
            for k in ["output", "checkpoint_interval", "save_total_limit", "eval_interval", "device", "gradient_checkpointing", "report_to"] {
                m.remove(k);
            }
        }
        v
    }
}

/// What clap gives the flag group `T` when none of its flags is on the command line: its
/// defaults, for library callers (the workflows) that build options without a command
/// line, so a default is written once, in the flag's attribute.
pub fn clap_defaults<T: clap::Args + clap::FromArgMatches>() -> Result<T> {
    let matches = T::augment_args(clap::Command::new("defaults")).try_get_matches_from(["defaults"])?;
    Ok(T::from_arg_matches(&matches)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: TrainOptions,
    }

    #[test]
    fn flags_override_toml_override_defaults() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "model = \"m\"\ndataset = \"d.jsonl\"\nepochs = 3\nlearning_rate = 1e-3\nlora_rank = 16\ntarget_modules = \"q_proj, v_proj\"\n")?;
        let toml = TrainOptions::from_toml_file(&file)?;
        let cli = Cli::try_parse_from(["x", "--steps", "7", "--rank", "4", "-o", "out", "--packing"])?.o;
        let cfg = cli.over(toml).resolve()?;
        assert_eq!(cfg.steps, Some(7));
        assert_eq!(cfg.epochs, None);
        assert_eq!(cfg.lora_rank, 4);
        assert_eq!(cfg.lora_alpha, 8.0);
        assert_eq!(cfg.learning_rate, 1e-3);
        assert_eq!(cfg.dataset, dir.path().join("d.jsonl"));
        assert_eq!(cfg.target_modules, vec!["q_proj", "v_proj"]);
        assert!(cfg.packing);
        assert_eq!(cfg.batch_size, 4);
        assert_eq!(cfg.lr_scheduler, SchedulerKind::Cosine);
        Ok(())
    }

    #[test]
    fn bad_values_are_all_reported() {
        let cli = Cli::try_parse_from(["x", "--lora-dropout", "1.5", "--target-modules", "q_proj,qkv", "--lr=-1"]).unwrap().o;
        let err = format!("{:#}", cli.resolve().unwrap_err());
        for needle in ["missing --model", "missing --dataset", "missing --output", "lora-dropout", "`qkv`", "learning-rate"] {
            assert!(err.contains(needle), "{needle} not in {err}");
        }
        assert!(Cli::try_parse_from(["x", "--steps", "3", "--epochs", "2"]).is_err());
        assert!(Cli::try_parse_from(["x", "--batch-size", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--eval-split", "1.5"]).is_err());
        // A misspelt key in a config file is refused by config_file::expand_argv, which knows
        // the command's own flags too (config_file's tests).
    }

    #[test]
    fn report_to_takes_a_list_and_refuses_none_beside_a_target() -> Result<()> {
        let base = ["x", "--model", "m", "--dataset", "d", "-o", "o"];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.o);
        assert_eq!(parse(&[])?.resolve()?.report_to, vec![]);
        assert_eq!(parse(&["--report-to", "none"])?.resolve()?.report_to, vec![]);
        assert_eq!(parse(&["--report-to", "tensorboard"])?.resolve()?.report_to, vec![ReportTo::Tensorboard]);
        let err = format!("{:#}", parse(&["--report-to", "tensorboard,none"])?.resolve().unwrap_err());
        assert!(err.contains("--report-to: `none` cannot be combined"), "{err}");
        assert!(parse(&["--report-to", "wandb"]).is_err());
        // A config file takes a string or a list; an unknown name is refused.
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "report_to = \"tensorboard\"\n")?;
        assert_eq!(TrainOptions::from_toml_file(&file)?.report_to, Some(vec![ReportTo::Tensorboard]));
        std::fs::write(&file, "report_to = [\"tensorboard\"]\n")?;
        assert_eq!(TrainOptions::from_toml_file(&file)?.report_to, Some(vec![ReportTo::Tensorboard]));
        std::fs::write(&file, "report_to = \"wandb\"\n")?;
        assert!(format!("{:#}", TrainOptions::from_toml_file(&file).unwrap_err()).contains("unknown target `wandb`"));
        // A run.json written before the flag existed still loads (no report_to key).
        let mut old = serde_json::to_value(parse(&[])?.resolve()?)?;
        old.as_object_mut().unwrap().remove("report_to");
        assert_eq!(serde_json::from_value::<TrainConfig>(old)?.report_to, vec![]);
        Ok(())
    }

    #[test]
    fn default_epochs_rule() {
        assert_eq!(TrainConfig::default_epochs(100), 5);
        assert_eq!(TrainConfig::default_epochs(1000), 3);
        assert_eq!(TrainConfig::default_epochs(2500), 1);
        assert_eq!(TrainConfig::default_epochs(100_000), 1);
    }
}
