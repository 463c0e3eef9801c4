//! The training engine: the loop machinery every method shares, written once.
//!
//! A method (`recipes/sft.rs`, ...) implements [`Method`]: its micro-batches, the rows
//! they put through the model, its loss, its evaluation. A [`Run`] is one adapter being
//! trained by a method, with its own configuration, AdamW, schedule, clipping, dropout
//! seed, step count, metrics, checkpoints and report. [`train`] drives one run (`sft`) or
//! several over ONE model (`sweep`): at each tick every active run contributes its next
//! micro-batch, their rows are concatenated into one forward pass routed per contiguous
//! row block (frozen base GEMM once over all rows, each adapter's LoRA on its own rows,
//! reference rows through the base alone), and one backward pass gives every run the
//! gradient of its own loss. A run that diverges is retired; the others go on.
pub mod data_parallel;
pub mod method;
pub mod run;
pub mod run_dir;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use lora_models::{Model, Route};

pub use method::{step_positions, BatchTokens, EvalOutput, InputRows, Method, MicroLoss};
pub use run::{Run, RunOptions, RunSummary};
pub use run_dir::{prepare_run_dir, read_status, write_run_json, RunStatus, METRICS_FILE, RUN_FILE};

use crate::parallel::Communicator;
pub use crate::run_control::{Control, Stopped};
use crate::training::derive_seed;
use run::StepSums;

/// Train every run to its last step (or until it diverges). Errors that are not a run's
/// own divergence (I/O, a failed forward) stop all runs: they share the forward pass.
pub fn train<M: Method>(model: &Model, runs: &mut [Run<M>]) -> Result<()> {
    fit_before_training(model, runs)?;
    train_replicated(model, runs, None)
}

/// Before step 1: plan the memory of the largest micro-batch the runs will make, decide
/// gradient checkpointing (`--gradient-checkpointing auto`), and stop with what would
/// fit when the plan exceeds the device's available memory (so a run that cannot fit
/// fails in its first seconds, not hours in). Returns the checkpointing decision.
pub fn fit_before_training<M: Method>(model: &Model, runs: &[Run<M>]) -> Result<bool> {
    use crate::config::CheckpointingArg;
    use crate::memory::{self, BaseStorage, FitDecision, Workload};
    let active: Vec<&Run<M>> = runs.iter().filter(|r| r.is_active()).collect();
    let Some(first) = active.first() else { return Ok(model.gradient_checkpointing()) };
    let (mut rows, mut row_len) = (0, 0);
    for run in &active {
        let (r, len) = run.method.largest_micro_batch().with_context(|| format!("{}: sizing its micro-batches", run.name))?;
        rows += r;
        row_len = row_len.max(len);
    }
    let cfg = &first.cfg;
    if rows == 0 || row_len == 0 {
        model.set_gradient_checkpointing(cfg.gradient_checkpointing == CheckpointingArg::On);
        return Ok(model.gradient_checkpointing());
    }
    let workload = Workload { rows, row_len, adapters: active.len(), rollout_rows: 0, rollout_len: 0 };
    let (stored, params) = model.projection_storage();
    let storage = BaseStorage::of_loaded(model.base_quant(), stored, params);
    let compute_bytes = model.compute_dtype().size_in_bytes() as f64;
    let m = model.config();
    let targets = cfg.target_modules.clone();
    let plan = |on: bool| memory::plan(m, storage, compute_bytes, cfg.lora_rank, &targets, &workload, on);
    let (off, on) = (plan(false), plan(true));
    let requested = match cfg.gradient_checkpointing {
        CheckpointingArg::Auto => None,
        CheckpointingArg::On => Some(true),
        CheckpointingArg::Off => Some(false),
    };
    let quantized = matches!(model.base_quant(), lora_models::BaseQuant::Nf4 | lora_models::BaseQuant::Int8);
    let mut hints = Vec::new();
    if model.base_quant() == lora_models::BaseQuant::None {
        let nf4 = memory::plan(m, BaseStorage::Nf4, compute_bytes, cfg.lora_rank, &targets, &workload, true);
        hints.push(format!("--base-quant nf4 with checkpointing (peak {})", memory::gib(nf4.total())));
    }
    if row_len > 256 {
        hints.push(format!("shorter rows (--max-sequence-length {})", row_len / 2));
    }
    if cfg.batch_size > 1 {
        hints.push(format!(
            "--batch-size {} --gradient-accumulation-steps {} (the same optimizer step, half the rows at once)",
            cfg.batch_size.div_ceil(2),
            cfg.gradient_accumulation_steps * 2
        ));
    }
    let available = memory::available_bytes(model.device(), off.base_bytes);
    match memory::decide(&off, &on, requested, quantized, available, &hints) {
        FitDecision::Fits { checkpointing } => {
            model.set_gradient_checkpointing(checkpointing);
            let chosen = if checkpointing { &on } else { &off };
            tracing::info!(
                "memory plan: {} at the peak ({} rows x {} tokens; base {}, LoRA + optimizer {}, activations {}), gradient checkpointing {}{}",
                memory::gib(chosen.total()),
                rows,
                row_len,
                memory::gib(chosen.base_bytes),
                memory::gib(chosen.lora_bytes),
                memory::gib(chosen.activation_bytes),
                if checkpointing { "on" } else { "off" },
                available.map(|a| format!(", {} available", memory::gib(a))).unwrap_or_default()
            );
            Ok(checkpointing)
        }
        FitDecision::DoesNotFit(msg) => anyhow::bail!("{}: {msg}", first.name),
    }
}

