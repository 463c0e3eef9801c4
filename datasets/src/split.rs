//! Deterministic held-out splits and subsamples. All functions work on indices so the
//! caller can apply them to any per-sample vector; `Dataset::select` applies them.
use std::collections::BTreeMap;

use crate::rng::SplitMix64;
use crate::sample::Dataset;

/// Held-out fraction when no eval file is given.
pub const DEFAULT_EVAL_FRACTION: f64 = 0.2;
/// What the sweep trains candidates on: 1,000 samples drawn with seed 42.
pub const SWEEP_SUBSAMPLE: usize = 1000;
pub const SWEEP_SEED: u64 = 42;

/// Sample indices of a train / eval split, each sorted ascending (file order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub eval: Vec<usize>,
}

/// How many of `n` go to eval: round(n * fraction), but at least one on each side when
/// n >= 2 and 0 < fraction < 1 (a 0-sample eval set would silently disable eval).
fn eval_count(n: usize, fraction: f64) -> usize {
    if n == 0 || fraction <= 0.0 {
        return 0;
    }
    if fraction >= 1.0 {
        return n;
    }
    let k = (n as f64 * fraction).round() as usize;
    if n >= 2 {
        k.clamp(1, n - 1)
    } else {
        k.min(n)
    }
}

/// A random held-out split of `n` samples.
pub fn split_eval(n: usize, eval_fraction: f64, seed: u64) -> Split {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::derived(seed, 0x5eed_0001).shuffle(&mut order);
    let k = eval_count(n, eval_fraction);
    let mut eval = order[..k].to_vec();
    let mut train = order[k..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    Split { train, eval }
}

/// `k` of `n` indices drawn without replacement (all of them when k >= n), sorted.
pub fn subsample(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if k < n {
        SplitMix64::derived(seed, 0x5eed_0002).shuffle(&mut order);
        order.truncate(k);
        order.sort_unstable();
    }
    order
}

/// A held-out split that keeps each label's share: every label group is shuffled and
/// round(size * fraction) of it held out (a label seen once stays in train). Samples
/// without a label form their own group.
pub fn stratified_split(labels: &[Option<String>], eval_fraction: f64, seed: u64) -> Split {
    let mut groups: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for (i, label) in labels.iter().enumerate() {
        groups.entry(label.as_deref()).or_default().push(i);
    }
    let mut rng = SplitMix64::derived(seed, 0x5eed_0003);
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (_, mut members) in groups {
        rng.shuffle(&mut members);
        let k = if members.len() < 2 { 0 } else { eval_count(members.len(), eval_fraction) };
        eval.extend_from_slice(&members[..k]);
        train.extend_from_slice(&members[k..]);
    }
    train.sort_unstable();
    eval.sort_unstable();
    Split { train, eval }
}

/// Labels are worth stratifying on when they look like classes: every sample has one,
/// and there are few distinct values (at most 100, and at most half the samples).
pub fn labels_are_categorical(labels: &[Option<String>]) -> bool {
    if labels.is_empty() || labels.iter().any(Option::is_none) {
        return false;
    }
    let distinct: std::collections::HashSet<&str> = labels.iter().flatten().map(String::as_str).collect();
    distinct.len() <= 100 && distinct.len() * 2 <= labels.len()
}

impl Dataset {
    /// Train / eval datasets: stratified by label when the labels look categorical,
    /// random otherwise.
    pub fn split_eval(&self, eval_fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let labels = self.labels();
        let split = if labels_are_categorical(&labels) {
            stratified_split(&labels, eval_fraction, seed)
        } else {
            split_eval(self.len(), eval_fraction, seed)
        };
        (self.select(&split.train), self.select(&split.eval))
    }

    pub fn subsample(&self, k: usize, seed: u64) -> Dataset {
        self.select(&subsample(self.len(), k, seed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_a_deterministic_partition() {
        let a = split_eval(100, 0.2, 7);
        assert_eq!(a, split_eval(100, 0.2, 7));
        assert_ne!(a, split_eval(100, 0.2, 8));
        assert_eq!(a.eval.len(), 20);
        let mut all: Vec<usize> = a.train.iter().chain(&a.eval).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(split_eval(3, 0.01, 1).eval.len(), 1, "never an empty eval set");
        assert_eq!(split_eval(1, 0.2, 1).eval.len(), 0);
    }

    #[test]
    fn subsample_draws_without_replacement() {
        let s = subsample(5000, SWEEP_SUBSAMPLE, SWEEP_SEED);
        assert_eq!(s.len(), 1000);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s, subsample(5000, 1000, 42));
        assert_eq!(subsample(10, 50, 1), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn stratified_split_keeps_label_shares() {
        let labels: Vec<Option<String>> =
            (0..1000).map(|i| Some(if i % 10 == 0 { "rare" } else { "common" }.to_string())).collect();
        let split = stratified_split(&labels, 0.2, 3);
        let rare_eval = split.eval.iter().filter(|&&i| i % 10 == 0).count();
        assert_eq!(rare_eval, 20);
        assert_eq!(split.eval.len(), 200);
        assert!(labels_are_categorical(&labels));
    }
}
