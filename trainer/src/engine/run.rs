//! One run: a named adapter with its own configuration, optimizer, schedule, trainer
//! state, metrics file, checkpoints and report. `sft` trains one run; `sweep` trains
//! several over one model. Set-up, the optimizer step of one run, evaluation and the
//! final write-out live here; the loop that feeds runs their micro-batches is
//! [`super::train`].
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Var;
use lora_models::Model;
use serde::Serialize;

use super::method::{EvalOutput, Method};
use super::run_dir::{self, RunStatus, METRICS_FILE};
use crate::checkpoint::{self, TrainerState};
use crate::clip::clip_grad_norm;
use crate::config::TrainConfig;
use crate::metrics::{self, MetricsRow};
use crate::metrics_writer::MetricsWriter;
use crate::optim::{AdamW, AdamWConfig};
use crate::progress::{fmt_duration, TrainProgress};
use crate::model_card::{self, CardFacts};
use crate::report;
use crate::run_control::Control;
use crate::schedule::LrSchedule;
use crate::training::{self, GradAccumulator};

/// What `sft --json` prints and `run.json` keeps under `"summary"`.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub output: PathBuf,
    pub adapter: PathBuf,
    pub steps: usize,
    pub epochs: f64,
    pub train_samples: usize,
    pub eval_samples: usize,
    pub train_loss: Option<f64>,
    pub initial_eval_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_perplexity: Option<f64>,
    pub tokens: u64,
    pub loss_tokens: u64,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
    pub resumed_from_step: Option<usize>,
    /// The method's headline number (its `report_spec`) before and after training.
    pub story: Option<report::Story>,
}

/// Options that change how a run is driven, not what it computes.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub resume: bool,
    /// No progress bar / summary on stderr (e.g. under `--json` in scripts).
    pub quiet: bool,
    /// When to stop between steps and who hears of each step (a job's row).
    pub control: Control,
}

/// Sums over the micro-batches of one optimizer step of one run.
pub(super) struct StepSums {
    pub grads: GradAccumulator,
    pub loss_sum: f64,
    pub metric_sums: BTreeMap<String, f64>,
    pub micro_batches: usize,
    pub tokens: usize,
    pub loss_tokens: usize,
}

impl StepSums {
    pub fn new(n_params: usize) -> Self {
        StepSums { grads: GradAccumulator::new(n_params), loss_sum: 0.0, metric_sums: BTreeMap::new(), micro_batches: 0, tokens: 0, loss_tokens: 0 }
    }
}

pub struct Run<M: Method> {
    /// The adapter's name in the model (the candidate name in a sweep).
    pub name: String,
    pub cfg: TrainConfig,
    pub method: M,
    pub total_steps: usize,
    pub status: RunStatus,
    /// Why the run stopped early (divergence), for the caller to report.
    pub failure: Option<String>,
    pub summary: Option<RunSummary>,
    params: Vec<(String, Var)>,
    opt: AdamW,
    schedule: LrSchedule,
    pub(super) state: TrainerState,
    metrics: MetricsWriter,
    eval_interval: usize,
    progress: TrainProgress,
    /// What the method reports (`Method::report_spec`), asked once.
    spec: report::ReportSpec,
    quiet: bool,
    pub(super) control: Control,
    initial_eval: Option<f64>,
    start_step: usize,
    started: Instant,
    elapsed_before: f64,
    resumed_from: Option<usize>,
    base_source: String,
}

