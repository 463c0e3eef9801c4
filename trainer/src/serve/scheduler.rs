//! The thread that owns the model's decoding: requests arrive as [`Job`]s on a channel,
//! their rows join one [`DecodeBatch`] (continuous batching over mixed adapters), and
//! every step's tokens go back to each request's handler as text deltas.
//!
//! Text is decoded here rather than in the handlers because stop strings end a row in
//! the batch: each step the row's tokens are decoded, a stop string cuts the text and
//! retires the row, and text that could still be the start of a stop string (or an
//! incomplete UTF-8 character) is held back until the next token decides it.
//! A request whose handler has gone (the client disconnected) is noticed at the next
//! step through its closed channel and its rows leave the batch.
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use lora_models::{DecodeBatch, Model, RowFinish, RowSpec, TokenizerBundle};
use tokio::sync::{mpsc::UnboundedSender, oneshot};

/// Why a choice ended, as OpenAI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or a stop string.
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One generated token with its log-prob and the most likely alternatives.
#[derive(Clone, Debug)]
pub struct TokenInfo {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub enum Event {
    /// New text of choice `choice` and the tokens generated since its last delta (a stop
    /// token is among the tokens but not in the text).
    Delta { choice: usize, text: String, tokens: Vec<TokenInfo>, finish: Option<Finish> },
    /// The request failed (its other choices are dropped).
    Error(String),
    /// Choice `choice`'s prompt began with `cached_tokens` positions the prefix cache
    /// held (sent once, before its first delta, when some were).
    Prefilled { choice: usize, cached_tokens: usize },
}

/// One request: its rows (choice i = `rows[i]`), stop strings, and where events go.
pub struct GenJob {
    pub rows: Vec<RowSpec>,
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
}

/// What needs the model mutably; the owner of the model answers it between steps.
pub enum Control {
    Load { name: String, path: String, reply: oneshot::Sender<Result<(), String>> },
    Unload { name: String, reply: oneshot::Sender<Result<(), String>> },
}

pub enum Job {
    Generate(GenJob),
    Control(Control),
}

struct RowState {
    choice: usize,
    /// Generated tokens that are text (a stop token excluded).
    tokens: Vec<u32>,
    stop: std::sync::Arc<Vec<String>>,
    /// Bytes of the decoded text already sent.
    emitted: usize,
    pending: Vec<TokenInfo>,
    events: UnboundedSender<Event>,
    /// The test-only failure of [`panic_trigger`] is armed by this row's request.
    inject_panic: bool,
}

/// A test-only switch, read in debug builds only (a release binary never has it): with
/// `LORA_TRAIN_SERVE_PANIC_AT_MAX_TOKENS=N` set, a decode step panics while a request that
/// asked for `max_tokens` N runs. The serve tests use it to check that a panic inside the
/// scheduler fails the requests it was serving with a 500 and the server goes on.
fn panic_trigger() -> Option<usize> {
    if !cfg!(debug_assertions) {
        return None;
    }
    static TRIGGER: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *TRIGGER.get_or_init(|| std::env::var("LORA_TRAIN_SERVE_PANIC_AT_MAX_TOKENS").ok().and_then(|v| v.parse().ok()))
}

/// Run `f`, turning a panic into an error: a bug in one forward (a kernel's assertion,
/// an index out of range) fails the requests in the batch, not the server.
fn guarded<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => Err(anyhow::anyhow!("{what} panicked: {}", super::panic_message(panic.as_ref()))),
    }
}

pub struct Scheduler {
    rx: Receiver<Job>,
    waiting: VecDeque<GenJob>,
    batch: DecodeBatch,
    rows: HashMap<u64, RowState>,
    bundle: TokenizerBundle,
    max_rows: usize,
    closed: bool,
    /// Bytes of prompt prefixes kept across requests (0: none).
    prefix_budget: usize,
}

impl Scheduler {
    pub fn new(rx: Receiver<Job>, bundle: TokenizerBundle, max_rows: usize) -> Self {
        Self { rx, waiting: VecDeque::new(), batch: DecodeBatch::new(), rows: HashMap::new(), bundle, max_rows: max_rows.max(1), closed: false, prefix_budget: 0 }
    }

