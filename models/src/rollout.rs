//! Rollouts for reinforcement fine-tuning: G sampled completions per prompt, with the
//! log-probability of every sampled token.
//!
//! - Each prompt is prefilled once (all prompts in one left-padded batch) and its keys
//!   and values are held once: the G rows of a prompt read them in place and append only
//!   their own completion ([`KvCache::share_prompts`], [`KvLayout::SharedPrompt`]). The
//!   earlier layout, the prompt's cache rows copied G times ([`KvLayout::CopiedPrompt`]),
//!   stays as the reference the tests and `rollout_bench --kv copied` compare against:
//!   both give the same tokens, and log-probs to float rounding (a key tile of the
//!   attention ends where the shared prompt ends).
//! - Row (p, g) draws from its own SplitMix64 stream seeded from the prompt's seed and g,
//!   so a completion depends only on (its seed, the prompt, g, the weights), never on
//!   which other prompts share the batch.
//! - The stop token is part of the completion (the policy must learn to emit it).
//! - top-k keeps the k largest logits with `select_nth_unstable` (linear time); top-p
//!   sorts only a growing head of the candidates until it holds the requested mass.
//! - Log-probabilities are those of the full temperature-scaled distribution (as TRL
//!   computes them at training time), not of the truncated top-k/top-p one.
//! - Runs under inference mode: no autograd graph.
use lora_kernels::sampling;
use rayon::prelude::*;
use crate::decoder::KvCache;
use crate::model::Model;
use crate::rng::{mix64, splitmix64, GOLDEN_GAMMA};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
pub struct RolloutParams {
    /// Completions per prompt (G).
    pub group: usize,
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f64,
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// New tokens, the stop token included when the row stopped.
    pub tokens: Vec<u32>,
    /// log p(token) under the temperature-scaled policy, one per token.
    pub logprobs: Vec<f32>,
    /// Entropy (nats) of the temperature-scaled distribution at each token.
    pub entropies: Vec<f32>,
    /// Ended on a stop token (false = cut at `max_new_tokens`).
    pub stopped: bool,
}

/// How rollouts hold their prompts' keys and values while the completions decode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvLayout {
    /// Each prompt once, read in place by its G rows (the default).
    #[default]
    SharedPrompt,
    /// The prompt's rows copied into each of its G rows (the layout before shared prompts;
    /// G times the prompt memory, the reference the shared layout is tested against).
    CopiedPrompt,
}

/// The random stream of completion `g` of the prompt whose seed is `prompt_seed`.
pub fn row_seed(prompt_seed: u64, g: usize) -> u64 {
    mix64(prompt_seed ^ (g as u64 + 1).wrapping_mul(GOLDEN_GAMMA))
}

impl Model {
    /// `params.group` completions for every prompt; `prompt_seeds[p]` seeds prompt p's
    /// rows. Returns `[prompt][g]`.
    pub fn rollouts(&self, prompts: &[Vec<u32>], prompt_seeds: &[u64], params: &RolloutParams, stop_ids: &[u32]) -> Result<Vec<Vec<Completion>>> {
        self.rollouts_with(prompts, prompt_seeds, params, stop_ids, KvLayout::default())
    }

    /// [`Model::rollouts`] with the prompts' keys and values held as `layout` says.
    pub fn rollouts_with(&self, prompts: &[Vec<u32>], prompt_seeds: &[u64], params: &RolloutParams, stop_ids: &[u32], layout: KvLayout) -> Result<Vec<Vec<Completion>>> {
        in_pool(|| self.rollouts_in_pool(prompts, prompt_seeds, params, stop_ids, layout))
    }

