//! Phase `plan`: the candidates (the sweep's defaults, or `--candidate`/`--grid`), and
//! per candidate its tokens, FLOPs, memory and time from the sweep planner
//! (`sweep::plan`: FLOPs over a measured CPU GEMM rate, or an assumed GPU rate), plus the
//! final full-data run and the evaluation inference, priced at `--gpu-hour-price` on a GPU
//! (CPU time only on a CPU). Written to `DIR/plan.md` and shown on stderr.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::inspect::{self, Inspection};
use crate::config::{TrainConfig, TrainOptions};
use crate::progress::fmt_duration;
use crate::sweep::plan::{self as sweep_plan, GIB};
use crate::sweep::{self, SweepOptions};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlannedCandidate {
    pub name: String,
    pub overrides: std::collections::BTreeMap<String, String>,
    pub steps: usize,
    pub tokens: u64,
    pub flops: f64,
    pub memory_bytes: u64,
    pub seconds: f64,
    pub device: Option<String>,
}

/// A line of the cost table that is not a candidate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cost {
    pub what: String,
    pub tokens: u64,
    pub flops: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub model: String,
    pub dataset: std::path::PathBuf,
    pub train_samples: usize,
    pub held_out_samples: usize,
    /// Candidates train on this many samples (`--tuning-samples`), when fewer than all.
    pub tuning_subsample: Option<usize>,
    pub candidates: Vec<PlannedCandidate>,
    /// Estimated wall time of the sweep (the busiest device's queue).
    pub sweep_seconds: f64,
    /// The final full-data run (absent when the candidates already train on all the data).
    pub final_run: Option<Cost>,
    /// Inference: validation losses, generations for evaluators, benchmarks.
    pub inference: Vec<Cost>,
    pub total_seconds: f64,
    pub device: String,
    pub device_flops_per_s: f64,
    pub gpu: bool,
    pub gpu_hour_price: Option<f64>,
    /// `total_seconds` at `gpu_hour_price` (GPU plans only).
    pub total_cost: Option<f64>,
    /// How candidates and models are compared: `validation loss`, or evaluators.
    pub evaluators: Vec<String>,
    pub evaluator_reason: String,
    /// The measured steps the time estimates are scaled by.
    #[serde(default)]
    pub calibration: Option<Calibration>,
}

/// A few training steps of the first candidate, timed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Calibration {
    pub candidate: String,
    pub steps: usize,
    pub tokens_per_s: f64,
    /// The rate the steps reached, which every estimate uses.
    pub flops_per_s: f64,
    /// The rate the planner assumed before.
    pub assumed_flops_per_s: f64,
}

/// Trains `steps` steps of candidate `c` (without evaluation) in a scratch directory next
/// to the sweep's, removed afterwards, and turns its tokens per second into FLOP/s with the
/// planner's FLOPs per token.
fn calibrate(c: &crate::sweep::CandidateRecord, steps: usize, assumed: f64) -> Result<Calibration> {
    let scratch = c.output.parent().and_then(Path::parent).and_then(Path::parent).context("no workflow directory")?.join(".calibration");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    eprintln!("plan: timing {steps} training steps of {}", c.name);
    let cfg = TrainConfig { output: scratch.clone(), steps: Some(steps), epochs: None, eval_split: None, eval_dataset: None, ..c.config.clone() };
    let summary = crate::recipes::sft::run(&cfg, &crate::engine::RunOptions { resume: false, quiet: true, ..Default::default() }).context("timing the calibration steps")?;
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    let per_token = c.est_flops / c.est_tokens.max(1) as f64;
    let flops_per_s = (summary.tokens_per_s * per_token).max(1.0);
    Ok(Calibration { candidate: c.name.clone(), steps, tokens_per_s: summary.tokens_per_s, flops_per_s, assumed_flops_per_s: assumed })
}

