//! GRPO reinforcement fine-tuning of a LoRA adapter from evaluator rewards, top to
//! bottom (TRL's GRPOTrainer is the reference for formulas, defaults and metric names):
//!
//! 1. run directory: fresh, or `--resume` (the GRPO options must match too)
//! 2. prompts (training + held-out), model, evaluators
//! 3. every optimizer step: `prepare_step` samples G completions for each of the step's
//!    prompts with the current adapter (`rollouts.rs`), scores them, computes group
//!    advantages (`advantages.rs`); the micro-batches are prompt + completion rows, and
//!    the loss is TRL's clipped surrogate (+ k3 KL to the adapter-off reference when
//!    beta > 0, whose rows share the base GEMM) normalised per loss type (`loss.rs`)
//! 4. the engine does the rest (AdamW, schedule, clipping, eval, checkpoints, metrics)
//!
//! Determinism: the prompts of a step are a pure function of (seed, step), each
//! completion's random stream of (seed, step, prompt, g), and the weights at the step
//! come from the checkpoint, so `--resume` replays the same rollouts bit for bit. When
//! one rollout batch serves several steps (`--num-iterations`), it is kept in
//! `DIR/rollout_cache/` so a run resumed mid-batch reuses it rather than resampling.
pub mod advantages;
pub mod agent;
pub mod loss;
pub mod preview;
pub mod rollouts;
pub mod signal;

// The prompt type and its helpers live below the recipes (eval, compare and the sides
// use them too); re-exported so `recipes::grpo::prompts` paths keep working.
pub use crate::prompts::{self, fill_context};

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use lora_datasets::Dataset;
use lora_models::{Model, RolloutParams, TokenizerBundle};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::engine::{BatchTokens, EvalOutput, InputRows, Method, MicroLoss, RunOptions, RunSummary};
use crate::recipes::recipe::{self, Recipe};
use crate::report::{q, ChartSpec, ReportSpec, SVG_FILE};
use crate::evaluators::{mean_std, EvaluatorArgs, EvaluatorSet};
use advantages::ScaleRewards;
use clap::ValueEnum;
use loss::{ImportanceSamplingLevel, LossTerms, LossType, PolicyTokens, VespoParams};
use prompts::Prompt;
use rollouts::{Cycle, CycleInputs};

/// Completions per step written to `rollouts.jsonl` (a sample, to read, not a record).
const LOGGED_ROLLOUTS: usize = 8;
pub const ROLLOUTS_FILE: &str = "rollouts.jsonl";

