//! `lora-train run dpo`: preference pairs (Fireworks or TRL form) trained directly with
//! `dpo` (`recipes/preference.rs`), one candidate per beta of `--grid beta=...` (times
//! any training-flag grid), each compared against the base on the held-out pairs'
//! prompts with `compare` (an evaluator or a judge model), in order, stopping early once a
//! candidate reaches `--target-win-rate`. As in the hosted DPO workflow there is no final
//! retraining: the sweep is the training run; the promotion picks the best win rate.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lora_datasets::{Format, Sample};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::approval::{self, Approval};
use super::final_run::FinalRun;
use super::inspect::{self, Inspection};
use super::plan::{self, Cost, Plan, PlannedCandidate};
use super::promotion::{self, Promotion, Row};
use super::report::{self, ReportInput};
use super::sft::WorkflowArgs;
use super::{Generated, Workflow, PLAN_FILE};
use crate::run_control::Control;
use crate::compare::CompareOptions;
use crate::config::{clap_defaults, TrainConfig, TrainOptions};
use crate::engine::{RunOptions, RunStatus, METRICS_FILE, RUN_FILE};
use crate::evaluators::EvaluatorArgs;
use crate::pairs::{PairsOptions, Sampler};
use crate::placement::PlacementArgs;
use crate::recipes::dpo::{Dpo, LossType};
use crate::recipes::preference::{self, PairOptions};
use crate::sides::{GenerationArgs, ModelRef};
use crate::share_key::ShareKey;
use crate::sweep::candidates;
use crate::sweep::worker::{GroupMember, GroupSpec, RecipeSpec};
use crate::recipes::preference::PreferenceRecipe;
use crate::sweep::plan as sweep_plan;

pub const ORDER: [&str; 8] = ["inspect", "plan", "approval", "data", "sweep", "promotion", "evaluation", "report"];

#[derive(clap::Args, Debug, Clone)]
pub struct DpoArgs {
    #[command(flatten)]
    pub common: WorkflowArgs,
    /// How the comparison against the base judges two answers: an evaluator spec (as
    /// `compare --evaluator`). Give this or --judge-model.
    #[arg(long = "evaluator", value_name = "SPEC", help_heading = "Comparison")]
    pub evaluators: Vec<String>,
    /// Judge the comparison with this model (MODEL or MODEL+ADAPTER) instead.
    #[arg(long, value_name = "MODEL[+ADAPTER]", help_heading = "Comparison")]
    pub judge_model: Option<String>,
    /// Stop the sweep once a candidate's win rate against the base reaches this.
    #[arg(long, help_heading = "Comparison")]
    pub target_win_rate: Option<f64>,
    /// Held-out prompts each comparison answers.
    #[arg(long, default_value_t = 50, help_heading = "Comparison")]
    pub eval_samples: usize,
    /// Longest answer in the comparison.
    #[arg(long, default_value_t = 128, help_heading = "Comparison")]
    pub max_new_tokens: usize,
    /// Prompts-only data: the preferred answers' sampler, MODEL or MODEL+ADAPTER (pairs
    /// by delta learning, as `lora-train pairs`).
    #[arg(long, value_name = "MODEL[+ADAPTER]", help_heading = "Pairs from prompts")]
    pub strong: Option<String>,
    /// Prompts-only data: the non-preferred answers' sampler [default: --model].
    #[arg(long, value_name = "MODEL[+ADAPTER]", help_heading = "Pairs from prompts")]
    pub weak: Option<String>,
    /// Prompts-only data: longest generated answer of a pair.
    #[arg(long, default_value_t = 256, help_heading = "Pairs from prompts")]
    pub pair_max_new_tokens: usize,
    /// The preference objective: dpo (the base as reference) or orpo (no reference; beta
    /// is ORPO's lambda).
    #[arg(long, value_enum, default_value_t = Method::Dpo, help_heading = "Comparison")]
    pub method: Method,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Dpo,
    Orpo,
}

/// One candidate: training-flag overrides and a beta.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Candidate {
    name: String,
    overrides: BTreeMap<String, String>,
    beta: f64,
    config: TrainConfig,
}

