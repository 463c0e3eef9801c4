//! Preference training (DPO, ORPO) of a LoRA adapter, top to bottom:
//!
//! 1. run directory: fresh, or `--resume` (the method's options must match, in `run.json`)
//! 2. pairs: the preference file -> chosen and rejected token sequences, fitted to
//!    `--max-prompt-length` / `--max-length`; model; `--adapter INIT` held as a frozen adapter
//! 3. the reference log-probs (DPO): rows routed to no adapter (the frozen base) or to the
//!    INIT copy, in the same forward pass as the policy rows, or computed once before
//!    training with `--precompute-ref-logps` and kept in the run directory
//! 4. the method: micro-batches of whole pairs (chosen and rejected always together), the
//!    objective's per-pair losses summed, divided by the pairs of the optimizer step
//! 5. the engine trains it (`engine/`)
//!
//! The objective (`dpo.rs`, `orpo.rs`) only maps sequence log-probs to per-pair losses and
//! metrics; everything else here is shared.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_datasets::{PairBatch, PairLimits, PairLoader};
use lora_datasets::Dataset;
use lora_models::{Model, TokenizerBundle};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::engine::{self, BatchTokens, EvalOutput, InputRows, Method, MicroLoss, RunOptions, RunSummary};
use crate::pair_data::{self, PairSet};
use crate::report::{q, ChartSpec, Quantity, ReportSpec, SVG_FILE};
use crate::recipes::recipe::{self, Recipe};
use crate::recipes::sft;

/// The suffix of the adapter a run's starting adapter is loaded as.
const INIT_ADAPTER: &str = "init";
/// Reference log-probs of the training pairs (`--precompute-ref-logps`).
pub const REF_LOGPS_FILE: &str = "ref_logps.json";

/// Sequence log-probs of a set of pairs, f64 `[pairs]` each (the loss math runs in f64:
/// ORPO's log(1 - exp(m)) loses digits in f32 when m is near 0).
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    /// Completion tokens of each side (IPO and ORPO average over them).
    pub chosen_tokens: Tensor,
    pub rejected_tokens: Tensor,
}

impl PairLogps {
    /// From per-row log-probs [2 * pairs] (chosen rows, then rejected) of a pair batch.
    pub fn from_rows(rows: &Tensor, tokens: &[f64]) -> Result<Self> {
        let k = tokens.len() / 2;
        let rows = rows.to_dtype(DType::F64)?;
        let t = Tensor::from_slice(tokens, tokens.len(), rows.device())?;
        Ok(PairLogps { chosen: rows.narrow(0, 0, k)?, rejected: rows.narrow(0, k, k)?, chosen_tokens: t.narrow(0, 0, k)?, rejected_tokens: t.narrow(0, k, k)? })
    }

    /// From stored `[chosen, rejected]` values and token counts.
    pub fn from_values(values: &[[f32; 2]], tokens: &[[f64; 2]], device: &Device) -> Result<Self> {
        let col = |v: Vec<f64>| Tensor::from_vec(v, values.len(), device);
        Ok(PairLogps {
            chosen: col(values.iter().map(|v| v[0] as f64).collect())?,
            rejected: col(values.iter().map(|v| v[1] as f64).collect())?,
            chosen_tokens: col(tokens.iter().map(|t| t[0]).collect())?,
            rejected_tokens: col(tokens.iter().map(|t| t[1]).collect())?,
        })
    }
}