/// GRPO's own flags (TRL's names and defaults).
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrpoOptions {
    /// Completions sampled per prompt (G).
    #[arg(long, default_value_t = 8, help_heading = "GRPO")]
    pub num_generations: usize,
    /// Most new tokens per completion (a completion cut here is "truncated").
    #[arg(long, default_value_t = 256, help_heading = "GRPO")]
    pub max_completion_length: usize,
    /// Sampling temperature of the rollouts (the log-probs are of logits / temperature).
    #[arg(long, default_value_t = 1.0, help_heading = "GRPO")]
    pub temperature: f64,
    /// Nucleus sampling mass (1.0 = off).
    #[arg(long, default_value_t = 1.0, help_heading = "GRPO")]
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0, help_heading = "GRPO")]
    pub top_k: usize,
    /// KL coefficient (k3 estimator, to the adapter-off base); 0 = no reference pass.
    #[arg(long, default_value_t = 0.0, help_heading = "GRPO")]
    pub beta: f64,
    /// Lower clipping bound of the ratio: 1 - epsilon.
    #[arg(long, default_value_t = 0.2, help_heading = "GRPO")]
    pub epsilon: f64,
    /// Upper clipping bound: 1 + epsilon-high [default: --epsilon].
    #[arg(long, help_heading = "GRPO")]
    pub epsilon_high: Option<f64>,
    /// How the per-token losses are formed and normalised (TRL's `loss_type`; README).
    #[arg(long, value_enum, default_value_t = LossType::Dapo, help_heading = "GRPO")]
    pub loss_type: LossType,
    /// Importance weights per `token`, or one per `sequence` (the mean log-ratio: GSPO).
    #[arg(long, value_enum, default_value_t = ImportanceSamplingLevel::Token, help_heading = "GRPO")]
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// Two-sided clipping: the unclipped ratio is capped at delta too (> 1 + epsilon-high).
    #[arg(long, help_heading = "GRPO")]
    pub delta: Option<f64>,
    /// `sapo`: gate temperature of tokens with a positive advantage.
    #[arg(long, default_value_t = 1.0, help_heading = "GRPO")]
    pub sapo_temperature_pos: f64,
    /// `sapo`: gate temperature of tokens with a non-positive advantage.
    #[arg(long, default_value_t = 1.05, help_heading = "GRPO")]
    pub sapo_temperature_neg: f64,
    /// `vespo`: power k of the gamma weight for advantages >= 0.
    #[arg(long, default_value_t = 2.0, help_heading = "GRPO")]
    pub vespo_k_pos: f64,
    /// `vespo`: decay lambda of the gamma weight for advantages >= 0.
    #[arg(long, default_value_t = 3.0, help_heading = "GRPO")]
    pub vespo_lambda_pos: f64,
    /// `vespo`: power k for negative advantages.
    #[arg(long, default_value_t = 3.0, help_heading = "GRPO")]
    pub vespo_k_neg: f64,
    /// `vespo`: decay lambda for negative advantages.
    #[arg(long, default_value_t = 2.0, help_heading = "GRPO")]
    pub vespo_lambda_neg: f64,
    /// Keep the policy loss only on this top share of tokens by entropy (1.0 = all tokens;
    /// 0.2 is the paper's value).
    #[arg(long, default_value_t = 1.0, help_heading = "GRPO")]
    pub top_entropy_quantile: f64,
    /// Advantage scaling: by the group's reward std (`group`, or `true`), the batch's
    /// (`batch`), or none (`none`, or `false`).
    #[arg(long, value_enum, default_value_t = ScaleRewards::Group, help_heading = "GRPO")]
    pub scale_rewards: ScaleRewards,
    /// Optimizer steps per rollout batch (> 1: PPO-style reuse with rollout-time log-probs).
    #[arg(long, default_value_t = 1, help_heading = "GRPO")]
    pub num_iterations: usize,
    /// Completions cut at --max-completion-length get no loss.
    #[arg(long, help_heading = "GRPO")]
    pub mask_truncated_completions: bool,
    /// Prompts per rollout batch (each sampled G times). An optimizer step trains on
    /// --gradient-accumulation-steps rollout batches (TRL: per-device batch x accumulation
    /// completions), sampled one batch at a time to bound memory.
    #[arg(long, default_value_t = 4, help_heading = "GRPO")]
    pub prompts_per_step: usize,
    /// End the run after K steps in a row where every group had zero reward variance
    /// (nothing to learn); the last step's checkpoint is kept and run.json says `stopped`.
    /// Not part of what --resume must repeat.
    #[arg(long, value_name = "K", help_heading = "GRPO")]
    #[serde(skip)]
    pub stop_on_no_signal: Option<usize>,
}

impl GrpoOptions {
    pub fn validate(&self) -> Result<()> {
        let mut errors = Vec::new();
        if self.num_generations < 2 {
            errors.push(format!("--num-generations must be at least 2 (advantages compare completions of one prompt), got {}", self.num_generations));
        }
        if self.max_completion_length == 0 {
            errors.push("--max-completion-length must be at least 1".to_string());
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            errors.push(format!("--temperature must be > 0 for rollouts, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            errors.push(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            errors.push(format!("--beta must be >= 0, got {}", self.beta));
        }
        for (name, v) in [("--epsilon", Some(self.epsilon)), ("--epsilon-high", self.epsilon_high)] {
            if v.is_some_and(|e| !(e >= 0.0 && e.is_finite())) {
                errors.push(format!("{name} must be >= 0"));
            }
        }
        if let Some(d) = self.delta.filter(|d| !(*d > 1.0 && d.is_finite())) {
            errors.push(format!("--delta caps the ratio, so it must be > 1 (TRL recommends > 1 + epsilon-high), got {d}"));
        }
        for (name, t) in [("--sapo-temperature-pos", self.sapo_temperature_pos), ("--sapo-temperature-neg", self.sapo_temperature_neg)] {
            if !(t > 0.0 && t.is_finite()) {
                errors.push(format!("{name} must be > 0 (the gate divides by it), got {t}"));
            }
        }
        for (name, v) in [
            ("--vespo-k-pos", self.vespo_k_pos),
            ("--vespo-lambda-pos", self.vespo_lambda_pos),
            ("--vespo-k-neg", self.vespo_k_neg),
            ("--vespo-lambda-neg", self.vespo_lambda_neg),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                errors.push(format!("{name} must be >= 0, got {v}"));
            }
        }
        if !(0.0..=1.0).contains(&self.top_entropy_quantile) {
            errors.push(format!("--top-entropy-quantile must be in [0, 1] (1 keeps every token), got {}", self.top_entropy_quantile));
        }
        if self.num_iterations == 0 {
            errors.push("--num-iterations must be at least 1".to_string());
        }
        if self.prompts_per_step == 0 {
            errors.push("--prompts-per-step must be at least 1".to_string());
        }
        if self.stop_on_no_signal == Some(0) {
            errors.push("--stop-on-no-signal must be at least 1 (steps in a row without signal)".to_string());
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("\n"));
        }
        for warning in self.combination_warnings() {
            tracing::warn!("{warning}");
        }
        Ok(())
    }