/// `--grid beta=...` (and `--candidate ...,beta=...` is not supported: beta is not a
/// training flag) times the other grids and candidates; without any, one candidate.
fn build_candidates(base: &TrainOptions, explicit: &[String], grids: &[String], dir: &Path) -> Result<Vec<Candidate>> {
    let mut betas = Vec::new();
    let mut rest = Vec::new();
    for g in grids {
        let (k, values) = candidates::parse_grid(g)?;
        if k == "beta" {
            for v in values {
                let b: f64 = v.parse().ok().filter(|b: &f64| b.is_finite() && *b > 0.0).with_context(|| format!("--grid beta: `{v}` is not a positive number"))?;
                betas.push(b);
            }
        } else {
            rest.push(g.clone());
        }
    }
    if explicit.iter().any(|c| c.split(',').any(|kv| kv.trim().starts_with("beta="))) {
        bail!("run dpo: give betas as --grid beta=0.1,0.3 (a --candidate holds training flags only)");
    }
    if betas.is_empty() {
        betas.push(0.1);
    }
    let train: Vec<(String, BTreeMap<String, String>)> = if explicit.is_empty() && rest.is_empty() {
        vec![(String::new(), BTreeMap::new())]
    } else {
        candidates::build(base, explicit, &rest)?.into_iter().map(|c| (c.name, c.overrides)).collect()
    };
    let mut out = Vec::new();
    for (tname, overrides) in &train {
        for &beta in &betas {
            let name = if tname.is_empty() { format!("beta{beta}") } else { format!("{tname}-beta{beta}") };
            let mut o = candidates::apply(base, overrides)?;
            o.output = Some(dir.join("sweep").join(&name));
            let config = o.resolve().with_context(|| format!("candidate {name}"))?;
            let mut ov = overrides.clone();
            ov.insert("beta".into(), beta.to_string());
            out.push(Candidate { name, overrides: ov, beta, config });
        }
    }
    Ok(out)
}

/// Held-out prompts for `compare`: each held-out pair's prompt, its preferred answer as
/// `ground_truth` (for evaluators that compare against one).
fn held_out_prompts(cfg: &TrainConfig, dir: &Path, limit: usize) -> Result<Generated> {
    let (_, eval) = crate::recipes::sft::load_split_with(cfg, crate::data::load_preference_dataset)?;
    let eval = eval.context("run dpo compares on held-out pairs: do not pass --eval-split 0")?;
    let mut lines = Vec::new();
    for s in eval.samples.iter().take(limit) {
        let Sample::Preference(p) = s else { continue };
        let chosen = p.chosen.iter().rev().find(|m| m.role == lora_datasets::Role::Assistant).map(|m| m.content.clone());
        let mut line = json!({"messages": p.prompt});
        if let Some(c) = chosen {
            line["ground_truth"] = json!(c);
        }
        lines.push(line);
    }
    super::write_generated(&dir.join("data"), "heldout-prompts", &cfg.dataset, "the prompts of the held-out pairs, preferred answer as ground_truth", &lines)
}

/// One trained and compared candidate.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Outcome {
    name: String,
    status: RunStatus,
    win_rate: Option<f64>,
    ci95: Option<[f64; 2]>,
    eval_loss_before: Option<f64>,
    eval_loss: Option<f64>,
    train_loss: Option<f64>,
    elapsed_s: Option<f64>,
    compare_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SweepOut {
    outcomes: Vec<Outcome>,
    /// Set when `--target-win-rate` stopped the sweep early.
    stopped_early_by: Option<String>,
}

/// The method of candidate `c` (its beta) as a recipe of the sweep worker.
fn recipe_of(c: &Candidate, method: Method) -> Result<RecipeSpec> {
    let pairs = PairOptions { max_prompt_length: None, max_length: None, adapter: None, precompute_ref_logps: false };
    Ok(match method {
        Method::Dpo => RecipeSpec::Dpo(PreferenceRecipe { pairs, objective: Dpo::new(c.beta, LossType::Sigmoid, 0.0)? }),
        Method::Orpo => RecipeSpec::Orpo(PreferenceRecipe { pairs, objective: crate::recipes::orpo::Orpo::new(c.beta)? }),
    })
}