/// [`train`], as the leader (rank 0) of a data-parallel group when `comm` is given: each
/// step it tells the followers ([`data_parallel::follow`]) the step and the adapter's
/// weights, computes its own share of the micro-batches, and finishes the step with the
/// sums of every replica.
fn train_replicated<M: Method>(model: &Model, runs: &mut [Run<M>], comm: Option<&dyn Communicator>) -> Result<()> {
    for run in runs.iter_mut().filter(|r| r.is_active()) {
        // Checks passed and the model is loaded: from here on the run is a job.
        run.control.started();
        run.initial_eval(model)?;
    }
    loop {
        let active: Vec<usize> = (0..runs.len()).filter(|&i| runs[i].is_active()).collect();
        if let Some(comm) = comm {
            let run = active.first().map(|&i| &runs[i]);
            data_parallel::lead_step(comm, run.map(|r| (r.step(), r.params())))?;
        }
        if active.is_empty() {
            return Ok(());
        }
        for &i in &active {
            let run = &mut runs[i];
            let step = run.step();
            let _route = model.route_all(&run.name)?;
            let _inference = model.inference();
            run.method.prepare_step(model, step).with_context(|| format!("{}: preparing step {}", run.name, step + 1))?;
        }
        let batches: Vec<Vec<M::Batch>> = active.iter().map(|&i| runs[i].method.step_batches(runs[i].step())).collect::<Result<_>>()?;
        let denominators: Vec<f64> = active.iter().zip(&batches).map(|(&i, b)| runs[i].method.denominator(b).max(f64::MIN_POSITIVE)).collect();
        let mut sums: Vec<_> = active.iter().map(|&i| runs[i].new_sums()).collect();
        let micro_batches = batches.iter().map(Vec::len).max().unwrap_or(0);
        let (rank, world) = comm.map_or((0, 1), |c| (c.rank(), c.world_size()));
        // Data-parallel: this replica's block of the step's micro-batches (all of them alone).
        for m in data_parallel::share(rank, world, micro_batches) {
            // Runs with fewer micro-batches this step (other accumulation) sit this one out.
            let mut members: Vec<Member<'_, M>> = Vec::new();
            for (k, s) in sums.iter_mut().enumerate().filter(|(k, _)| batches[*k].len() > m) {
                let run = &runs[active[k]];
                members.push(Member {
                    name: &run.name,
                    method: &run.method,
                    params: run.params(),
                    dropout_seed: derive_seed(run.cfg.seed, run.step() as u64, m as u64),
                    batch: &batches[k][m],
                    denominator: denominators[k],
                    sums: s,
                });
            }
            micro_batch(model, &mut members)?;
        }
        if let Some(comm) = comm {
            let (Some(own), true) = (sums.pop(), sums.is_empty()) else { anyhow::bail!("data-parallel training takes one run") };
            sums.push(data_parallel::reduce_sums(comm, own, runs[active[0]].params())?);
        }
        for ((k, &i), s) in active.iter().enumerate().zip(sums) {
            runs[i].finish_step(model, s, denominators[k])?;
            if let Some(reason) = runs[i].method.stop_reason().filter(|_| runs[i].is_active()) {
                runs[i].stop_early(model, &reason)?;
            }
        }
        // Asked to stop (the runs' stop token: `jobs` arms it with SIGTERM / SIGINT / Slurm's
        // SIGUSR1): stop between steps, with a checkpoint of the step just finished, so
        // `--resume` continues bit-exactly.
        if let Some(signal) = runs.iter().find_map(|r| r.control.stop_requested()) {
            if let Some(comm) = comm {
                data_parallel::lead_step(comm, None)?;
            }
            let mut checkpoints = Vec::new();
            for run in runs.iter_mut().filter(|r| r.is_active()) {
                checkpoints.extend(run.checkpoint_now(model)?);
            }
            return Err(Stopped { signal, checkpoints }.into());
        }
    }
}

