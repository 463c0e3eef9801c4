//! Supervised fine-tuning of a LoRA adapter, top to bottom:
//!
//! 1. run directory: fresh, or `--resume` from its latest complete checkpoint
//! 2. model + tokenizer, dataset -> tokens (loss mask: ARCHITECTURE.md), held-out split
//! 3. LoRA (PEFT init) + AdamW on the LoRA parameters only + LR schedule
//! 4. the loop: each optimizer step takes `gradient_accumulation_steps` micro-batches and
//!    back-propagates sum(token losses) / (loss tokens of ALL those micro-batches), so
//!    batch 4 and batch 2 x accumulation 2 give the same update; clip; step; log; eval;
//!    checkpoint. A NaN/Inf loss or gradient stops the run before the update, leaving the
//!    last good checkpoint as the newest one.
//! 5. final adapter, report.md, run.json, summary.
//!
//! Determinism: batches are a pure function of (seed, epoch, index), dropout masks of
//! (seed, step, micro-batch), and a checkpoint stores adapter + AdamW moments + step, so a
//! run killed at any point and resumed produces the same adapter bit for bit (on CPU).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lora_datasets::{BatchConfig, DataLoader};
use serde::Serialize;

use crate::checkpoint::{self, TrainerState};
use crate::clip::clip_grad_norm;
use crate::config::SftConfig;
use crate::data::{self, EvalResult};
use crate::metrics::{self, MetricsRow, MetricsWriter};
use crate::optim::{AdamW, AdamWConfig};
use crate::progress::{fmt_duration, TrainProgress};
use crate::report;
use crate::schedule::LrSchedule;
use crate::training::{self, derive_seed, GradAccumulator};

pub const RUN_FILE: &str = "run.json";
pub const METRICS_FILE: &str = "metrics.jsonl";

/// What `sft --json` prints and `run.json` keeps under `"summary"`.
#[derive(Clone, Debug, Serialize)]
pub struct SftSummary {
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
}

/// Options that change how the run is driven, not what it computes.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub resume: bool,
    /// No progress bar / summary on stderr (e.g. under `--json` in scripts).
    pub quiet: bool,
}

