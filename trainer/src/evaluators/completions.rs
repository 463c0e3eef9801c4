//! Scoring finished completions: reading a JSONL of `{messages, completion, ground_truth,
//! ...}` lines and summarising a scored batch in the shape `eval --evaluator` prints.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::Value;

use super::combine::mean_std;
use super::{EvaluatorSet, Sample, SetScores};

/// One sample per non-blank line: `messages` (the prompt) and `completion` are required;
/// `id` (string or number) defaults to the line number; every other field is kept.
pub fn load_completions(path: &Path) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(line) else {
            bail!("{at}: not a JSON object");
        };
        let messages = match obj.remove("messages") {
            Some(Value::Array(m)) => m,
            _ => bail!("{at}: `messages` (a list of messages) is required"),
        };
        let completion = match obj.remove("completion") {
            Some(Value::String(c)) => c,
            _ => bail!("{at}: `completion` (a string) is required"),
        };
        let id = match obj.remove("id") {
            Some(Value::String(s)) => s,
            Some(Value::Number(n)) => n.to_string(),
            None => (i + 1).to_string(),
            Some(other) => bail!("{at}: `id` must be a string or a number, got {other}"),
        };
        let ground_truth = obj.remove("ground_truth").filter(|v| !v.is_null());
        samples.push(Sample { id, messages, completion, ground_truth, fields: obj });
    }
    if samples.is_empty() {
        bail!("{}: no completions", path.display());
    }
    Ok(samples)
}

/// A scored batch in numbers; `None` means no sample had a reward.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Distinct prompt conversations.
    pub prompts: usize,
    pub samples: usize,
    /// Samples with a reward (the others had no score from any evaluator).
    pub scored: usize,
    pub reward_mean: Option<f64>,
    /// n - 1 denominator.
    pub reward_std: Option<f64>,
    /// Evaluator failures (one per sample and evaluator that gave no score).
    pub failures: u64,
    /// `rewards_<evaluator>`: the mean score of each evaluator over the samples it scored.
    #[serde(flatten)]
    pub per_evaluator: BTreeMap<String, Option<f64>>,
}

impl Summary {
    pub fn of(set: &EvaluatorSet, samples: &[Sample], scores: &SetScores) -> Self {
        let prompts: BTreeSet<String> = samples.iter().map(|s| Value::Array(s.messages.clone()).to_string()).collect();
        let stats = mean_std(scores.rewards.iter().copied());
        let per_evaluator = set
            .names()
            .iter()
            .zip(&scores.per_evaluator)
            .map(|(name, list)| (format!("rewards_{name}"), mean_std(list.iter().map(|s| s.score)).map(|(m, _, _)| m)))
            .collect();
        Summary {
            prompts: prompts.len(),
            samples: samples.len(),
            scored: stats.map_or(0, |(_, _, n)| n),
            reward_mean: stats.map(|(m, _, _)| m),
            reward_std: stats.map(|(_, s, _)| s),
            failures: scores.per_evaluator.iter().flatten().filter(|s| s.score.is_none()).count() as u64,
            per_evaluator,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Context;
    use super::*;
    use std::time::Duration;

    #[test]
    fn completions_load_and_summarise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        let q = r#"[{"role": "user", "content": "17 * 3?"}]"#;
        let lines = [
            format!(r#"{{"messages": {q}, "completion": "It is 51.", "ground_truth": "51", "level": 2}}"#),
            format!(r#"{{"messages": {q}, "completion": "50", "ground_truth": "51"}}"#),
            String::new(),
            r#"{"id": "x", "messages": [{"role": "user", "content": "2+2?"}], "completion": "4"}"#.to_string(),
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let samples = load_completions(&path).unwrap();
        assert_eq!(samples.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["1", "2", "x"]);
        assert_eq!(samples[0].fields["level"], 2);
        let set = EvaluatorSet::new(&["numeric".to_string()], None, &Context::new(1, Duration::from_secs(1))).unwrap();
        let summary = Summary::of(&set, &samples, &set.score_batch(&samples));
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"prompts": 2, "samples": 3, "scored": 2, "reward_mean": 0.5, "reward_std": 0.5f64.sqrt(),
                "failures": 1, "rewards_numeric": 0.5})
        );
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        std::fs::write(&path, "{\"messages\": [], \"completion\": \"a\"}\n{\"messages\": []}\n").unwrap();
        let err = load_completions(&path).unwrap_err().to_string();
        assert!(err.ends_with("c.jsonl:2: `completion` (a string) is required"), "{err}");
    }
}