/// Per-pair losses [pairs] (graph attached) and per-pair metric values (TRL's names).
pub struct PairLosses {
    pub losses: Tensor,
    pub metrics: Vec<(&'static str, Tensor)>,
}

/// TRL's reward metrics from per-pair rewards and the log-probs the method reports
/// (accuracy counts a strictly higher chosen reward).
pub fn reward_metrics(rewards_chosen: Tensor, rewards_rejected: Tensor, logps_chosen: &Tensor, logps_rejected: &Tensor) -> Result<Vec<(&'static str, Tensor)>> {
    Ok(vec![
        ("rewards_accuracy", rewards_chosen.gt(&rewards_rejected)?.to_dtype(DType::F64)?),
        ("rewards_margin", (&rewards_chosen - &rewards_rejected)?),
        ("rewards_chosen", rewards_chosen),
        ("rewards_rejected", rewards_rejected),
        ("logps_chosen", logps_chosen.detach()),
        ("logps_rejected", logps_rejected.detach()),
    ])
}

/// What distinguishes DPO from ORPO: the per-pair loss of sequence log-probs.
pub trait PairObjective: Serialize {
    fn name(&self) -> &'static str;
    /// Whether the loss compares against a reference model.
    fn uses_reference(&self) -> bool;
    fn losses(&self, policy: &PairLogps, reference: Option<&PairLogps>) -> Result<PairLosses>;
    /// What the run's report, progress line and summary show (see [`pair_report_spec`]).
    fn report_spec(&self) -> ReportSpec;
}

/// The report of a pair method: its loss per pair (`loss_series`: the loss and its terms)
/// as the headline, and TRL's `rewards/*` and `logps/*` quantities (the `metrics.jsonl`
/// keys of [`reward_metrics`]), train and held-out, one chart per family.
pub fn pair_report_spec(headline: &'static str, loss_title: &'static str, loss_series: Vec<Quantity>, logps_title: &'static str) -> ReportSpec {
    ReportSpec {
        headline: q("eval_loss", headline),
        higher_is_better: false,
        loss_label: "loss per pair",
        progress: vec![q("rewards_accuracy", "rewards/accuracies"), q("rewards_margin", "rewards/margins"), q("logps_chosen", "logps/chosen")],
        eval: vec![
            q("eval_loss", "eval loss per pair"),
            q("eval_rewards_accuracy", "eval_rewards/accuracies"),
            q("eval_rewards_margin", "eval_rewards/margins"),
            q("eval_rewards_chosen", "eval_rewards/chosen"),
            q("eval_rewards_rejected", "eval_rewards/rejected"),
            q("eval_logps_chosen", "eval_logps/chosen"),
            q("eval_logps_rejected", "eval_logps/rejected"),
        ],
        charts: vec![
            ChartSpec { file: SVG_FILE, title: loss_title, y_label: "loss per pair", series: loss_series },
            ChartSpec {
                file: "rewards.svg",
                title: "Rewards of the chosen and rejected completions, and their margin",
                y_label: "reward",
                series: vec![
                    q("rewards_chosen", "rewards/chosen"),
                    q("rewards_rejected", "rewards/rejected"),
                    q("rewards_margin", "rewards/margins"),
                    q("eval_rewards_chosen", "eval_rewards/chosen"),
                    q("eval_rewards_rejected", "eval_rewards/rejected"),
                    q("eval_rewards_margin", "eval_rewards/margins"),
                ],
            },
            ChartSpec {
                file: "accuracy.svg",
                title: "Reward accuracy (pairs whose chosen reward is higher)",
                y_label: "fraction of pairs",
                series: vec![q("rewards_accuracy", "rewards/accuracies"), q("eval_rewards_accuracy", "eval_rewards/accuracies")],
            },
            ChartSpec {
                file: "logps.svg",
                title: logps_title,
                y_label: "log-prob",
                series: vec![
                    q("logps_chosen", "logps/chosen"),
                    q("logps_rejected", "logps/rejected"),
                    q("eval_logps_chosen", "eval_logps/chosen"),
                    q("eval_logps_rejected", "eval_logps/rejected"),
                ],
            },
        ],
        ..ReportSpec::loss_only()
    }
}

/// Mean loss and mean metrics of `objective` over whole sets of scored pairs.
pub fn mean_losses(objective: &impl PairObjective, policy: &PairLogps, reference: Option<&PairLogps>) -> Result<(f64, BTreeMap<String, f64>)> {
    let out = objective.losses(policy, reference)?;
    let mean = |t: &Tensor| -> Result<f64> { Ok(t.detach().mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let metrics = out.metrics.iter().map(|(k, v)| Ok((k.to_string(), mean(v)?))).collect::<Result<_>>()?;
    Ok((mean(&out.losses)?, metrics))
}

/// The pair limits and reference options shared by `dpo` and `orpo`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairOptions {
    /// Keep the last N prompt tokens (None: no limit).
    pub max_prompt_length: Option<usize>,
    /// Cap on prompt + completion (None: `--max-sequence-length`).
    pub max_length: Option<usize>,
    /// Start from this adapter (DPO: and keep a frozen copy of it as the reference).
    pub adapter: Option<PathBuf>,
    /// Compute reference log-probs once before training (DPO).
    pub precompute_ref_logps: bool,
}

impl PairOptions {
    pub fn limits(&self, cfg: &TrainConfig) -> PairLimits {
        PairLimits { max_prompt_length: self.max_prompt_length, max_length: self.max_length.unwrap_or(cfg.max_sequence_length) }
    }
}

/// Train one adapter on preference pairs with `objective`; the summary `--json` prints.
pub fn run<O: PairObjective + Clone>(cfg: &TrainConfig, pair_opts: &PairOptions, objective: O, opts: &RunOptions) -> Result<RunSummary> {
    recipe::run_alone(&PreferenceRecipe { pairs: pair_opts.clone(), objective }, cfg, opts)
}

/// DPO or ORPO as a [`Recipe`]: `objective` over the preference pairs of a run's
/// configuration, the pair limits and starting adapter of `pairs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreferenceRecipe<O> {
    pub pairs: PairOptions,
    pub objective: O,
}

/// The adapter a run's `--init-adapter` is loaded as: the policy starts from a copy of it,
/// and DPO keeps it, frozen, as the reference (one per run of a packed sweep).
fn init_adapter_name(run: &str) -> String {
    format!("{run}-{INIT_ADAPTER}")
}

impl<O: PairObjective + Clone> Recipe for PreferenceRecipe<O> {
    type Method = Preference<O>;
    type Data = (Dataset, Option<Dataset>);

