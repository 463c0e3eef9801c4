//! `lora-train run rft`: a prompts file and evaluators to a GRPO-trained adapter: the base
//! model's reward on the held-out prompts (benchmark), a short GRPO sweep of the
//! candidates (`--sweep-steps` steps each, on the tuning subsample), the promotion of the
//! one with the highest held-out reward, the final GRPO run on all the prompts, and the
//! reward before and after.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lora_datasets::Format;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::approval::{self, Approval};
use super::evaluation::{self, SideScores};
use super::final_run::FinalRun;
use super::inspect::{self, Inspection};
use super::plan::{self, Cost, Plan, PlannedCandidate};
use super::promotion::{self, Promotion, Row};
use super::report::{self, ReportInput};
use super::sft::WorkflowArgs;
use super::{Workflow, PLAN_FILE};
use crate::run_control::Control;
use crate::share_key::ShareKey;
use crate::sweep::worker::{GroupMember, GroupSpec, RecipeSpec};
use crate::recipes::grpo::GrpoRecipe;
use crate::config::{TrainConfig, TrainOptions};
use crate::engine::{RunOptions, RunStatus, METRICS_FILE, RUN_FILE};
use crate::evaluators::EvaluatorArgs;
use crate::recipes::grpo::agent::AgentOptions;
use crate::recipes::grpo::{self, prompts, GrpoOptions};
use crate::sweep::candidates;
use crate::sweep::plan as sweep_plan;

pub const ORDER: [&str; 9] = ["inspect", "plan", "approval", "benchmark", "sweep", "promotion", "final run", "evaluation", "report"];

