//! Several evaluators at once. Their scores combine as TRL's GRPOTrainer combines reward
//! functions: the weighted sum of the scores present (`nansum` over rewards_per_func *
//! reward_weights), so an evaluator with no score for a sample is left out of that
//! sample's sum rather than counting as 0. Where no evaluator scored a sample, TRL's
//! nansum gives 0 (with a warning); here the reward is `None`, so the caller can give
//! the sample no advantage (DESIGN.md s6) or fall back to TRL's 0 with `unwrap_or(0.0)`.
use std::collections::BTreeMap;

use anyhow::{bail, Result};

use super::{Context, Evaluator, Sample, Score};

pub struct EvaluatorSet {
    evaluators: Vec<Evaluator>,
    weights: Vec<f64>,
    names: Vec<String>,
}

/// Scores of one batch.
#[derive(Debug, Clone, Default)]
pub struct SetScores {
    /// One list per evaluator (in spec order), one score per sample.
    pub per_evaluator: Vec<Vec<Score>>,
    /// The weighted sum per sample; `None` where no evaluator gave a score.
    pub rewards: Vec<Option<f64>>,
}

/// One weight per evaluator: `weights`, checked, or 1 each.
pub(super) fn weights_for(specs: &[String], weights: Option<&[f64]>) -> Result<Vec<f64>> {
    if specs.is_empty() {
        bail!("no evaluator given (--evaluator SPEC)");
    }
    Ok(match weights {
        None => vec![1.0; specs.len()],
        Some(w) if w.len() != specs.len() => {
            bail!("--reward-weights has {} values for {} evaluators ({}): give one weight per --evaluator", w.len(), specs.len(), specs.join(", "))
        }
        Some(w) => {
            if let Some(bad) = w.iter().find(|x| !x.is_finite()) {
                bail!("--reward-weights: {bad} is not a finite number");
            }
            w.to_vec()
        }
    })
}

impl EvaluatorSet {
    /// `weights` defaults to 1 for each evaluator (as TRL's `reward_weights`).
    pub fn new(specs: &[String], weights: Option<&[f64]>, ctx: &Context) -> Result<Self> {
        let weights = weights_for(specs, weights)?;
        let evaluators = specs.iter().map(|s| Evaluator::new(s, ctx)).collect::<Result<Vec<_>>>()?;
        let names = unique_names(evaluators.iter().map(Evaluator::short_name).collect());
        Ok(EvaluatorSet { evaluators, weights, names })
    }

    pub fn evaluators(&self) -> &[Evaluator] {
        &self.evaluators
    }

    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Metric names, one per evaluator, unique (`numeric`, `numeric_2`, ...), for
    /// `rewards_<name>`.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Scores the batch with every evaluator (the evaluators run side by side, so two
    /// external ones wait on their processes at the same time).
    pub fn score_batch(&self, samples: &[Sample]) -> SetScores {
        let per_evaluator: Vec<Vec<Score>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self.evaluators.iter().map(|e| scope.spawn(move || e.score_batch(samples))).collect();
            handles
                .into_iter()
                .zip(&self.evaluators)
                .map(|(h, e)| {
                    h.join().unwrap_or_else(|_| {
                        tracing::error!("evaluator `{}` panicked on a batch: its samples get no score", e.spec());
                        vec![Score { reason: Some("the evaluator panicked".into()), ..Default::default() }; samples.len()]
                    })
                })
                .collect()
        });
        let rewards = combine(&per_evaluator, &self.weights);
        SetScores { per_evaluator, rewards }
    }

    /// Failures so far: evaluator name -> kind -> count (only evaluators that failed).
    pub fn failures(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.names.iter().zip(&self.evaluators).map(|(n, e)| (n.clone(), e.failures())).filter(|(_, f)| !f.is_empty()).collect()
    }

    /// All failures so far, over evaluators and kinds.
    pub fn failure_count(&self) -> u64 {
        self.evaluators.iter().flat_map(|e| e.failures().into_values()).sum()
    }
}

/// Per sample: the sum over evaluators of weight x score, over the scores present;
/// `None` where none is.
pub fn combine(per_evaluator: &[Vec<Score>], weights: &[f64]) -> Vec<Option<f64>> {
    let n = per_evaluator.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| {
            let present: Vec<f64> = per_evaluator.iter().zip(weights).filter_map(|(scores, w)| scores.get(i)?.score.map(|s| w * s)).collect();
            (!present.is_empty()).then(|| present.iter().sum())
        })
        .collect()
}

/// Mean and standard deviation (n - 1 denominator, torch's default; 0 for one value) of
/// the values present, with their count; `None` when there are none.
pub fn mean_std(values: impl IntoIterator<Item = Option<f64>>) -> Option<(f64, f64, usize)> {
    let xs: Vec<f64> = values.into_iter().flatten().collect();
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let std = if xs.len() < 2 { 0.0 } else { (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() };
    Some((mean, std, xs.len()))
}

fn unique_names(names: Vec<String>) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    names
        .into_iter()
        .map(|n| {
            let count = seen.entry(n.clone()).or_insert(0);
            *count += 1;
            if *count == 1 { n } else { format!("{n}_{count}") }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(x: Option<f64>) -> Score {
        Score { score: x, ..Default::default() }
    }

    #[test]
    fn weighted_sum_skips_missing_scores() {
        let per = vec![vec![s(Some(1.0)), s(None), s(None), s(Some(0.0))], vec![s(Some(0.5)), s(Some(1.0)), s(None), s(Some(1.0))]];
        assert_eq!(combine(&per, &[1.0, 0.5]), vec![Some(1.25), Some(0.5), None, Some(0.5)]);
    }

    #[test]
    fn mean_std_ignores_missing() {
        assert_eq!(mean_std([Some(1.0), None, Some(3.0)]), Some((2.0, 2f64.sqrt(), 2)));
        assert_eq!(mean_std([Some(1.0)]), Some((1.0, 0.0, 1)));
        assert_eq!(mean_std([None]), None);
    }

    #[test]
    fn a_set_weights_counts_and_names() {
        let ctx = Context::new(1, std::time::Duration::from_secs(5));
        let specs = vec!["exact".to_string(), "contains".to_string(), "exact:ci".to_string()];
        let set = EvaluatorSet::new(&specs, Some(&[1.0, 0.5, 2.0]), &ctx).unwrap();
        assert_eq!(set.names(), ["exact", "contains", "exact_2"]);
        let samples = vec![
            Sample { id: "a".into(), completion: "Paris".into(), ground_truth: Some(json!("Paris")), ..Default::default() },
            Sample { id: "b".into(), completion: "It is paris".into(), ground_truth: Some(json!("Paris")), ..Default::default() },
            Sample { id: "c".into(), completion: "Paris".into(), ..Default::default() },
        ];
        let out = set.score_batch(&samples);
        assert_eq!(out.rewards, vec![Some(3.5), Some(0.0), None]);
        assert_eq!(set.failure_count(), 3, "three evaluators found no ground truth on c");
        assert_eq!(set.failures()["exact"]["no_ground_truth"], 1);
    }

    #[test]
    fn weight_count_must_match() {
        let ctx = Context::new(1, std::time::Duration::from_secs(5));
        let err = EvaluatorSet::new(&["exact".to_string()], Some(&[1.0, 2.0]), &ctx).err().unwrap();
        assert!(err.to_string().contains("2 values for 1 evaluators"), "{err}");
        let err = EvaluatorSet::new(&["exact".to_string(), "bleu".to_string()], None, &ctx).err().unwrap();
        assert!(format!("{err:#}").contains("evaluator `bleu`"), "{err:#}");
    }
}