impl<M: Method> Run<M> {
    /// Attach the run's adapter to `model` (fresh, or from the checkpoint `resume_from`
    /// that [`run_dir::prepare_run_dir`] found), set up AdamW and the schedule, and claim
    /// the run directory. `fingerprint` identifies the training data: resuming on other
    /// data is refused.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        model: &mut Model,
        name: &str,
        cfg: TrainConfig,
        method: M,
        fingerprint: String,
        resume_from: Option<(PathBuf, TrainerState)>,
        base_source: &str,
        opts: &RunOptions,
    ) -> Result<Self> {
        let out = cfg.output.clone();
        let steps_per_epoch = method.steps_per_epoch();
        let epochs = cfg.epochs.unwrap_or_else(|| TrainConfig::default_epochs(method.sample_counts().0));
        let total_steps = cfg.steps.unwrap_or(epochs * steps_per_epoch);
        let mut state = TrainerState { seed: cfg.seed, data_fingerprint: Some(fingerprint.clone()), ..Default::default() };
        match &resume_from {
            Some((dir, saved)) => {
                if saved.data_fingerprint.as_deref().is_some_and(|f| f != fingerprint) {
                    bail!("--resume: the training data changed since {} was written ({} tokenizes differently)", dir.display(), cfg.dataset.display());
                }
                model.load_named_adapter(name, dir).with_context(|| format!("loading the adapter of {}", dir.display()))?;
                state = saved.clone();
            }
            None => {
                model.add_adapter(name, &cfg.lora_config(), cfg.seed)?;
            }
        }
        let params = model.adapter_parameters(name)?;
        let mut opt = AdamW::new(params.clone(), AdamWConfig { weight_decay: cfg.weight_decay, ..Default::default() })?;
        if let Some((dir, _)) = &resume_from {
            opt.load(&dir.join(training::OPTIMIZER_FILE))?;
            if opt.steps_taken() as usize != state.step {
                bail!("{}: optimizer state is at step {}, trainer state at {}", dir.display(), opt.steps_taken(), state.step);
            }
        }
        let schedule = LrSchedule::new(cfg.lr_scheduler, cfg.learning_rate, cfg.warmup_ratio, total_steps);
        let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        tracing::info!(
            "{name}: LoRA r={} alpha={} on {}: {n_params} trainable parameters, {total_steps} steps",
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.target_modules.join(",")
        );

        // Model and data are good: the run directory is ours now.
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        checkpoint::remove_stale_temporaries(&out)?;
        run_dir::write_run_json(&out, method.name(), &cfg, &method.options(), RunStatus::Running, None::<&RunSummary>)?;
        let metrics_path = out.join(METRICS_FILE);
        let metrics = if resume_from.is_some() { MetricsWriter::resume(&metrics_path, state.step)? } else { MetricsWriter::create(&metrics_path)? };
        let resumed_at = resume_from.as_ref().map(|_| state.step);
        let metrics = metrics.report_to(&cfg.report_to, &out, name, &serde_json::to_value(&cfg)?, resumed_at)?;
        let mut progress = TrainProgress::new(total_steps, state.step, opts.quiet);
        progress.set_prefix(if name == lora_models::DEFAULT_ADAPTER { method.name() } else { name });
        Ok(Run {
            name: name.to_string(),
            eval_interval: cfg.eval_interval.unwrap_or((total_steps / 10).max(1)),
            total_steps,
            status: RunStatus::Running,
            failure: None,
            summary: None,
            params,
            opt,
            schedule,
            start_step: state.step,
            elapsed_before: state.elapsed_s,
            resumed_from: resume_from.as_ref().map(|(_, s)| s.step),
            state,
            metrics,
            progress,
            spec: method.report_spec(),
            quiet: opts.quiet,
            control: opts.control.clone(),
            initial_eval: None,
            started: Instant::now(),
            base_source: base_source.to_string(),
            method,
            cfg,
        })
    }

    pub fn is_active(&self) -> bool {
        self.status == RunStatus::Running && self.state.step < self.total_steps
    }
    pub fn step(&self) -> usize {
        self.state.step
    }
    pub(super) fn params(&self) -> &[(String, Var)] {
        &self.params
    }
    pub(super) fn new_sums(&self) -> StepSums {
        StepSums::new(self.params.len())
    }
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// Evaluate with every row routed through this run's adapter, without a graph.
    fn evaluate(&self, model: &Model) -> Result<Option<EvalOutput>> {
        let _route = model.route_all(&self.name)?;
        let _inference = model.inference();
        self.method.evaluate(model)
    }

    /// The evaluation before the first step (the `step 0` row of `metrics.jsonl`).
    pub(super) fn initial_eval(&mut self, model: &Model) -> Result<()> {
        if self.state.step != 0 {
            return Ok(());
        }
        if let Some(ev) = self.evaluate(model)? {
            self.initial_eval = Some(ev.loss);
            self.state.last_eval_loss = Some(ev.loss);
            let mut row = MetricsRow { step: 0, epoch: Some(0.0), tokens: 0, elapsed_s: self.elapsed(), ..Default::default() };
            put_eval(&mut row, &ev);
            self.progress.println(&format!("{}step 0: {}", self.label(), self.spec.eval_line(&row)));
            self.metrics.write(&row)?;
        }
        Ok(())
    }

    fn label(&self) -> String {
        if self.name == lora_models::DEFAULT_ADAPTER { String::new() } else { format!("{}: ", self.name) }
    }

    /// Clip, check, update, log, evaluate, checkpoint: the end of one optimizer step.
    /// A NaN/Inf retires the run (status `diverged`) without writing anything of this step.
    pub(super) fn finish_step(&mut self, model: &Model, sums: StepSums, denominator: f64) -> Result<()> {
        let step = self.state.step;
        let loss = sums.loss_sum / denominator;
        let mut grads = sums.grads.finish(&self.params)?;
        let grad_norm = clip_grad_norm(&mut grads, self.cfg.max_grad_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            return self.diverge(step + 1, &format!("loss {loss}, gradient norm {grad_norm}"));
        }
        let lr = self.schedule.lr_at(step);
        self.opt.step(&grads, lr)?;
        if !training::all_finite(&self.params)? {
            return self.diverge(step + 1, &format!("the update at lr {lr:.3e} made LoRA weights non-finite (loss was {loss})"));
        }

        let steps_per_epoch = self.method.steps_per_epoch();
        let st = &mut self.state;
        st.step = step + 1;
        st.epoch = st.step / steps_per_epoch;
        st.batch_in_epoch = (st.step % steps_per_epoch) * self.cfg.gradient_accumulation_steps;
        st.tokens_seen += sums.tokens as u64;
        st.loss_tokens_seen += sums.loss_tokens as u64;
        st.last_loss = Some(loss);
        let micro = sums.micro_batches.max(1) as f64;
        let mut method_metrics: BTreeMap<String, f64> = sums.metric_sums.iter().map(|(k, v)| (k.clone(), v / micro)).collect();
        method_metrics.extend(self.method.step_metrics());
        self.progress.step(st.step, self.spec.loss_label, loss, lr, sums.tokens as u64, &self.spec.progress_line(&method_metrics));
        let mut row = MetricsRow {
            step: st.step,
            epoch: Some(st.step as f64 / steps_per_epoch as f64),
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: Some(grad_norm),
            tokens: st.tokens_seen,
            loss_tokens: Some(sums.loss_tokens as u64),
            extra: method_metrics.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect(),
            ..Default::default()
        };
        let last_step = self.state.step == self.total_steps;
        let mut evaluated = false;
        if self.state.step % self.eval_interval == 0 || last_step {
            if let Some(ev) = self.evaluate(model)? {
                self.state.last_eval_loss = Some(ev.loss);
                put_eval(&mut row, &ev);
                let (label, loss_label) = (self.label(), self.spec.loss_label);
                self.progress.println(&format!("{label}step {}: train {loss_label} {loss:.4}, {}", self.state.step, self.spec.eval_line(&row)));
                evaluated = true;
            }
        }
        self.state.elapsed_s = self.elapsed();
        row.elapsed_s = self.state.elapsed_s;
        self.metrics.write(&row)?;
        if evaluated {
            // The method's warnings (e.g. DPO over-optimizing) read the rows written so far.
            for warning in (self.spec.diagnose)(&metrics::read_metrics(self.metrics.path())?) {
                self.progress.println(&format!("{}warning: {warning}", self.label()));
            }
        }
        self.control.on_step(self.state.step, self.total_steps, Some(loss));
        if self.state.step % self.cfg.checkpoint_interval == 0 || last_step {
            self.save_checkpoint(model)?;
        }
        if last_step {
            self.complete(model)?;
        }
        Ok(())
    }

    fn save_checkpoint(&self, model: &Model) -> Result<PathBuf> {
        let out = &self.cfg.output;
        let dir = checkpoint::save_checkpoint(out, &self.state, |dir| {
            model.save_named_adapter(&self.name, dir, &self.base_source)?;
            self.opt.save(&dir.join(training::OPTIMIZER_FILE))
        })?;
        checkpoint::prune_checkpoints(out, self.cfg.save_total_limit)?;
        tracing::debug!("checkpoint {}", dir.display());
        Ok(dir)
    }

    /// Stopping early (a signal): the checkpoint of the step just finished, written now
    /// unless the checkpoint interval already wrote it. `None` before the first step.
    pub(super) fn checkpoint_now(&mut self, model: &Model) -> Result<Option<PathBuf>> {
        self.progress.finish();
        if self.state.step == 0 {
            return Ok(None);
        }
        let dir = checkpoint::checkpoint_dir(&self.cfg.output, self.state.step);
        if dir.is_dir() {
            return Ok(Some(dir));
        }
        self.save_checkpoint(model).map(Some)
    }

    /// Stop after a NaN/Inf: mark the run, keep the checkpoints (all written before this
    /// step, so the newest is the last good one), and say where to go from here.
    fn diverge(&mut self, step: usize, what: &str) -> Result<()> {
        self.progress.finish();
        let out = &self.cfg.output;
        let last = checkpoint::latest_checkpoint(out).ok().flatten();
        run_dir::write_run_json(out, self.method.name(), &self.cfg, &self.method.options(), RunStatus::Diverged, None::<&RunSummary>)?;
        // The run is ending either way: a damaged metrics file costs the report its curves,
        // said once, not the run's status.
        let rows = metrics::read_metrics(&out.join(METRICS_FILE)).unwrap_or_else(|e| {
            tracing::warn!("{e:#}; the report has no curves");
            Vec::new()
        });
        report::write_report(out, &format!("{} run (diverged)", self.method.name().to_uppercase()), &self.spec, &[], &serde_json::to_value(&self.cfg)?, &rows)?;
        self.status = RunStatus::Diverged;
        self.failure = Some(format!(
            "training diverged at step {step}: {what}. Stopped before saving anything from this step; {}. \
             Try a lower --learning-rate (now {}) or a --max-grad-norm.",
            match last {
                Some((dir, st)) => format!("the last good checkpoint is {} (step {}); no newer checkpoint or final adapter was written", dir.display(), st.step),
                None => "no checkpoint was written yet".to_string(),
            },
            self.cfg.learning_rate
        ));
        tracing::warn!("{}{}", self.label(), self.failure.as_deref().unwrap_or_default());
        Ok(())
    }

    /// End before the last step at the method's request: checkpoint the step just
    /// finished, mark the run `stopped`, and keep the reason for the caller.
    pub(super) fn stop_early(&mut self, model: &Model, reason: &str) -> Result<()> {
        let checkpoint = self.checkpoint_now(model)?;
        let out = &self.cfg.output;
        run_dir::write_run_json(out, self.method.name(), &self.cfg, &self.method.options(), RunStatus::Stopped, None::<&RunSummary>)?;
        // The run is ending either way: a damaged metrics file costs the report its curves,
        // said once, not the run's status.
        let rows = metrics::read_metrics(&out.join(METRICS_FILE)).unwrap_or_else(|e| {
            tracing::warn!("{e:#}; the report has no curves");
            Vec::new()
        });
        report::write_report(out, &format!("{} run (stopped early)", self.method.name().to_uppercase()), &self.spec, &[], &serde_json::to_value(&self.cfg)?, &rows)?;
        self.status = RunStatus::Stopped;
        let kept = checkpoint.map_or("no checkpoint".to_string(), |d| format!("checkpoint {} kept", d.display()));
        self.failure = Some(format!("{}stopped at step {} of {}: {reason} ({kept}; no final adapter)", self.label(), self.state.step, self.total_steps));
        Ok(())
    }

    /// Final adapter, summary, `run.json`, report.
    fn complete(&mut self, model: &Model) -> Result<()> {
        self.progress.finish();
        let out = self.cfg.output.clone();
        model.save_named_adapter(&self.name, &out, &self.base_source)?;
        let rows = metrics::read_metrics(&out.join(METRICS_FILE))?;
        let initial_eval_loss = self.initial_eval.or_else(|| rows.iter().find(|r| r.step == 0).and_then(|r| r.eval_loss));
        let last_eval = rows.iter().rev().find(|r| r.eval_loss.is_some());
        let st = &self.state;
        let segment_tokens = st.tokens_seen - rows.iter().find(|r| r.step == self.start_step).map_or(0, |r| r.tokens);
        let segment_secs = self.started.elapsed().as_secs_f64();
        let (train_samples, eval_samples) = self.method.sample_counts();
        let summary = RunSummary {
            output: out.clone(),
            adapter: out.clone(),
            steps: st.step,
            epochs: st.step as f64 / self.method.steps_per_epoch() as f64,
            train_samples,
            eval_samples,
            train_loss: st.last_loss,
            initial_eval_loss,
            eval_loss: last_eval.and_then(|r| r.eval_loss),
            eval_perplexity: last_eval.and_then(|r| r.eval_perplexity),
            tokens: st.tokens_seen,
            loss_tokens: st.loss_tokens_seen,
            elapsed_s: st.elapsed_s,
            tokens_per_s: if segment_secs > 0.0 { segment_tokens as f64 / segment_secs } else { 0.0 },
            resumed_from_step: self.resumed_from,
            story: self.spec.story(&rows),
        };
        run_dir::write_run_json(&out, self.method.name(), &self.cfg, &self.method.options(), RunStatus::Completed, Some(&summary))?;
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        let report_summary = vec![
            ("model".to_string(), self.cfg.model.clone()),
            ("steps".to_string(), format!("{} ({:.2} epochs)", summary.steps, summary.epochs)),
            ("tokens trained on".to_string(), summary.tokens.to_string()),
            ("training time".to_string(), fmt_duration(summary.elapsed_s)),
            ("adapter".to_string(), format!("`{}`", out.display())),
        ];
        let title = format!("{} run", self.method.name().to_uppercase());
        report::write_report(&out, &title, &self.spec, &report_summary, &serde_json::to_value(&self.cfg)?, &rows)?;
        let card = CardFacts { method: self.method.name(), config: &self.cfg, summary: &serde_json::to_value(&summary)?, data_fingerprint: st.data_fingerprint.as_deref() };
        model_card::write_model_card(&out, &card)?;
        if !self.quiet {
            let story = summary.story.as_ref().map_or("no evaluation".to_string(), |s| s.to_string());
            eprintln!(
                "\n{}Done: {} steps in {}, {} tokens ({:.0} tok/s).\n  train {} {}   {}\n  adapter: {}  (report: {})\n  try it:  lora-train generate --model {} --adapter {} --chat \"Hello\"",
                self.label(),
                summary.steps,
                fmt_duration(summary.elapsed_s),
                summary.tokens,
                summary.tokens_per_s,
                self.spec.loss_label,
                f(summary.train_loss),
                story,
                out.display(),
                out.join(report::REPORT_FILE).display(),
                self.cfg.model,
                out.display(),
            );
        }
        self.status = RunStatus::Completed;
        self.summary = Some(summary);
        Ok(())
    }

    pub fn output(&self) -> &Path {
        &self.cfg.output
    }
}

fn put_eval(row: &mut MetricsRow, ev: &EvalOutput) {
    row.eval_loss = Some(ev.loss);
    row.eval_perplexity = ev.perplexity;
    row.eval_tokens = Some(ev.tokens);
    for (k, v) in &ev.metrics {
        row.extra.insert(format!("eval_{k}"), serde_json::json!(v));
    }
}
