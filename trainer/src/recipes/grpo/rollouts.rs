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
use crate::evaluators::{mean_std, EvaluatorSet, Sample, SetScores};

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
///
/// The evaluators score a prompt's group on their own thread as soon as the group has
/// finished decoding, while the other groups decode (an external evaluator's processes
/// or a judge's HTTP calls then cost nothing on top of the rollouts); the advantages wait
/// for every score. `time_scoring_s` is the scoring time the step still waits for once the
/// last group has finished, `time_scoring_total_s` the scorer's whole busy time.
pub fn run_cycle_scored(inp: &CycleInputs, index: usize, chosen: &[usize]) -> Result<(Cycle, SetScores)> {
    let started = Instant::now();
    let g = inp.params.group;
    let stop = &inp.bundle.eos_token_ids;
    let mut entropy = (0.0f64, 0usize);
    // A stream of at most `chunk` x G rows: a prompt's group joins as soon as another's
    // has finished, instead of every chunk waiting for its longest row.
    let ids: Vec<Vec<u32>> = chosen.iter().map(|&p| inp.prompts[p].ids.clone()).collect();
    let seeds: Vec<u64> = chosen.iter().map(|&p| prompt_seed(inp.seed, index, p)).collect();
    // Slot k holds the group of chosen[k], whatever order the groups finish in.
    let mut groups: Vec<Vec<Rollout>> = vec![Vec::new(); chosen.len()];
    let failures_before = inp.evaluators.failure_count();
    let (group_scores, rollout_s, scoring_s, scoring_total_s) = std::thread::scope(|scope| -> Result<_> {
        let (to_scorer, finished_groups) = std::sync::mpsc::channel::<(usize, Vec<Sample>)>();
        let scorer = scope.spawn(move || {
            let mut scored = Vec::new();
            let mut busy = 0.0;
            for (k, samples) in finished_groups {
                let t = Instant::now();
                scored.push((k, inp.evaluators.score_batch(&samples)));
                busy += t.elapsed().as_secs_f64();
            }
            (scored, busy)
        });
        let decoded = inp.model.rollouts_streamed(&ids, &seeds, inp.params, stop, inp.chunk.max(1) * g, |k, group| {
            let p = chosen[k];
            let mut rows = Vec::with_capacity(group.len());
            for (gi, c) in group.into_iter().enumerate() {
                entropy.0 += c.entropies.iter().map(|&e| e as f64).sum::<f64>();
                entropy.1 += c.entropies.len();
                let text = inp.bundle.decode(&c.tokens, true)?;
                rows.push(Rollout { prompt: p, g: gi, tokens: c.tokens, logprobs: c.logprobs, stopped: c.stopped, reward: None, advantage: 0.0, text, prompt_ids: None });
            }
            let samples = rows.iter().map(|r| inp.prompts[p].sample(format!("{}-{}-{}", index, p, r.g), r.text.clone())).collect();
            groups[k] = rows;
            // The scorer only stops early by panicking, which `join` reports below.
            let _ = to_scorer.send((k, samples));
            Ok(())
        });
        drop(to_scorer); // the scorer ends once it has scored every group sent
        let rollout_s = started.elapsed().as_secs_f64();
        let waited = Instant::now();
        let (scored, busy) = scorer.join().map_err(|_| anyhow::anyhow!("the evaluators' scoring thread panicked"))?;
        decoded?;
        Ok((scored, rollout_s, waited.elapsed().as_secs_f64(), busy))
    })?;
    let mut rollouts: Vec<Rollout> = groups.into_iter().flatten().collect();
    let scores = concat_in_prompt_order(group_scores, inp.evaluators.evaluators().len());
    let rewards = scores.rewards.clone();
    let adv = advantages(&rewards, g, inp.scale_rewards);
    for ((r, reward), a) in rollouts.iter_mut().zip(&rewards).zip(&adv.values) {
        r.reward = *reward;
        r.advantage = *a;
    }

    let mut m = cycle_metrics(inp.evaluators, &rewards, &scores.per_evaluator, adv.frac_reward_zero_std, &rollouts);
    if entropy.1 > 0 {
        m.insert("entropy".into(), entropy.0 / entropy.1 as f64);
    }
    m.insert("evaluator_failures".into(), (inp.evaluators.failure_count() - failures_before) as f64);
    m.insert("time_rollout_s".into(), rollout_s);
    m.insert("time_scoring_s".into(), scoring_s);
    m.insert("time_scoring_total_s".into(), scoring_total_s);
    let groups_without_signal = super::signal::groups_without_signal(&rewards, g);
    Ok((Cycle { index, rollouts, metrics: m, groups: chosen.len(), groups_without_signal }, scores))
}

/// The per-group scores of a streamed cycle, (slot, scores) in finishing order, as one
/// batch's scores in slot order (the order of the rollouts).
fn concat_in_prompt_order(mut scored: Vec<(usize, SetScores)>, evaluators: usize) -> SetScores {
    scored.sort_by_key(|(k, _)| *k);
    let mut all = SetScores { per_evaluator: vec![Vec::new(); evaluators], rewards: Vec::new() };
    for (_, s) in scored {
        for (list, part) in all.per_evaluator.iter_mut().zip(s.per_evaluator) {
            list.extend(part);
        }
        all.rewards.extend(s.rewards);
    }
    all
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