    fn name(&self) -> &'static str {
        self.objective.name()
    }

    fn options(&self) -> serde_json::Value {
        serde_json::json!({ "method": self.objective.name(), "objective": &self.objective, "pairs": &self.pairs })
    }

    /// Each row holds one side of one pair, and batches are whole pairs in shuffled order.
    fn unused_settings(&self) -> &'static [&'static str] {
        &["packing", "group_by_length"]
    }

    fn prepare(&self, cfg: &mut TrainConfig) -> Result<()> {
        if let Some(init) = &self.pairs.adapter {
            adopt_adapter_shape(cfg, init)?;
        }
        Ok(())
    }

    fn read(&self, cfg: &TrainConfig) -> Result<Self::Data> {
        sft::load_split_with(cfg, crate::data::load_preference_dataset)
    }

    fn build(&self, (train_ds, eval_ds): Self::Data, model: &mut Model, bundle: &TokenizerBundle, cfg: &TrainConfig, name: &str) -> Result<(Preference<O>, String)> {
        // ---- Pairs, INIT ----------------------------------------------------------------
        let limits = self.pairs.limits(cfg);
        let train = pair_data::tokenize_pairs(bundle, &train_ds, &limits)?;
        let eval = eval_ds.as_ref().map(|d| pair_data::tokenize_pairs(bundle, d, &limits)).transpose()?;
        tracing::info!("{} training pairs, {} eval pairs", train.pairs.len(), eval.as_ref().map_or(0, |e| e.pairs.len()));
        let reference_adapter = match &self.pairs.adapter {
            Some(init) => {
                let init_name = init_adapter_name(name);
                model.load_named_adapter(&init_name, init).with_context(|| format!("--init-adapter {}", init.display()))?;
                Some(init_name)
            }
            None => None,
        };
        let pad = crate::data::pad_token_id(bundle);
        let fingerprint = train.fingerprint();

        // ---- Reference log-probs computed once (before the policy adapter exists) -------
        let precomputed = match self.objective.uses_reference() && self.pairs.precompute_ref_logps {
            true => {
                let p = precomputed_reference(model, &cfg.output, &train, &fingerprint, reference_adapter.as_deref(), cfg.batch_size, pad)?;
                std::fs::create_dir_all(&cfg.output).with_context(|| format!("creating {}", cfg.output.display()))?;
                crate::checkpoint::write_atomic(&cfg.output.join(REF_LOGPS_FILE), &serde_json::to_vec(&p)?)?;
                Some(p.values)
            }
            false => None,
        };

        // ---- The method -----------------------------------------------------------------
        let method = Preference {
            loader: PairLoader::new(&train.pairs, cfg.batch_size, pad, cfg.seed),
            eval: eval.map(|e| EvalPairs { loader: PairLoader::new(&e.pairs, cfg.batch_size, pad, 0), tokens: pair_data::pair_tokens(&e.pairs), reference: OnceLock::new() }),
            accumulation: cfg.gradient_accumulation_steps,
            precomputed,
            reference_adapter,
            options: self.options(),
            objective: self.objective.clone(),
        };
        Ok((method, fingerprint))
    }

    /// A fresh run that starts from INIT takes INIT's weights.
    fn attached(&self, model: &Model, _cfg: &TrainConfig, name: &str, fresh: bool) -> Result<()> {
        if fresh && self.pairs.adapter.is_some() {
            copy_adapter(model, &init_adapter_name(name), name)?;
        }
        Ok(())
    }
}

