//! `lora-train run sft`: inspect, plan with cost, one approval, sweep, promotion gate,
//! the winner retrained on all the data, base against fine-tuned, `final_report.md`.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::approval::{self, Approval};
use super::evaluation::{self, Comparison};
use super::final_run::{self, FinalRun};
use super::inspect::{self, Inspection};
use super::plan::{self, Plan, PlanInput};
use super::promotion::{self, Promotion};
use super::report::{self, ReportInput};
use super::sweep::{self as sweep_phase, SweepResult};
use super::{Workflow, PLAN_FILE};
use crate::run_control::Control;
use crate::config::TrainOptions;
use crate::sweep::SweepOptions;

pub const ORDER: [&str; 8] = ["inspect", "plan", "approval", "sweep", "promotion", "final run", "evaluation", "report"];

/// The flags every workflow shares.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkflowArgs {
    #[command(flatten)]
    pub options: TrainOptions,
    /// A candidate as key=value pairs over the training flags, e.g. `rank=8,lr=1.5e-4`
    /// (as `sweep --candidate`). Repeatable.
    #[arg(long, value_name = "K=V,..", help_heading = "Workflow")]
    pub candidate: Vec<String>,
    /// One axis of a candidate grid, e.g. `--grid rank=8,16` (as `sweep --grid`).
    /// Without --candidate and --grid: (rank 8, lr 1.5e-4), (16, 1e-4), (32, 5e-5).
    #[arg(long, value_name = "K=V1,V2", help_heading = "Workflow")]
    pub grid: Vec<String>,
    /// Above this many training samples, candidates tune on a subsample of this size
    /// and the winner retrains on all of them; 0 = candidates train on all.
    #[arg(long, default_value_t = 1000, help_heading = "Workflow")]
    pub tuning_samples: usize,
    /// At most this many candidates train at the same time.
    #[arg(long, default_value_t = 6, help_heading = "Workflow")]
    pub max_parallel: usize,
    /// Price of one GPU hour, for the plan's cost (GPU plans only).
    #[arg(long, value_name = "USD", help_heading = "Workflow")]
    pub gpu_hour_price: Option<f64>,
    /// Training steps of the first candidate timed while planning, to calibrate the time
    /// estimates (0: the planner's assumed rate).
    #[arg(long, default_value_t = 3, help_heading = "Workflow")]
    pub calibration_steps: usize,
    /// Promote the winning candidate as it is, without the full-data final run.
    #[arg(long, help_heading = "Workflow")]
    pub skip_final: bool,
    /// Approve the plan and the promotion without asking (needed without a terminal).
    #[arg(long, short = 'y', help_heading = "Workflow")]
    pub yes: bool,
    /// Continue the workflow in --output at the phase (and candidate) where it stopped.
    #[arg(long, help_heading = "Workflow")]
    pub resume: bool,
    /// Print the report's data as one JSON object on stdout (`run classify`: per model
    /// `accuracy`, `per_label` and `confusion`; the others: `final_report.json`); with
    /// --detach, the job id.
    #[arg(long, help_heading = "Workflow")]
    pub json: bool,
    /// The job-store row, --detach and --backend slurm (the whole workflow as one job).
    #[command(flatten)]
    pub job: crate::jobs::JobArgs,
}

impl WorkflowArgs {
    /// The settings `--resume` must find unchanged.
    pub fn settings(&self) -> serde_json::Value {
        json!({
            "options": self.options, "candidate": self.candidate, "grid": self.grid,
            "tuning_samples": self.tuning_samples, "skip_final": self.skip_final, "gpu_hour_price": self.gpu_hour_price,
        })
    }

