//! One rollout batch: which prompts a step uses, their sampled completions, the rewards
//! the evaluators give them, the advantages, and the numbers logged about them.
use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use lora_models::rng::{mix64, splitmix64, GOLDEN_GAMMA};
use lora_models::{Model, RolloutParams, TokenizerBundle};
use serde::{Deserialize, Serialize};

use super::advantages::{advantages, ScaleRewards};
use super::prompts::Prompt;
use crate::evaluators::{mean_std, EvaluatorSet, SetScores};

/// One completion with what training needs of it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Rollout {
    /// Index into the training prompts.
    pub prompt: usize,
    pub g: usize,
    /// Sampled tokens, the stop token included when it stopped.
    pub tokens: Vec<u32>,
    /// Rollout-time log-probs (the old policy when one batch serves several steps).
    pub logprobs: Vec<f32>,
    pub stopped: bool,
    pub reward: Option<f64>,
    pub advantage: f64,
    pub text: String,
    /// The prompt of this row when it is not the dataset prompt's: one model call of an
    /// agent's multi-turn rollout (`--agent-url`), whose prompt holds the earlier turns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_ids: Option<Vec<u32>>,
}

/// The rollouts of one generation cycle (`--num-iterations` steps share one).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Cycle {
    pub index: usize,
    pub rollouts: Vec<Rollout>,
    /// Rollout statistics for `metrics.jsonl` (reward, lengths, entropy, ...).
    pub metrics: BTreeMap<String, f64>,
    /// Prompt groups in the batch, and those whose rewards carry no signal (`signal.rs`).
    #[serde(default)]
    pub groups: usize,
    #[serde(default)]
    pub groups_without_signal: usize,
}

/// Prompt order: a permutation per epoch drawn from (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = mix64(seed ^ 0x6772_706f_u64.wrapping_mul(GOLDEN_GAMMA) ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    for i in (1..n).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The seed of prompt `prompt`'s completions in cycle `cycle`: it names the prompt by
/// its index in the dataset, so a completion never depends on its batch-mates.
pub fn prompt_seed(seed: u64, cycle: usize, prompt: usize) -> u64 {
    crate::training::derive_seed(seed ^ 0x726f_6c6c_6f75_7473, cycle as u64, prompt as u64)
}

pub struct CycleInputs<'a> {
    pub model: &'a Model,
    pub bundle: &'a TokenizerBundle,
    pub prompts: &'a [Prompt],
    pub evaluators: &'a EvaluatorSet,
    pub params: &'a RolloutParams,
    pub scale_rewards: ScaleRewards,
    pub seed: u64,
    /// Prompts sampled together (bounds the decode batch at this many x G rows).
    pub chunk: usize,
}

/// Sample, decode, score, and compute advantages for the prompts `chosen`.
pub fn run_cycle(inp: &CycleInputs, index: usize, chosen: &[usize]) -> Result<Cycle> {
    Ok(run_cycle_scored(inp, index, chosen)?.0)
}

/// [`run_cycle`], with every evaluator's score of every completion (why one failed).
pub fn run_cycle_scored(inp: &CycleInputs, index: usize, chosen: &[usize]) -> Result<(Cycle, SetScores)> {
    let started = Instant::now();
    let g = inp.params.group;
    let stop = &inp.bundle.eos_token_ids;
    let mut rollouts = Vec::with_capacity(chosen.len() * g);
    let mut entropy = (0.0f64, 0usize);
    // A stream of at most `chunk` x G rows: a prompt's group joins as soon as another's
    // has finished, instead of every chunk waiting for its longest row.
    let ids: Vec<Vec<u32>> = chosen.iter().map(|&p| inp.prompts[p].ids.clone()).collect();
    let seeds: Vec<u64> = chosen.iter().map(|&p| prompt_seed(inp.seed, index, p)).collect();
    let groups = inp.model.rollouts_streamed_all(&ids, &seeds, inp.params, stop, inp.chunk.max(1) * g)?;
    for (&p, group) in chosen.iter().zip(groups) {
        for (gi, c) in group.into_iter().enumerate() {
            entropy.0 += c.entropies.iter().map(|&e| e as f64).sum::<f64>();
            entropy.1 += c.entropies.len();
            let text = inp.bundle.decode(&c.tokens, true)?;
            rollouts.push(Rollout { prompt: p, g: gi, tokens: c.tokens, logprobs: c.logprobs, stopped: c.stopped, reward: None, advantage: 0.0, text, prompt_ids: None });
        }
    }
    let rollout_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let failures_before = inp.evaluators.failure_count();
    let samples: Vec<_> = rollouts.iter().map(|r| inp.prompts[r.prompt].sample(format!("{}-{}-{}", index, r.prompt, r.g), r.text.clone())).collect();
    let scores = inp.evaluators.score_batch(&samples);
    let rewards = scores.rewards.clone();
    let adv = advantages(&rewards, g, inp.scale_rewards);
    for ((r, reward), a) in rollouts.iter_mut().zip(&rewards).zip(&adv.values) {
        r.reward = *reward;
        r.advantage = *a;
    }
    let scoring_s = started.elapsed().as_secs_f64();

    let mut m = cycle_metrics(inp.evaluators, &rewards, &scores.per_evaluator, adv.frac_reward_zero_std, &rollouts);
    if entropy.1 > 0 {
        m.insert("entropy".into(), entropy.0 / entropy.1 as f64);
    }
    m.insert("evaluator_failures".into(), (inp.evaluators.failure_count() - failures_before) as f64);
    m.insert("time_rollout_s".into(), rollout_s);
    m.insert("time_scoring_s".into(), scoring_s);
    let groups_without_signal = super::signal::groups_without_signal(&rewards, g);
    Ok((Cycle { index, rollouts, metrics: m, groups: chosen.len(), groups_without_signal }, scores))
}

/// The reward and length statistics of a rollout batch for `metrics.jsonl`.
pub fn cycle_metrics(
    evaluators: &EvaluatorSet,
    rewards: &[Option<f64>],
    per_evaluator: &[Vec<crate::evaluators::Score>],
    frac_reward_zero_std: f64,
    rollouts: &[Rollout],
) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    if let Some((mean, std, _)) = mean_std(rewards.iter().copied()) {
        m.insert("reward".into(), mean);
        m.insert("reward_std".into(), std);
    }
    for (name, list) in evaluators.names().iter().zip(per_evaluator) {
        if let Some((mean, _, _)) = mean_std(list.iter().map(|s| s.score)) {
            m.insert(format!("rewards_{name}"), mean);
        }
    }
    m.insert("frac_reward_zero_std".into(), frac_reward_zero_std);
    let lengths: Vec<f64> = rollouts.iter().map(|r| r.tokens.len() as f64).collect();
    if !lengths.is_empty() {
        m.insert("completion_length_mean".into(), lengths.iter().sum::<f64>() / lengths.len() as f64);
        m.insert("completion_length_min".into(), lengths.iter().copied().fold(f64::INFINITY, f64::min));
        m.insert("completion_length_max".into(), lengths.iter().copied().fold(0.0, f64::max));
        m.insert("clipped_ratio".into(), rollouts.iter().filter(|r| !r.stopped).count() as f64 / lengths.len() as f64);
    }
    m
}