    /// Keep prompt prefixes across requests, at most `budget_bytes` of keys and values
    /// (`serve --prefix-cache-mb`); 0 keeps none.
    pub fn with_prefix_cache(mut self, budget_bytes: usize) -> Self {
        self.prefix_budget = budget_bytes;
        self.batch = DecodeBatch::with_prefix_cache(budget_bytes);
        self
    }

    /// Drop the kept prefixes of adapter `name` (it is being loaded or unloaded: blocks
    /// made with its old weights would answer for the new ones).
    pub fn forget_prefixes(&mut self, name: &str) {
        self.batch.forget_prefixes(Some(name));
    }

    /// What the prefix cache has done so far (None without one).
    pub fn prefix_stats(&self) -> Option<lora_models::PrefixStats> {
        self.batch.prefix_stats()
    }

    /// Every sender is gone and no work is left.
    pub fn finished(&self) -> bool {
        self.closed && self.batch.is_empty() && self.waiting.is_empty()
    }

    /// Running or waiting rows through adapter `name` (an unload must wait for them).
    pub fn uses_adapter(&self, name: &str) -> usize {
        self.batch.rows_of_adapter(name)
            + self.waiting.iter().flat_map(|j| &j.rows).filter(|r| r.adapter.as_deref() == Some(name)).count()
    }

    /// Take new jobs (waiting up to `wait` when there is nothing to do), admit what fits,
    /// and run one decode step. Returns the control jobs for the model's owner.
    pub fn tick(&mut self, model: &Model, wait: Duration) -> Vec<Control> {
        let mut controls = Vec::new();
        if self.batch.is_empty() && self.waiting.is_empty() && !self.closed {
            match self.rx.recv_timeout(wait) {
                Ok(job) => self.take(job, &mut controls),
                Err(RecvTimeoutError::Timeout) => return controls,
                Err(RecvTimeoutError::Disconnected) => self.closed = true,
            }
        }
        while let Ok(job) = self.rx.try_recv() {
            self.take(job, &mut controls);
        }
        self.admit(model);
        let gone: Vec<u64> = self.rows.iter().filter(|(_, r)| r.events.is_closed()).map(|(&id, _)| id).collect();
        self.cancel(&gone);
        if !self.batch.is_empty() {
            let inject = self.rows.values().any(|r| r.inject_panic);
            let step = guarded("a decode step", || {
                if inject {
                    panic!("injected failure (LORA_TRAIN_SERVE_PANIC_AT_MAX_TOKENS)");
                }
                self.batch.step(model)
            });
            match step {
                Ok((tokens, errors)) => {
                    for e in errors {
                        if let Some(r) = self.rows.remove(&e.id) {
                            let _ = r.events.send(Event::Error(e.message));
                        }
                    }
                    let mut done = Vec::new();
                    for t in tokens {
                        let finish = t.finish.map(|f| match f {
                            RowFinish::Stop => Finish::Stop,
                            RowFinish::Length => Finish::Length,
                        });
                        let is_stop_token = t.finish == Some(RowFinish::Stop);
                        if self.emit(t.id, TokenInfo { id: t.token, logprob: t.logprob, top: t.top }, is_stop_token, finish) && t.finish.is_none() {
                            done.push(t.id);
                        }
                    }
                    self.cancel(&done);
                }
                // A failed or panicked forward leaves the batch in an unknown state.
                Err(e) => self.fail_all(&format!("generation failed: {e:#}")),
            }
        }
        controls
    }

    fn take(&mut self, job: Job, controls: &mut Vec<Control>) {
        match job {
            Job::Generate(g) => self.waiting.push_back(g),
            Job::Control(c) => controls.push(c),
        }
    }