/// One run's part of a micro-batch pass.
struct Member<'a, M: Method> {
    /// The adapter the run's policy rows go through.
    name: &'a str,
    method: &'a M,
    params: &'a [(String, Var)],
    dropout_seed: u64,
    batch: &'a M::Batch,
    /// What the run's summed micro-losses of the whole step are divided by.
    denominator: f64,
    sums: &'a mut StepSums,
}

/// Forward the members' rows as one routed batch, take each member's loss, and add the
/// gradients of one backward pass and the counts to each member's sums.
fn micro_batch<M: Method>(model: &Model, members: &mut [Member<'_, M>]) -> Result<()> {
    let inputs: Vec<Vec<InputRows>> = members.iter().map(|mb| mb.method.inputs(mb.batch)).collect();
    let packed = PackedRows::new(&inputs);
    let routes: Vec<Route> = members
        .iter()
        .zip(&inputs)
        .flat_map(|(mb, rows)| {
            let reference = mb.method.reference_adapter();
            rows.iter().map(move |r| Route {
                rows: r.batch_size,
                adapter: if r.through_adapter { Some(mb.name) } else { reference },
                dropout_seed: Some(mb.dropout_seed),
            })
        })
        .collect();
    let _routing = model.route(&routes)?;
    let hidden = packed.forward(model)?;
    let mut total: Option<Tensor> = None;
    let mut row = 0;
    for (mb, rows) in members.iter_mut().zip(&inputs) {
        let mut own = Vec::with_capacity(rows.len());
        for r in rows {
            own.push(hidden.narrow(0, row, r.batch_size)?.narrow(1, 0, r.seq_len)?);
            row += r.batch_size;
        }
        let loss = mb.method.loss(model, mb.batch, &own).with_context(|| format!("{}: loss", mb.name))?;
        let s = &mut *mb.sums;
        s.loss_sum += loss.sum.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64;
        for (name, v) in loss.metrics {
            *s.metric_sums.entry(name).or_default() += v;
        }
        let counts = mb.method.batch_tokens(mb.batch);
        s.tokens += counts.tokens;
        s.loss_tokens += counts.loss_tokens;
        s.micro_batches += 1;
        let scaled = (loss.sum / mb.denominator)?;
        total = Some(match total {
            None => scaled,
            Some(t) => (t + scaled)?,
        });
    }
    let Some(total) = total else { return Ok(()) };
    let grads = model.backward(&total)?;
    for mb in members.iter_mut() {
        mb.sums.grads.add(&grads, mb.params).with_context(|| format!("{}: gradients", mb.name))?;
    }
    Ok(())
}

/// Train one run (`sft`, `dpo`, `grpo`, ...) and return its summary, or its failure
/// (divergence) as the error.
pub fn train_one<M: Method>(model: &Model, run: Run<M>) -> Result<RunSummary> {
    let mut runs = vec![run];
    train(model, &mut runs)?;
    into_summary(runs.pop().context("the run vanished")?)
}

/// A finished run's summary, or why it has none (divergence, an early stop) as the error.
fn into_summary<M: Method>(run: Run<M>) -> Result<RunSummary> {
    match run.summary {
        Some(summary) => Ok(summary),
        None => anyhow::bail!("{}", run.failure.unwrap_or_else(|| "the run stopped before its last step".into())),
    }
}

/// The rows of several runs' micro-batches as one `[rows, seq_len]` batch, shorter rows
/// padded at the end (segment 0: attention and loss never see the padding, and causal
/// attention keeps a row's real positions independent of what follows them).
struct PackedRows {
    rows: usize,
    seq_len: usize,
    input_ids: Vec<u32>,
    position_ids: Vec<u32>,
    segment_ids: Vec<u32>,
}

impl PackedRows {
    fn new(inputs: &[Vec<InputRows>]) -> Self {
        let all: Vec<&InputRows> = inputs.iter().flatten().collect();
        let seq_len = all.iter().map(|r| r.seq_len).max().unwrap_or(0);
        let rows = all.iter().map(|r| r.batch_size).sum();
        let mut p = PackedRows { rows, seq_len, input_ids: Vec::with_capacity(rows * seq_len), position_ids: Vec::new(), segment_ids: Vec::new() };
        for r in all {
            for b in 0..r.batch_size {
                let span = b * r.seq_len..(b + 1) * r.seq_len;
                let pad = seq_len - r.seq_len;
                let pad_id = r.input_ids[span.clone()].last().copied().unwrap_or(0);
                p.input_ids.extend_from_slice(&r.input_ids[span.clone()]);
                p.input_ids.extend(std::iter::repeat_n(pad_id, pad));
                p.position_ids.extend_from_slice(&r.position_ids[span.clone()]);
                p.position_ids.extend(std::iter::repeat_n(0, pad));
                p.segment_ids.extend_from_slice(&r.segment_ids[span]);
                p.segment_ids.extend(std::iter::repeat_n(0, pad));
            }
        }
        p
    }

    fn forward(&self, model: &Model) -> Result<Tensor> {
        let shape = (self.rows, self.seq_len);
        let dev = model.device();
        let ids = Tensor::from_slice(&self.input_ids, shape, dev)?;
        let pos = Tensor::from_slice(&self.position_ids, shape, dev)?;
        let seg = Tensor::from_slice(&self.segment_ids, shape, dev)?;
        Ok(model.forward_hidden(&ids, &pos, Some(&seg))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(b: usize, t: usize, base: u32) -> InputRows {
        let n = b * t;
        InputRows {
            batch_size: b,
            seq_len: t,
            input_ids: (0..n as u32).map(|i| base + i).collect(),
            position_ids: (0..n).map(|i| (i % t) as u32).collect(),
            segment_ids: vec![1; n],
            through_adapter: true,
        }
    }

    #[test]
    fn packed_rows_pad_shorter_rows_at_the_end_with_segment_zero() {
        let p = PackedRows::new(&[vec![rows(1, 3, 10)], vec![rows(2, 2, 20)]]);
        assert_eq!((p.rows, p.seq_len), (3, 3));
        assert_eq!(p.input_ids, vec![10, 11, 12, 20, 21, 21, 22, 23, 23]);
        assert_eq!(p.segment_ids, vec![1, 1, 1, 1, 1, 0, 1, 1, 0]);
        assert_eq!(p.position_ids, vec![0, 1, 2, 0, 1, 0, 0, 1, 0]);
    }
}
