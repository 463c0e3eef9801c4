//! Evaluators: score a completion in [0, 1] (DESIGN.md s6). One spec syntax everywhere
//! (`spec.rs`): built-ins (`builtin.rs`, `schema.rs`), external processes speaking JSON
//! lines (`pool.rs`), Python functions through a shipped shim (`python.rs`), several at
//! once with weights (`combine.rs`), the shared command-line flags (`args.rs`), and
//! scoring a file of finished completions (`completions.rs`).
//!
//! An evaluator never stops a run: a crash, hang or garbage reply costs that sample its
//! score (`None`), is counted by kind and logged once per kind.
mod args;
mod builtin;
mod combine;
mod completions;
mod pool;
mod python;
mod schema;
mod spec;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::{Map, Value};

pub use args::EvaluatorArgs;
pub use combine::{combine, mean_std, EvaluatorSet, SetScores};
pub use completions::{load_completions, Summary};
pub use spec::{parse_spec, Spec};

/// One completion to score.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Echoed by external evaluators; unique within one `score_batch` call is enough.
    pub id: String,
    /// The prompt conversation (OpenAI-form message objects), without the completion.
    pub messages: Vec<Value>,
    /// The generated answer.
    pub completion: String,
    /// `ground_truth` of the dataset line: a string or a list of strings (any may match).
    pub ground_truth: Option<Value>,
    /// The line's other fields, handed to external evaluators as they are.
    pub fields: Map<String, Value>,
}

/// The score of one sample by one evaluator.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Score {
    /// In [0, 1]; `None` = no reward (crash, timeout, garbage reply, evaluator error).
    pub score: Option<f64>,
    pub reason: Option<String>,
    pub metrics: BTreeMap<String, f64>,
}

impl Score {
    pub fn of(score: f64) -> Self {
        Score { score: Some(score), ..Default::default() }
    }
    pub fn pass(ok: bool, why_not: impl FnOnce() -> String) -> Self {
        Score { score: Some(if ok { 1.0 } else { 0.0 }), reason: (!ok).then(why_not), metrics: BTreeMap::new() }
    }
    fn with_metric(mut self, name: &str, value: f64) -> Self {
        self.metrics.insert(name.to_string(), value);
        self
    }
}

/// Why a sample got no score; the counters are kept per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureKind {
    /// The external process exited (or its pipe broke) before replying.
    Crash,
    /// No reply within `--evaluator-timeout`.
    Timeout,
    /// A reply that is not JSON, names another id, or lacks a numeric `score`.
    Garbage,
    /// The evaluator answered `"score": null` (for `py:`, the function raised or returned None).
    NoScore,
    /// The sample has no `ground_truth` and the evaluator needs one.
    NoGroundTruth,
    /// The external process could not be started.
    Spawn,
}

impl FailureKind {
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Crash => "crash",
            FailureKind::Timeout => "timeout",
            FailureKind::Garbage => "garbage",
            FailureKind::NoScore => "no_score",
            FailureKind::NoGroundTruth => "no_ground_truth",
            FailureKind::Spawn => "spawn",
        }
    }
}

/// A sample's score, or why it has none (`detail` is logged the first time a kind occurs).
pub(crate) enum Outcome {
    Scored(Score),
    Failed { kind: FailureKind, detail: String, reason: Option<String> },
}

impl Outcome {
    fn failed(kind: FailureKind, detail: impl Into<String>) -> Self {
        Outcome::Failed { kind, detail: detail.into(), reason: None }
    }
}

/// What the caller knows that some evaluators need.
#[derive(Clone, Default)]
pub struct Context {
    /// Every label named by the dataset's ground truths (for `label`).
    pub labels: Vec<String>,
    /// Counts a completion's tokens with the run's tokenizer (for `length`).
    pub count_tokens: Option<Arc<dyn Fn(&str) -> usize + Send + Sync>>,
    /// Processes per external evaluator.
    pub workers: usize,
    /// Per request, for external evaluators.
    pub timeout: Duration,
}

impl Context {
    pub fn new(workers: usize, timeout: Duration) -> Self {
        Context { workers, timeout, ..Default::default() }
    }
}