    fn rollouts_in_pool(&self, prompts: &[Vec<u32>], prompt_seeds: &[u64], params: &RolloutParams, stop_ids: &[u32], layout: KvLayout) -> Result<Vec<Vec<Completion>>> {
        if prompts.len() != prompt_seeds.len() {
            bail!("{} prompts but {} seeds", prompts.len(), prompt_seeds.len());
        }
        if prompts.is_empty() || params.group == 0 {
            return Ok(prompts.iter().map(|_| Vec::new()).collect());
        }
        if prompts.iter().any(Vec::is_empty) {
            bail!("cannot generate from an empty prompt");
        }
        let _inference = self.inference();
        let device = self.device().clone();
        let (p, g) = (prompts.len(), params.group);
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(p * longest);
        let mut positions = Vec::with_capacity(p * longest);
        let mut segments = Vec::with_capacity(p * longest);
        for prompt in prompts {
            let pad = longest - prompt.len();
            ids.extend(std::iter::repeat_n(0u32, pad).chain(prompt.iter().copied()));
            positions.extend((0..longest).map(|i| i.saturating_sub(pad) as u32));
            segments.extend((0..longest).map(|i| u32::from(i >= pad)));
        }
        // Shared: the prefill's buffers hold exactly the prompts (they become the shared
        // part); copied: they also hold the completions, and are copied G times.
        let mut cache = match layout {
            KvLayout::SharedPrompt => KvCache::with_capacity(longest),
            KvLayout::CopiedPrompt => KvCache::with_capacity(longest + params.max_new_tokens),
        };
        let input = Tensor::from_vec(ids, (p, longest), &device)?;
        let hidden = self.forward_cached(&input, &positions, &segments, &mut cache)?;
        let last = hidden.narrow(1, longest - 1, 1)?;
        // The prompt's next-token logits are the same for its G rows: computed once, and
        // batch row r reads logits row r / share (share = G for them, then 1).
        let mut logits = self.logits(&last)?.squeeze(1)?;
        let mut share = g;
        match layout {
            KvLayout::SharedPrompt => {
                let of_row = (0..p * g).map(|r| (r / g) as u32).collect();
                cache = KvCache::share_prompts(cache, of_row, params.max_new_tokens)?;
            }
            KvLayout::CopiedPrompt if g > 1 => cache.repeat_rows(g)?,
            KvLayout::CopiedPrompt => {}
        }

        let rows = p * g;
        // Segment ids of every cached position, per row (the prompt's, repeated).
        let mut row_segments: Vec<Vec<u32>> = (0..rows).map(|r| segments[(r / g) * longest..(r / g + 1) * longest].to_vec()).collect();
        let mut next_pos: Vec<u32> = (0..rows).map(|r| prompts[r / g].len() as u32).collect();
        let mut rngs: Vec<u64> = (0..rows).map(|r| row_seed(prompt_seeds[r / g], r % g)).collect();
        let mut out: Vec<Completion> = (0..rows).map(|_| Completion { tokens: vec![], logprobs: vec![], entropies: vec![], stopped: false }).collect();
        let mut done = vec![false; rows];
        let pad_token = stop_ids.first().copied().unwrap_or(0);
        for step in 0..params.max_new_tokens {
            let mut step_ids = Vec::with_capacity(rows);
            let sampling = lora_kernels::profile::part("rollout/sample");
            // Rows sample in parallel: each draws from its own stream, so the tokens are
            // the same in any order.
            let picks: Vec<Option<std::result::Result<Picked, f32>>> = with_host_f32(&logits, |flat| {
                let vocab = flat.len() / (rows / share);
                rngs.par_iter_mut()
                    .zip(done.par_iter())
                    .enumerate()
                    .map(|(r, (rng, &finished))| (!finished).then(|| checked_pick(&flat[r / share * vocab..][..vocab], params, rng)))
                    .collect()
            })?;
            for (r, picked) in picks.into_iter().enumerate() {
                let Some(picked) = picked else {
                    step_ids.push(pad_token);
                    continue;
                };
                let picked = picked.map_err(|bad| candle_core::Error::Msg(format!("the model produced {bad} logits at completion token {step} of prompt {} (sample {})", r / g, r % g)))?;
                out[r].tokens.push(picked.token);
                out[r].logprobs.push(picked.logprob);
                out[r].entropies.push(picked.entropy);
                if stop_ids.contains(&picked.token) {
                    out[r].stopped = true;
                    done[r] = true;
                }
                step_ids.push(picked.token);
            }
            drop(sampling);
            if done.iter().all(|d| *d) || step + 1 == params.max_new_tokens {
                break;
            }
            // A finished row keeps a slot in the batch; segment 0 makes it padding.
            for (r, seg) in row_segments.iter_mut().enumerate() {
                seg.push(if done[r] { 0 } else { 1 });
            }
            let flat: Vec<u32> = row_segments.iter().flatten().copied().collect();
            let input = Tensor::from_vec(step_ids, (rows, 1), &device)?;
            let forward = lora_kernels::profile::part("rollout/forward");
            let hidden = self.forward_cached(&input, &next_pos, &flat, &mut cache)?;
            drop(forward);
            next_pos.iter_mut().for_each(|x| *x += 1);
            let _logits = lora_kernels::profile::part("rollout/logits");
            logits = self.logits(&hidden)?.squeeze(1)?;
            share = 1;
        }
        let mut grouped = Vec::with_capacity(p);
        let mut it = out.into_iter();
        for _ in 0..p {
            grouped.push(it.by_ref().take(g).collect());
        }
        Ok(grouped)
    }
}