    /// The sweep's training options (on `dataset`, into `DIR/sweep`) and its options.
    pub fn sweep_setup(&self, dir: &Path, dataset: &Path) -> Result<(TrainOptions, SweepOptions)> {
        if self.max_parallel == 0 {
            bail!("--max-parallel must be at least 1");
        }
        // The candidates keep `--device`: the winner's configuration is what the final run
        // trains, and it must run where the user said, not on `auto`.
        let options = TrainOptions { dataset: Some(dataset.to_path_buf()), output: Some(dir.join("sweep")), ..self.options.clone() };
        let devices = options.device.clone().unwrap_or_else(|| "auto".into());
        let sweep = SweepOptions {
            candidates: self.candidate.clone(),
            grid: self.grid.clone(),
            tuning_samples: self.tuning_samples,
            pack: true,
            devices,
            simulate_devices: None,
            max_parallel: self.max_parallel,
            dry_run: false,
            resume: false,
            quiet: false,
            slurm: false,
            control: Control::default(),
        };
        Ok((options, sweep))
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct SftArgs {
    #[command(flatten)]
    pub common: WorkflowArgs,
    /// How candidates and the fine-tuned model are scored besides validation loss: an
    /// evaluator spec (as `eval --evaluator`), or `auto` (numeric, json or label when the
    /// answers are objectively checkable). Repeatable. [default: validation loss only]
    #[arg(long = "evaluator", value_name = "SPEC", help_heading = "Evaluation")]
    pub evaluators: Vec<String>,
    /// Held-out samples each model answers for the evaluators.
    #[arg(long, default_value_t = 50, help_heading = "Evaluation")]
    pub eval_samples: usize,
    /// Longest generated answer for the evaluators.
    #[arg(long, default_value_t = 128, help_heading = "Evaluation")]
    pub max_new_tokens: usize,
    /// A model sweep: every candidate on each of these bases, comma-separated [default:
    /// --model]. Eval losses of different tokenizers are not comparable: give an evaluator.
    #[arg(long, value_delimiter = ',', help_heading = "Workflow")]
    pub models: Option<Vec<String>>,
}

/// The sweep of each base of a model sweep: its training options (into `DIR/sweep`, or
/// `DIR/sweep/mK` with several bases) and its candidates' name prefix.
fn model_sweeps(options: &TrainOptions, models: &[String], dir: &Path) -> Vec<(String, TrainOptions)> {
    if models.len() <= 1 {
        let model = models.first().cloned().or_else(|| options.model.clone());
        return vec![(String::new(), TrainOptions { model, ..options.clone() })];
    }
    models
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("m{}-", i + 1), TrainOptions { model: Some(m.clone()), output: Some(dir.join("sweep").join(format!("m{}", i + 1))), ..options.clone() }))
        .collect()
}

/// One plan for several bases: their candidates (prefixed) one sweep after another, the
/// final run of the most expensive, the first base's evaluation.
fn merge_plans(mut plans: Vec<(String, Plan)>) -> Result<Plan> {
    let (prefix, mut first) = plans.remove(0);
    first.candidates = first.candidates.into_iter().map(|c| plan::PlannedCandidate { name: format!("{prefix}{}", c.name), ..c }).collect();
    for (prefix, p) in plans {
        first.candidates.extend(p.candidates.into_iter().map(|c| plan::PlannedCandidate { name: format!("{prefix}{}", c.name), ..c }));
        first.sweep_seconds += p.sweep_seconds;
        // The promotion's scoring of these candidates (the first plan counted its own).
        first.inference.extend(p.inference.into_iter().filter(|c| c.what.starts_with("generation")).map(|c| plan::Cost { what: format!("{prefix}* {}", c.what), ..c }));
        if p.final_run.as_ref().map_or(0.0, |f| f.seconds) > first.final_run.as_ref().map_or(0.0, |f| f.seconds) {
            first.final_run = p.final_run;
        }
    }
    Ok(first.with_totals())
}

/// Several bases' sweeps as one: candidates prefixed, the winner by the first sweep's
/// criterion over all of them.
fn merge_sweeps(mut results: Vec<(String, SweepResult)>, dir: &Path) -> Result<SweepResult> {
    if results.len() == 1 {
        return Ok(results.remove(0).1);
    }
    let criterion = results[0].1.criterion.clone();
    let mut merged = SweepResult { dir: dir.join("sweep"), winner: None, criterion: criterion.clone(), wall_s: 0.0, candidates: Vec::new() };
    for (prefix, r) in results {
        merged.wall_s += r.wall_s;
        merged.candidates.extend(r.candidates.into_iter().map(|c| crate::sweep::CandidateRecord { name: format!("{prefix}{}", c.name), ..c }));
    }
    let key = |c: &crate::sweep::CandidateRecord| if criterion == "eval_loss" { c.eval_loss } else { c.train_loss };
    merged.winner = merged
        .candidates
        .iter()
        .filter(|c| c.status == crate::engine::RunStatus::Completed)
        .filter_map(|c| key(c).filter(|v| v.is_finite()).map(|v| (v, c.name.clone())))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n);
    Ok(merged)
}