    /// TRL's warnings for combinations that run but are probably not what was meant.
    pub fn combination_warnings(&self) -> Vec<String> {
        let sequence = self.importance_sampling_level == ImportanceSamplingLevel::Sequence;
        let mut out = Vec::new();
        if self.loss_type == LossType::Luspo && !sequence {
            out.push("--loss-type luspo is meant for --importance-sampling-level sequence (the paper's setup)".to_string());
        }
        if self.loss_type == LossType::Vespo && sequence {
            out.push("--loss-type vespo computes its own sequence-level weights; --importance-sampling-level should be token".to_string());
        }
        if sequence && matches!(self.loss_type, LossType::Bnpo | LossType::DrGrpo | LossType::Dapo | LossType::Cispo) {
            out.push(format!(
                "with --importance-sampling-level sequence, --loss-type {} sums per-token terms, weighting each sequence by its length; GSPO's setup is --loss-type grpo",
                self.loss_type.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
            ));
        }
        if self.loss_type == LossType::Cispo && self.epsilon_high.unwrap_or(self.epsilon) < 1.0 {
            out.push("--loss-type cispo caps the weight at --epsilon-high itself (not 1 + it); below 1 every on-policy token is capped (the paper uses 5.0)".to_string());
        }
        out
    }

    pub fn loss_terms(&self) -> LossTerms {
        LossTerms {
            loss_type: self.loss_type,
            importance_sampling_level: self.importance_sampling_level,
            epsilon_low: self.epsilon,
            epsilon_high: self.epsilon_high.unwrap_or(self.epsilon),
            delta: self.delta,
            beta: self.beta,
            max_completion_length: self.max_completion_length,
            sapo_temperature_pos: self.sapo_temperature_pos,
            sapo_temperature_neg: self.sapo_temperature_neg,
            vespo: VespoParams { k_pos: self.vespo_k_pos, lambda_pos: self.vespo_lambda_pos, k_neg: self.vespo_k_neg, lambda_neg: self.vespo_lambda_neg },
            top_entropy_quantile: self.top_entropy_quantile,
        }
    }

    pub fn rollout_params(&self) -> RolloutParams {
        RolloutParams {
            group: self.num_generations,
            max_new_tokens: self.max_completion_length,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

/// Train one adapter with GRPO; the summary `grpo --json` prints.
pub fn run(cfg: &TrainConfig, grpo: &GrpoOptions, agent_opts: &agent::AgentOptions, eval_args: &EvaluatorArgs, opts: &RunOptions) -> Result<RunSummary> {
    let recipe = GrpoRecipe { grpo: grpo.clone(), agent: agent_opts.clone(), evaluators: eval_args.clone() };
    recipe::run_alone(&recipe, cfg, opts)
}

/// GRPO as a [`Recipe`]: prompts, evaluators and the sampling and loss options.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GrpoRecipe {
    pub grpo: GrpoOptions,
    pub agent: agent::AgentOptions,
    pub evaluators: EvaluatorArgs,
}

impl Recipe for GrpoRecipe {
    type Method = Grpo;
    type Data = (Dataset, Option<Dataset>, crate::evaluators::Context);

    fn name(&self) -> &'static str {
        "grpo"
    }

    /// The GRPO options and evaluators are part of what a resumed run must repeat.
    fn options(&self) -> serde_json::Value {
        serde_json::json!({"grpo": self.grpo, "evaluators": self.evaluators.evaluators, "reward_weights": self.evaluators.reward_weights})
    }

    /// Rows are prompt + sampled completion, one group of completions a prompt: there is
    /// no sequence cap to apply (`--max-new-tokens` bounds a completion), no packing and
    /// no length grouping.
    fn unused_settings(&self) -> &'static [&'static str] {
        &["max_sequence_length", "packing", "group_by_length"]
    }

    fn prepare(&self, _cfg: &mut TrainConfig) -> Result<()> {
        self.grpo.validate()?;
        self.agent.validate()?;
        // Before the run directory and the model: a mistyped evaluator is reported at once.
        self.evaluators.check()?;
        if let Some(url) = &self.agent.agent_url {
            agent::check_reachable(url)?;
        }
        Ok(())
    }

    fn read(&self, cfg: &TrainConfig) -> Result<Self::Data> {
        let (train, eval) = super::sft::load_split_with(cfg, prompts::load_prompt_dataset)?;
        Ok((train, eval, self.evaluators.context()?))
    }