/// Train the unfinished candidates, packed over one base per group of candidates that can
/// share it (`ShareKey::base`). A candidate that cannot start or diverges is left to the
/// scoreboard (its status says so); a stop on request ends the workflow.
fn train_packed(cands: &[Candidate], args: &DpoArgs, control: &Control) -> Result<()> {
    let mut groups: BTreeMap<ShareKey, Vec<&Candidate>> = BTreeMap::new();
    for c in cands.iter().filter(|c| crate::engine::read_status(&c.config.output) != Some(RunStatus::Completed)) {
        groups.entry(ShareKey::base(&c.config)).or_default().push(c);
    }
    for group in groups.values() {
        let members = group
            .iter()
            .map(|c| Ok(GroupMember { name: c.name.clone(), config: c.config.clone(), resume: c.config.output.join(RUN_FILE).exists(), recipe: Some(recipe_of(c, args.method)?) }))
            .collect::<Result<Vec<_>>>()?;
        let names: Vec<&str> = group.iter().map(|c| c.name.as_str()).collect();
        eprintln!("{}: training {} packed over one base", format!("{:?}", args.method).to_lowercase(), names.join(", "));
        let spec = GroupSpec { device: group[0].config.device.clone(), members, result_file: None, recipe: recipe_of(group[0], args.method)? };
        match crate::sweep::worker::train_spec(&spec, control) {
            Err(e) if crate::run_control::is_stop(&e) => return Err(e),
            Err(e) => tracing::warn!("candidates {}: {e:#}", names.join(", ")),
            Ok(()) => {}
        }
    }
    Ok(())
}

/// `compare` of `adapter` against the base on `prompts`, through its library function.
fn compare(cfg: &TrainConfig, adapter: &Path, prompts: &Path, out: &Path, args: &DpoArgs) -> Result<crate::compare::Summary> {
    let opts = CompareOptions {
        model: cfg.model.clone(),
        adapter: adapter.to_path_buf(),
        baseline_adapter: None,
        placement: placement(cfg)?,
        dataset: prompts.to_path_buf(),
        output: out.to_path_buf(),
        overwrite: true,
        evaluators: EvaluatorArgs { evaluators: args.evaluators.clone(), ..clap_defaults()? },
        judge_model: args.judge_model.clone(),
        rubric: None,
        judge_max_new_tokens: crate::compare::JUDGE_MAX_NEW_TOKENS,
        batch_size: crate::compare::BATCH_SIZE,
        examples: crate::compare::EXAMPLES,
        generation: GenerationArgs { max_new_tokens: args.max_new_tokens, ..clap_defaults()? },
    };
    crate::compare::compare(&opts)
}

/// The base as the candidates trained it: their device and compute dtype (the other
/// placement flags at their defaults).
fn placement(cfg: &TrainConfig) -> Result<PlacementArgs> {
    Ok(PlacementArgs { device: cfg.device.clone(), dtype: cfg.dtype, ..clap_defaults()? })
}

fn read_losses(o: &mut Outcome, run_dir: &Path) -> Result<()> {
    o.status = crate::engine::read_status(run_dir).unwrap_or(RunStatus::Pending);
    let rows: Vec<crate::metrics::MetricsRow> = crate::metrics::read_metrics_so_far(&run_dir.join(METRICS_FILE))?;
    o.eval_loss_before = rows.iter().find(|r| r.step == 0).and_then(|r| r.eval_loss);
    o.eval_loss = rows.iter().rev().find(|r| r.step > 0 && r.eval_loss.is_some()).and_then(|r| r.eval_loss);
    o.train_loss = rows.iter().rev().find_map(|r| r.loss);
    o.elapsed_s = rows.last().map(|r| r.elapsed_s);
    Ok(())
}