    /// Start the waiting requests that fit in the batch (one at least when it is empty).
    fn admit(&mut self, model: &Model) {
        while let Some(job) = self.waiting.front() {
            if job.events.is_closed() {
                self.waiting.pop_front();
                continue;
            }
            if !self.batch.is_empty() && self.batch.len() + job.rows.len() > self.max_rows {
                break;
            }
            let Some(job) = self.waiting.pop_front() else { break };
            let stop = std::sync::Arc::new(job.stop);
            let inject_panic = job.rows.first().is_some_and(|r| Some(r.max_new_tokens) == panic_trigger());
            for (choice, r) in job.rows.iter().enumerate() {
                let state = RowState { choice, tokens: Vec::new(), stop: stop.clone(), emitted: 0, pending: Vec::new(), events: job.events.clone(), inject_panic };
                self.rows.insert(r.id, state);
            }
            let ids: Vec<u64> = job.rows.iter().map(|r| r.id).collect();
            match guarded("a prefill", || self.batch.admit(model, job.rows)) {
                Ok(errors) if errors.is_empty() => {
                    for (choice, id) in ids.iter().enumerate() {
                        if let Some(cached_tokens) = self.batch.cached_prompt_tokens(*id).filter(|&c| c > 0) {
                            let _ = job.events.send(Event::Prefilled { choice, cached_tokens });
                        }
                    }
                }
                Ok(errors) => {
                    let _ = job.events.send(Event::Error(errors[0].message.clone()));
                    self.cancel(&ids);
                }
                Err(e) => self.fail_all(&format!("prefill failed: {e:#}")),
            }
        }
    }

    fn cancel(&mut self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        for id in ids {
            self.rows.remove(id);
        }
        if let Err(e) = guarded("dropping rows from the batch", || self.batch.cancel(ids)) {
            self.fail_all(&format!("{e:#}"));
        }
    }

    /// Fail every running request with `message` (their handlers answer a 500 and log
    /// it) and start over with an empty batch; the waiting requests run next.
    fn fail_all(&mut self, message: &str) {
        tracing::error!("{message}; the {} running rows fail", self.rows.len());
        for (_, r) in self.rows.drain() {
            let _ = r.events.send(Event::Error(message.to_string()));
        }
        // The kept prefixes go too: a failed forward may have left them half written.
        self.batch = DecodeBatch::with_prefix_cache(self.prefix_budget);
    }

    /// Record row `id`'s new token and send what text is settled. Returns true when a
    /// stop string ended the row here (the caller removes it from the batch).
    fn emit(&mut self, id: u64, token: TokenInfo, is_stop_token: bool, finish: Option<Finish>) -> bool {
        let Some(row) = self.rows.get_mut(&id) else { return false };
        if !is_stop_token {
            row.tokens.push(token.id);
        }
        row.pending.push(token);
        let text = self.bundle.decode(&row.tokens, true).unwrap_or_default();
        let (mut end, mut finish) = (text.len(), finish);
        let mut stopped_by_string = false;
        if let Some(cut) = row.stop.iter().filter_map(|s| text.get(row.emitted.min(text.len())..).and_then(|t| t.find(s.as_str())).map(|p| p + row.emitted)).min() {
            end = cut;
            finish = Some(Finish::Stop);
            stopped_by_string = true;
        } else if finish.is_none() {
            // Hold back an incomplete character and a possible start of a stop string.
            if text.ends_with('\u{FFFD}') {
                end = text.trim_end_matches('\u{FFFD}').len();
            }
            let held = row.stop.iter().map(|s| longest_prefix_suffix(&text[..end], s)).max().unwrap_or(0);
            end -= held;
        }
        let start = row.emitted.min(end);
        let delta = text.get(start..end).unwrap_or_default().to_string();
        if delta.is_empty() && finish.is_none() && !row.pending.is_empty() && row.pending.len() < 16 {
            return false;
        }
        row.emitted = end.max(row.emitted);
        let tokens = std::mem::take(&mut row.pending);
        let sent = row.events.send(Event::Delta { choice: row.choice, text: delta, tokens, finish });
        if finish.is_some() || sent.is_err() {
            self.rows.remove(&id);
            return stopped_by_string || sent.is_err();
        }
        false
    }
}

/// The length of the longest proper prefix of `stop` that `text` ends with.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::longest_prefix_suffix;

    #[test]
    fn held_back_text_is_a_possible_start_of_a_stop_string() {
        assert_eq!(longest_prefix_suffix("the answer is E", "END"), 1);
        assert_eq!(longest_prefix_suffix("the answer is EN", "END"), 2);
        assert_eq!(longest_prefix_suffix("the answer", "END"), 0);
        assert_eq!(longest_prefix_suffix("x", "é!"), 0);
    }
}