    fn build(&self, (train_ds, eval_ds, mut ctx): Self::Data, _model: &mut Model, bundle: &TokenizerBundle, cfg: &TrainConfig, _name: &str) -> Result<(Grpo, String)> {
        let train = prompts::tokenize_prompts(bundle, &train_ds)?;
        let eval = eval_ds.as_ref().map(|d| prompts::tokenize_prompts(bundle, d)).transpose()?;
        fill_context(&mut ctx, bundle, train.iter().chain(eval.iter().flatten()));
        let evaluators = self.evaluators.build(&ctx)?;
        tracing::info!("{} training prompts, {} held-out; evaluators: {}", train.len(), eval.as_ref().map_or(0, Vec::len), self.evaluators.evaluators.join(", "));
        let fingerprint = prompts::fingerprint(&train);
        let mut method = Grpo::new(train, eval, bundle.clone(), evaluators, self.grpo.clone(), cfg);
        method.agent_options = self.agent.agent_url.is_some().then(|| self.agent.clone());
        method.options = self.options();
        Ok((method, fingerprint))
    }
}

/// What a run (and `--preview`) works with: the model, its tokenizer, the training and
/// held-out prompts, the evaluators.
pub struct Loaded {
    pub model: Model,
    pub bundle: TokenizerBundle,
    /// How the model was named (written into the adapter's config).
    pub base_source: String,
    pub train: Vec<Prompt>,
    pub eval: Option<Vec<Prompt>>,
    pub evaluators: EvaluatorSet,
}

/// Load the prompts, the model and the evaluators of `cfg`.
pub fn load(cfg: &TrainConfig, eval_args: &EvaluatorArgs) -> Result<Loaded> {
    let (train_ds, eval_ds) = super::sft::load_split_with(cfg, prompts::load_prompt_dataset)?;
    let mut ctx = eval_args.context()?;
    let (model, bundle, base_source) = super::recipe::load_base(cfg)?;
    let train = prompts::tokenize_prompts(&bundle, &train_ds)?;
    let eval = eval_ds.as_ref().map(|d| prompts::tokenize_prompts(&bundle, d)).transpose()?;
    fill_context(&mut ctx, &bundle, train.iter().chain(eval.iter().flatten()));
    let evaluators = eval_args.build(&ctx)?;
    tracing::info!("{} training prompts, {} held-out; evaluators: {}", train.len(), eval.as_ref().map_or(0, Vec::len), eval_args.evaluators.join(", "));
    Ok(Loaded { model, bundle, base_source, train, eval, evaluators })
}


/// One micro-batch: prompt + completion rows, right-padded.
pub struct GrpoBatch {
    rows: InputRows,
    /// Per row: where its completion starts (= prompt length) and its loss tokens.
    starts: Vec<usize>,
    lengths: Vec<usize>,
    /// The loss tokens, row by row.
    targets: Vec<u32>,
    old_logps: Option<Vec<f32>>,
    advantages: Vec<f32>,
}

pub struct Grpo {
    prompts: Vec<Prompt>,
    eval_prompts: Option<Vec<Prompt>>,
    bundle: TokenizerBundle,
    evaluators: EvaluatorSet,
    opts: GrpoOptions,
    terms: LossTerms,
    seed: u64,
    batch_size: usize,
    /// Rollout batches of --prompts-per-step prompts behind one optimizer step.
    accumulation: usize,
    output: PathBuf,
    cycle: Option<Cycle>,
    /// The current step's metrics so far and when its training part began.
    fresh_cycle: bool,
    training_started: Option<Instant>,
    log_checked: bool,
    /// `--agent-url`: rollouts come from a remote agent (started at the first step).
    pub agent_options: Option<agent::AgentOptions>,
    agent: Option<agent::AgentRollouts>,
    signal: signal::SignalWatch,
    /// The recipe's options (`run.json`).
    options: serde_json::Value,
}

impl Grpo {
    pub fn new(prompts: Vec<Prompt>, eval_prompts: Option<Vec<Prompt>>, bundle: TokenizerBundle, evaluators: EvaluatorSet, opts: GrpoOptions, cfg: &TrainConfig) -> Self {
        Grpo {
            prompts,
            eval_prompts,
            bundle,
            evaluators,
            terms: opts.loss_terms(),
            signal: signal::SignalWatch::new(opts.stop_on_no_signal),
            opts,
            seed: cfg.seed,
            batch_size: cfg.batch_size.max(1),
            accumulation: cfg.gradient_accumulation_steps.max(1),
            output: cfg.output.clone(),
            cycle: None,
            fresh_cycle: false,
            training_started: None,
            log_checked: false,
            agent_options: None,
            agent: None,
            options: serde_json::Value::Null,
        }
    }