/// What the plan needs besides the training options.
pub struct PlanInput<'a> {
    /// The training options with the (converted) dataset and `output` = the sweep's directory.
    pub options: &'a TrainOptions,
    pub sweep: &'a SweepOptions,
    pub evaluators: Vec<String>,
    pub evaluator_reason: String,
    pub gpu_hour_price: Option<f64>,
    /// Held-out samples each model generates an answer for (0 without evaluators).
    pub generations_per_side: usize,
    pub max_new_tokens: usize,
    /// Models compared on the held-out split (base + fine-tuned = 2; classify: per --models).
    pub sides: usize,
    /// Extra inference the workflow does, in forward tokens (classify: label scoring).
    pub extra_inference: Option<(String, u64)>,
    /// No training (`--benchmark-only`): no candidates, no sweep, no final run.
    pub benchmark_only: bool,
    /// Training steps timed to calibrate the estimates (0 = the planner's rate).
    pub calibration_steps: usize,
}

pub fn build(inp: &PlanInput, inspection: &Inspection) -> Result<Plan> {
    let dry = SweepOptions { dry_run: true, quiet: true, resume: false, ..inp.sweep.clone() };
    let record = sweep::run(inp.options.clone(), &dry).context("planning the sweep")?;
    let splan: sweep_plan::Plan = serde_json::from_value(record.plan.clone())?;
    let mut device = splan.devices.first().cloned().context("the planner found no device")?;
    let planner_rate = device.flops_per_s.max(1.0);
    // A few real steps of the first candidate replace the assumed rate (GEMM-based on CPU,
    // a guess on GPU) with a measured one.
    let calibration = match record.candidates.first().filter(|_| inp.calibration_steps > 0 && !inp.benchmark_only) {
        Some(c) => Some(calibrate(c, inp.calibration_steps, planner_rate)?),
        None => None,
    };
    let rate = calibration.as_ref().map_or(planner_rate, |c| c.flops_per_s);
    device.flops_per_s = rate;
    let scale = planner_rate / rate;

    let cfg: TrainConfig = inp.options.clone().resolve()?;
    let full_cfg = TrainConfig { max_train_samples: None, ..cfg.clone() };
    let (train, held) = crate::recipes::sft::load_split(&full_cfg)?;
    let (train_n, held_n) = (train.len(), held.as_ref().map_or(0, |h| h.len()));
    let tuning_subsample = (inp.sweep.tuning_samples > 0 && train_n > inp.sweep.tuning_samples && cfg.max_train_samples.is_none()).then_some(inp.sweep.tuning_samples);

    let all_tokens = inspection.tokens();
    let samples = inspection.samples.max(1) as u64;
    let per_sample = all_tokens as f64 / samples as f64;
    let model_cfg = lora_models::load_model_config(&cfg.model)?;
    let params = sweep_plan::base_parameters(&model_cfg);
    let held_tokens = (per_sample * held_n as f64) as u64;
    // A run evaluates on the held-out split before, after, and every --eval-interval steps
    // (about 10 times by default): forward passes the training FLOPs do not count.
    let eval_seconds = |steps: usize, interval: Option<usize>| -> f64 {
        let evals = 2 + interval.map_or(10, |i| steps / i.max(1));
        evals as f64 * 2.0 * params * held_tokens as f64 / rate
    };
    let candidates: Vec<PlannedCandidate> = record
        .candidates
        .iter()
        .filter(|_| !inp.benchmark_only)
        .map(|c| PlannedCandidate {
            name: c.name.clone(),
            overrides: c.overrides.clone(),
            steps: c.total_steps,
            tokens: c.est_tokens,
            flops: c.est_flops,
            memory_bytes: c.est_memory_bytes,
            seconds: c.est_seconds * scale + eval_seconds(c.total_steps, c.config.eval_interval),
            device: c.device.clone(),
        })
        .collect();
    let sweep_evals: f64 = record.candidates.iter().map(|c| eval_seconds(c.total_steps, c.config.eval_interval)).sum();

    let final_run = tuning_subsample.filter(|_| !inp.benchmark_only).map(|_| {
        let epochs = cfg.epochs.unwrap_or_else(|| TrainConfig::default_epochs(train_n));
        let tokens = match cfg.steps {
            // Fixed steps: the final run sees as many tokens as a candidate.
            Some(_) => candidates.iter().map(|c| c.tokens).max().unwrap_or(0),
            None => (per_sample * train_n as f64) as u64 * epochs as u64,
        };
        // FLOPs per token of the most expensive candidate (the winner is not known yet).
        let per_token = candidates.iter().map(|c| c.flops / c.tokens.max(1) as f64).fold(0.0, f64::max);
        let flops = per_token * tokens as f64;
        Cost { what: "final run (winner, all training data; with its evaluations)".into(), tokens, flops, seconds: flops / rate + eval_seconds(0, None) }
    });

    let mut inference = Vec::new();
    if held_n > 0 && !inp.benchmark_only {
        // A forward pass costs about 2 FLOPs per parameter and token.
        let tokens = held_tokens * inp.sides as u64;
        let flops = 2.0 * params * tokens as f64;
        inference.push(Cost { what: format!("validation loss, {} model(s) x {held_n} held-out samples", inp.sides), tokens, flops, seconds: flops / rate });
    }
    if inp.generations_per_side > 0 && !inp.evaluators.is_empty() {
        let n = inp.generations_per_side.min(held_n);
        // Promotion scores every candidate too; each answer re-reads the prompt once.
        let sides = inp.sides + candidates.len();
        let tokens = (sides * n) as u64 * (per_sample as u64 + inp.max_new_tokens as u64);
        let flops = 2.0 * params * tokens as f64;
        inference.push(Cost { what: format!("generation for evaluators: {sides} model(s) x {n} prompts, up to {} new tokens", inp.max_new_tokens), tokens, flops, seconds: flops / rate });
    }
    if let Some((what, tokens)) = &inp.extra_inference {
        let flops = 2.0 * params * *tokens as f64;
        inference.push(Cost { what: what.clone(), tokens: *tokens, flops, seconds: flops / rate });
    }
    let mut p = Plan::on_device(&cfg.model, &cfg.dataset, &device, inp.gpu_hour_price);
    p.train_samples = train_n;
    p.held_out_samples = held_n;
    p.tuning_subsample = tuning_subsample;
    p.candidates = candidates;
    p.sweep_seconds = if inp.benchmark_only { 0.0 } else { splan.est_seconds * scale + sweep_evals };
    p.calibration = calibration;
    p.final_run = final_run;
    p.inference = inference;
    p.evaluators = inp.evaluators.clone();
    p.evaluator_reason = inp.evaluator_reason.clone();
    Ok(p.with_totals())
}

