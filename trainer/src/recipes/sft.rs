//! Supervised fine-tuning of a LoRA adapter, top to bottom:
//!
//! 1. run directory: fresh, or `--resume` from its latest complete checkpoint
//! 2. model + tokenizer, dataset -> tokens (the loss mask of ARCHITECTURE.md), held-out split
//! 3. the SFT method: its micro-batches, and its loss = sum over loss tokens of the token
//!    cross-entropy, divided by the loss tokens of ALL micro-batches of the optimizer step
//!    (so batch 4 and batch 2 x accumulation 2 give the same update)
//! 4. the engine trains it: AdamW, schedule, clipping, NaN/Inf stop, eval, checkpoints,
//!    metrics, report (`engine/`)
//!
//! Determinism: batches are a pure function of (seed, epoch, index), dropout masks of
//! (seed, step, micro-batch), and a checkpoint stores adapter + AdamW moments + step, so a
//! run killed at any point and resumed produces the same adapter bit for bit (on CPU).
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use lora_datasets::{Batch, BatchConfig, DataLoader, Dataset};
use lora_models::{Model, TokenizerBundle};

use crate::config::TrainConfig;
use crate::data::{self, TokenizedSet};
use crate::engine::{self, BatchTokens, EvalOutput, InputRows, Method, MicroLoss, Run, RunOptions, RunSummary};
use crate::recipes::recipe::{self, Recipe};
use crate::share_key::ShareKey;
use crate::report::{q, ChartSpec, ReportSpec, SVG_FILE};

/// Train one adapter as `cfg` says; the summary `sft --json` prints.
pub fn run(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let devices = crate::device::device_list(&cfg.device)?;
    if devices.len() <= 1 {
        return recipe::run_alone(&SftRecipe::default(), cfg, opts);
    }
    // Several devices: one run, data-parallel over replicas of the model (`parallel/`).
    let recipe = SftRecipe::default();
    let cfg = recipe::prepared(&recipe, cfg)?;
    let resume_from = engine::prepare_run_dir(&cfg.output, &cfg, &recipe.options(), opts.resume)?;
    let comms = crate::parallel::communicators(&devices)?;
    let split = recipe.read(&cfg)?;
    let (mut model, bundle, base_source) = load_base_on(&cfg, &devices[0])?;
    let name = lora_models::DEFAULT_ADAPTER;
    let (method, fingerprint) = recipe.build(split, &mut model, &bundle, &cfg, name)?;
    let data = recipe.shared_data(&cfg).context("the tokenized data vanished")?;
    let run = Run::start(&mut model, name, cfg.clone(), method, fingerprint, resume_from, &base_source, opts)?;
    // One more replica per device, each with its own copy of the base and the same method
    // over the same tokenized data.
    engine::data_parallel::train_one_data_parallel(&model, run, comms, |rank| {
        let (mut replica, _, _) = load_base_on(&cfg, &devices[rank])?;
        replica.add_adapter(name, &cfg.lora_config(), cfg.seed)?;
        Ok((replica, Sft::new(&data, &cfg)))
    })
}

/// SFT as a [`Recipe`]: chat samples, tokenized once per data setting and shared by every
/// run that has the same (a sweep group's candidates).
#[derive(Default)]
pub struct SftRecipe {
    tokenized: RefCell<HashMap<ShareKey, Arc<SftData>>>,
}

impl SftRecipe {
    /// The tokenized data of `cfg`, once built.
    fn shared_data(&self, cfg: &TrainConfig) -> Option<Arc<SftData>> {
        self.tokenized.borrow().get(&ShareKey::data(cfg)).cloned()
    }
}

impl Recipe for SftRecipe {
    type Method = Sft;
    type Data = (Dataset, Option<Dataset>);