    fn signal_advice(&self) -> String {
        signal::advice(self.opts.num_generations, self.opts.temperature)
    }

    /// Prompts whose completions one optimizer step (one rollout cycle) trains on.
    fn prompts_per_cycle(&self) -> usize {
        self.opts.prompts_per_step * self.accumulation
    }

    fn cycles_per_epoch(&self) -> usize {
        self.prompts.len().div_ceil(self.prompts_per_cycle()).max(1)
    }

    /// The training prompts of rollout cycle `c`: the next slice of this epoch's order.
    fn cycle_prompts(&self, c: usize) -> Vec<usize> {
        let per = self.cycles_per_epoch();
        let order = rollouts::epoch_order(self.prompts.len(), self.seed, c / per);
        let first = (c % per) * self.prompts_per_cycle();
        order[first.min(order.len())..(first + self.prompts_per_cycle()).min(order.len())].to_vec()
    }

    fn cache_path(&self, c: usize) -> PathBuf {
        self.output.join("rollout_cache").join(format!("cycle-{c}.json"))
    }

    fn cycle_inputs<'a>(&'a self, model: &'a Model, params: &'a RolloutParams) -> CycleInputs<'a> {
        CycleInputs {
            model,
            bundle: &self.bundle,
            prompts: &self.prompts,
            evaluators: &self.evaluators,
            params,
            scale_rewards: self.opts.scale_rewards,
            seed: self.seed,
            chunk: self.opts.prompts_per_step,
        }
    }

    fn sample_cycle(&self, model: &Model, c: usize) -> Result<Cycle> {
        let params = self.opts.rollout_params();
        rollouts::run_cycle(&self.cycle_inputs(model, &params), c, &self.cycle_prompts(c))
    }

    /// The rollouts of cycle `c` from the remote agent (its policy server starts once).
    fn agent_cycle(&mut self, model: &Model, opts: agent::AgentOptions, c: usize) -> Result<Cycle> {
        if self.agent.is_none() {
            let url = opts.agent_url.clone().unwrap_or_default();
            let run_id = self.output.file_name().map_or_else(|| "run".to_string(), |n| n.to_string_lossy().replace(|ch: char| !ch.is_ascii_alphanumeric(), "-"));
            self.agent = Some(agent::AgentRollouts::start(&opts, &url, &self.bundle, &self.opts, model, run_id)?);
        }
        let chosen = self.cycle_prompts(c);
        let params = self.opts.rollout_params();
        // Out of `self` while it runs, so the inputs can borrow the rest of `self`.
        let mut agent = self.agent.take().context("the agent's policy server did not start")?;
        let cycle = agent.run_cycle(&self.cycle_inputs(model, &params), c, &chosen);
        self.agent = Some(agent);
        cycle
    }

    /// Append a bounded sample of the cycle's completions to `rollouts.jsonl` (rows of
    /// steps after `step` come from a killed run and are dropped first).
    fn log_rollouts(&mut self, step: usize, cycle: &Cycle) -> Result<()> {
        let path = self.output.join(ROLLOUTS_FILE);
        if !self.log_checked {
            self.log_checked = true;
            if path.exists() {
                let text = std::fs::read_to_string(&path)?;
                let kept: String = text
                    .lines()
                    .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| (s as usize) <= step))
                    .map(|l| format!("{l}\n"))
                    .collect();
                lora_models::write_atomic(&path, kept.as_bytes())?;
            }
        }
        let n = cycle.rollouts.len();
        let stride = n.div_ceil(LOGGED_ROLLOUTS).max(1);
        let mut bytes = Vec::new();
        for r in cycle.rollouts.iter().step_by(stride) {
            // `messages` (+ `tools`) make every row a trajectory `sft --trajectory-dataset` reads.
            let prompt = &self.prompts[r.prompt];
            let row = serde_json::json!({
                "step": step + 1, "prompt": r.prompt, "g": r.g, "messages": prompt.messages, "tools": prompt.tools,
                "completion": r.text, "tokens": r.tokens.len(), "stopped": r.stopped, "reward": r.reward, "advantage": r.advantage,
            });
            serde_json::to_writer(&mut bytes, &row)?;
            bytes.push(b'\n');
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        f.write_all(&bytes)?;
        Ok(())
    }

    fn batch(&self, cycle: &Cycle, members: &[usize]) -> GrpoBatch {
        let rollouts: Vec<_> = members.iter().map(|&i| &cycle.rollouts[i]).collect();
        // An agent's model call carries its own prompt (the earlier turns included).
        let prompt_of = |r: &rollouts::Rollout| r.prompt_ids.as_deref().unwrap_or(&self.prompts[r.prompt].ids).to_vec();
        let seq_len = rollouts.iter().map(|r| prompt_of(r).len() + r.tokens.len()).max().unwrap_or(1);
        let b = rollouts.len();
        let pad = self.bundle.eos_token_ids.first().copied().unwrap_or(0);
        let mut rows = InputRows { batch_size: b, seq_len, input_ids: Vec::new(), position_ids: Vec::new(), segment_ids: Vec::new(), through_adapter: true };
        let (mut starts, mut lengths, mut targets, mut old, mut advantages) = (vec![], vec![], vec![], vec![], vec![]);
        for r in rollouts {
            let prompt = &prompt_of(r);
            let len = prompt.len() + r.tokens.len();
            rows.input_ids.extend(prompt.iter().chain(&r.tokens).copied().chain(std::iter::repeat_n(pad, seq_len - len)));
            rows.position_ids.extend((0..seq_len as u32).map(|p| if (p as usize) < len { p } else { 0 }));
            rows.segment_ids.extend((0..seq_len).map(|p| u32::from(p < len)));
            let masked = self.opts.mask_truncated_completions && !r.stopped;
            let n = if masked { 0 } else { r.tokens.len() };
            starts.push(prompt.len());
            lengths.push(n);
            targets.extend_from_slice(&r.tokens[..n]);
            old.extend_from_slice(&r.logprobs[..n]);
            advantages.push(r.advantage as f32);
        }
        GrpoBatch { rows, starts, lengths, targets, old_logps: (self.opts.num_iterations > 1).then_some(old), advantages }
    }

    /// `hidden` rows at the positions that predict each loss token.
    fn completion_hidden(&self, b: &GrpoBatch, hidden: &Tensor) -> Result<Tensor> {
        let (rows, t, h) = hidden.dims3()?;
        let mut index = Vec::with_capacity(b.targets.len());
        for (r, (&s, &n)) in b.starts.iter().zip(&b.lengths).enumerate() {
            index.extend((0..n).map(|j| (r * t + s - 1 + j) as u32));
        }
        let index = Tensor::from_vec(index, b.targets.len(), hidden.device())?;
        Ok(hidden.reshape((rows * t, h))?.index_select(&index, 0)?)
    }

    /// Greedy completions of the held-out prompts, scored: (mean reward, std, tokens).
    fn evaluate_prompts(&self, model: &Model, prompts: &[Prompt]) -> Result<(Option<(f64, f64)>, u64)> {
        let params = RolloutParams { group: 1, temperature: 0.0, top_k: 0, top_p: 1.0, max_new_tokens: self.opts.max_completion_length };
        let mut samples = Vec::new();
        let mut tokens = 0u64;
        // One row per prompt, at most `chunk` at once: a finished row's place goes to
        // the next prompt (`rollouts_streamed`). Sample ids keep the chunk numbering.
        let chunk = self.batch_size.max(self.opts.prompts_per_step).max(1);
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let done = model.rollouts_streamed_all(&ids, &vec![0; ids.len()], &params, &self.bundle.eos_token_ids, chunk)?;
        for (j, (p, group)) in prompts.iter().zip(done).enumerate() {
            let Some(c) = group.first() else { anyhow::bail!("held-out prompt {j} got no completion") };
            tokens += c.tokens.len() as u64;
            samples.push(p.sample(format!("eval-{}-{}", j / chunk, j % chunk), self.bundle.decode(&c.tokens, true)?));
        }
        let scores = self.evaluators.score_batch(&samples);
        Ok((mean_std(scores.rewards).map(|(m, s, _)| (m, s)), tokens))
    }
}