enum Kind {
    Builtin(builtin::Builtin),
    External(pool::Pool),
}

/// One evaluator built from a spec, with its failure counters.
pub struct Evaluator {
    spec: String,
    kind: Kind,
    failures: Mutex<BTreeMap<FailureKind, u64>>,
    clamp_warned: AtomicBool,
}

impl Evaluator {
    /// Builds the evaluator a spec names; errors (unknown kind, bad pattern, missing file)
    /// name the spec.
    pub fn new(spec: &str, ctx: &Context) -> Result<Self> {
        let build = || -> Result<Kind> {
            Ok(match parse_spec(spec)? {
                Spec::Cmd(command) => Kind::External(pool::Pool::new(pool::Launch::shell(&command), ctx.workers, ctx.timeout)?),
                Spec::Py { file, function } => {
                    Kind::External(pool::Pool::new(python::launch(&file, &function)?, ctx.workers, ctx.timeout)?)
                }
                other => Kind::Builtin(builtin::Builtin::new(other, ctx)?),
            })
        };
        let kind = build().with_context(|| format!("evaluator `{spec}`"))?;
        Ok(Evaluator { spec: spec.to_string(), kind, failures: Mutex::new(BTreeMap::new()), clamp_warned: AtomicBool::new(false) })
    }

    /// The spec as given.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// A short name for metrics (`rewards_<name>`): the kind, or the function for `py:`
    /// (TRL names its reward metrics after the function).
    pub fn short_name(&self) -> String {
        match parse_spec(&self.spec) {
            Ok(Spec::Py { function, .. }) => function,
            _ => self.spec.split(':').next().unwrap_or("evaluator").replace('-', "_"),
        }
    }

    /// Scores every sample; never fails: a sample the evaluator could not score gets `None`.
    pub fn score_batch(&self, samples: &[Sample]) -> Vec<Score> {
        let outcomes = match &self.kind {
            Kind::Builtin(b) => samples.iter().map(|s| b.score(s)).collect(),
            Kind::External(p) => p.score_batch(samples),
        };
        outcomes.into_iter().zip(samples).map(|(o, s)| self.settle(o, s)).collect()
    }

    /// Samples without a score so far, by kind (`crash`, `timeout`, `garbage`, ...).
    pub fn failures(&self) -> BTreeMap<String, u64> {
        let counts = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(k, n)| (k.name().to_string(), *n)).collect()
    }

    /// Counts and logs failures, clamps scores into [0, 1].
    fn settle(&self, outcome: Outcome, sample: &Sample) -> Score {
        match outcome {
            Outcome::Scored(mut score) => {
                if let Some(v) = score.score {
                    if !(0.0..=1.0).contains(&v) {
                        if !self.clamp_warned.swap(true, Ordering::Relaxed) {
                            tracing::warn!("evaluator `{}` scored {v} (sample {}): scores are clamped to [0, 1]", self.spec, sample.id);
                        }
                        score.score = Some(v.clamp(0.0, 1.0));
                    }
                }
                score
            }
            Outcome::Failed { kind, detail, reason } => {
                let first = {
                    let mut counts = self.failures.lock().unwrap_or_else(|e| e.into_inner());
                    let n = counts.entry(kind).or_insert(0);
                    *n += 1;
                    *n == 1
                };
                if first {
                    tracing::warn!(
                        "evaluator `{}`: {} on sample {}: {detail} (the sample gets no reward; later {} failures are only counted)",
                        self.spec,
                        kind.name(),
                        sample.id,
                        kind.name()
                    );
                }
                Score { score: None, reason: Some(reason.unwrap_or(detail)), metrics: BTreeMap::new() }
            }
        }
    }
}

/// The sample's ground truths as strings: a string is one, a list is each string in it
/// (numbers are accepted as their JSON text).
pub(crate) fn ground_truths(sample: &Sample) -> Option<Vec<String>> {
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    let truths: Vec<String> = match sample.ground_truth.as_ref()? {
        Value::Array(items) => items.iter().filter_map(text).collect(),
        other => text(other).into_iter().collect(),
    };
    (!truths.is_empty()).then_some(truths)
}