/// The LoRA shape of a run that starts from `init` is INIT's (rank, alpha, targets,
/// rsLoRA); its dropout stays the run's own.
fn adopt_adapter_shape(cfg: &mut TrainConfig, init: &Path) -> Result<()> {
    let c = lora_models::lora::parse_adapter_config(&init.join("adapter_config.json")).with_context(|| format!("--adapter {}", init.display()))?;
    if (cfg.lora_rank, cfg.lora_alpha, cfg.use_rslora, &cfg.target_modules) != (c.rank, c.alpha, c.use_rslora, &c.target_modules) {
        tracing::info!("--adapter {}: training its shape (r={}, alpha={}, {})", init.display(), c.rank, c.alpha, c.target_modules.join(","));
    }
    cfg.lora_rank = c.rank;
    cfg.lora_alpha = c.alpha;
    cfg.use_rslora = c.use_rslora;
    cfg.target_modules = c.target_modules;
    Ok(())
}

/// Starting from INIT: the policy adapter takes INIT's weights (AdamW moments stay zero,
/// as in a fresh run).
fn copy_adapter(model: &Model, from: &str, to: &str) -> Result<()> {
    let source: BTreeMap<String, candle_core::Var> = model.adapter_parameters(from)?.into_iter().collect();
    for (key, var) in model.adapter_parameters(to)? {
        let src = source.get(&key).with_context(|| format!("adapter `{from}` has no tensor `{key}`"))?;
        var.set(&src.as_tensor().copy()?)?;
    }
    Ok(())
}

/// `ref_logps.json`: the reference log-probs of the training pairs, tied to the data.
#[derive(Serialize, Deserialize)]
struct Precomputed {
    data_fingerprint: String,
    /// `base`, or the INIT adapter directory.
    reference: String,
    values: Vec<[f32; 2]>,
}

/// Read `ref_logps.json` when it belongs to this data and reference (a resumed run), or
/// compute it: one pass over the training pairs without a graph.
fn precomputed_reference(model: &Model, out: &Path, train: &PairSet, fingerprint: &str, adapter: Option<&str>, batch_size: usize, pad: u32) -> Result<Precomputed> {
    let reference = match adapter {
        Some(_) => "init adapter".to_string(),
        None => "base".to_string(),
    };
    let path = out.join(REF_LOGPS_FILE);
    if let Some(p) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Precomputed>(&b).ok()) {
        if p.data_fingerprint == fingerprint && p.reference == reference && p.values.len() == train.pairs.len() {
            tracing::info!("reference log-probs from {}", path.display());
            return Ok(p);
        }
    }
    tracing::info!("computing reference log-probs of {} pairs ({reference})", train.pairs.len());
    let loader = PairLoader::new(&train.pairs, batch_size, pad, 0);
    let values = pair_data::reference_scores(model, &loader, adapter)?;
    Ok(Precomputed { data_fingerprint: fingerprint.to_string(), reference, values })
}

/// Held-out pairs; their reference log-probs never change, so they are computed once.
struct EvalPairs {
    loader: PairLoader,
    tokens: Vec<[f64; 2]>,
    reference: OnceLock<Vec<[f32; 2]>>,
}

/// A preference method: whole pairs per micro-batch, the objective's loss per pair.
pub struct Preference<O: PairObjective> {
    objective: O,
    loader: PairLoader,
    eval: Option<EvalPairs>,
    accumulation: usize,
    /// Reference log-probs of the training pairs by pair index (`--precompute-ref-logps`).
    precomputed: Option<Vec<[f32; 2]>>,
    reference_adapter: Option<String>,
    /// The recipe's options (`run.json`).
    options: serde_json::Value,
}

impl<O: PairObjective> Preference<O> {
    fn needs_reference_rows(&self) -> bool {
        self.objective.uses_reference() && self.precomputed.is_none()
    }
}