/// GRPO's report: the reward (sampled in training, greedy on held-out prompts) is the
/// story; the rollout batch's statistics and the policy update's clip ratios and KL are
/// charted by key family, so statistics added later (TRL-named `clip_ratio/...`) appear
/// without a change here, and a chart without data (KL at beta 0) is left out.
pub fn report_spec() -> ReportSpec {
    ReportSpec {
        headline: q("eval_reward", "held-out reward (greedy)"),
        higher_is_better: true,
        loss_label: "surrogate loss",
        progress: vec![q("reward", "reward"), q("reward_std", "reward std"), q("frac_reward_zero_std", "zero-std groups"), q("completion_length_mean", "length"), q("kl", "kl")],
        eval: vec![q("eval_reward", "eval reward"), q("eval_reward_std", "eval reward std")],
        charts: vec![
            ChartSpec {
                file: "reward.svg",
                title: "Reward: sampled completions (train) and greedy answers to held-out prompts (eval)",
                y_label: "reward",
                series: vec![q("reward", "reward (mean)"), q("reward_std", "reward std"), q("eval_reward", "eval reward"), q("rewards_*", ""), q("rewards/*", "")],
            },
            ChartSpec {
                file: "rollout_fractions.svg",
                title: "Rollout batch: groups with zero reward std (no signal), completions cut at the length limit",
                y_label: "fraction",
                series: vec![q("frac_reward_zero_std", "frac_reward_zero_std"), q("clipped_ratio", "clipped_ratio (cut at max length)"), q("completions/clipped_ratio", "completions/clipped_ratio")],
            },
            ChartSpec {
                file: "completion_length.svg",
                title: "Completion length",
                y_label: "tokens",
                series: vec![q("completion_length_*", ""), q("completions/*_length", "")],
            },
            ChartSpec { file: "clip_ratio.svg", title: "Clip ratio of the policy update", y_label: "fraction of tokens", series: vec![q("clip_ratio*", "")] },
            ChartSpec { file: "kl.svg", title: "KL to the reference (beta > 0)", y_label: "KL per token", series: vec![q("kl", "kl")] },
            ChartSpec { file: "entropy.svg", title: "Entropy of the sampled tokens", y_label: "nats per token", series: vec![q("entropy", "entropy")] },
            ChartSpec { file: SVG_FILE, title: "GRPO surrogate loss (train)", y_label: "loss", series: vec![q("loss", "surrogate loss")] },
        ],
        ..ReportSpec::loss_only()
    }
}