impl Plan {
    /// An empty plan on `device`; the workflow fills in its work, then [`Plan::with_totals`].
    pub fn on_device(model: &str, dataset: &Path, device: &sweep_plan::DeviceSlot, gpu_hour_price: Option<f64>) -> Plan {
        Plan {
            model: model.to_string(),
            dataset: dataset.to_path_buf(),
            train_samples: 0,
            held_out_samples: 0,
            tuning_subsample: None,
            candidates: Vec::new(),
            sweep_seconds: 0.0,
            final_run: None,
            inference: Vec::new(),
            total_seconds: 0.0,
            device: device.name.clone(),
            device_flops_per_s: device.flops_per_s.max(1.0),
            gpu: device.name.starts_with("cuda"),
            gpu_hour_price,
            total_cost: None,
            evaluators: Vec::new(),
            evaluator_reason: String::new(),
            calibration: None,
        }
    }

    /// The total time (sweep, final run, inference) and its price on a GPU.
    pub fn with_totals(mut self) -> Plan {
        self.total_seconds = self.sweep_seconds + self.final_run.as_ref().map_or(0.0, |f| f.seconds) + self.inference.iter().map(|c| c.seconds).sum::<f64>();
        self.total_cost = self.gpu_hour_price.filter(|_| self.gpu).map(|p| p * self.total_seconds / 3600.0);
        self
    }
}

/// The device a one-process workflow (`run dpo`, `run rft`) plans for: the first GPU when
/// `--device` is auto or cuda and one exists, else the CPU at its measured rate.
pub fn device_for(device: &str) -> sweep_plan::DeviceSlot {
    let gpus = if device.starts_with("cuda") || device == "auto" { sweep_plan::gpu_devices() } else { Vec::new() };
    gpus.into_iter().next().unwrap_or_else(sweep_plan::cpu_device)
}