/// `--evaluator` as given, or `auto` resolved from the training answers (for JSON
/// answers: `json-schema` with a schema inferred from them, written to `dir/data/`).
fn resolve_evaluators(specs: &[String], dataset: &Path, dir: &Path) -> Result<(Vec<String>, String)> {
    if specs.iter().any(|s| s == "auto") {
        if specs.len() > 1 {
            bail!("--evaluator auto chooses one evaluator; give it alone");
        }
        let ds = crate::data::load_chat_dataset(dataset)?;
        let answers: Vec<String> = ds.samples.iter().filter_map(evaluation::prompt_and_answer).map(|(_, a)| a).collect();
        let (spec, why) = evaluation::auto_evaluator(&answers);
        if spec.as_deref() == Some("json") {
            let objects: Vec<serde_json::Map<String, serde_json::Value>> = answers.iter().filter_map(|a| serde_json::from_str(a.trim()).ok()).collect();
            let schema = evaluation::infer_schema(&objects);
            std::fs::create_dir_all(dir.join("data"))?;
            let path = crate::output_file::fresh_path(&dir.join("data"), "answers-schema", "json", "")?;
            lora_models::write_new(&path, &serde_json::to_vec_pretty(&schema)?)?;
            // Absolute: a resumed workflow may run from another directory.
            let path = std::fs::canonicalize(&path).with_context(|| format!("resolving {}", path.display()))?;
            let required: Vec<String> = schema["required"].as_array().map(|r| r.iter().filter_map(|k| k.as_str().map(str::to_string)).collect()).unwrap_or_default();
            return Ok((
                vec![format!("json-schema:{}", path.display())],
                format!("--evaluator auto: {why}; schema inferred from the {} answers in the data (required: {})", objects.len(), required.join(", ")),
            ));
        }
        return Ok((spec.into_iter().collect(), format!("--evaluator auto: {why}")));
    }
    Ok((specs.to_vec(), if specs.is_empty() { "the default".into() } else { "--evaluator".into() }))
}

pub fn run(args: SftArgs, control: &Control) -> Result<()> {
    let w = &args.common;
    let cfg0 = w.options.clone().resolve()?;
    // A bad spec fails before the output directory is claimed.
    for s in args.evaluators.iter().filter(|s| *s != "auto") {
        crate::evaluators::parse_spec(s).map_err(|e| anyhow::anyhow!("--evaluator {s}: {e:#}"))?;
    }
    let mut settings = w.settings();
    settings["evaluators"] = json!(args.evaluators);
    settings["eval_samples"] = json!(args.eval_samples);
    settings["max_new_tokens"] = json!(args.max_new_tokens);
    settings["models"] = json!(args.models);
    let mut wf = Workflow::open(&cfg0.output, "sft", settings, w.resume, w.yes, ORDER.to_vec())?.with_control(control);

    let insp: Inspection = wf.phase("inspect", |wf| inspect::run(&wf.dir, &cfg0.dataset, &cfg0.model, cfg0.max_sequence_length, 50.0))?;
    let (options, sweep_opts) = w.sweep_setup(&wf.dir, &insp.dataset)?;
    let sweeps = model_sweeps(&options, args.models.as_deref().unwrap_or_default(), &wf.dir);
    let plan: Plan = wf.phase("plan", |wf| {
        let (evaluators, reason) = resolve_evaluators(&args.evaluators, &insp.dataset, &wf.dir)?;
        let mut plans = Vec::new();
        for (prefix, options) in &sweeps {
            let input = PlanInput {
                options,
                sweep: &sweep_opts,
                generations_per_side: if evaluators.is_empty() { 0 } else { args.eval_samples },
                evaluators: evaluators.clone(),
                evaluator_reason: reason.clone(),
                gpu_hour_price: w.gpu_hour_price,
                max_new_tokens: args.max_new_tokens,
                sides: 2,
                extra_inference: None,
                benchmark_only: false,
                calibration_steps: w.calibration_steps,
            };
            plans.push((prefix.clone(), plan::build(&input, &insp)?));
        }
        let extra: Vec<String> = if sweeps.len() > 1 {
            vec![format!("model sweep: {}", sweeps.iter().map(|(p, o)| format!("`{}*` on {}", p, o.model.as_deref().unwrap_or_default())).collect::<Vec<_>>().join(", "))]
        } else {
            Vec::new()
        };
        let p = merge_plans(plans)?;
        plan::write(&wf.dir, &plan::render("run sft", &p, &insp, &extra))?;
        Ok(p)
    })?;
    let _: Approval = wf.phase("approval", |wf| approval::require(wf, "plan", &wf.dir.join(PLAN_FILE)))?;
    let sw: SweepResult = wf.phase("sweep", |wf| {
        let results = sweeps.iter().map(|(prefix, o)| Ok((prefix.clone(), sweep_phase::run(o, &sweep_opts, &wf.control)?))).collect::<Result<Vec<_>>>()?;
        merge_sweeps(results, &wf.dir)
    })?;
    let promo: Promotion = wf.phase("promotion", |wf| promotion::run(wf, &sw, &plan.candidates, &plan.evaluators, args.eval_samples, args.max_new_tokens))?;
    let fin: FinalRun = wf.phase("final run", |wf| {
        let skip = if w.skip_final {
            Some("--skip-final".to_string())
        } else if plan.tuning_subsample.is_none() {
            Some("the candidates trained on all the training data already".to_string())
        } else {
            None
        };
        final_run::run(&wf.dir, &promo.winner_config, &promo.winner_dir, w.options.max_train_samples, skip, &wf.control)
    })?;
    let cmp: Comparison = wf.phase("evaluation", |_| evaluation::compare(&fin.config, &fin.adapter, &plan.evaluators, args.eval_samples, args.max_new_tokens))?;
    let _: serde_json::Value = wf.phase("report", |wf| {
        let input = ReportInput {
            title: "run sft: final report",
            plan: &plan,
            promotion: Some(&promo),
            final_run: Some(&fin),
            comparison_md: comparison_md(&cmp),
            comparison: serde_json::to_value(&cmp)?,
            generated: insp.generated.clone(),
            inference_phases: &["promotion", "evaluation"],
            eval_is_negative_reward: false,
        };
        report::write(wf, &input)
    })?;
    wf.finish_with_report(&fin.adapter, args.common.json)
}