#[derive(clap::Args, Debug, Clone)]
pub struct RftArgs {
    #[command(flatten)]
    pub common: WorkflowArgs,
    #[command(flatten)]
    pub grpo: GrpoOptions,
    #[command(flatten)]
    pub evaluators: EvaluatorArgs,
    /// Optimizer steps of each sweep candidate (the final run takes --steps/--epochs).
    #[arg(long, default_value_t = 10, help_heading = "Workflow")]
    pub sweep_steps: usize,
    /// Held-out prompts the benchmark and the final evaluation answer.
    #[arg(long, default_value_t = 50, help_heading = "Workflow")]
    pub eval_samples: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Candidate {
    name: String,
    overrides: std::collections::BTreeMap<String, String>,
    config: TrainConfig,
}

fn build_candidates(base: &TrainOptions, args: &RftArgs, train_n: usize, dir: &Path) -> Result<Vec<Candidate>> {
    let w = &args.common;
    candidates::build(base, &w.candidate, &w.grid)?
        .into_iter()
        .map(|c| {
            let mut o = candidates::apply(base, &c.overrides)?;
            o.output = Some(dir.join("sweep").join(&c.name));
            o.steps = Some(args.sweep_steps);
            o.epochs = None;
            if o.max_train_samples.is_none() && w.tuning_samples > 0 && train_n > w.tuning_samples {
                o.max_train_samples = Some(w.tuning_samples);
            }
            Ok(Candidate { name: c.name.clone(), overrides: c.overrides, config: o.resolve().with_context(|| format!("candidate {}", c.name))? })
        })
        .collect()
}

/// The held-out prompts (the first `limit`) of `cfg`, tokenized for `loaded`'s model.
fn held_out_prompts(cfg: &TrainConfig, bundle: &lora_models::TokenizerBundle, limit: usize) -> Result<Vec<prompts::Prompt>> {
    let (_, eval) = crate::recipes::sft::load_split_with(cfg, prompts::load_prompt_dataset)?;
    let eval = eval.context("run rft benchmarks on held-out prompts: do not pass --eval-split 0")?;
    let mut p = prompts::tokenize_prompts(bundle, &eval)?;
    p.truncate(limit);
    Ok(p)
}

/// Greedy answers of the base (or the adapter at `adapter`) to the held-out prompts, scored.
fn reward(cfg: &TrainConfig, adapter: Option<&Path>, args: &RftArgs) -> Result<SideScores> {
    const TUNED: &str = "fine-tuned";
    let adapters: Vec<(String, PathBuf)> = adapter.map(|a| (TUNED.to_string(), a.to_path_buf())).into_iter().collect();
    let loaded = evaluation::load_with_adapters(cfg, &adapters)?;
    let prompts = held_out_prompts(cfg, &loaded.tokenizer, args.eval_samples)?;
    let mut ctx = args.evaluators.context()?;
    grpo::fill_context(&mut ctx, &loaded.tokenizer, prompts.iter());
    let set = args.evaluators.build(&ctx)?;
    let s = evaluation::generate_and_score(&loaded, adapter.map(|_| TUNED), &prompts, &set, args.grpo.max_completion_length)?;
    eprintln!("reward of {}: {} on {} held-out prompts", adapter.map_or("the base".to_string(), |a| a.display().to_string()), s.reward_mean.map_or("-".into(), |r| format!("{r:.4}")), prompts.len());
    Ok(s)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Trained {
    rows: Vec<Row>,
}

pub fn run(args: RftArgs, control: &Control) -> Result<()> {
    let w = &args.common;
    if args.evaluators.evaluators.is_empty() {
        bail!("run rft needs --evaluator SPEC (the reward)");
    }
    args.grpo.validate()?;
    if args.sweep_steps == 0 {
        bail!("--sweep-steps must be at least 1");
    }
    let cfg0 = w.options.clone().resolve()?;
    let mut settings = w.settings();
    settings["grpo"] = json!(args.grpo);
    settings["evaluators"] = json!(args.evaluators.evaluators);
    settings["reward_weights"] = json!(args.evaluators.reward_weights);
    settings["sweep_steps"] = json!(args.sweep_steps);
    settings["eval_samples"] = json!(args.eval_samples);
    let mut wf = Workflow::open(&cfg0.output, "rft", settings, w.resume, w.yes, ORDER.to_vec())?.with_control(control);

    let insp: Inspection = wf.phase("inspect", |wf| inspect::run_for(&wf.dir, &cfg0.dataset, &cfg0.model, cfg0.max_sequence_length, 50.0, Format::Prompts))?;
    let base = TrainOptions { dataset: Some(insp.dataset.clone()), ..w.options.clone() };
    let base_cfg = TrainConfig { output: wf.dir.join("benchmark"), ..base.clone().resolve()? };
    let (train_ds, held_ds) = crate::recipes::sft::load_split_with(&base_cfg, prompts::load_prompt_dataset)?;
    let cands = build_candidates(&base, &args, train_ds.len(), &wf.dir)?;
    let plan_data: Plan = wf.phase("plan", |wf| {
        let p = rft_plan(&cands, &base_cfg, train_ds.len(), held_ds.as_ref().map_or(0, |h| h.len()), &insp, &args)?;
        let extra = vec![format!("reward: {} on greedy answers to up to {} held-out prompts, base before training and fine-tuned after", args.evaluators.evaluators.join(" + "), args.eval_samples)];
        plan::write(&wf.dir, &plan::render("run rft", &p, &insp, &extra))?;
        Ok(p)
    })?;
    let _: Approval = wf.phase("approval", |wf| approval::require(wf, "plan", &wf.dir.join(PLAN_FILE)))?;
    let bench: SideScores = wf.phase("benchmark", |_| reward(&base_cfg, None, &args))?;
    let trained: Trained = wf.phase("sweep", |wf| {
        let mut rows = Vec::new();
        // The unfinished candidates train packed over one base per group that can share
        // it (one forward pass, each candidate's adapter on its own rows), as `sweep` packs.
        let recipe = RecipeSpec::Grpo(GrpoRecipe { grpo: args.grpo.clone(), agent: AgentOptions::local(), evaluators: args.evaluators.clone() });
        let mut groups: BTreeMap<ShareKey, Vec<GroupMember>> = BTreeMap::new();
        for c in cands.iter().filter(|c| crate::engine::read_status(&c.config.output) != Some(RunStatus::Completed)) {
            let member = GroupMember { name: c.name.clone(), config: c.config.clone(), resume: c.config.output.join(RUN_FILE).exists(), recipe: None };
            groups.entry(ShareKey::base(&c.config)).or_default().push(member);
        }
        for members in groups.into_values() {
            let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
            eprintln!("rft: candidates {} ({} steps), packed over one base", names.join(", "), args.sweep_steps);
            let spec = GroupSpec { device: members[0].config.device.clone(), members, result_file: None, recipe: recipe.clone() };
            match crate::sweep::worker::train_spec(&spec, &wf.control) {
                // A stop on request ends the workflow (resumable), not the candidates.
                Err(e) if crate::run_control::is_stop(&e) => return Err(e),
                Err(e) => tracing::warn!("candidates {}: {e:#}", names.join(", ")),
                Ok(()) => {}
            }
        }
        for c in &cands {
            let run_dir = &c.config.output;
            let rows_m: Vec<crate::metrics::MetricsRow> = crate::metrics::read_metrics_so_far(&run_dir.join(METRICS_FILE))?;
            // GRPO's eval loss is minus the held-out reward.
            let reward_after = rows_m.iter().rev().find(|r| r.step > 0 && r.eval_loss.is_some()).and_then(|r| r.eval_loss).map(|l| -l);
            rows.push(Row {
                name: c.name.clone(),
                overrides: c.overrides.clone(),
                status: crate::engine::read_status(run_dir).unwrap_or(RunStatus::Failed),
                eval_loss_before: None,
                eval_loss: None,
                train_loss: rows_m.iter().rev().find_map(|r| r.loss),
                elapsed_s: rows_m.last().map(|r| r.elapsed_s),
                est_seconds: plan_data.candidates.iter().find(|p| p.name == c.name).map_or(0.0, |p| p.seconds),
                reward_mean: reward_after,
                output: run_dir.clone(),
            });
        }
        if !rows.iter().any(|r| r.status == RunStatus::Completed) {
            bail!("no candidate completed (see {})", wf_sweep_dir(&cands).display());
        }
        Ok(Trained { rows })
    })?;
    let promo: Promotion = wf.phase("promotion", |wf| {
        let best = trained
            .rows
            .iter()
            .filter(|r| r.status == RunStatus::Completed)
            .max_by(|a, b| a.reward_mean.unwrap_or(f64::MIN).total_cmp(&b.reward_mean.unwrap_or(f64::MIN)))
            .context("no completed candidate")?;
        let winner = best.name.clone();
        let text = promotion::render(&trained.rows, &winner, "held-out reward");
        let path = wf.dir.join(promotion::SCOREBOARD_FILE);
        crate::checkpoint::write_atomic(&path, text.as_bytes())?;
        eprintln!("{text}");
        let approval = approval::require(wf, &format!("promotion of `{winner}`"), &path)?;
        let c = cands.iter().find(|c| c.name == winner).context("winner vanished")?;
        Ok(Promotion { winner, criterion: "reward".into(), rows: trained.rows.clone(), winner_dir: c.config.output.clone(), winner_config: c.config.clone(), approved_by: approval.by })
    })?;
    let fin: FinalRun = wf.phase("final run", |wf| {
        if w.skip_final {
            return Ok(FinalRun { adapter: promo.winner_dir.clone(), retrained: false, skipped_because: Some("--skip-final".into()), config: promo.winner_config.clone(), elapsed_s: None, train_loss: None, eval_loss: None });
        }
        // The winner's configuration with the user's length and all the prompts.
        let cfg = TrainConfig { output: wf.dir.join("final"), steps: base_cfg.steps, epochs: base_cfg.epochs, max_train_samples: base_cfg.max_train_samples, ..promo.winner_config.clone() };
        let resume = cfg.output.join(RUN_FILE).exists();
        let s = grpo::run(&cfg, &args.grpo, &AgentOptions::local(), &args.evaluators, &RunOptions { resume, quiet: false, control: wf.control.clone() })?;
        Ok(FinalRun { adapter: s.adapter.clone(), retrained: true, skipped_because: None, config: cfg, elapsed_s: Some(s.elapsed_s), train_loss: s.train_loss, eval_loss: s.eval_loss })
    })?;
    let tuned: SideScores = wf.phase("evaluation", |_| reward(&base_cfg, Some(&fin.adapter), &args))?;
    let _: serde_json::Value = wf.phase("report", |wf| {
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        let mut md = format!("Reward ({}) of greedy answers to the held-out prompts:\n\n| model | reward |\n| --- | ---: |\n", args.evaluators.evaluators.join(" + "));
        let _ = writeln!(md, "| base | {} |\n| fine-tuned | {} |", f(bench.reward_mean), f(tuned.reward_mean));
        let data = json!({"base": bench, "fine_tuned": tuned, "reward_before": bench.reward_mean, "reward_after": tuned.reward_mean});
        let input = ReportInput {
            title: "run rft: final report",
            plan: &plan_data,
            promotion: Some(&promo),
            final_run: Some(&fin),
            comparison_md: md,
            comparison: data,
            generated: insp.generated.clone(),
            inference_phases: &["benchmark", "evaluation"],
            eval_is_negative_reward: true,
        };
        report::write(wf, &input)
    })?;
    wf.finish_with_report(&fin.adapter, args.common.json)
}

fn wf_sweep_dir(cands: &[Candidate]) -> PathBuf {
    cands.first().and_then(|c| c.config.output.parent().map(Path::to_path_buf)).unwrap_or_default()
}

/// Rough GRPO cost: every step samples prompts_per_step x accumulation x G completions of
/// up to --max-completion-length tokens (2 FLOPs per parameter and token) and trains on
/// them (the LoRA step of the sweep planner); the held-out reward is measured about 12
/// times per run plus the benchmark and the final evaluation.
fn rft_plan(cands: &[Candidate], base: &TrainConfig, train_n: usize, held_n: usize, insp: &Inspection, args: &RftArgs) -> Result<Plan> {
    let model_cfg = lora_models::load_model_config(&base.model)?;
    let params = sweep_plan::base_parameters(&model_cfg);
    let device = plan::device_for(&base.device);
    let rate = device.flops_per_s.max(1.0);
    let prompt_tokens = insp.tokens() as f64 / insp.samples.max(1) as f64;
    let seq = prompt_tokens + args.grpo.max_completion_length as f64;
    let held = args.eval_samples.min(held_n);
    let cost_of = |cfg: &TrainConfig, steps: usize| -> (u64, f64) {
        let completions = steps * args.grpo.prompts_per_step * cfg.gradient_accumulation_steps * args.grpo.num_generations;
        let tokens = (completions as f64 * seq) as u64;
        let train = sweep_plan::estimate(&model_cfg, cfg, tokens, seq as usize).flops;
        let evals = 12.0 * held as f64 * seq * 2.0 * params;
        (tokens, 2.0 * params * tokens as f64 + train + evals)
    };
    let planned: Vec<PlannedCandidate> = cands
        .iter()
        .map(|c| {
            let (tokens, flops) = cost_of(&c.config, args.sweep_steps);
            let e = sweep_plan::estimate(&model_cfg, &c.config, tokens, seq as usize);
            PlannedCandidate { name: c.name.clone(), overrides: c.overrides.clone(), steps: args.sweep_steps, tokens, flops, memory_bytes: e.base_bytes + e.own_bytes, seconds: flops / rate, device: Some(device.name.clone()) }
        })
        .collect();
    let final_run = (!args.common.skip_final).then(|| {
        let cycles = train_n.div_ceil(args.grpo.prompts_per_step * base.gradient_accumulation_steps).max(1);
        let steps = base.steps.unwrap_or(base.epochs.unwrap_or_else(|| TrainConfig::default_epochs(train_n)) * cycles * args.grpo.num_iterations);
        let (tokens, flops) = cost_of(base, steps);
        Cost { what: format!("final GRPO run ({steps} steps, all prompts)"), tokens, flops, seconds: flops / rate }
    });
    let bench_tokens = (2.0 * held as f64 * seq) as u64;
    let bench_flops = 2.0 * params * bench_tokens as f64;
    let inference = vec![Cost { what: format!("reward benchmark: base and fine-tuned x {held} prompts"), tokens: bench_tokens, flops: bench_flops, seconds: bench_flops / rate }];
    let mut p = Plan::on_device(&base.model, &base.dataset, &device, args.common.gpu_hour_price);
    p.train_samples = train_n;
    p.held_out_samples = held_n;
    p.tuning_subsample = cands.first().and_then(|c| c.config.max_train_samples);
    p.sweep_seconds = planned.iter().map(|c| c.seconds).sum();
    p.candidates = planned;
    p.final_run = final_run;
    p.inference = inference;
    p.evaluators = args.evaluators.evaluators.clone();
    p.evaluator_reason = "the reward".into();
    Ok(p.with_totals())
}
