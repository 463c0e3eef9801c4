//! `lora-train run classify`: the `run sft` phases around a classification benchmark.
//! Labels come from `--labels`, else `ground_truth` (a list = multi-label), else the final
//! assistant message; the plan flags a label imbalance above `--imbalance-threshold`; every
//! `--models` entry is benchmarked on the held-out split before training, scored by label
//! log-likelihood (the label whose assistant message the model finds most likely, so
//! every prediction is a valid label) and by free generation; the fine-tuned model is
//! scored the same way after training. Per label: accuracy (one against the rest),
//! precision, recall, F1, support; a confusion matrix and its SVG heat map.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lora_datasets::{Dataset, Format, Message, PairLimits, PairLoader, PreferenceSample, Sample};
use lora_models::{LoadedModel, RolloutParams};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::approval::{self, Approval};
use super::evaluation;
use super::final_run::{self, FinalRun};
use super::inspect::{self, Inspection};
use super::plan::{self, Plan, PlanInput};
use super::plots;
use super::promotion::{self, Promotion};
use super::report::{self, ReportInput};
use super::sft::WorkflowArgs;
use super::sweep::{self as sweep_phase, SweepResult};
use super::{Workflow, PLAN_FILE};
use crate::run_control::Control;
use crate::config::TrainConfig;

pub const ORDER: [&str; 9] = ["inspect", "plan", "approval", "benchmark", "sweep", "promotion", "final run", "evaluation", "report"];
const BENCHMARK_ONLY_ORDER: [&str; 5] = ["inspect", "plan", "approval", "benchmark", "report"];

/// What free generation predicted when its answer is no label.
pub const OTHER: &str = "(other)";

#[derive(clap::Args, Debug, Clone)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub common: WorkflowArgs,
    /// The label set, comma-separated [default: every label found in the data].
    #[arg(long, value_delimiter = ',', help_heading = "Classification")]
    pub labels: Option<Vec<String>>,
    /// Flag a most/least frequent label ratio above this in the plan.
    #[arg(long, default_value_t = 50.0, help_heading = "Classification")]
    pub imbalance_threshold: f64,
    /// The old name of --eval-split (hidden, kept for one release).
    #[arg(long, value_name = "FRACTION", conflicts_with_all = ["eval_split", "eval_dataset"], hide = true, help_heading = "Classification")]
    pub split: Option<f64>,
    /// Base models to benchmark on the held-out split, comma-separated [default: --model].
    /// Training uses --model.
    #[arg(long, value_delimiter = ',', help_heading = "Classification")]
    pub models: Option<Vec<String>>,
    /// Benchmark the base model(s) and stop: no training.
    #[arg(long, help_heading = "Classification")]
    pub benchmark_only: bool,
    /// At most this many held-out samples are benchmarked.
    #[arg(long, default_value_t = 500, help_heading = "Classification")]
    pub benchmark_samples: usize,
    /// Longest generated answer in the free-generation scoring.
    #[arg(long, default_value_t = 16, help_heading = "Classification")]
    pub max_new_tokens: usize,
}

/// The labels of the data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabelInfo {
    /// `--labels`, `ground_truth` or `final assistant message`.
    pub source: String,
    pub labels: Vec<String>,
    /// Per label, most frequent first.
    pub counts: Vec<(String, usize)>,
    pub imbalance_ratio: f64,
    pub imbalance_threshold: f64,
    pub imbalanced: bool,
    pub multi_label: bool,
}

/// The labels of one sample.
fn sample_labels(s: &Sample) -> Vec<String> {
    match s {
        Sample::Chat(c) => match &c.ground_truth {
            Some(t) => t.iter().map(|x| x.trim().to_string()).collect(),
            None => evaluation::prompt_and_answer(s).map(|(_, a)| vec![a.trim().to_string()]).unwrap_or_default(),
        },
        _ => Vec::new(),
    }
}