pub fn run(cfg: &SftConfig, opts: &RunOptions) -> Result<SftSummary> {
    let wall = Instant::now();
    let out = cfg.output.clone();

    // ---- 1. Run directory: fresh or resumed -------------------------------------------
    let resume_from = prepare_run_dir(&out, cfg, opts.resume)?;

    // ---- 2. Data (validated first: cheaper than a model load), model, tokens ------------
    let full = data::load_chat_dataset(&cfg.dataset)?;
    let (train_ds, eval_ds) = match (&cfg.eval_dataset, cfg.eval_split) {
        (Some(path), _) => (full, Some(data::load_chat_dataset(path)?)),
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
    let device = crate::device::parse_device(&cfg.device)?;
    tracing::info!("loading {} ({:?}, compute {:?}, base weights {:?})", cfg.model, device, cfg.dtype, cfg.base_dtype);
    let loaded = lora_models::load_model_mixed(&cfg.model, &device, cfg.dtype.to_candle(), cfg.base_dtype.to_candle())
        .with_context(|| format!("loading model {}", cfg.model))?;
    let (mut model, bundle, base_source) = (loaded.model, loaded.tokenizer, loaded.source);
    let train = data::tokenize_dataset(&bundle, &train_ds, cfg.max_sequence_length)?;
    let eval = eval_ds.as_ref().map(|d| data::tokenize_dataset(&bundle, d, cfg.max_sequence_length)).transpose()?;
    let pad = data::pad_token_id(&bundle);
    let loader = DataLoader::new(
        train.samples.clone(),
        BatchConfig {
            batch_size: cfg.batch_size,
            max_seq_len: cfg.max_sequence_length,
            packing: cfg.packing,
            group_by_length: cfg.group_by_length,
            pad_token_id: pad,
            seed: cfg.seed,
        },
    );
    let eval_loader = eval.as_ref().map(|e| data::eval_loader(e, cfg.batch_size, cfg.max_sequence_length, pad));

    // Steps: each epoch is ceil(micro-batches / accumulation) optimizer steps; the last
    // step of an epoch may take fewer micro-batches. Step k's micro-batches follow from k.
    let micro_per_epoch = loader.batches_per_epoch();
    let accum = cfg.gradient_accumulation_steps;
    let steps_per_epoch = micro_per_epoch.div_ceil(accum);
    let epochs = cfg.epochs.unwrap_or_else(|| SftConfig::default_epochs(train.samples.len()));
    let total_steps = cfg.steps.unwrap_or(epochs * steps_per_epoch);
    let micro_batches_of = |step: usize| {
        let epoch = step / steps_per_epoch;
        let first = (step % steps_per_epoch) * accum;
        (epoch, first..(first + accum).min(micro_per_epoch))
    };
    let eval_interval = cfg.eval_interval.unwrap_or((total_steps / 10).max(1));
    tracing::info!(
        "{} training samples ({} tokens, {} loss tokens, {} truncated), {} eval samples; {} micro-batches/epoch, {} steps",
        train.samples.len(),
        train.tokens,
        train.loss_tokens,
        train.truncated,
        eval.as_ref().map_or(0, |e| e.samples.len()),
        micro_per_epoch,
        total_steps
    );

    // ---- 3. LoRA, optimizer, schedule (or their state from the checkpoint) -------------
    let lora_cfg = cfg.lora_config();
    model.add_lora(&lora_cfg, cfg.seed)?;
    let fingerprint = train.fingerprint();
    let mut state = TrainerState { seed: cfg.seed, data_fingerprint: Some(fingerprint.clone()), ..Default::default() };
    if let Some((dir, saved)) = &resume_from {
        if saved.data_fingerprint.as_deref().is_some_and(|f| f != fingerprint) {
            bail!("--resume: the training data changed since {} was written ({} tokenizes differently)", dir.display(), cfg.dataset.display());
        }
        model.load_adapter(dir).with_context(|| format!("loading the adapter of {}", dir.display()))?;
        state = saved.clone();
    }
    let params = model.lora_parameters();
    let mut opt = AdamW::new(params.clone(), AdamWConfig { weight_decay: cfg.weight_decay, ..Default::default() })?;
    if let Some((dir, _)) = &resume_from {
        opt.load(&dir.join(training::OPTIMIZER_FILE))?;
        if opt.steps_taken() as usize != state.step {
            bail!("{}: optimizer state is at step {}, trainer state at {}", dir.display(), opt.steps_taken(), state.step);
        }
    }
    let schedule = LrSchedule::new(cfg.lr_scheduler, cfg.learning_rate, cfg.warmup_ratio, total_steps);
    let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    tracing::info!("LoRA r={} alpha={} on {}: {} trainable parameters", cfg.lora_rank, cfg.lora_alpha, cfg.target_modules.join(","), n_params);

    // Model and data are good: the run directory is ours now.
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    checkpoint::remove_stale_temporaries(&out)?;
    write_run_json(&out, cfg, "running", None)?;
    let metrics_path = out.join(METRICS_FILE);
    let mut metrics = if resume_from.is_some() { MetricsWriter::resume(&metrics_path, state.step)? } else { MetricsWriter::create(&metrics_path)? };
    let elapsed_before = state.elapsed_s;
    let segment_start = Instant::now();
    let elapsed = || elapsed_before + segment_start.elapsed().as_secs_f64();
    let run_eval = |model: &lora_models::Model| -> Result<Option<EvalResult>> {
        eval_loader.as_ref().map(|l| data::evaluate(model, l)).transpose()
    };

    let mut progress = TrainProgress::new(total_steps, state.step, opts.quiet);
    let start_step = state.step;
    let mut initial_eval = None;
    if start_step == 0 {
        if let Some(ev) = run_eval(&model)? {
            progress.println(&format!("step 0: eval loss {:.4} (perplexity {:.2})", ev.eval_loss, ev.perplexity));
            initial_eval = Some(ev.eval_loss);
            state.last_eval_loss = Some(ev.eval_loss);
            metrics.write(&MetricsRow {
                step: 0,
                epoch: Some(0.0),
                tokens: 0,
                elapsed_s: elapsed(),
                eval_loss: Some(ev.eval_loss),
                eval_perplexity: Some(ev.perplexity),
                eval_tokens: Some(ev.loss_tokens as u64),
                ..Default::default()
            })?;
        }
    }

    // ---- 4. The loop ---------------------------------------------------------------
    for step in start_step..total_steps {
        let (epoch, micro) = micro_batches_of(step);
        let batches: Vec<_> = micro
            .clone()
            .map(|i| loader.batch(epoch as u64, i).context("data loader position out of range"))
            .collect::<Result<_>>()?;
        // Normalise by the loss tokens of the whole accumulated batch.
        let step_loss_tokens: usize = batches.iter().map(|b| b.loss_tokens).sum();
        let denom = step_loss_tokens.max(1) as f64;
        let mut acc = GradAccumulator::new(params.len());
        let mut loss_sum = 0.0f64;
        let mut step_tokens = 0usize;
        for (i, batch) in batches.iter().enumerate() {
            let t = data::to_tensors(batch, model.device())?;
            model.set_dropout_seed(Some(derive_seed(cfg.seed, step as u64, i as u64)));
            let hidden = model.forward_hidden(&t.input_ids, &t.position_ids, Some(&t.segment_ids))?;
            let sum = model.loss_sum(&hidden, &t.input_ids, &t.loss_mask)?;
            loss_sum += sum.to_scalar::<f32>()? as f64;
            acc.backward(&(sum / denom)?, &params)?;
            step_tokens += t.tokens;
        }
        model.set_dropout_seed(None);
        let loss = loss_sum / denom;
        let mut grads = acc.finish(&params)?;
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            progress.finish();
            return Err(diverged(&out, cfg, &metrics_path, step + 1, &format!("loss {loss}, gradient norm {grad_norm}")));
        }
        let lr = schedule.lr_at(step);
        opt.step(&grads, lr)?;
        if !training::all_finite(&params)? {
            progress.finish();
            return Err(diverged(&out, cfg, &metrics_path, step + 1, &format!("the update at lr {lr:.3e} made LoRA weights non-finite (loss was {loss})")));
        }

        state.step = step + 1;
        state.epoch = (step + 1) / steps_per_epoch;
        state.batch_in_epoch = ((step + 1) % steps_per_epoch) * accum;
        state.tokens_seen += step_tokens as u64;
        state.loss_tokens_seen += step_loss_tokens as u64;
        state.last_loss = Some(loss);
        progress.step(state.step, loss, lr, step_tokens as u64);
        let mut row = MetricsRow {
            step: state.step,
            epoch: Some(state.step as f64 / steps_per_epoch as f64),
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: Some(grad_norm),
            tokens: state.tokens_seen,
            loss_tokens: Some(step_loss_tokens as u64),
            ..Default::default()
        };
        let last_step = state.step == total_steps;
        if state.step % eval_interval == 0 || last_step {
            if let Some(ev) = run_eval(&model)? {
                progress.println(&format!("step {}: train loss {loss:.4}, eval loss {:.4} (perplexity {:.2})", state.step, ev.eval_loss, ev.perplexity));
                state.last_eval_loss = Some(ev.eval_loss);
                row.eval_loss = Some(ev.eval_loss);
                row.eval_perplexity = Some(ev.perplexity);
                row.eval_tokens = Some(ev.loss_tokens as u64);
            }
        }
        state.elapsed_s = elapsed();
        row.elapsed_s = state.elapsed_s;
        metrics.write(&row)?;
        if state.step % cfg.checkpoint_interval == 0 || last_step {
            let dir = training::save_checkpoint(&out, &model, &opt, &state, &base_source)?;
            checkpoint::prune_checkpoints(&out, cfg.save_total_limit)?;
            tracing::debug!("checkpoint {}", dir.display());
        }
    }
    progress.finish();

    // ---- 5. Final adapter, report, summary --------------------------------------------
    model.save_adapter(&out, &base_source)?;
    let rows = metrics::read_metrics(&metrics_path)?;
    let initial_eval_loss = initial_eval.or_else(|| rows.iter().find(|r| r.step == 0).and_then(|r| r.eval_loss));
    let last_eval = rows.iter().rev().find(|r| r.eval_loss.is_some());
    let segment_tokens = state.tokens_seen - rows.iter().find(|r| r.step == start_step).map_or(0, |r| r.tokens);
    let segment_secs = segment_start.elapsed().as_secs_f64();
    let summary = SftSummary {
        output: out.clone(),
        adapter: out.clone(),
        steps: state.step,
        epochs: state.step as f64 / steps_per_epoch as f64,
        train_samples: train.samples.len(),
        eval_samples: eval.as_ref().map_or(0, |e| e.samples.len()),
        train_loss: state.last_loss,
        initial_eval_loss,
        eval_loss: last_eval.and_then(|r| r.eval_loss),
        eval_perplexity: last_eval.and_then(|r| r.eval_perplexity),
        tokens: state.tokens_seen,
        loss_tokens: state.loss_tokens_seen,
        elapsed_s: state.elapsed_s,
        tokens_per_s: if segment_secs > 0.0 { segment_tokens as f64 / segment_secs } else { 0.0 },
        resumed_from_step: resume_from.as_ref().map(|(_, s)| s.step),
    };
    write_run_json(&out, cfg, "completed", Some(&summary))?;
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    let report_summary = vec![
        ("model".to_string(), cfg.model.clone()),
        ("steps".to_string(), format!("{} ({:.2} epochs)", summary.steps, summary.epochs)),
        ("final train loss".to_string(), f(summary.train_loss)),
        ("eval loss before -> after".to_string(), format!("{} -> {}", f(summary.initial_eval_loss), f(summary.eval_loss))),
        ("tokens trained on".to_string(), summary.tokens.to_string()),
        ("training time".to_string(), fmt_duration(summary.elapsed_s)),
        ("adapter".to_string(), format!("`{}`", out.display())),
    ];
    report::write_report(&out, "SFT run", &report_summary, &serde_json::to_value(cfg)?, &rows)?;
    if !opts.quiet {
        eprintln!(
            "\nDone: {} steps in {} (wall {}), {} tokens ({:.0} tok/s).\n  train loss {}   eval loss {} -> {}\n  adapter: {}  (report: {})\n  try it:  lora-train generate --model {} --adapter {} --chat \"Hello\"",
            summary.steps,
            fmt_duration(summary.elapsed_s),
            fmt_duration(wall.elapsed().as_secs_f64()),
            summary.tokens,
            summary.tokens_per_s,
            f(summary.train_loss),
            f(summary.initial_eval_loss),
            f(summary.eval_loss),
            out.display(),
            out.join(report::REPORT_FILE).display(),
            cfg.model,
            out.display(),
        );
    }
    Ok(summary)
}

