//! `lora-train compare`: two answers per prompt (fine-tuned vs baseline), judged by
//! evaluator scores or by a judge model in both orders (`judge.rs`), tallied into wins,
//! losses, ties and a win rate with its Wilson interval (`stats.rs`), reported as
//! `compare.json` + `compare.md` (`report.rs`).
pub mod judge;
pub mod report;
mod run;
pub mod stats;

use std::path::PathBuf;

use serde::Serialize;

pub use judge::Verdict;
pub use run::{compare, CompareOptions, BATCH_SIZE, EXAMPLES, JUDGE_MAX_NEW_TOKENS};

/// The fine-tuned side's result on one prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Win,
    Loss,
    Tie,
}

/// Evaluator scores of both sides (`None`: the evaluators gave no score).
#[derive(Clone, Debug, Serialize)]
pub struct SideScores {
    pub finetuned: Option<f64>,
    pub baseline: Option<f64>,
}

impl SideScores {
    /// Higher wins, equal is a tie; without both scores there is no evidence either way.
    pub fn outcome(&self) -> Outcome {
        match (self.finetuned, self.baseline) {
            (Some(f), Some(b)) if f > b => Outcome::Win,
            (Some(f), Some(b)) if f < b => Outcome::Loss,
            _ => Outcome::Tie,
        }
    }
}

/// The judge's reply and verdict for one ordering.
#[derive(Clone, Debug, Serialize)]
pub struct Judged {
    pub reply: String,
    pub verdict: Verdict,
}

/// Both orderings: the fine-tuned answer as A, then as B.
#[derive(Clone, Debug, Serialize)]
pub struct JudgeRecord {
    pub finetuned_first: Judged,
    pub baseline_first: Judged,
}

#[derive(Clone, Debug, Serialize)]
pub struct Example {
    /// 1-based line of the prompt in the dataset.
    pub line: usize,
    pub prompt: String,
    pub finetuned: String,
    pub baseline: String,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scores: Option<SideScores>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeRecord>,
}

/// What `compare --json` prints and `compare.json` holds under "summary".
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub output: PathBuf,
    pub finetuned: String,
    pub baseline: String,
    /// `evaluator: SPEC, ...` or `judge: MODEL[+ADAPTER]`.
    pub judged_by: String,
    pub n: usize,
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
    /// (wins + ties / 2) / n.
    pub win_rate: f64,
    /// Wilson 95% interval of the win rate.
    pub ci95: [f64; 2],
    /// Evaluator judging: prompts where a side got no score (counted as ties).
    pub unscored: usize,
    /// Judge model: replies with no verdict found (each makes its prompt a tie).
    pub unparsed: usize,
    /// Judge model: prompts where the two orders disagreed (position bias; ties).
    pub order_disagreements: usize,
}

impl Summary {
    pub fn tally(output: PathBuf, finetuned: String, baseline: String, judged_by: String, examples: &[Example]) -> Self {
        let count = |o: Outcome| examples.iter().filter(|e| e.outcome == o).count();
        let (wins, losses, ties) = (count(Outcome::Win), count(Outcome::Loss), count(Outcome::Tie));
        let n = examples.len();
        let win_rate = if n == 0 { 0.0 } else { (wins as f64 + ties as f64 / 2.0) / n as f64 };
        let (lo, hi) = stats::wilson(win_rate, n);
        let unscored = examples.iter().filter(|e| e.scores.as_ref().is_some_and(|s| s.finetuned.is_none() || s.baseline.is_none())).count();
        let judged: Vec<&JudgeRecord> = examples.iter().filter_map(|e| e.judge.as_ref()).collect();
        let unparsed = judged.iter().flat_map(|j| [j.finetuned_first.verdict, j.baseline_first.verdict]).filter(|v| *v == Verdict::Unparsed).count();
        let order_disagreements = judged
            .iter()
            .filter(|j| {
                let (a, b) = (j.finetuned_first.verdict, j.baseline_first.verdict);
                // Agreement: A then B (win), B then A (loss), tie both times.
                !matches!((a, b), (Verdict::A, Verdict::B) | (Verdict::B, Verdict::A) | (Verdict::Tie, Verdict::Tie))
            })
            .count();
        Summary { output, finetuned, baseline, judged_by, n, wins, losses, ties, win_rate, ci95: [lo, hi], unscored, unparsed, order_disagreements }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(outcome: Outcome) -> Example {
        Example { line: 1, prompt: String::new(), finetuned: String::new(), baseline: String::new(), outcome, scores: None, judge: None }
    }

    #[test]
    fn tally_counts_and_rate() {
        let examples = vec![ex(Outcome::Win), ex(Outcome::Win), ex(Outcome::Loss), ex(Outcome::Tie)];
        let s = Summary::tally(PathBuf::new(), "f".into(), "b".into(), "x".into(), &examples);
        assert_eq!((s.n, s.wins, s.losses, s.ties), (4, 2, 1, 1));
        assert!((s.win_rate - 0.625).abs() < 1e-12);
        assert!(s.ci95[0] < 0.625 && 0.625 < s.ci95[1]);
    }

    #[test]
    fn scores_decide_by_strictly_higher() {
        let s = |f, b| SideScores { finetuned: f, baseline: b }.outcome();
        assert_eq!(s(Some(1.0), Some(0.0)), Outcome::Win);
        assert_eq!(s(Some(0.0), Some(0.5)), Outcome::Loss);
        assert_eq!(s(Some(0.5), Some(0.5)), Outcome::Tie);
        assert_eq!(s(None, Some(0.5)), Outcome::Tie);
    }
}