/// One row of a streamed rollout batch.
struct StreamRow {
    rng: u64,
    logits: Vec<f32>,
    out: Completion,
    done: bool,
    next_pos: u32,
}

/// The G rows of one prompt in a streamed rollout batch (they join and leave together).
struct StreamGroup {
    prompt: usize,
    prompt_len: usize,
    rows: Vec<StreamRow>,
}

impl Model {
    /// [`Model::rollouts_streamed`], every prompt's group collected in prompt order (what
    /// [`Model::rollouts`] returns, decoded as a stream of at most `max_rows` rows).
    pub fn rollouts_streamed_all(&self, prompts: &[Vec<u32>], prompt_seeds: &[u64], params: &RolloutParams, stop_ids: &[u32], max_rows: usize) -> Result<Vec<Vec<Completion>>> {
        let mut groups: Vec<Vec<Completion>> = vec![Vec::new(); prompts.len()];
        self.rollouts_streamed(prompts, prompt_seeds, params, stop_ids, max_rows, |i, group| {
            groups[i] = group;
            Ok(())
        })?;
        Ok(groups)
    }

    /// Rollouts as a stream (continuous batching): at most `max_rows` rows decode at once
    /// (at least one group). A prompt's G rows join the running batch together, right
    /// after its prefill, and leave it together once the last of them has finished; then
    /// `finished(prompt, completions)` receives them and the next prompt's group takes the
    /// freed rows, so no row waits for the longest row of a fixed batch. Groups are the
    /// unit because they share their prompt's keys and values (`KvCache::join_prompt`):
    /// a finished row of a running group idles until its group ends, as in
    /// [`Model::rollouts`]. A completion is the one [`Model::rollouts`] gives (its own
    /// seed, prompt and g): the same tokens, log-probs to float rounding (which rows share
    /// a GEMM differs).
    pub fn rollouts_streamed(
        &self,
        prompts: &[Vec<u32>],
        prompt_seeds: &[u64],
        params: &RolloutParams,
        stop_ids: &[u32],
        max_rows: usize,
        mut finished: impl FnMut(usize, Vec<Completion>) -> Result<()>,
    ) -> Result<()> {
        if prompts.len() != prompt_seeds.len() {
            bail!("{} prompts but {} seeds", prompts.len(), prompt_seeds.len());
        }
        if prompts.iter().any(Vec::is_empty) {
            bail!("cannot generate from an empty prompt");
        }
        let g = params.group;
        if g == 0 || params.max_new_tokens == 0 {
            return prompts.iter().enumerate().try_for_each(|(p, _)| finished(p, Vec::new()));
        }
        let _inference = self.inference();
        let device = self.device().clone();
        let groups_at_once = (max_rows / g).max(1);
        let mut cache = KvCache::shared_prompts(params.max_new_tokens + 1);
        let mut live: Vec<StreamGroup> = Vec::new();
        let mut next = 0;
        let pad_token = stop_ids.first().copied().unwrap_or(0);
        loop {
            while live.len() < groups_at_once && next < prompts.len() {
                let prompt = &prompts[next];
                let len = prompt.len();
                let mut one = KvCache::with_capacity(len);
                let input = Tensor::from_slice(prompt, (1, len), &device)?;
                let positions: Vec<u32> = (0..len as u32).collect();
                let logits = in_pool(|| -> Result<Vec<f32>> {
                    let hidden = self.forward_cached(&input, &positions, &vec![1; len], &mut one)?;
                    Ok(self.logits(&hidden.narrow(1, len - 1, 1)?)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
                })?;
                cache.join_prompt(one, g)?;
                let rows = (0..g)
                    .map(|gi| StreamRow {
                        rng: row_seed(prompt_seeds[next], gi),
                        logits: logits.clone(),
                        out: Completion { tokens: vec![], logprobs: vec![], entropies: vec![], stopped: false },
                        done: false,
                        next_pos: len as u32,
                    })
                    .collect();
                live.push(StreamGroup { prompt: next, prompt_len: len, rows });
                next += 1;
            }
            if live.is_empty() {
                return Ok(());
            }
            let mut step_ids = Vec::with_capacity(live.len() * g);
            let sampling = lora_kernels::profile::part("rollout/sample");
            // Rows sample in parallel (each from its own stream), then append in order.
            let picks: Vec<Option<std::result::Result<Picked, f32>>> = {
                let mut rows: Vec<&mut StreamRow> = live.iter_mut().flat_map(|grp| grp.rows.iter_mut()).collect();
                rows.par_iter_mut().map(|row| (!row.done).then(|| checked_pick(&row.logits, params, &mut row.rng))).collect()
            };
            let mut picks = picks.into_iter();
            for group in &mut live {
                for (gi, row) in group.rows.iter_mut().enumerate() {
                    let Some(picked) = picks.next().flatten() else {
                        step_ids.push(pad_token);
                        continue;
                    };
                    let picked = picked.map_err(|bad| {
                        candle_core::Error::Msg(format!("the model produced {bad} logits at completion token {} of prompt {} (sample {gi})", row.out.tokens.len(), group.prompt))
                    })?;
                    row.out.tokens.push(picked.token);
                    row.out.logprobs.push(picked.logprob);
                    row.out.entropies.push(picked.entropy);
                    row.out.stopped = stop_ids.contains(&picked.token);
                    row.done = row.out.stopped || row.out.tokens.len() == params.max_new_tokens;
                    step_ids.push(picked.token);
                }
            }
            drop(sampling);
            // Groups whose rows have all finished leave; their rows are freed.
            let mut keep_rows = Vec::with_capacity(step_ids.len());
            let mut kept_ids = Vec::with_capacity(step_ids.len());
            let mut still = Vec::with_capacity(live.len());
            for (i, group) in std::mem::take(&mut live).into_iter().enumerate() {
                if group.rows.iter().all(|r| r.done) {
                    finished(group.prompt, group.rows.into_iter().map(|r| r.out).collect())?;
                } else {
                    keep_rows.extend(i * g..(i + 1) * g);
                    kept_ids.extend_from_slice(&step_ids[i * g..(i + 1) * g]);
                    still.push(group);
                }
            }
            live = still;
            if keep_rows.len() != step_ids.len() {
                cache.retain_rows(&keep_rows)?;
            }
            if live.is_empty() {
                continue;
            }
            // One new token per row. Each row's key positions: the prompt part (its
            // prompt right-aligned), then the own part from its start (earlier own
            // positions are skipped by the attention); a finished row's token is padding.
            let own = cache.own_len();
            if cache.capacity().is_some_and(|c| own + 1 > c) {
                cache.reserve(own + 1 + params.max_new_tokens)?;
            }
            let lp = cache.prompt_len();
            let total = lp + own + 1;
            let mut segments = Vec::with_capacity(live.len() * g * total);
            let mut positions = Vec::with_capacity(live.len() * g);
            for (group, &start) in live.iter().flat_map(|grp| grp.rows.iter().map(move |r| (grp, r))).zip(cache.own_starts()) {
                let (grp, row) = group;
                let start = start as usize;
                segments.extend((0..lp).map(|j| u32::from(j >= lp - grp.prompt_len)));
                segments.extend((0..own).map(|j| u32::from(j >= start)));
                segments.push(u32::from(!row.done));
                positions.push(row.next_pos);
            }
            let input = Tensor::from_vec(kept_ids, (live.len() * g, 1), &device)?;
            in_pool(|| -> Result<()> {
                let forward = lora_kernels::profile::part("rollout/forward");
                let hidden = self.forward_cached(&input, &positions, &segments, &mut cache)?;
                drop(forward);
                let _logits = lora_kernels::profile::part("rollout/logits");
                // Into each row's own buffer (the vocabulary's size since it joined).
                with_host_f32(&self.logits(&hidden)?.squeeze(1)?, |flat| {
                    let vocab = flat.len() / (live.len() * g);
                    for (row, l) in live.iter_mut().flat_map(|grp| grp.rows.iter_mut()).zip(flat.chunks_exact(vocab)) {
                        row.logits.copy_from_slice(l);
                        row.next_pos += 1;
                    }
                })
            })?;
        }
    }
}

/// Runs `f` on a worker of rayon's pool, the caller waiting. A decode step runs hundreds
/// of small parallel regions (a few per projection); called from a thread outside the
/// pool, each of them hands its work to the pool and sleeps until it is done (two thread
/// wake-ups per region, the rayon scheduling a `perf` profile of rollouts showed), in
/// the pool they are plain joins. The same threads split the same work: results are
/// unchanged.
fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Runs `f` on `t`'s values, f32 in row-major order: on the CPU read from its storage in
/// place (a decode step's logits are rows x vocabulary floats: no host copy, no fresh
/// buffer per step), elsewhere copied to the host.
fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&v[a..b]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

/// [`pick`] with the next draw of `rng`, or the first non-finite logit (nothing drawn).
fn checked_pick(logits: &[f32], params: &RolloutParams, rng: &mut u64) -> std::result::Result<Picked, f32> {
    if let Some(&bad) = logits.iter().find(|v| !v.is_finite()) {
        return Err(bad);
    }
    Ok(pick(logits, params, unit(splitmix64(rng))))
}

/// A uniform draw in [0, 1) from 53 random bits.
pub fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A sampled token with its log-probability and the distribution's entropy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Picked {
    pub token: u32,
    pub logprob: f32,
    pub entropy: f32,
}