/// A fresh run needs an output directory without a previous run in it; `--resume` needs
/// the same configuration as the run it continues. Returns the checkpoint to resume from.
/// Writes nothing: the directory is only touched once model and data have loaded, so a run
/// that fails to start leaves no trace.
fn prepare_run_dir(out: &Path, cfg: &SftConfig, resume: bool) -> Result<Option<(PathBuf, TrainerState)>> {
    let run_json = out.join(RUN_FILE);
    if !resume {
        if run_json.exists() || checkpoint::checkpoints_dir(out).exists() || out.join("adapter_model.safetensors").exists() {
            bail!(
                "{} already holds a run; pass --resume to continue it, or choose another --output",
                out.display()
            );
        }
        return Ok(None);
    }
    let prev: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&run_json).with_context(|| format!("--resume: {} not found (nothing to resume)", run_json.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", run_json.display()))?;
    let prev_cfg: SftConfig = serde_json::from_value(prev["config"].clone()).with_context(|| format!("{}: no SFT config", run_json.display()))?;
    let (a, b) = (prev_cfg.resume_relevant(), cfg.resume_relevant());
    if a != b {
        let mut diffs = Vec::new();
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                let vb = b.get(k).unwrap_or(&serde_json::Value::Null);
                if va != vb {
                    diffs.push(format!("{k}: {va} in the run, {vb} now"));
                }
            }
        }
        bail!("--resume needs the command line of the run it continues; these differ:\n  {}", diffs.join("\n  "));
    }
    let latest = checkpoint::latest_checkpoint(out)?;
    match &latest {
        Some((dir, st)) => tracing::info!("resuming from {} (step {})", dir.display(), st.step),
        None => tracing::warn!("--resume: no complete checkpoint in {}; starting from step 0", out.display()),
    }
    Ok(latest)
}