pub fn run(args: DpoArgs, control: &Control) -> Result<()> {
    let w = &args.common;
    if args.evaluators.is_empty() == args.judge_model.is_none() {
        bail!("run dpo compares against the base with a judge: give --evaluator SPEC or --judge-model MODEL (one of them)");
    }
    if let Some(t) = args.target_win_rate {
        if !(0.0..=1.0).contains(&t) {
            bail!("--target-win-rate must be in [0, 1], got {t}");
        }
    }
    let cfg0 = w.options.clone().resolve()?;
    let mut settings = w.settings();
    settings["evaluators"] = json!(args.evaluators);
    settings["judge_model"] = json!(args.judge_model);
    settings["target_win_rate"] = json!(args.target_win_rate);
    settings["eval_samples"] = json!(args.eval_samples);
    settings["max_new_tokens"] = json!(args.max_new_tokens);
    settings["method"] = json!(args.method);
    settings["strong"] = json!(args.strong);
    settings["weak"] = json!(args.weak);
    settings["pair_max_new_tokens"] = json!(args.pair_max_new_tokens);
    // Prompts-only data becomes pairs (delta learning) after the approval.
    let prompts_only = lora_datasets::load_dataset(&cfg0.dataset, None).is_ok_and(|d| d.format == Format::Prompts);
    if prompts_only && args.strong.is_none() {
        bail!("{}: prompts only; give --strong MODEL[+ADAPTER] (and --weak, default --model) to make preference pairs first", cfg0.dataset.display());
    }
    let mut wf = Workflow::open(&cfg0.output, "dpo", settings, w.resume, w.yes, ORDER.to_vec())?.with_control(control);

    let wants = if prompts_only { Format::Prompts } else { Format::Preference };
    let insp: Inspection = wf.phase("inspect", |wf| inspect::run_for(&wf.dir, &cfg0.dataset, &cfg0.model, cfg0.max_sequence_length, 50.0, wants))?;
    let planned = build_candidates(&TrainOptions { dataset: Some(insp.dataset.clone()), ..w.options.clone() }, &w.candidate, &w.grid, &wf.dir)?;
    let plan_data: Plan = wf.phase("plan", |wf| {
        let p = dpo_plan(&planned, &insp, &args, w.gpu_hour_price, prompts_only)?;
        let mut extra = Vec::new();
        if prompts_only {
            extra.push(format!(
                "pairs by delta learning first: preferred answers from `{}`, non-preferred from `{}`{}",
                args.strong.as_deref().unwrap_or_default(),
                args.weak.as_deref().unwrap_or(&cfg0.model),
                if args.evaluators.is_empty() { String::new() } else { format!(", kept only where `{}` scores the preferred one higher", args.evaluators.join("`, `")) }
            ));
        }
        extra.push("comparison prompts: the held-out pairs' prompts (written after the approval)".into());
        if let Some(t) = args.target_win_rate {
            extra.push(format!("the sweep stops once a candidate wins {t} against the base"));
        }
        plan::write(&wf.dir, &plan::render("run dpo", &p, &insp, &extra))?;
        Ok(p)
    })?;
    let _: Approval = wf.phase("approval", |wf| approval::require(wf, "plan", &wf.dir.join(PLAN_FILE)))?;
    let data: DataReady = wf.phase("data", |wf| {
        let pairs = if prompts_only { Some(make_pairs(&cfg0, &insp.dataset, &wf.dir, &args)?) } else { None };
        let dataset = pairs.as_ref().map_or_else(|| insp.dataset.clone(), |g| g.path.clone());
        let cfg = TrainConfig { dataset: dataset.clone(), ..planned[0].config.clone() };
        let prompts = held_out_prompts(&cfg, &wf.dir, args.eval_samples)?;
        Ok(DataReady { dataset, pairs, prompts })
    })?;
    let prompts = data.prompts.clone();
    let cands = build_candidates(&TrainOptions { dataset: Some(data.dataset.clone()), ..w.options.clone() }, &w.candidate, &w.grid, &wf.dir)?;
    let sweep: SweepOut = wf.phase("sweep", |wf| {
        let mut outcomes = Vec::new();
        let mut stopped = None;
        // Without a target to stop at, every candidate trains: those that share a base
        // train packed over one loaded copy (one forward pass, each candidate's adapter on
        // its own rows), as `sweep` packs SFT candidates. With a target, one at a time, so
        // the first to reach it ends the sweep before the others cost anything.
        let packed = args.target_win_rate.is_none();
        if packed {
            train_packed(&cands, &args, &wf.control)?;
        }
        for c in &cands {
            let run_dir = &c.config.output;
            let status = crate::engine::read_status(run_dir);
            if status != Some(RunStatus::Completed) && !packed {
                eprintln!("{}: training {} (beta {})", format!("{:?}", args.method).to_lowercase(), c.name, c.beta);
                let resume = run_dir.join(RUN_FILE).exists();
                let pairs = PairOptions { max_prompt_length: None, max_length: None, adapter: None, precompute_ref_logps: false };
                let opts = RunOptions { resume, quiet: false, control: wf.control.clone() };
                let trained = match args.method {
                    Method::Dpo => preference::run(&c.config, &pairs, Dpo::new(c.beta, LossType::Sigmoid, 0.0)?, &opts),
                    Method::Orpo => preference::run(&c.config, &pairs, crate::recipes::orpo::Orpo::new(c.beta)?, &opts),
                };
                match trained {
                    // Ctrl-C, `jobs cancel`, Slurm's preemption: the workflow stops with
                    // the candidate's checkpoint (and `--resume` continues it), it does
                    // not count the candidate as failed and start the next one.
                    Err(e) if crate::run_control::is_stop(&e) => return Err(e),
                    Err(e) => tracing::warn!("candidate {}: {e:#}", c.name),
                    Ok(_) => {}
                }
            }
            let compare_dir = wf.dir.join("compare").join(&c.name);
            let mut o = Outcome { name: c.name.clone(), status: RunStatus::Pending, win_rate: None, ci95: None, eval_loss_before: None, eval_loss: None, train_loss: None, elapsed_s: None, compare_dir: compare_dir.clone() };
            read_losses(&mut o, run_dir)?;
            if o.status == RunStatus::Completed {
                eprintln!("dpo: comparing {} against the base", c.name);
                let s = compare(&c.config, run_dir, &prompts.path, &compare_dir, &args)?;
                o.win_rate = Some(s.win_rate);
                o.ci95 = Some(s.ci95);
                eprintln!("dpo: {} wins {:.3} against the base (95% CI {:.3} to {:.3})", c.name, s.win_rate, s.ci95[0], s.ci95[1]);
            }
            let reached = matches!((o.win_rate, args.target_win_rate), (Some(r), Some(t)) if r >= t);
            outcomes.push(o);
            if reached {
                stopped = Some(format!("{} reached --target-win-rate {}", c.name, args.target_win_rate.unwrap_or_default()));
                break;
            }
        }
        if !outcomes.iter().any(|o| o.status == RunStatus::Completed) {
            bail!("no candidate completed (see {})", wf.dir.join("sweep").display());
        }
        Ok(SweepOut { outcomes, stopped_early_by: stopped })
    })?;
    let promo: Promotion = wf.phase("promotion", |wf| {
        let rows: Vec<Row> = sweep
            .outcomes
            .iter()
            .zip(&cands)
            .map(|(o, c)| Row {
                name: o.name.clone(),
                overrides: c.overrides.clone(),
                status: o.status,
                eval_loss_before: o.eval_loss_before,
                eval_loss: o.eval_loss,
                train_loss: o.train_loss,
                elapsed_s: o.elapsed_s,
                est_seconds: plan_data.candidates.iter().find(|p| p.name == o.name).map_or(0.0, |p| p.seconds),
                reward_mean: o.win_rate,
                output: c.config.output.clone(),
            })
            .collect();
        // Highest win rate; equal ones go to the lower held-out loss.
        let best = rows
            .iter()
            .filter(|r| r.status == RunStatus::Completed)
            .max_by(|a, b| a.reward_mean.unwrap_or(0.0).total_cmp(&b.reward_mean.unwrap_or(0.0)).then_with(|| b.eval_loss.unwrap_or(f64::MAX).total_cmp(&a.eval_loss.unwrap_or(f64::MAX))))
            .context("no completed candidate")?;
        let winner = best.name.clone();
        let text = promotion::render(&rows, &winner, "win rate against the base (reward column)");
        let path = wf.dir.join(promotion::SCOREBOARD_FILE);
        crate::checkpoint::write_atomic(&path, text.as_bytes())?;
        eprintln!("{text}");
        let approval = approval::require(wf, &format!("promotion of `{winner}`"), &path)?;
        let c = cands.iter().find(|c| c.name == winner).context("winner vanished")?;
        Ok(Promotion { winner, criterion: "win_rate".into(), rows, winner_dir: c.config.output.clone(), winner_config: c.config.clone(), approved_by: approval.by })
    })?;
    let fin = FinalRun {
        adapter: promo.winner_dir.clone(),
        retrained: false,
        skipped_because: Some("DPO: the sweep is the training run".into()),
        config: promo.winner_config.clone(),
        elapsed_s: None,
        train_loss: None,
        eval_loss: None,
    };
    let cmp: serde_json::Value = wf.phase("evaluation", |_| {
        let o = sweep.outcomes.iter().find(|o| o.name == promo.winner).context("winner vanished")?;
        let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(o.compare_dir.join("compare.json")).with_context(|| format!("reading {}", o.compare_dir.join("compare.json").display()))?)?;
        Ok(json!({"winner": o.name, "win_rate": o.win_rate, "ci95": o.ci95, "compare": summary["summary"], "compare_dir": o.compare_dir, "stopped_early_by": sweep.stopped_early_by}))
    })?;
    let _: serde_json::Value = wf.phase("report", |wf| {
        let mut md = String::new();
        let _ = writeln!(md, "`compare` of each candidate against the base on {} held-out prompts (judged by {}):\n", cmp["compare"]["n"], cmp["compare"]["judged_by"]);
        let _ = writeln!(md, "| candidate | win rate | 95% CI | held-out loss before -> after |\n| --- | ---: | --- | --- |");
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        for o in &sweep.outcomes {
            let ci = o.ci95.map_or("-".into(), |c| format!("{:.3} to {:.3}", c[0], c[1]));
            let _ = writeln!(md, "| `{}` | {} | {ci} | {} -> {} |", o.name, f(o.win_rate), f(o.eval_loss_before), f(o.eval_loss));
        }
        if let Some(why) = &sweep.stopped_early_by {
            let _ = writeln!(md, "\nThe sweep stopped early: {why}.");
        }
        let _ = writeln!(md, "\nThe winner's answers side by side: `{}`.", Path::new(cmp["compare_dir"].as_str().unwrap_or_default()).join("compare.md").display());
        let mut generated = insp.generated.clone();
        generated.extend(data.pairs.clone());
        generated.push(prompts.clone());
        let input = ReportInput {
            title: "run dpo: final report",
            plan: &plan_data,
            promotion: Some(&promo),
            final_run: Some(&fin),
            comparison_md: md,
            comparison: cmp.clone(),
            generated,
            inference_phases: &["evaluation"],
            eval_is_negative_reward: false,
        };
        report::write(wf, &input)
    })?;
    wf.finish_with_report(&fin.adapter, args.common.json)
}