/// Each sampling thread's scratch, kept across rows and steps instead of allocated per
/// row: a row's softmax weights and their chunk sums (`lora_kernels::sampling`), and the
/// top-k / top-p candidates.
#[derive(Default)]
struct Scratch {
    weights: Vec<f32>,
    chunk_sums: Vec<f64>,
    candidates: Vec<usize>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Sample one token from `logits` with the uniform draw `u` (greedy when temperature is
/// 0). The log-probability and entropy are of the full temperature-scaled distribution.
pub fn pick(logits: &[f32], params: &RolloutParams, u: f64) -> Picked {
    SCRATCH.with_borrow_mut(|s| pick_with(logits, params, u, s))
}

fn pick_with(logits: &[f32], params: &RolloutParams, u: f64, s: &mut Scratch) -> Picked {
    let t = if params.temperature > 0.0 { params.temperature } else { 1.0 };
    // Softmax of logits / t once over the vocabulary (f32 exp 16 lanes at a time, sums in
    // f64): log Z, the entropy and the draw share the weights.
    s.weights.resize(logits.len(), 0.0);
    s.chunk_sums.resize(logits.len().div_ceil(sampling::CHUNK), 0.0);
    let w = sampling::weigh(logits, (1.0 / t) as f32, &mut s.weights, &mut s.chunk_sums);
    let log_z = w.total.ln();
    let entropy = (log_z - w.weighted / w.total) as f32;
    let max = w.max as f64;
    let logprob = |tok: usize| ((logits[tok] as f64 - max) / t - log_z) as f32;
    let token = if params.temperature <= 0.0 {
        argmax(logits)
    } else if params.top_k == 0 && params.top_p >= 1.0 {
        sampling::draw(&s.weights, &s.chunk_sums, w.total, u)
    } else {
        sample_truncated(logits, params, &s.weights, &mut s.candidates, u)
    };
    Picked { token: token as u32, logprob: logprob(token), entropy }
}

fn argmax(logits: &[f32]) -> usize {
    logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
}

/// Descending by logit, ties by index (so the order never depends on the sort).
fn by_logit_desc(logits: &[f32]) -> impl Fn(&usize, &usize) -> std::cmp::Ordering + '_ {
    move |&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
}

/// The first of `candidates` (ascending) at which `u * total` minus the running sum of
/// their weights drops below zero (the last one if rounding leaves none).
fn draw(weights: &[f32], candidates: impl IntoIterator<Item = usize>, total: f64, u: f64) -> usize {
    let mut r = u * total;
    let mut last = 0;
    for i in candidates {
        r -= weights[i] as f64;
        if r < 0.0 {
            return i;
        }
        last = i;
    }
    last
}

/// Sample from the top-k / top-p truncation of softmax(logits / t); `weights[i]` is
/// exp((logits[i] - max) / t).
fn sample_truncated(logits: &[f32], params: &RolloutParams, weights: &[f32], candidates: &mut Vec<usize>, u: f64) -> usize {
    let cmp = by_logit_desc(logits);
    candidates.clear();
    candidates.extend(0..logits.len());
    if params.top_k > 0 && params.top_k < candidates.len() {
        candidates.select_nth_unstable_by(params.top_k - 1, &cmp);
        candidates.truncate(params.top_k);
    }
    let weight = |i: usize| weights[i] as f64;
    if params.top_p < 1.0 {
        let total: f64 = candidates.iter().map(|&i| weight(i)).sum();
        // Sort a head of the candidates; grow it until it holds top_p of the mass.
        let mut head = 64.min(candidates.len());
        loop {
            if head < candidates.len() {
                candidates.select_nth_unstable_by(head - 1, &cmp);
            }
            candidates[..head].sort_unstable_by(&cmp);
            let mut acc = 0.0;
            let keep = candidates[..head].iter().position(|&i| {
                acc += weight(i) / total;
                acc >= params.top_p
            });
            match keep {
                Some(n) => {
                    candidates.truncate(n + 1);
                    break;
                }
                None if head == candidates.len() => break,
                None => head = (head * 4).min(candidates.len()),
            }
        }
    }
    candidates.sort_unstable();
    let total: f64 = candidates.iter().map(|&i| weight(i)).sum();
    draw(weights, candidates.iter().copied(), total, u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: usize, top_p: f64) -> RolloutParams {
        RolloutParams { group: 1, max_new_tokens: 1, temperature, top_k, top_p }
    }

    #[test]
    fn greedy_logprob_and_entropy_match_softmax() {
        let logits = [1.0f32, 3.0, 0.5, 2.0];
        let p = pick(&logits, &params(0.0, 0, 1.0), 0.3);
        assert_eq!(p.token, 1);
        let z: f64 = logits.iter().map(|&v| (v as f64).exp()).sum();
        assert!((p.logprob as f64 - (3.0 - z.ln())).abs() < 1e-6);
        let h: f64 = -logits.iter().map(|&v| { let q = (v as f64).exp() / z; q * q.ln() }).sum::<f64>();
        assert!((p.entropy as f64 - h).abs() < 1e-6);
    }

    #[test]
    fn temperature_scales_the_logprob() {
        let logits = [1.0f32, 3.0];
        let p = pick(&logits, &params(2.0, 0, 1.0), 0.99);
        assert_eq!(p.token, 1);
        let expected = 1.5 - (0.5f64.exp() + 1.5f64.exp()).ln();
        assert!((p.logprob as f64 - expected).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_head() {
        // 300 tokens, so top-p has to grow its sorted head past 64.
        let logits: Vec<f32> = (0..300).map(|i| -(i as f32) * 0.01).collect();
        for k in 0..50 {
            let u = k as f64 / 50.0;
            assert!(pick(&logits, &params(1.0, 3, 1.0), u).token < 3);
            assert!(pick(&logits, &params(1.0, 0, 0.1), u).token < 300);
        }
        let peaked = [0.0f32, 10.0, 9.0, -5.0];
        for k in 0..20 {
            let t = pick(&peaked, &params(1.0, 0, 0.5), k as f64 / 20.0).token;
            assert_eq!(t, 1, "top-p 0.5 keeps only the most likely token");
        }
        // The sampled frequencies follow the distribution: u below p(0) picks token 0.
        let two = [0.0f32, 0.0];
        assert_eq!(pick(&two, &params(1.0, 0, 1.0), 0.49).token, 0);
        assert_eq!(pick(&two, &params(1.0, 0, 1.0), 0.51).token, 1);
    }

    #[test]
    fn untruncated_draw_equals_the_candidate_list_draw() {
        // `pick` skips the candidate list when nothing is truncated: the same tokens.
        let logits: Vec<f32> = (0..5000u64).map(|i| (mix64(i) % 1000) as f32 * 0.013 - 6.0).collect();
        let p = params(0.9, 0, 1.0);
        let mut rng = 5u64;
        for _ in 0..200 {
            let u = unit(splitmix64(&mut rng));
            let mut scratch = Scratch::default();
            let fast = pick_with(&logits, &p, u, &mut scratch).token as usize;
            assert_eq!(fast, sample_truncated(&logits, &p, &scratch.weights, &mut Vec::new(), u));
        }
    }

    #[test]
    fn row_streams_differ_per_completion() {
        assert_ne!(row_seed(7, 0), row_seed(7, 1));
        assert_eq!(row_seed(7, 3), row_seed(7, 3));
    }
}
