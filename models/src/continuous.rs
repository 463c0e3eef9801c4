//! Continuous batching for a server: rows join a running decode batch when their
//! request arrives and leave it when they finish, each through its own adapter over one
//! base (Punica / S-LoRA style), each with its own sampling parameters and random stream.
//!
//! - A new row is prefilled alone (one forward over its prompt, routed to its adapter),
//!   so its first token never depends on what else is running; rows with the same prompt
//!   and adapter admitted together (`n > 1`) share that prefill (the cache rows are
//!   copied, as in `rollouts`).
//! - Its KV rows are then appended to the batch cache. Rows of different lengths are
//!   left-aligned to the longest by empty positions marked with segment 0, which the
//!   attention skips; a step is one forward of one new token per row.
//! - Rows are kept grouped by adapter, because routing takes contiguous blocks of rows:
//!   the base GEMM runs once over all rows, each adapter's LoRA term over its block.
//! - A row's token stream depends only on its prompt, adapter, parameters and seed, never
//!   on its batch-mates (the test `continuous` checks it against one-at-a-time decoding).
//! - Padding every row shares at the front is dropped when rows leave, so the cache is
//!   as long as its longest row, not as long as the server has been running.
//! - With a prefix cache ([`DecodeBatch::with_prefix_cache`]) a prompt that begins with
//!   blocks an earlier prompt prefilled (a server's shared system prompt) prefills only
//!   the rest ([`crate::prefix_cache`]); the running batch still holds each row's
//!   positions itself.
use crate::decoder::KvCache;
use crate::model::{Model, Route};
use crate::prefix_cache::{PrefixCache, PrefixStats};
use crate::rng::splitmix64;
use crate::rollout::{pick, unit, RolloutParams};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Positions added to the batch cache each time it fills up.
const CACHE_HEADROOM: usize = 64;

