//! What a training method (SFT, DPO, ORPO, GRPO) tells the engine, and nothing more:
//! its micro-batches, the token rows they put through the model, its loss on the hidden
//! states of those rows, and its evaluation. Everything else (optimizer, schedule,
//! clipping, accumulation, checkpoints, metrics, reports) is the engine's.
use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::Tensor;
use lora_models::Model;

use crate::report::ReportSpec;

/// Token rows of one micro-batch, row-major `[batch_size, seq_len]`.
#[derive(Clone, Debug, PartialEq)]
pub struct InputRows {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// Rotary positions (restart at 0 for each packed sample).
    pub position_ids: Vec<u32>,
    /// 0 = padding; attention stays within a run of equal ids.
    pub segment_ids: Vec<u32>,
    /// Through the run's adapter (the policy), or through the frozen base alone (a
    /// reference model sharing the base GEMM with the policy rows).
    pub through_adapter: bool,
}

/// A method's loss on one micro-batch.
pub struct MicroLoss {
    /// Scalar f32 with the autograd graph attached: the SUM over the micro-batch of what
    /// the method's loss adds up. The engine divides by [`Method::denominator`] of the
    /// whole accumulated step, so accumulation never changes the update.
    pub sum: Tensor,
    /// Method-specific numbers for `metrics.jsonl` (e.g. DPO's `rewards_margin`),
    /// averaged over the micro-batches of the step.
    pub metrics: BTreeMap<String, f64>,
}

/// The outcome of an evaluation pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalOutput {
    /// What the winner of a sweep is chosen by (lower is better).
    pub loss: f64,
    pub perplexity: Option<f64>,
    pub tokens: u64,
    /// Extra numbers, written as `eval_<name>` in `metrics.jsonl`.
    pub metrics: BTreeMap<String, f64>,
}

/// Counts of one micro-batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchTokens {
    /// Non-padding tokens.
    pub tokens: usize,
    /// Tokens the loss counts.
    pub loss_tokens: usize,
}

/// Where optimizer step `step` (0-based) reads its micro-batches: the epoch and the
/// loader positions in it. An epoch is ceil(batches / accumulation) steps; its last step
/// may take fewer micro-batches.
pub fn step_positions(step: usize, batches_per_epoch: usize, accumulation: usize) -> (u64, std::ops::Range<usize>) {
    let steps_per_epoch = batches_per_epoch.div_ceil(accumulation).max(1);
    let first = (step % steps_per_epoch) * accumulation;
    ((step / steps_per_epoch) as u64, first..(first + accumulation).min(batches_per_epoch))
}

pub trait Method {
    type Batch;

    /// The command that runs this method (`sft`, ...), written to `run.json`.
    fn name(&self) -> &'static str;
    /// The method's own options (not in `TrainConfig`: DPO's beta and loss, GRPO's
    /// generations and evaluators), written to `run.json` and required to be equal on
    /// `--resume` ([`super::prepare_run_dir`]). Default: none.
    fn options(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Training samples and held-out samples (for the summary).
    fn sample_counts(&self) -> (usize, usize);
    /// Optimizer steps per pass over the training data.
    fn steps_per_epoch(&self) -> usize;
    /// Model work that must happen before the step's micro-batches exist (GRPO samples
    /// its rollouts here). The engine calls it once per optimizer step, before
    /// [`Method::step_batches`], with every row routed through the run's adapter and
    /// inference mode on (no graph, no dropout). What it computes must be a pure function
    /// of the step and the adapter's weights, so a resumed run stays bit-identical.
    fn prepare_step(&mut self, _model: &Model, _step: usize) -> Result<()> {
        Ok(())
    }
    /// Why the run should end after the step just finished though steps remain (GRPO's
    /// `--stop-on-no-signal`); None = go on. The engine checkpoints that step and marks
    /// the run `stopped` with this reason.
    fn stop_reason(&self) -> Option<String> {
        None
    }
    /// Numbers of the whole optimizer step for its `metrics.jsonl` row (rollout
    /// statistics, the time split), asked once after the update.
    fn step_metrics(&mut self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    /// The micro-batches of optimizer step `step` (0-based): a pure function of the step,
    /// which is what makes a resumed run bit-identical.
    fn step_batches(&self, step: usize) -> Result<Vec<Self::Batch>>;
    /// The rows `batch` puts through the model, in the order `loss` receives them.
    fn inputs(&self, batch: &Self::Batch) -> Vec<InputRows>;
    fn batch_tokens(&self, batch: &Self::Batch) -> BatchTokens;
    /// What the summed micro-losses of one optimizer step are divided by (SFT: the loss
    /// tokens of all its micro-batches; DPO: its pairs).
    fn denominator(&self, batches: &[Self::Batch]) -> f64;
    /// The loss of `batch` from the hidden states of its rows (`hidden[i]` is
    /// `[rows_i, seq_len_i, hidden]` for `inputs(batch)[i]`).
    fn loss(&self, model: &Model, batch: &Self::Batch, hidden: &[Tensor]) -> Result<MicroLoss>;
    /// The adapter that rows with `through_adapter: false` go through: None = the frozen
    /// base alone (DPO's reference from a fresh adapter), or a frozen adapter the method
    /// added (DPO continuing from an SFT adapter keeps a copy of it as the reference).
    fn reference_adapter(&self) -> Option<&str> {
        None
    }
    /// What the method's report, progress line and summary show: its headline number,
    /// its quantities and charts (`metrics.jsonl` keys), its warnings. The default is the
    /// loss alone, so a new method brings its own report by overriding this.
    fn report_spec(&self) -> ReportSpec {
        ReportSpec::loss_only()
    }
    /// Evaluate the model as routed now (the engine routes every row through the run's
    /// adapter and turns inference mode on); None when there is no held-out data.
    fn evaluate(&self, model: &Model) -> Result<Option<EvalOutput>>;
    /// The largest micro-batch forward this method makes, as (rows, tokens per row), for
    /// the memory check before the first step. Default: the largest of the first epoch's
    /// micro-batches. A method whose batches need the model first (GRPO's rollouts)
    /// gives a bound from its configuration instead.
    fn largest_micro_batch(&self) -> Result<(usize, usize)> {
        let mut largest = (0, 0);
        for step in 0..self.steps_per_epoch() {
            for batch in self.step_batches(step)? {
                let rows = self.inputs(&batch);
                let n: usize = rows.iter().map(|r| r.batch_size).sum();
                let len = rows.iter().map(|r| r.seq_len).max().unwrap_or(0);
                if n * len > largest.0 * largest.1 {
                    largest = (n, len);
                }
            }
        }
        Ok(largest)
    }
}