/// Stop after a NaN/Inf: mark the run, keep the checkpoints (all written before this step,
/// so the newest is the last good one), and say where to go from here.
fn diverged(out: &Path, cfg: &SftConfig, metrics_path: &Path, step: usize, what: &str) -> anyhow::Error {
    let last = checkpoint::latest_checkpoint(out).ok().flatten();
    let _ = write_run_json(out, cfg, "diverged", None);
    let rows = metrics::read_metrics(metrics_path).unwrap_or_default();
    if let Ok(config) = serde_json::to_value(cfg) {
        let _ = report::write_report(out, "SFT run (diverged)", &[], &config, &rows);
    }
    anyhow::anyhow!(
        "training diverged at step {step}: {what}. Stopped before saving anything from this step; {}. \
         Try a lower --learning-rate (now {}) or a --max-grad-norm.",
        match last {
            Some((dir, st)) => format!("the last good checkpoint is {} (step {}); no newer checkpoint or final adapter was written", dir.display(), st.step),
            None => "no checkpoint was written yet".to_string(),
        },
        cfg.learning_rate
    )
}

fn write_run_json(out: &Path, cfg: &SftConfig, status: &str, summary: Option<&SftSummary>) -> Result<()> {
    let v = serde_json::json!({
        "command": "sft",
        "version": env!("CARGO_PKG_VERSION"),
        "status": status,
        "config": cfg,
        "summary": summary,
    });
    checkpoint::write_atomic(&out.join(RUN_FILE), &serde_json::to_vec_pretty(&v)?)
}