/// One row to decode.
#[derive(Clone, Debug)]
pub struct RowSpec {
    /// The caller's id for the row (unique among the running rows).
    pub id: u64,
    pub prompt: Vec<u32>,
    /// The adapter the row goes through (`None` = the base model alone).
    pub adapter: Option<String>,
    /// 0 = greedy.
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f64,
    /// Initial state of the row's SplitMix64 stream.
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Tokens that end the row (the stop token is reported, then the row leaves).
    pub stop_ids: Vec<u32>,
    /// Alternatives reported with each token (their log-probs), 0 = none.
    pub top_logprobs: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFinish {
    /// A stop token.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// What one step produced for one row.
#[derive(Clone, Debug)]
pub struct RowToken {
    pub id: u64,
    pub token: u32,
    /// log p(token) under the temperature-scaled distribution (the raw one when greedy).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens and their log-probs, most likely first.
    pub top: Vec<(u32, f32)>,
    /// Set when the row left the batch with this token.
    pub finish: Option<RowFinish>,
}

/// A row that could not go on (bad adapter name, non-finite logits): it left the batch.
#[derive(Debug)]
pub struct RowError {
    pub id: u64,
    pub message: String,
}

struct Row {
    id: u64,
    adapter: Option<String>,
    params: RolloutParams,
    rng: u64,
    stop_ids: Vec<u32>,
    top_logprobs: usize,
    /// Empty positions before the row's first real one in the batch cache.
    pad: usize,
    /// Prompt positions that came from the prefix cache.
    cached_prompt_tokens: usize,
    next_pos: u32,
    generated: usize,
    /// The logits of the row's next token.
    logits: Vec<f32>,
}

/// The running batch: rows, their KV cache, and what each needs next.
#[derive(Default)]
pub struct DecodeBatch {
    rows: Vec<Row>,
    cache: KvCache,
    prefixes: Option<PrefixCache>,
}

impl DecodeBatch {
    pub fn new() -> Self {
        Self::default()
    }
    /// A batch whose prefills reuse prompt prefixes kept across requests, at most
    /// `budget_bytes` of keys and values (0: none kept).
    pub fn with_prefix_cache(budget_bytes: usize) -> Self {
        Self { prefixes: (budget_bytes > 0).then(|| PrefixCache::new(budget_bytes)), ..Self::default() }
    }
    /// What the prefix cache has done (None without one).
    pub fn prefix_stats(&self) -> Option<PrefixStats> {
        self.prefixes.as_ref().map(PrefixCache::stats)
    }
    /// Drop the kept prefixes of `adapter` (its weights are about to change).
    pub fn forget_prefixes(&mut self, adapter: Option<&str>) {
        if let Some(p) = self.prefixes.as_mut() {
            p.forget_adapter(adapter);
        }
    }
    /// Prompt tokens of running row `id` whose keys came from the prefix cache.
    pub fn cached_prompt_tokens(&self, id: u64) -> Option<usize> {
        self.rows.iter().find(|r| r.id == id).map(|r| r.cached_prompt_tokens)
    }
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// Cached positions per row (the longest row's length).
    pub fn positions(&self) -> usize {
        if self.rows.is_empty() { 0 } else { self.cache.len() }
    }
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.rows.iter().map(|r| r.id)
    }
    /// Running rows that go through adapter `name`.
    pub fn rows_of_adapter(&self, name: &str) -> usize {
        self.rows.iter().filter(|r| r.adapter.as_deref() == Some(name)).count()
    }

    /// Prefill and add rows. A row that cannot start (empty prompt, unknown adapter) is
    /// returned as an error and the others still join.
    pub fn admit(&mut self, model: &Model, specs: Vec<RowSpec>) -> Result<Vec<RowError>> {
        let _inference = model.inference();
        let mut errors = Vec::new();
        let mut i = 0;
        while i < specs.len() {
            let same = |s: &RowSpec| s.prompt == specs[i].prompt && s.adapter == specs[i].adapter;
            let j = i + specs[i..].iter().take_while(|s| same(s)).count();
            match prefill(model, &specs[i], self.prefixes.as_mut()) {
                Ok(p) => self.merge(p, &specs[i..j])?,
                Err(e) => errors.extend(specs[i..j].iter().map(|s| RowError { id: s.id, message: format!("{e:#}") })),
            }
            i = j;
        }
        self.regroup()?;
        Ok(errors)
    }

    /// Add the prefilled rows `specs` (one cache row, copied for each).
    fn merge(&mut self, prefilled: Prefilled, specs: &[RowSpec]) -> Result<()> {
        let Prefilled { mut cache, logits, cached_tokens } = prefilled;
        let len = cache.len();
        if specs.len() > 1 {
            cache.repeat_rows(specs.len())?;
        }
        let pad = if self.rows.is_empty() {
            self.cache = KvCache::with_capacity(len + CACHE_HEADROOM);
            0
        } else {
            let have = self.cache.len();
            if len < have {
                cache.pad_front(have - len)?;
            } else if len > have {
                self.cache.pad_front(len - have)?;
                self.rows.iter_mut().for_each(|r| r.pad += len - have);
            }
            have.saturating_sub(len)
        };
        self.cache.append_rows(cache)?;
        for s in specs {
            self.rows.push(Row {
                id: s.id,
                adapter: s.adapter.clone(),
                params: RolloutParams { group: 1, max_new_tokens: s.max_new_tokens, temperature: s.temperature, top_k: s.top_k, top_p: s.top_p },
                rng: s.seed,
                stop_ids: s.stop_ids.clone(),
                top_logprobs: s.top_logprobs,
                pad,
                cached_prompt_tokens: cached_tokens,
                next_pos: len as u32,
                generated: 0,
                logits: logits.clone(),
            });
        }
        Ok(())
    }

    /// Order the rows by adapter (stable), so each adapter's rows form one block.
    fn regroup(&mut self) -> Result<()> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_by(|&a, &b| self.rows[a].adapter.cmp(&self.rows[b].adapter));
        if order.iter().enumerate().any(|(i, &o)| i != o) {
            self.keep(&order)?;
        }
        Ok(())
    }

    /// Keep rows `order` (in that order); drop the front padding all of them share.
    fn keep(&mut self, order: &[usize]) -> Result<()> {
        if order.is_empty() {
            self.rows.clear();
            self.cache = KvCache::new();
            return Ok(());
        }
        self.cache.retain_rows(order)?;
        let mut old: Vec<Option<Row>> = std::mem::take(&mut self.rows).into_iter().map(Some).collect();
        self.rows = order.iter().filter_map(|&i| old[i].take()).collect();
        let shared = self.rows.iter().map(|r| r.pad).min().unwrap_or(0);
        if shared > 0 {
            self.cache.drop_front(shared)?;
            self.rows.iter_mut().for_each(|r| r.pad -= shared);
        }
        Ok(())
    }

    /// Remove rows by id (a stop string matched, the client went away).
    pub fn cancel(&mut self, ids: &[u64]) -> Result<()> {
        let keep: Vec<usize> = (0..self.rows.len()).filter(|&i| !ids.contains(&self.rows[i].id)).collect();
        if keep.len() != self.rows.len() {
            self.keep(&keep)?;
        }
        Ok(())
    }