fn price(plan: &Plan, seconds: f64) -> String {
    match (plan.gpu, plan.gpu_hour_price) {
        (true, Some(p)) => format!("${:.2}", p * seconds / 3600.0),
        (true, None) => "- (no --gpu-hour-price)".into(),
        (false, _) => format!("{} CPU", fmt_duration(seconds)),
    }
}

/// `plan.md`: data, candidates with their cost, the other work, the total.
pub fn render(title: &str, plan: &Plan, inspection: &Inspection, extra: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Plan: {title}\n");
    let _ = writeln!(s, "Model `{}`, training data `{}`.\n", plan.model, plan.dataset.display());
    let _ = writeln!(s, "## Data\n");
    for l in inspect::summary_lines(inspection) {
        let _ = writeln!(s, "- {l}");
    }
    let _ = writeln!(s, "- split: {} training, {} held out for evaluation", plan.train_samples, plan.held_out_samples);
    if let Some(k) = plan.tuning_subsample {
        let _ = writeln!(s, "- candidates tune on a subsample of {k} training samples (seed of the run); the winner then retrains on all {}", plan.train_samples);
    }
    for l in extra {
        let _ = writeln!(s, "- {l}");
    }
    let _ = writeln!(s, "\n## Evaluation\n");
    if plan.evaluators.is_empty() {
        let _ = writeln!(s, "Validation loss on the held-out split ({}).", plan.evaluator_reason);
    } else {
        let _ = writeln!(s, "Validation loss, and evaluator(s) `{}` on greedy answers to held-out prompts ({}).", plan.evaluators.join("`, `"), plan.evaluator_reason);
    }
    let _ = writeln!(s, "\n## Cost\n");
    match &plan.calibration {
        Some(c) => {
            let _ = writeln!(
                s,
                "Device `{}` at {:.3} TFLOP/s, measured over {} training steps of `{}` ({:.0} tokens/s; the planner assumed {:.3} TFLOP/s).\n",
                plan.device,
                c.flops_per_s / 1e12,
                c.steps,
                c.candidate,
                c.tokens_per_s,
                c.assumed_flops_per_s / 1e12
            );
        }
        None => {
            let _ = writeln!(
                s,
                "Device `{}` at {:.3} TFLOP/s assumed{}.\n",
                plan.device,
                plan.device_flops_per_s / 1e12,
                if plan.gpu { "" } else { " (measured f32 GEMM rate x 0.6)" }
            );
        }
    }
    let _ = writeln!(s, "| work | steps | tokens | TFLOPs | memory GiB | est. time | cost |");
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for c in &plan.candidates {
        let _ = writeln!(
            s,
            "| candidate `{}` | {} | {} | {:.3} | {:.2} | {} | {} |",
            c.name,
            c.steps,
            c.tokens,
            c.flops / 1e12,
            c.memory_bytes as f64 / GIB,
            fmt_duration(c.seconds),
            price(plan, c.seconds)
        );
    }
    if !plan.candidates.is_empty() {
        let _ = writeln!(s, "| sweep, wall time | | | | | {} | {} |", fmt_duration(plan.sweep_seconds), price(plan, plan.sweep_seconds));
    }
    for c in plan.final_run.iter().chain(&plan.inference) {
        let _ = writeln!(s, "| {} | | {} | {:.3} | | {} | {} |", c.what, c.tokens, c.flops / 1e12, fmt_duration(c.seconds), price(plan, c.seconds));
    }
    let _ = writeln!(s, "| **total** | | | | | **{}** | **{}** |", fmt_duration(plan.total_seconds), price(plan, plan.total_seconds));
    let _ = writeln!(s, "\nEstimates: FLOPs of the frozen-base LoRA step (about 4 x base parameters per token plus attention) over the device rate; inference 2 x parameters per token.");
    s
}

/// Writes `plan.md` in `dir` and shows it on stderr.
pub fn write(dir: &Path, text: &str) -> Result<()> {
    crate::checkpoint::write_atomic(&dir.join(super::PLAN_FILE), text.as_bytes())?;
    eprintln!("{text}");
    eprintln!("plan: {}", dir.join(super::PLAN_FILE).display());
    Ok(())
}