pub fn label_info(ds: &Dataset, given: Option<&[String]>, threshold: f64) -> Result<LabelInfo> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut multi = false;
    let has_truth = ds.samples.iter().any(|s| matches!(s, Sample::Chat(c) if c.ground_truth.is_some()));
    for (s, line) in ds.samples.iter().zip(&ds.lines) {
        let ls = sample_labels(s);
        if ls.is_empty() || ls.iter().any(|l| l.is_empty()) {
            bail!("{}:{line}: no label (give `ground_truth` or a final assistant message)", ds.path.display());
        }
        multi |= ls.len() > 1;
        for l in ls {
            if let Some(set) = given {
                if !set.contains(&l) {
                    bail!("{}:{line}: label `{l}` is not in --labels ({})", ds.path.display(), set.join(", "));
                }
            }
            *counts.entry(l).or_default() += 1;
        }
    }
    let labels: Vec<String> = match given {
        Some(set) => set.to_vec(),
        None => counts.keys().cloned().collect(),
    };
    if labels.len() < 2 {
        bail!("{}: {} label(s); classification needs at least 2", ds.path.display(), labels.len());
    }
    if !multi && labels.len() > 100 {
        tracing::warn!("{}: {} distinct labels; is this free text rather than classes?", ds.path.display(), labels.len());
    }
    let mut by_count: Vec<(String, usize)> = labels.iter().map(|l| (l.clone(), counts.get(l).copied().unwrap_or(0))).collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let most = by_count.first().map_or(0, |c| c.1) as f64;
    let least = by_count.last().map_or(0, |c| c.1) as f64;
    let ratio = if least == 0.0 { f64::INFINITY } else { most / least };
    Ok(LabelInfo {
        source: if given.is_some() { "--labels".into() } else if has_truth { "ground_truth".into() } else { "final assistant message".into() },
        labels,
        counts: by_count,
        imbalance_ratio: ratio,
        imbalance_threshold: threshold,
        imbalanced: ratio > threshold,
        multi_label: multi,
    })
}

impl LabelInfo {
    fn plan_lines(&self) -> Vec<String> {
        let counts: Vec<String> = self.counts.iter().map(|(l, n)| format!("`{l}` {n}")).collect();
        let mut out = vec![
            format!("labels ({}, from {}): {}", self.labels.len(), self.source, counts.join(", ")),
            format!("imbalance ratio (most / least frequent): {:.1}, threshold {}", self.imbalance_ratio, self.imbalance_threshold),
        ];
        if self.imbalanced {
            out.push(
                "**IMBALANCED**: proposed mitigations (not applied): rebalance by oversampling the rare labels in a copy of the training data, or weight the loss per label; the held-out metrics per label show how rare labels fare".into(),
            );
        }
        if self.multi_label {
            out.push("multi-label data: scored per label and by exact set match".into());
        }
        out
    }
}

/// Scores of one way of predicting.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LabelScores {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Confusion {
    /// Row labels (true); columns are these plus `(other)` for answers that are no label.
    pub labels: Vec<String>,
    pub matrix: Vec<Vec<usize>>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Scores {
    /// Samples whose predicted label set equals the true one.
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_label: BTreeMap<String, LabelScores>,
    pub confusion: Confusion,
    /// Predictions that were no label (free generation only).
    pub invalid: usize,
    pub samples: usize,
}

/// Per-label and overall scores of `preds` against `truths`.
pub fn score(truths: &[Vec<String>], preds: &[Vec<String>], labels: &[String]) -> Scores {
    let n = truths.len();
    let mut cols = labels.to_vec();
    cols.push(OTHER.into());
    let mut matrix = vec![vec![0usize; cols.len()]; labels.len()];
    let mut exact = 0;
    let mut invalid = 0;
    for (t, p) in truths.iter().zip(preds) {
        let (ts, ps): (BTreeSet<&String>, BTreeSet<&String>) = (t.iter().collect(), p.iter().collect());
        exact += usize::from(ts == ps);
        invalid += usize::from(p.iter().any(|x| x == OTHER));
        for tl in &ts {
            let Some(r) = labels.iter().position(|l| l == *tl) else { continue };
            for pl in &ps {
                let c = cols.iter().position(|l| l == *pl).unwrap_or(labels.len());
                matrix[r][c] += 1;
            }
        }
    }
    let mut per_label = BTreeMap::new();
    for l in labels {
        let (mut tp, mut fp, mut fneg) = (0usize, 0usize, 0usize);
        for (t, p) in truths.iter().zip(preds) {
            let (in_t, in_p) = (t.contains(l), p.contains(l));
            tp += usize::from(in_t && in_p);
            fp += usize::from(!in_t && in_p);
            fneg += usize::from(in_t && !in_p);
        }
        let tn = n - tp - fp - fneg;
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fneg);
        let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        per_label.insert(l.clone(), LabelScores { accuracy: ratio(tp + tn, n), precision, recall, f1, support: tp + fneg });
    }
    let macro_f1 = if labels.is_empty() { 0.0 } else { per_label.values().map(|s| s.f1).sum::<f64>() / labels.len() as f64 };
    Scores { accuracy: if n == 0 { 0.0 } else { exact as f64 / n as f64 }, macro_f1, per_label, confusion: Confusion { labels: labels.to_vec(), matrix }, invalid, samples: n }
}

