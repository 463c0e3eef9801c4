//! `grpo --preview N`: the learning signal of a run before paying for it. Samples N of
//! the first epoch's prompts x G completions from the starting policy (the fresh
//! adapter, exactly as the run's first steps would, same seeds), scores them with the
//! run's evaluators, and reports the reward distribution, the groups with zero reward
//! variance (they teach nothing), a few scored completions per reward bucket, and the
//! evaluators' failures. Nothing is written.
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Serialize;

use super::rollouts::{self, CycleInputs};
use super::{load, signal, GrpoOptions, Loaded};
use crate::config::TrainConfig;
use crate::evaluators::{mean_std, EvaluatorArgs};

/// Completions shown per reward bucket, and evaluator failures shown in all.
const EXAMPLES_PER_BUCKET: usize = 2;
const FAILURE_EXAMPLES: usize = 5;
/// Up to this many distinct rewards get a bucket each; more are binned.
const DISTINCT_BUCKETS: usize = 6;
const BINS: usize = 5;
/// Characters of a completion shown in the text report.
const SHOWN_CHARS: usize = 240;

#[derive(Debug, Serialize)]
pub struct Preview {
    pub prompts: usize,
    pub num_generations: usize,
    pub evaluators: Vec<String>,
    pub rollout_s: f64,
    pub scoring_s: f64,
    /// Mean, std, min and max over the scored completions.
    pub reward: Option<RewardStats>,
    pub unscored: usize,
    pub buckets: Vec<Bucket>,
    pub groups: usize,
    /// Groups whose rewards are all equal (or fewer than two): advantage 0 for all.
    pub groups_without_signal: usize,
    /// TRL's `frac_reward_zero_std` (share of completions in zero-std groups).
    pub frac_reward_zero_std: f64,
    /// Samples without a score, by evaluator and kind (`crash`, `timeout`, ...).
    pub failures: BTreeMap<String, BTreeMap<String, u64>>,
    pub failure_examples: Vec<FailureExample>,
    /// What to change, when no group has signal.
    pub advice: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RewardStats {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub scored: usize,
}

#[derive(Debug, Serialize)]
pub struct Bucket {
    /// `1.000`, `[0.200, 0.400)`, or `no reward`.
    pub label: String,
    pub count: usize,
    pub examples: Vec<Example>,
}

#[derive(Debug, Serialize)]
pub struct Example {
    /// Index of the prompt in the training prompts.
    pub prompt: usize,
    pub g: usize,
    pub reward: Option<f64>,
    pub tokens: usize,
    pub stopped: bool,
    pub completion: String,
}

#[derive(Debug, Serialize)]
pub struct FailureExample {
    pub evaluator: String,
    pub prompt: usize,
    pub g: usize,
    pub reason: String,
}

/// Sample and score N prompts x G completions as the run's first steps would.
pub fn preview(cfg: &TrainConfig, grpo: &GrpoOptions, eval_args: &EvaluatorArgs, n: usize) -> Result<Preview> {
    grpo.validate()?;
    eval_args.check()?;
    if n == 0 {
        bail!("--preview needs at least 1 prompt");
    }
    let Loaded { mut model, bundle, train, evaluators, .. } = load(cfg, eval_args)?;
    if n > train.len() {
        tracing::warn!("--preview {n}: the training set has {} prompts; previewing all of them", train.len());
    }
    let chosen: Vec<usize> = rollouts::epoch_order(train.len(), cfg.seed, 0).into_iter().take(n).collect();
    // The run's starting policy: its fresh adapter (same seed), so these are the completions step 1 samples.
    let name = lora_models::DEFAULT_ADAPTER;
    model.add_adapter(name, &cfg.lora_config(), cfg.seed)?;
    let _route = model.route_all(name)?;
    let params = grpo.rollout_params();
    let inputs = CycleInputs {
        model: &model,
        bundle: &bundle,
        prompts: &train,
        evaluators: &evaluators,
        params: &params,
        scale_rewards: grpo.scale_rewards,
        seed: cfg.seed,
        chunk: grpo.prompts_per_step,
    };
    let (cycle, scores) = rollouts::run_cycle_scored(&inputs, 0, &chosen)?;

    let rewards: Vec<Option<f64>> = cycle.rollouts.iter().map(|r| r.reward).collect();
    let examples: Vec<Example> = cycle
        .rollouts
        .iter()
        .map(|r| Example { prompt: r.prompt, g: r.g, reward: r.reward, tokens: r.tokens.len(), stopped: r.stopped, completion: r.text.clone() })
        .collect();
    let mut failure_examples = Vec::new();
    for (name, list) in evaluators.names().iter().zip(&scores.per_evaluator) {
        for (score, r) in list.iter().zip(&cycle.rollouts) {
            if score.score.is_none() && failure_examples.len() < FAILURE_EXAMPLES {
                let reason = score.reason.clone().unwrap_or_else(|| "no score".to_string());
                failure_examples.push(FailureExample { evaluator: name.clone(), prompt: r.prompt, g: r.g, reason });
            }
        }
    }
    let scored: Vec<f64> = rewards.iter().flatten().copied().collect();
    let reward = mean_std(rewards.iter().copied()).map(|(mean, std, count)| RewardStats {
        mean,
        std,
        min: scored.iter().copied().fold(f64::INFINITY, f64::min),
        max: scored.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        scored: count,
    });
    let no_signal = cycle.groups > 0 && cycle.groups_without_signal == cycle.groups;
    Ok(Preview {
        prompts: chosen.len(),
        num_generations: grpo.num_generations,
        evaluators: eval_args.evaluators.clone(),
        rollout_s: cycle.metrics.get("time_rollout_s").copied().unwrap_or(0.0),
        scoring_s: cycle.metrics.get("time_scoring_s").copied().unwrap_or(0.0),
        reward,
        unscored: rewards.len() - scored.len(),
        buckets: buckets(examples),
        groups: cycle.groups,
        groups_without_signal: cycle.groups_without_signal,
        frac_reward_zero_std: cycle.metrics.get("frac_reward_zero_std").copied().unwrap_or(0.0),
        failures: evaluators.failures(),
        failure_examples,
        advice: no_signal.then(|| signal::advice(grpo.num_generations, grpo.temperature)),
    })
}

/// The completions by reward: one bucket per distinct reward when there are few, else
/// equal-width bins over [min, max]; completions without a reward last.
fn buckets(examples: Vec<Example>) -> Vec<Bucket> {
    let mut values: Vec<f64> = examples.iter().filter_map(|e| e.reward).collect();
    values.sort_by(f64::total_cmp);
    values.dedup_by(|a, b| (*a - *b).abs() <= 1e-9);
    let (lo, hi) = (values.first().copied().unwrap_or(0.0), values.last().copied().unwrap_or(0.0));
    let binned = values.len() > DISTINCT_BUCKETS;
    let width = (hi - lo) / BINS as f64;
    let bucket_of = |r: f64| -> usize {
        if binned {
            (((r - lo) / width) as usize).min(BINS - 1)
        } else {
            values.iter().position(|v| (v - r).abs() <= 1e-9).unwrap_or(0)
        }
    };
    let mut out: Vec<Bucket> = if binned {
        (0..BINS)
            .map(|b| {
                let (a, z) = (lo + width * b as f64, lo + width * (b + 1) as f64);
                let close = if b + 1 == BINS { "]" } else { ")" };
                Bucket { label: format!("[{a:.3}, {z:.3}{close}"), count: 0, examples: vec![] }
            })
            .collect()
    } else {
        values.iter().map(|v| Bucket { label: format!("{v:.3}"), count: 0, examples: vec![] }).collect()
    };
    let mut unscored = Bucket { label: "no reward".to_string(), count: 0, examples: vec![] };
    for e in examples {
        let bucket = match e.reward {
            Some(r) => &mut out[bucket_of(r)],
            None => &mut unscored,
        };
        bucket.count += 1;
        if bucket.examples.len() < EXAMPLES_PER_BUCKET {
            bucket.examples.push(e);
        }
    }
    out.retain(|b| b.count > 0);
    if unscored.count > 0 {
        out.push(unscored);
    }
    out
}

/// The preview as text for a terminal.
pub fn render(p: &Preview) -> String {
    let mut s = format!(
        "GRPO preview: {} prompts x {} completions from the starting policy, scored by {} ({:.1} s sampling, {:.1} s scoring)\n\n",
        p.prompts,
        p.num_generations,
        p.evaluators.join(", "),
        p.rollout_s,
        p.scoring_s
    );
    match &p.reward {
        Some(r) => {
            s += &format!(
                "reward: mean {:.3}, std {:.3}, min {:.3}, max {:.3} ({} scored, {} without a reward)\n",
                r.mean, r.std, r.min, r.max, r.scored, p.unscored
            )
        }
        None => s += &format!("reward: none of the {} completions got a reward\n", p.unscored),
    }
    let total: usize = p.buckets.iter().map(|b| b.count).sum();
    for b in &p.buckets {
        let bar = "#".repeat((40 * b.count).div_ceil(total.max(1)));
        s += &format!("  {:>16}  {bar} {}\n", b.label, b.count);
    }
    let share = 100.0 * p.groups_without_signal as f64 / p.groups.max(1) as f64;
    s += &format!(
        "\ngroups with zero reward variance: {} of {} ({share:.0}%): their completions all get advantage 0 and teach nothing\n",
        p.groups_without_signal, p.groups
    );
    if let Some(advice) = &p.advice {
        s += &format!("  no group has a learning signal. Try {advice}\n");
    }
    s += "\ncompletions by reward:\n";
    for b in &p.buckets {
        s += &format!("  {} ({}):\n", b.label, b.count);
        for e in &b.examples {
            let mut text: String = e.completion.chars().take(SHOWN_CHARS).collect();
            if e.completion.chars().count() > SHOWN_CHARS {
                text.push_str("...");
            }
            let end = if e.stopped { "stopped" } else { "truncated" };
            s += &format!("    prompt {} #{}: {:?} ({} tokens, {end})\n", e.prompt, e.g, text, e.tokens);
        }
    }
    let failed: u64 = p.failures.values().flat_map(|m| m.values()).sum();
    if failed == 0 {
        s += "\nevaluator failures: none\n";
    } else {
        s += &format!("\nevaluator failures: {failed}\n");
        for (evaluator, kinds) in p.failures.iter().filter(|(_, k)| !k.is_empty()) {
            let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
            s += &format!("  {evaluator}: {}\n", list.join(", "));
        }
        for f in &p.failure_examples {
            s += &format!("  {} on prompt {} #{}: {}\n", f.evaluator, f.prompt, f.g, f.reason);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(reward: Option<f64>) -> Example {
        Example { prompt: 0, g: 0, reward, tokens: 1, stopped: true, completion: String::new() }
    }

    #[test]
    fn few_distinct_rewards_get_a_bucket_each_many_are_binned() {
        let b = buckets(vec![ex(Some(1.0)), ex(Some(0.0)), ex(Some(1.0)), ex(None), ex(Some(1.0))]);
        let labels: Vec<(&str, usize, usize)> = b.iter().map(|b| (b.label.as_str(), b.count, b.examples.len())).collect();
        assert_eq!(labels, vec![("0.000", 1, 1), ("1.000", 3, 2), ("no reward", 1, 1)]);
        let many = buckets((0..10).map(|i| ex(Some(i as f64 / 9.0))).collect());
        assert_eq!(many.len(), BINS);
        assert_eq!(many.iter().map(|b| b.count).sum::<usize>(), 10);
        assert_eq!(many.last().unwrap().label, "[0.800, 1.000]");
    }
}