    /// Sample one token for every row, retire the rows that finished, and run the
    /// forward that gives the others their next logits.
    pub fn step(&mut self, model: &Model) -> Result<(Vec<RowToken>, Vec<RowError>)> {
        let _inference = model.inference();
        let mut tokens = Vec::with_capacity(self.rows.len());
        let mut errors = Vec::new();
        let mut keep = Vec::with_capacity(self.rows.len());
        for (i, row) in self.rows.iter_mut().enumerate() {
            if let Some(bad) = row.logits.iter().find(|v| !v.is_finite()) {
                errors.push(RowError { id: row.id, message: format!("the model produced {bad} logits at token {}", row.generated) });
                continue;
            }
            let picked = pick(&row.logits, &row.params, unit(splitmix64(&mut row.rng)));
            row.generated += 1;
            let finish = if row.stop_ids.contains(&picked.token) {
                Some(RowFinish::Stop)
            } else if row.generated >= row.params.max_new_tokens {
                Some(RowFinish::Length)
            } else {
                keep.push(i);
                None
            };
            let top = top_logprobs(&row.logits, row.params.temperature, row.top_logprobs);
            tokens.push(RowToken { id: row.id, token: picked.token, logprob: picked.logprob, top, finish });
        }
        let next: Vec<u32> = keep.iter().map(|&i| tokens.iter().find(|t| t.id == self.rows[i].id).map_or(0, |t| t.token)).collect();
        if keep.len() != self.rows.len() {
            self.keep(&keep)?;
        }
        if !self.rows.is_empty() {
            self.forward(model, &next)?;
        }
        Ok((tokens, errors))
    }

    /// One new token per row through the model; stores each row's next logits.
    fn forward(&mut self, model: &Model, next: &[u32]) -> Result<()> {
        let have = self.cache.len();
        if self.cache.capacity().is_some_and(|c| have + 1 > c) {
            self.cache.reserve(have + CACHE_HEADROOM.max(have / 2))?;
        }
        let rows = self.rows.len();
        let mut segments = Vec::with_capacity(rows * (have + 1));
        for r in &self.rows {
            segments.extend((0..=have).map(|p| u32::from(p >= r.pad)));
        }
        let positions: Vec<u32> = self.rows.iter().map(|r| r.next_pos).collect();
        let mut routes: Vec<Route> = Vec::new();
        for r in &self.rows {
            match routes.last_mut() {
                Some(last) if last.adapter == r.adapter.as_deref() => last.rows += 1,
                _ => routes.push(Route { rows: 1, adapter: r.adapter.as_deref(), dropout_seed: None }),
            }
        }
        let logits = {
            let _routing = model.route(&routes)?;
            let input = Tensor::from_slice(next, (rows, 1), model.device())?;
            let hidden = model.forward_cached(&input, &positions, &segments, &mut self.cache)?;
            model.logits(&hidden)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?
        };
        for (row, l) in self.rows.iter_mut().zip(logits) {
            row.logits = l;
            row.next_pos += 1;
        }
        Ok(())
    }
}

/// A prompt through its adapter: its cache row, next-token logits, and how many of its
/// positions came from the prefix cache.
struct Prefilled {
    cache: KvCache,
    logits: Vec<f32>,
    cached_tokens: usize,
}

/// The prompt of `spec` through its adapter, starting from the longest prefix the prefix
/// cache holds (if any); the prompt's full blocks are then kept for later requests.
fn prefill(model: &Model, spec: &RowSpec, prefixes: Option<&mut PrefixCache>) -> Result<Prefilled> {
    if spec.prompt.is_empty() {
        bail!("cannot generate from an empty prompt");
    }
    if spec.max_new_tokens == 0 {
        bail!("max_new_tokens must be at least 1");
    }
    let _routing = model.route(&[Route { rows: 1, adapter: spec.adapter.as_deref(), dropout_seed: None }])?;
    let adapter = spec.adapter.as_deref();
    let len = spec.prompt.len();
    let mut prefixes = prefixes;
    let (mut cache, cached) = match prefixes.as_deref_mut().map(|p| p.lookup(adapter, &spec.prompt)).transpose()?.flatten() {
        Some(hit) => (hit.cache, hit.tokens),
        None => (KvCache::new(), 0),
    };
    let rest = &spec.prompt[cached..];
    let input = Tensor::from_slice(rest, (1, rest.len()), model.device())?;
    let positions: Vec<u32> = (cached as u32..len as u32).collect();
    let hidden = model.forward_cached(&input, &positions, &vec![1; len], &mut cache)?;
    let last = hidden.narrow(1, rest.len() - 1, 1)?;
    let logits = model.logits(&last)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if let Some(p) = prefixes {
        p.insert(adapter, &spec.prompt, &cache)?;
    }
    Ok(Prefilled { cache, logits, cached_tokens: cached })
}

/// The `n` most likely tokens and their log-probs under softmax(logits / t) (t = 1 when
/// greedy), most likely first.
pub fn top_logprobs(logits: &[f32], temperature: f64, n: usize) -> Vec<(u32, f32)> {
    if n == 0 || logits.is_empty() {
        return Vec::new();
    }
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let log_z = logits.iter().map(|&v| ((v as f64 - max) / t).exp()).sum::<f64>().ln();
    let cmp = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(idx.len());
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|i| (i as u32, ((logits[i] as f64 - max) / t - log_z) as f32)).collect()
}