/// What the candidates train and are compared on.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct DataReady {
    /// The pairs file: the user's, or the generated one.
    dataset: PathBuf,
    /// Pairs made from prompts-only data.
    pairs: Option<Generated>,
    prompts: Generated,
}

/// Preference pairs from the prompts by `pairs`' library function: `--strong` answers are
/// preferred over `--weak` (default: the base) answers, kept only where the evaluators
/// score the preferred one strictly higher (when evaluators are given).
fn make_pairs(cfg: &TrainConfig, prompts: &Path, dir: &Path, args: &DpoArgs) -> Result<Generated> {
    let out = dir.join("data");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let strong = args.strong.clone().context("--strong is needed for prompts-only data")?;
    let weak = args.weak.clone().unwrap_or_else(|| cfg.model.clone());
    let opts = PairsOptions {
        dataset: prompts.to_path_buf(),
        strong: Sampler::new(ModelRef::parse(&strong)?, crate::pairs::STRONG_TEMPERATURE),
        weak: Sampler::new(ModelRef::parse(&weak)?, crate::pairs::WEAK_TEMPERATURE),
        output: out,
        placement: placement(cfg)?,
        max_new_tokens: args.pair_max_new_tokens,
        seed: 0,
        batch_size: crate::pairs::BATCH_SIZE,
        evaluators: EvaluatorArgs { evaluators: args.evaluators.clone(), ..clap_defaults()? },
    };
    eprintln!("pairs: {strong} (preferred) against {weak} on {}", prompts.display());
    let o = crate::pairs::generate_pairs(&opts)?;
    eprintln!("pairs: {} pairs, {} prompts dropped -> {}", o.pairs, o.dropped, o.output.display());
    if o.pairs < 2 {
        bail!("only {} pair(s) kept of {} prompts (see {}); DPO needs more", o.pairs, o.prompts, o.provenance.display());
    }
    Ok(Generated { path: o.output, from: prompts.to_path_buf(), what: format!("preference pairs by delta learning: {strong} preferred over {weak} ({} pairs, {} prompts dropped)", o.pairs, o.dropped) })
}