/// A model's benchmark: label log-likelihood (the top-level numbers) and free generation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelScores {
    pub name: String,
    /// `base` or `fine-tuned`.
    pub kind: String,
    pub model: String,
    pub adapter: Option<PathBuf>,
    #[serde(flatten)]
    pub loglik: Scores,
    pub generation: Scores,
    /// The heat map of the log-likelihood confusion matrix.
    pub confusion_svg: PathBuf,
}

/// The held-out samples a benchmark scores: prompt conversations and true labels.
pub struct HeldOut {
    pub prompts: Vec<Vec<Message>>,
    pub truths: Vec<Vec<String>>,
}

pub fn held_out(cfg: &TrainConfig, limit: usize) -> Result<HeldOut> {
    let ds = evaluation::held_out(cfg)?.context("classification needs held-out data: do not pass --eval-split 0")?;
    let mut prompts = Vec::new();
    let mut truths = Vec::new();
    for s in ds.samples.iter().take(limit) {
        if let Some((p, _)) = evaluation::prompt_and_answer(s) {
            prompts.push(p);
            truths.push(sample_labels(s));
        }
    }
    Ok(HeldOut { prompts, truths })
}

/// The label with the highest log-likelihood as the assistant's answer, per prompt. Each
/// prompt's labels go through the preference-pair scorer two at a time (the summed
/// log-probability of the label's tokens and the end-of-turn token: the chance that the
/// whole answer is exactly that label).
fn loglik_predictions(loaded: &LoadedModel, adapter: Option<&str>, h: &HeldOut, labels: &[String], max_len: usize) -> Result<Vec<Vec<String>>> {
    let mut samples = Vec::new();
    let mut index = Vec::new();
    let k = labels.len();
    for (i, p) in h.prompts.iter().enumerate() {
        for a in (0..k).step_by(2) {
            // An odd label count pairs the last label with the first (never with itself:
            // an identical pair is warned about as teaching nothing).
            let b = if a + 1 < k { a + 1 } else { 0 };
            samples.push(Sample::Preference(PreferenceSample { prompt: p.clone(), chosen: vec![Message::assistant(labels[a].clone())], rejected: vec![Message::assistant(labels[b].clone())], tools: None }));
            index.push((i, a, b));
        }
    }
    let ds = Dataset { path: PathBuf::from("<held-out prompts x labels>"), format: Format::Preference, lines: (1..=samples.len()).collect(), samples };
    let set = crate::pair_data::tokenize_pairs(&loaded.tokenizer, &ds, &PairLimits { max_prompt_length: None, max_length: max_len })?;
    if set.pairs.len() != index.len() {
        bail!("{} prompt+label sequence(s) do not fit --max-sequence-length {max_len}", index.len() - set.pairs.len());
    }
    let loader = PairLoader::new(&set.pairs, 8, crate::data::pad_token_id(&loaded.tokenizer), 0);
    let scores = crate::pair_data::reference_scores(&loaded.model, &loader, adapter)?;
    let mut best = vec![(f32::NEG_INFINITY, 0usize); h.prompts.len()];
    for (&(i, a, b), [sa, sb]) in index.iter().zip(scores) {
        for (s, l) in [(sa, a), (sb, b)] {
            if s > best[i].0 {
                best[i] = (s, l);
            }
        }
    }
    Ok(best.into_iter().map(|(_, l)| vec![labels[l].clone()]).collect())
}