    fn name(&self) -> &'static str {
        "sft"
    }

    fn options(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn read(&self, cfg: &TrainConfig) -> Result<Self::Data> {
        load_split(cfg)
    }

    fn build(&self, (train, eval): Self::Data, _model: &mut Model, bundle: &TokenizerBundle, cfg: &TrainConfig, _name: &str) -> Result<(Sft, String)> {
        let data = match self.shared_data(cfg) {
            Some(d) => d,
            None => {
                let d = Arc::new(SftData::tokenize(bundle, &train, eval.as_ref(), cfg)?);
                self.tokenized.borrow_mut().insert(ShareKey::data(cfg), d.clone());
                d
            }
        };
        Ok((Sft::new(&data, cfg), data.train.fingerprint()))
    }
}

pub use super::recipe::{load_base, load_base_on};

/// The training set and the held-out set: `--eval-dataset`, or `--eval-split` of
/// `--dataset` (a fraction or a count; 0 = none), then `--max-train-samples`.
pub fn load_split(cfg: &TrainConfig) -> Result<(Dataset, Option<Dataset>)> {
    load_split_with(cfg, data::load_chat_dataset)
}

/// [`load_split`] for data that `load` reads (preference pairs for dpo/orpo, prompt
/// files for grpo).
pub fn load_split_with(cfg: &TrainConfig, load: fn(&std::path::Path) -> Result<Dataset>) -> Result<(Dataset, Option<Dataset>)> {
    let full = load(&cfg.dataset)?;
    let (train, eval) = match (&cfg.eval_dataset, cfg.eval_split) {
        (Some(path), _) => (full, Some(load(path)?)),
        (None, Some(split)) => {
            let fraction = if split >= 1.0 { split / full.len() as f64 } else { split };
            if split >= 1.0 && split as usize >= full.len() {
                bail!("--eval-split {split} leaves no training data ({} has {} samples)", cfg.dataset.display(), full.len());
            }
            let (tr, ev) = full.split_eval(fraction, cfg.seed);
            if ev.is_empty() {
                tracing::warn!("--eval-split {split}: {} has too few samples to hold any out; training without evaluation", cfg.dataset.display());
                (tr, None)
            } else {
                (tr, Some(ev))
            }
        }
        (None, None) => (full, None),
    };
    let train = match cfg.max_train_samples {
        Some(k) if k < train.len() => {
            tracing::info!("training on {k} of {} samples (--max-train-samples, seed {})", train.len(), cfg.seed);
            train.subsample(k, cfg.seed)
        }
        _ => train,
    };
    Ok((train, eval))
}

/// Tokenized training and held-out sets (shared by every run of a sweep over one dataset).
pub struct SftData {
    pub train: TokenizedSet,
    pub eval: Option<TokenizedSet>,
    pub pad: u32,
}

impl SftData {
    pub fn tokenize(bundle: &TokenizerBundle, train: &Dataset, eval: Option<&Dataset>, cfg: &TrainConfig) -> Result<Self> {
        let train = data::tokenize_dataset(bundle, train, cfg.max_sequence_length)?;
        let eval = eval.map(|d| data::tokenize_dataset(bundle, d, cfg.max_sequence_length)).transpose()?;
        tracing::info!(
            "{} training samples ({} tokens, {} loss tokens, {} truncated), {} eval samples",
            train.samples.len(),
            train.tokens,
            train.loss_tokens,
            train.truncated,
            eval.as_ref().map_or(0, |e| e.samples.len()),
        );
        Ok(SftData { train, eval, pad: data::pad_token_id(bundle) })
    }
}

/// The SFT method: next-token cross-entropy on the loss-mask tokens.
pub struct Sft {
    loader: DataLoader,
    eval_loader: Option<DataLoader>,
    accumulation: usize,
    eval_samples: usize,
}