impl Method for Grpo {
    type Batch = GrpoBatch;

    fn report_spec(&self) -> ReportSpec {
        report_spec()
    }

    fn name(&self) -> &'static str {
        "grpo"
    }

    fn options(&self) -> serde_json::Value {
        self.options.clone()
    }

    fn sample_counts(&self) -> (usize, usize) {
        (self.prompts.len(), self.eval_prompts.as_ref().map_or(0, Vec::len))
    }

    fn steps_per_epoch(&self) -> usize {
        self.cycles_per_epoch() * self.opts.num_iterations
    }

    fn prepare_step(&mut self, model: &Model, step: usize) -> Result<()> {
        let c = step / self.opts.num_iterations;
        self.fresh_cycle = false;
        if self.cycle.as_ref().is_none_or(|cy| cy.index != c) {
            let cached = self.cache_path(c);
            let cycle = if step % self.opts.num_iterations != 0 {
                // Resumed in the middle of a rollout batch: the batch the run sampled.
                let bytes = std::fs::read(&cached).with_context(|| format!("--resume at step {step}: the rollout batch of this step is missing ({})", cached.display()))?;
                serde_json::from_slice(&bytes).with_context(|| format!("{}: damaged", cached.display()))?
            } else {
                let cycle = match &self.agent_options {
                    Some(opts) => self.agent_cycle(model, opts.clone(), c)?,
                    None => self.sample_cycle(model, c)?,
                };
                if self.opts.num_iterations > 1 {
                    lora_models::write_atomic(&cached, &serde_json::to_vec(&cycle)?)?;
                }
                self.fresh_cycle = true;
                self.log_rollouts(step, &cycle)?;
                cycle
            };
            self.cycle = Some(cycle);
        }
        if let Some(cycle) = &self.cycle {
            if let Some(warning) = self.signal.observe(step + 1, cycle.groups_without_signal, cycle.groups, &self.signal_advice()) {
                tracing::warn!("{warning}");
            }
        }
        self.training_started = Some(Instant::now());
        Ok(())
    }

    fn stop_reason(&self) -> Option<String> {
        self.signal.stop_reason(&self.signal_advice())
    }

    fn step_metrics(&mut self) -> BTreeMap<String, f64> {
        let mut m = self.cycle.as_ref().map(|c| c.metrics.clone()).unwrap_or_default();
        if !self.fresh_cycle {
            m.insert("time_rollout_s".into(), 0.0);
            m.insert("time_scoring_s".into(), 0.0);
        }
        m.insert("evaluator_failures_total".into(), self.evaluators.failure_count() as f64);
        if let Some(t) = self.training_started.take() {
            m.insert("time_training_s".into(), t.elapsed().as_secs_f64());
        }
        m
    }

    fn step_batches(&self, step: usize) -> Result<Vec<GrpoBatch>> {
        let cycle = self.cycle.as_ref().filter(|c| c.index == step / self.opts.num_iterations).context("no rollouts sampled for this step")?;
        let all: Vec<usize> = (0..cycle.rollouts.len()).collect();
        Ok(all.chunks(self.batch_size).map(|members| self.batch(cycle, members)).collect())
    }

    /// Rollouts exist only once the step samples them: bound the micro-batch by the
    /// longest prompt plus --max-completion-length, with the reference rows when beta > 0.
    fn largest_micro_batch(&self) -> Result<(usize, usize)> {
        let longest_prompt = self.prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let rows = self.batch_size * if self.terms.beta > 0.0 { 2 } else { 1 };
        Ok((rows, longest_prompt + self.opts.max_completion_length))
    }

    fn inputs(&self, b: &GrpoBatch) -> Vec<InputRows> {
        let mut rows = vec![b.rows.clone()];
        if self.terms.beta > 0.0 {
            rows.push(InputRows { through_adapter: false, ..b.rows.clone() });
        }
        rows
    }

    fn batch_tokens(&self, b: &GrpoBatch) -> BatchTokens {
        BatchTokens { tokens: b.rows.segment_ids.iter().filter(|&&s| s != 0).count(), loss_tokens: b.targets.len() }
    }

    fn denominator(&self, batches: &[GrpoBatch]) -> f64 {
        loss::denominator(self.terms.loss_type, batches.len(), batches.iter().map(|b| b.targets.len()).sum())
    }

    fn loss(&self, model: &Model, b: &GrpoBatch, hidden: &[Tensor]) -> Result<MicroLoss> {
        let dev = model.device();
        if b.targets.is_empty() {
            // Every completion masked (truncated): no loss, but keep the graph well-formed.
            return Ok(MicroLoss { sum: (hidden[0].sum_all()?.to_dtype(DType::F32)? * 0.0)?, metrics: BTreeMap::new() });
        }
        let targets = Tensor::from_slice(&b.targets, b.targets.len(), dev)?;
        let logp = model.token_logprobs(&self.completion_hidden(b, &hidden[0])?, &targets, self.opts.temperature)?;
        let ref_logp = match hidden.get(1) {
            Some(h) if self.terms.beta > 0.0 => {
                Some(model.token_logprobs(&self.completion_hidden(b, &h.detach())?, &targets, self.opts.temperature)?.to_vec1::<f32>()?)
            }
            _ => None,
        };
        // The high-entropy mask needs the policy's entropy at each token now (TRL computes
        // it from the training forward, which differs from the rollout's after an update).
        let entropies = if self.terms.top_entropy_quantile < 1.0 {
            Some(token_entropies(model, &self.completion_hidden(b, &hidden[0].detach())?, self.opts.temperature)?)
        } else {
            None
        };
        let tokens = PolicyTokens {
            logp: &logp,
            old_logp: b.old_logps.as_deref(),
            ref_logp: ref_logp.as_deref(),
            advantages: &b.advantages,
            lengths: &b.lengths,
            entropies: entropies.as_deref(),
        };
        let (sum, mut metrics) = loss::micro_loss(&tokens, &self.terms)?;
        // `entropy` is the rollout's (rollouts.rs): the same policy's at the first iteration.
        metrics.remove("entropy");
        Ok(MicroLoss { sum, metrics })
    }

    /// Held-out prompts, greedy: the loss a sweep minimises is minus the mean reward.
    fn evaluate(&self, model: &Model) -> Result<Option<EvalOutput>> {
        let Some(prompts) = &self.eval_prompts else { return Ok(None) };
        let (stats, tokens) = self.evaluate_prompts(model, prompts)?;
        let mut metrics = BTreeMap::new();
        if let Some((mean, std)) = stats {
            metrics.insert("reward".to_string(), mean);
            metrics.insert("reward_std".to_string(), std);
        }
        Ok(Some(EvalOutput { loss: -stats.map_or(0.0, |s| s.0), perplexity: None, tokens, metrics }))
    }
}

/// Entropy (nats) of softmax(logits / temperature) at each row of `hidden` `[n, h]`,
/// without a graph, a few hundred rows at a time (the `[rows, vocab]` logits are what
/// costs memory).
fn token_entropies(model: &Model, hidden: &Tensor, temperature: f64) -> Result<Vec<f32>> {
    const ROWS: usize = 256;
    let n = hidden.dim(0)?;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(ROWS) {
        let x = (model.logits(&hidden.narrow(0, start, ROWS.min(n - start))?)? / temperature)?;
        let shifted = x.broadcast_sub(&x.max_keepdim(1)?)?;
        let e = shifted.exp()?;
        let z = e.sum_keepdim(1)?;
        let entropy = (z.log()? - (e * &shifted)?.sum_keepdim(1)?.div(&z)?)?;
        out.extend(entropy.squeeze(1)?.to_vec1::<f32>()?);
    }
    Ok(out)
}