/// Greedy answers mapped onto labels (case-insensitive; multi-label answers split at
/// commas); anything else is `(other)`.
fn generation_predictions(loaded: &LoadedModel, adapter: Option<&str>, h: &HeldOut, labels: &[String], multi: bool, max_new_tokens: usize) -> Result<Vec<Vec<String>>> {
    let template = crate::chat::template_for(&loaded.tokenizer)?;
    let prompts = h
        .prompts
        .iter()
        .map(|p| {
            let ids = lora_datasets::tokenize_prompt(&loaded.tokenizer.tokenizer, &template, p, None).map_err(|e| anyhow::anyhow!("held-out prompt: {e}"))?;
            Ok(crate::prompts::Prompt { ids, messages: Vec::new(), ground_truth: None, fields: Default::default(), tools: None })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = RolloutParams { group: 1, max_new_tokens, temperature: 0.0, top_k: 0, top_p: 1.0 };
    let answers = {
        let _route = evaluation::route(loaded, adapter)?;
        let bar = crate::sides::progress_bar(prompts.len(), adapter.unwrap_or("base"));
        let a = crate::sides::complete_one(loaded, &prompts, &params, 0, 0, 8, &bar)?;
        bar.finish_and_clear();
        a
    };
    let find = |s: &str| labels.iter().find(|l| l.eq_ignore_ascii_case(s.trim().trim_end_matches('.'))).cloned().unwrap_or_else(|| OTHER.to_string());
    Ok(answers
        .iter()
        .map(|a| {
            if multi {
                let mut set: Vec<String> = a.split(',').map(find).collect();
                set.sort();
                set.dedup();
                set
            } else {
                vec![find(a)]
            }
        })
        .collect())
}

/// Benchmarks one model (base, or base + adapter) and draws its confusion heat map.
#[allow(clippy::too_many_arguments)]
fn benchmark(dir: &Path, name: &str, kind: &str, cfg: &TrainConfig, adapter: Option<&Path>, h: &HeldOut, info: &LabelInfo, max_new_tokens: usize, file: &str) -> Result<ModelScores> {
    const TUNED: &str = "fine-tuned";
    let adapters: Vec<(String, PathBuf)> = adapter.map(|a| (TUNED.to_string(), a.to_path_buf())).into_iter().collect();
    let loaded = evaluation::load_with_adapters(cfg, &adapters)?;
    let route = adapter.map(|_| TUNED);
    eprintln!("benchmark: {name}: {} held-out samples x {} labels", h.prompts.len(), info.labels.len());
    let ll = loglik_predictions(&loaded, route, h, &info.labels, cfg.max_sequence_length)?;
    let gen = generation_predictions(&loaded, route, h, &info.labels, info.multi_label, max_new_tokens)?;
    let loglik = score(&h.truths, &ll, &info.labels);
    let generation = score(&h.truths, &gen, &info.labels);
    let svg = plots::confusion_svg(&format!("{name}: label log-likelihood"), &info.labels, &loglik.confusion.matrix.iter().map(|r| r[..info.labels.len()].to_vec()).collect::<Vec<_>>())?;
    let svg_path = dir.join(file);
    crate::checkpoint::write_atomic(&svg_path, svg.as_bytes())?;
    eprintln!("benchmark: {name}: accuracy {:.3} (log-likelihood), {:.3} (generation, {} not a label)", loglik.accuracy, generation.accuracy, generation.invalid);
    Ok(ModelScores { name: name.into(), kind: kind.into(), model: cfg.model.clone(), adapter: adapter.map(Path::to_path_buf), loglik, generation, confusion_svg: PathBuf::from(file) })
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ClassifyPlan {
    plan: Plan,
    labels: LabelInfo,
}

pub fn run(args: ClassifyArgs, control: &Control) -> Result<()> {
    let mut common = args.common.clone();
    if let Some(s) = args.split {
        common.options.eval_split = Some(s);
    }
    let w = &common;
    let cfg0 = w.options.clone().resolve()?;
    let models: Vec<String> = args.models.clone().unwrap_or_else(|| vec![cfg0.model.clone()]);
    let mut settings = w.settings();
    settings["labels"] = json!(args.labels);
    settings["imbalance_threshold"] = json!(args.imbalance_threshold);
    settings["models"] = json!(models);
    settings["benchmark_only"] = json!(args.benchmark_only);
    settings["benchmark_samples"] = json!(args.benchmark_samples);
    settings["max_new_tokens"] = json!(args.max_new_tokens);
    let order = if args.benchmark_only { BENCHMARK_ONLY_ORDER.to_vec() } else { ORDER.to_vec() };
    let mut wf = Workflow::open(&cfg0.output, "classify", settings, w.resume, w.yes, order)?.with_control(control);

    let insp: Inspection = wf.phase("inspect", |wf| inspect::run(&wf.dir, &cfg0.dataset, &cfg0.model, cfg0.max_sequence_length, args.imbalance_threshold))?;
    let (options, sweep_opts) = w.sweep_setup(&wf.dir, &insp.dataset)?;
    let cfg = TrainConfig { output: wf.dir.join("benchmark"), ..options.clone().resolve()? };
    let cp: ClassifyPlan = wf.phase("plan", |wf| {
        let ds = crate::data::load_chat_dataset(&insp.dataset)?;
        let labels = label_info(&ds, args.labels.as_deref(), args.imbalance_threshold)?;
        let per_sample = insp.tokens() / insp.samples.max(1) as u64;
        let held = (insp.samples as f64 * cfg.eval_split.map_or(0.0, |f| if f >= 1.0 { f / insp.samples.max(1) as f64 } else { f })) as u64;
        let held = held.min(args.benchmark_samples as u64);
        let sides = models.len() + usize::from(!args.benchmark_only);
        let label_tokens = held * labels.labels.len() as u64 * per_sample * sides as u64;
        let input = PlanInput {
            options: &options,
            sweep: &sweep_opts,
            evaluators: vec!["label".into()],
            evaluator_reason: "classification: label accuracy by log-likelihood and by generation".into(),
            gpu_hour_price: w.gpu_hour_price,
            generations_per_side: args.benchmark_samples,
            max_new_tokens: args.max_new_tokens,
            sides,
            benchmark_only: args.benchmark_only,
            calibration_steps: w.calibration_steps,
            extra_inference: Some((format!("label log-likelihood benchmark: {sides} model(s) x {held} samples x {} labels", labels.labels.len()), label_tokens)),
        };
        let p = plan::build(&input, &insp)?;
        let mut extra = labels.plan_lines();
        extra.push(format!("benchmark: {} on up to {} held-out samples, before training", models.join(", "), args.benchmark_samples));
        if args.benchmark_only {
            extra.push("--benchmark-only: no training".into());
        }
        plan::write(&wf.dir, &plan::render("run classify", &p, &insp, &extra))?;
        Ok(ClassifyPlan { plan: p, labels })
    })?;
    let _: Approval = wf.phase("approval", |wf| approval::require(wf, "plan", &wf.dir.join(PLAN_FILE)))?;
    let bench: Vec<ModelScores> = wf.phase("benchmark", |wf| {
        let h = held_out(&cfg, args.benchmark_samples)?;
        models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mcfg = TrainConfig { model: m.clone(), ..cfg.clone() };
                benchmark(&wf.dir, &format!("base {m}"), "base", &mcfg, None, &h, &cp.labels, args.max_new_tokens, &format!("confusion-base-{}.svg", i + 1))
            })
            .collect()
    })?;
    let (promo, fin, tuned) = if args.benchmark_only {
        (None, None, None)
    } else {
        let sw: SweepResult = wf.phase("sweep", |wf| sweep_phase::run(&options, &sweep_opts, &wf.control))?;
        let promo: Promotion = wf.phase("promotion", |wf| promotion::run(wf, &sw, &cp.plan.candidates, &["label".to_string()], args.benchmark_samples, args.max_new_tokens))?;
        let fin: FinalRun = wf.phase("final run", |wf| {
            let skip = if w.skip_final {
                Some("--skip-final".to_string())
            } else if cp.plan.tuning_subsample.is_none() {
                Some("the candidates trained on all the training data already".to_string())
            } else {
                None
            };
            final_run::run(&wf.dir, &promo.winner_config, &promo.winner_dir, w.options.max_train_samples, skip, &wf.control)
        })?;
        let tuned: ModelScores = wf.phase("evaluation", |wf| {
            let h = held_out(&cfg, args.benchmark_samples)?;
            benchmark(&wf.dir, "fine-tuned", "fine-tuned", &cfg, Some(&fin.adapter), &h, &cp.labels, args.max_new_tokens, "confusion-fine-tuned.svg")
        })?;
        (Some(promo), Some(fin), Some(tuned))
    };
    let all: Vec<&ModelScores> = bench.iter().chain(tuned.as_ref()).collect();
    let data = json!({"labels": cp.labels, "held_out": all.first().map_or(0, |m| m.loglik.samples), "models": all});
    let _: serde_json::Value = wf.phase("report", |wf| {
        let input = ReportInput {
            title: "run classify: final report",
            plan: &cp.plan,
            promotion: promo.as_ref(),
            final_run: fin.as_ref(),
            comparison_md: comparison_md(&cp.labels, &all),
            comparison: data.clone(),
            generated: insp.generated.clone(),
            inference_phases: &["benchmark", "promotion", "evaluation"],
            eval_is_negative_reward: false,
        };
        report::write(wf, &input)
    })?;
    wf.finish()?;
    if args.common.json {
        println!("{}", serde_json::to_string(&data)?);
    }
    Ok(())
}

fn comparison_md(info: &LabelInfo, models: &[&ModelScores]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}\n", info.plan_lines().join("; "));
    let _ = writeln!(s, "Log-likelihood: the most likely label as the whole answer (always a valid label). Generation: the greedy answer, `(other)` when it is no label.\n");
    let _ = writeln!(s, "| model | accuracy (log-likelihood) | macro F1 | accuracy (generation) | macro F1 | not a label |\n| --- | ---: | ---: | ---: | ---: | ---: |");
    for m in models {
        let _ = writeln!(s, "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {} |", m.name, m.loglik.accuracy, m.loglik.macro_f1, m.generation.accuracy, m.generation.macro_f1, m.generation.invalid);
    }
    for m in models {
        let _ = writeln!(s, "\n### {} (log-likelihood)\n\n| label | accuracy | precision | recall | F1 | support |\n| --- | ---: | ---: | ---: | ---: | ---: |", m.name);
        for (l, v) in &m.loglik.per_label {
            let _ = writeln!(s, "| `{l}` | {:.3} | {:.3} | {:.3} | {:.3} | {} |", v.accuracy, v.precision, v.recall, v.f1, v.support);
        }
        let _ = writeln!(s, "\n![confusion matrix of {}]({})", m.name, m.confusion_svg.display());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(x: &[&str]) -> Vec<String> {
        x.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn per_label_scores_and_confusion() {
        let labels = v(&["a", "b"]);
        let truths = vec![v(&["a"]), v(&["a"]), v(&["b"]), v(&["b"])];
        let preds = vec![v(&["a"]), v(&["b"]), v(&["b"]), v(&[OTHER])];
        let s = score(&truths, &preds, &labels);
        assert_eq!(s.accuracy, 0.5);
        assert_eq!(s.invalid, 1);
        assert_eq!(s.confusion.matrix, vec![vec![1, 1, 0], vec![0, 1, 1]]);
        let a = &s.per_label["a"];
        assert_eq!((a.precision, a.recall, a.support), (1.0, 0.5, 2));
        assert!((a.f1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(a.accuracy, 0.75, "one against the rest: 3 of 4 right about `a`");
        let b = &s.per_label["b"];
        assert_eq!((b.precision, b.recall), (0.5, 0.5));
    }

    #[test]
    fn multi_label_is_scored_per_label_and_by_exact_set() {
        let labels = v(&["x", "y", "z"]);
        let s = score(&[v(&["x", "y"]), v(&["z"])], &[v(&["x", "y"]), v(&["z", "x"])], &labels);
        assert_eq!(s.accuracy, 0.5);
        assert_eq!(s.per_label["x"].precision, 0.5);
        assert_eq!(s.per_label["z"].recall, 1.0);
    }

    #[test]
    fn labels_come_from_the_data_and_imbalance_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let mut text = String::new();
        for i in 0..60 {
            let l = if i < 59 { "spam" } else { "ham" };
            text.push_str(&json!({"messages": [{"role": "user", "content": format!("mail {i}")}, {"role": "assistant", "content": l}]}).to_string());
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        let ds = crate::data::load_chat_dataset(&path).unwrap();
        let info = label_info(&ds, None, 50.0).unwrap();
        assert_eq!(info.labels, ["ham", "spam"]);
        assert_eq!(info.imbalance_ratio, 59.0);
        assert!(info.imbalanced && info.plan_lines().iter().any(|l| l.contains("oversampling")));
        assert!(format!("{:#}", label_info(&ds, Some(&v(&["spam", "other"])), 50.0).unwrap_err()).contains("d.jsonl:60: label `ham` is not in --labels"));
    }
}