fn comparison_md(c: &Comparison) -> String {
    if c.held_out_samples == 0 {
        return "No held-out data (`--eval-split 0`): nothing compared.".into();
    }
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    let mut s = format!("On {} held-out samples", c.held_out_samples);
    if c.generated > 0 {
        let _ = write!(s, " (evaluators `{}` on greedy answers to the first {})", c.evaluators.join("`, `"), c.generated);
    }
    s.push_str(":\n\n| model | eval loss | perplexity | reward |\n| --- | ---: | ---: | ---: |\n");
    let ppl = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.3}", v.exp()));
    let _ = writeln!(s, "| base | {} | {} | {} |", f(c.base_eval_loss), ppl(c.base_eval_loss), f(c.base.as_ref().and_then(|b| b.reward_mean)));
    let _ = writeln!(s, "| fine-tuned | {} | {} | {} |", f(c.tuned_eval_loss), ppl(c.tuned_eval_loss), f(c.tuned.as_ref().and_then(|b| b.reward_mean)));
    if let Some(t) = &c.tuned {
        s.push_str("\nFirst answers of the fine-tuned model (expected -> answer):\n\n");
        for (truth, answer) in &t.examples {
            let _ = writeln!(s, "- {truth} -> {:?}", answer.chars().take(200).collect::<String>());
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::sweep::candidates;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WorkflowArgs,
    }

    /// `run sft --device cpu`: the sweep places its candidates on the CPU, and every
    /// candidate's configuration (the winner's is what the final run trains) says cpu too,
    /// not `auto`. The old spelling `--devices` means the same.
    #[test]
    fn the_device_reaches_the_sweep_and_the_final_run() -> Result<()> {
        for flag in ["--device", "--devices"] {
            let w = Cli::try_parse_from(["run", "--model", "m", "--dataset", "d.jsonl", "-o", "out", flag, "cpu"])?.args;
            let (options, sweep) = w.sweep_setup(Path::new("out"), Path::new("d.jsonl"))?;
            assert_eq!(sweep.devices, "cpu", "{flag}");
            for c in candidates::build(&options, &[], &[])? {
                let config = candidates::apply(&options, &c.overrides)?.resolve()?;
                assert_eq!(config.device, "cpu", "{flag}: candidate {}", c.name);
            }
        }
        Ok(())
    }
}