impl<O: PairObjective> Method for Preference<O> {
    type Batch = PairBatch;

    fn name(&self) -> &'static str {
        self.objective.name()
    }

    fn options(&self) -> serde_json::Value {
        self.options.clone()
    }

    fn sample_counts(&self) -> (usize, usize) {
        (self.loader.pairs(), self.eval.as_ref().map_or(0, |e| e.loader.pairs()))
    }

    fn steps_per_epoch(&self) -> usize {
        self.loader.batches_per_epoch().div_ceil(self.accumulation).max(1)
    }

    fn step_batches(&self, step: usize) -> Result<Vec<PairBatch>> {
        let (epoch, positions) = engine::step_positions(step, self.loader.batches_per_epoch(), self.accumulation);
        positions.map(|i| self.loader.batch(epoch, i).context("data loader position out of range")).collect()
    }

    /// The policy rows; the reference rows (same tokens) follow unless precomputed.
    fn inputs(&self, b: &PairBatch) -> Vec<InputRows> {
        let mut rows = vec![pair_data::pair_rows(b, true)];
        if self.needs_reference_rows() {
            rows.push(pair_data::pair_rows(b, false));
        }
        rows
    }

    fn batch_tokens(&self, b: &PairBatch) -> BatchTokens {
        BatchTokens { tokens: b.rows.segment_ids.iter().filter(|&&s| s != 0).count(), loss_tokens: b.rows.loss_tokens }
    }

    /// The loss of a step is the mean over its pairs.
    fn denominator(&self, batches: &[PairBatch]) -> f64 {
        batches.iter().map(|b| b.pairs).sum::<usize>().max(1) as f64
    }

    fn loss(&self, model: &Model, b: &PairBatch, hidden: &[Tensor]) -> Result<MicroLoss> {
        let tokens = pair_data::row_tokens(b);
        let policy = PairLogps::from_rows(&pair_data::sequence_logps(model, b, &hidden[0])?, &tokens)?;
        let reference = match (&self.precomputed, self.objective.uses_reference()) {
            (_, false) => None,
            (Some(pre), true) => {
                let values: Vec<[f32; 2]> = b.pair_indices.iter().map(|&i| pre[i]).collect();
                let pair_tokens: Vec<[f64; 2]> = (0..b.pairs).map(|k| [tokens[k], tokens[b.pairs + k]]).collect();
                Some(PairLogps::from_values(&values, &pair_tokens, model.device())?)
            }
            (None, true) => Some(PairLogps::from_rows(&pair_data::sequence_logps(model, b, &hidden[1])?.detach(), &tokens)?),
        };
        let out = self.objective.losses(&policy, reference.as_ref())?;
        let mut metrics = BTreeMap::new();
        for (k, v) in &out.metrics {
            metrics.insert(k.to_string(), v.detach().mean_all()?.to_scalar::<f64>()?);
        }
        Ok(MicroLoss { sum: out.losses.sum_all()?.to_dtype(DType::F32)?, metrics })
    }

    fn reference_adapter(&self) -> Option<&str> {
        self.reference_adapter.as_deref()
    }

    fn report_spec(&self) -> ReportSpec {
        self.objective.report_spec()
    }

    /// Mean loss and metrics over the held-out pairs (the engine routes every row through
    /// the policy; the reference is scored once, with its own routing).
    fn evaluate(&self, model: &Model) -> Result<Option<EvalOutput>> {
        let Some(ev) = &self.eval else { return Ok(None) };
        let policy = PairLogps::from_values(&pair_data::score_pairs(model, &ev.loader)?, &ev.tokens, model.device())?;
        let reference = match self.objective.uses_reference() {
            false => None,
            true => {
                if ev.reference.get().is_none() {
                    let scores = pair_data::reference_scores(model, &ev.loader, self.reference_adapter.as_deref())?;
                    let _ = ev.reference.set(scores);
                }
                let scores = ev.reference.get().context("reference log-probs of the eval pairs")?;
                Some(PairLogps::from_values(scores, &ev.tokens, model.device())?)
            }
        };
        let (loss, metrics) = mean_losses(&self.objective, &policy, reference.as_ref())?;
        let tokens = ev.tokens.iter().map(|t| t[0] + t[1]).sum::<f64>() as u64;
        Ok(Some(EvalOutput { loss, perplexity: None, tokens, metrics }))
    }
}