impl Sft {
    pub fn new(data: &SftData, cfg: &TrainConfig) -> Self {
        let loader = DataLoader::new(
            data.train.samples.clone(),
            BatchConfig {
                batch_size: cfg.batch_size,
                max_seq_len: cfg.max_sequence_length,
                packing: cfg.packing,
                group_by_length: cfg.group_by_length,
                pad_token_id: data.pad,
                seed: cfg.seed,
            },
        );
        Sft {
            loader,
            eval_loader: data.eval.as_ref().map(|e| data::eval_loader(e, cfg.batch_size, cfg.max_sequence_length, data.pad)),
            accumulation: cfg.gradient_accumulation_steps,
            eval_samples: data.eval.as_ref().map_or(0, |e| e.samples.len()),
        }
    }
}

/// SFT's report: the loss per loss token and the perplexity, train and held-out.
pub fn report_spec() -> ReportSpec {
    ReportSpec {
        headline: q("eval_loss", "eval loss per token"),
        higher_is_better: false,
        loss_label: "loss per token",
        progress: Vec::new(),
        eval: vec![q("eval_loss", "eval loss per token"), q("eval_perplexity", "eval perplexity")],
        charts: vec![
            ChartSpec { file: SVG_FILE, title: "Loss per loss token", y_label: "loss (nats per token)", series: vec![q("loss", "train loss"), q("eval_loss", "eval loss")] },
            ChartSpec { file: "perplexity.svg", title: "Eval perplexity", y_label: "perplexity", series: vec![q("eval_perplexity", "eval perplexity")] },
        ],
        ..ReportSpec::loss_only()
    }
}

impl Method for Sft {
    type Batch = Batch;

    fn report_spec(&self) -> ReportSpec {
        report_spec()
    }

    fn name(&self) -> &'static str {
        "sft"
    }

    fn sample_counts(&self) -> (usize, usize) {
        (self.loader.samples().len(), self.eval_samples)
    }

    /// Each epoch is ceil(micro-batches / accumulation) optimizer steps; the last step of
    /// an epoch may take fewer micro-batches.
    fn steps_per_epoch(&self) -> usize {
        self.loader.batches_per_epoch().div_ceil(self.accumulation).max(1)
    }

    fn step_batches(&self, step: usize) -> Result<Vec<Batch>> {
        let (epoch, positions) = engine::step_positions(step, self.loader.batches_per_epoch(), self.accumulation);
        positions.map(|i| self.loader.batch(epoch, i).context("data loader position out of range")).collect()
    }

    fn inputs(&self, b: &Batch) -> Vec<InputRows> {
        vec![InputRows {
            batch_size: b.batch_size,
            seq_len: b.seq_len,
            input_ids: b.input_ids.clone(),
            position_ids: b.position_ids.clone(),
            segment_ids: b.segment_ids.clone(),
            through_adapter: true,
        }]
    }

    fn batch_tokens(&self, b: &Batch) -> BatchTokens {
        BatchTokens { tokens: b.segment_ids.iter().filter(|&&s| s != 0).count(), loss_tokens: b.loss_tokens }
    }

    /// Normalise by the loss tokens of the whole accumulated batch.
    fn denominator(&self, batches: &[Batch]) -> f64 {
        batches.iter().map(|b| b.loss_tokens).sum::<usize>().max(1) as f64
    }

    fn loss(&self, model: &Model, b: &Batch, hidden: &[Tensor]) -> Result<MicroLoss> {
        let shape = (b.batch_size, b.seq_len);
        let ids = Tensor::from_slice(&b.input_ids, shape, model.device())?;
        let mask = Tensor::from_slice(&b.loss_mask, shape, model.device())?;
        let sum = model.loss_sum(&hidden[0], &ids, &mask)?;
        Ok(MicroLoss { sum, metrics: Default::default() })
    }

    fn evaluate(&self, model: &Model) -> Result<Option<EvalOutput>> {
        let Some(loader) = &self.eval_loader else { return Ok(None) };
        let ev = data::evaluate(model, loader)?;
        Ok(Some(EvalOutput { loss: ev.eval_loss, perplexity: Some(ev.perplexity), tokens: ev.loss_tokens as u64, metrics: Default::default() }))
    }
}