/// The cost of the candidates (trained one after another): the LoRA step's FLOPs from the
/// sweep planner over both sequences of every pair, plus the reference model's forward
/// pass (2 FLOPs per parameter and token), and the comparisons' generations.
fn dpo_plan(cands: &[Candidate], insp: &Inspection, args: &DpoArgs, price: Option<f64>, prompts_only: bool) -> Result<Plan> {
    let cfg = &cands[0].config;
    let model_cfg = lora_models::load_model_config(&cfg.model)?;
    let params = sweep_plan::base_parameters(&model_cfg);
    let load = if prompts_only { crate::prompts::load_prompt_dataset } else { crate::data::load_preference_dataset };
    let (train, held) = crate::recipes::sft::load_split_with(cfg, load)?;
    let (train_n, held_n) = (train.len(), held.as_ref().map_or(0, |h| h.len()));
    let device = plan::device_for(&cfg.device);
    let rate = device.flops_per_s.max(1.0);
    // A pair's two sequences; from prompts, each is the prompt plus a generated answer.
    let prompt_tokens = insp.tokens() as f64 / insp.samples.max(1) as f64;
    let per_sample = if prompts_only { 2.0 * (prompt_tokens + args.pair_max_new_tokens as f64) } else { prompt_tokens };
    let longest = insp.stats["tokens"]["max"].as_u64().unwrap_or(cfg.max_sequence_length as u64) as usize;
    let mut planned = Vec::new();
    for c in cands {
        let epochs = c.config.epochs.unwrap_or_else(|| TrainConfig::default_epochs(train_n));
        let steps_per_epoch = train_n.div_ceil(c.config.batch_size * c.config.gradient_accumulation_steps).max(1);
        let steps = c.config.steps.unwrap_or(epochs * steps_per_epoch);
        let tokens = (per_sample * (steps * c.config.batch_size * c.config.gradient_accumulation_steps).min(train_n * epochs) as f64) as u64;
        let e = sweep_plan::estimate(&model_cfg, &c.config, tokens, longest);
        // DPO's reference (the base) costs one more forward pass; ORPO has none.
        let reference = if args.method == Method::Dpo { 2.0 * params * tokens as f64 } else { 0.0 };
        let flops = e.flops + reference;
        planned.push(PlannedCandidate { name: c.name.clone(), overrides: c.overrides.clone(), steps, tokens, flops, memory_bytes: e.base_bytes + 2 * e.own_bytes, seconds: flops / rate, device: Some(device.name.clone()) });
    }
    let n = args.eval_samples.min(held_n);
    let gen_tokens = (2 * n * cands.len()) as u64 * (per_sample as u64 / 2 + args.max_new_tokens as u64);
    let gen_flops = 2.0 * params * gen_tokens as f64;
    let mut inference = vec![Cost { what: format!("compare: 2 models x {n} prompts per candidate, up to {} new tokens", args.max_new_tokens), tokens: gen_tokens, flops: gen_flops, seconds: gen_flops / rate }];
    if prompts_only {
        let prompts = insp.samples;
        let tokens = (2.0 * prompts as f64 * (prompt_tokens + args.pair_max_new_tokens as f64)) as u64;
        let flops = 2.0 * params * tokens as f64;
        inference.insert(0, Cost { what: format!("pairs: 2 samplers x {prompts} prompts, up to {} new tokens", args.pair_max_new_tokens), tokens, flops, seconds: flops / rate });
    }
    let mut p = Plan::on_device(&cfg.model, &cfg.dataset, &device, price);
    p.train_samples = train_n;
    p.held_out_samples = held_n;
    p.sweep_seconds = planned.iter().map(|c| c.seconds).sum();
    p.candidates = planned;
    p.inference = inference;
    p.evaluators = match &args.judge_model {
        Some(j) => vec![format!("judge model {j}")],
        None => args.evaluators.clone(),
    };
    p.evaluator_reason = "win rate of each candidate against the base (`compare`)".into();
    Ok(p.with_totals())
}
