//! GRPO rollouts produced by a remote agent (`--agent-url`) instead of local sampling.
//!
//! The trainer serves its current policy in-process (the `serve` router on a free
//! loopback port, `model_base_url`), and for each prompt and each of its G rollouts:
//! 1. posts `URL/init` `{rollout_id, model, model_base_url, messages, tools, metadata:
//!    {run_id, row_id, rollout_id, step}}`; `model` is the rollout id, so every call the
//!    agent makes with it is recorded under that rollout;
//! 2. polls `GET URL/status?rollout_id=...` until `{"terminated": true}` or
//!    `--agent-timeout` (an `"error"` field, a failed request or the timeout drop the
//!    rollout from its group: it gets no reward, so it takes no part in its group's mean
//!    and std, and it trains nothing; the run goes on);
//! 3. the reward is the status reply's `reward` when it has one, else the evaluators'
//!    score of the final answer (the last assistant message of the reply's `messages`,
//!    else the text of the rollout's last model call).
//!
//! Every model call of a rollout becomes one training row: its prompt exactly as the
//! policy saw it (earlier turns and tool outputs included) and the tokens the policy
//! generated, with their log-probs; the loss covers those tokens only, so tool outputs
//! and any other inserted text are never learned. All calls of a rollout share its
//! advantage. The policy samples with the trainer's temperature / top-k / top-p and at
//! most --max-completion-length tokens per call, whatever the agent asks.
//!
//! The model stays on the training thread: it runs the decode batch of every rollout's
//! calls (continuous batching across rollouts) while worker threads talk to the agent.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lora_models::rollout::row_seed;
use lora_models::{Model, TokenizerBundle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::advantages::advantages;
use super::rollouts::{cycle_metrics, prompt_seed, Cycle, CycleInputs, Rollout};
use crate::serve::scheduler::Scheduler;

/// Prompt keys and values kept across an agent's calls within one cycle: each turn of a
/// conversation resends the earlier turns, and the G rollouts of a prompt begin alike, so
/// most of a call's prompt is found (forgotten at every cycle: the weights change).
const AGENT_PREFIX_CACHE_BYTES: usize = 256 << 20;
use crate::serve::{AppState, CallRecord, Control, HttpServer, Limits, Models, RolloutCalls, RolloutRegistry};

/// `grpo --agent-url` and its settings.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct AgentOptions {
    /// Base URL of an agent server (POST /init, GET /status) that produces the rollouts
    /// by calling the policy through an OpenAI-compatible endpoint the trainer serves.
    #[arg(long, value_name = "URL", help_heading = "GRPO agent")]
    pub agent_url: Option<String>,
    /// Seconds a rollout may take from /init to a terminated status before it is dropped.
    #[arg(long, default_value_t = 300.0, help_heading = "GRPO agent")]
    pub agent_timeout: f64,
    /// Rollouts in flight at once (each polls the agent on its own thread).
    #[arg(long, default_value_t = 8, help_heading = "GRPO agent")]
    pub agent_concurrency: usize,
}

impl AgentOptions {
    /// Rollouts sampled in-process (no agent): what `run rft` trains with.
    pub fn local() -> Self {
        AgentOptions { agent_url: None, agent_timeout: 300.0, agent_concurrency: 8 }
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(url) = &self.agent_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("--agent-url must start with http:// (got {url})");
            }
            if url.starts_with("https://") {
                bail!("--agent-url: https is not supported (this build has no TLS); run the agent on http");
            }
        }
        if !(self.agent_timeout > 0.0 && self.agent_timeout.is_finite()) {
            bail!("--agent-timeout must be > 0 seconds, got {}", self.agent_timeout);
        }
        if self.agent_concurrency == 0 {
            bail!("--agent-concurrency must be at least 1");
        }
        Ok(())
    }
}

/// How one rollout ended on the agent's side.
enum Outcome {
    /// The final status reply.
    Done(Value),
    TimedOut,
    Failed(String),
}

struct Job {
    slot: usize,
    rollout_id: String,
    init: Value,
}

/// The in-process policy server and the agent's address.
pub struct AgentRollouts {
    url: String,
    timeout: Duration,
    concurrency: usize,
    run_id: String,
    server: HttpServer,
    scheduler: Scheduler,
    registry: Arc<RolloutRegistry>,
    base_url: String,
    dropped_total: usize,
}

impl AgentRollouts {
    /// Start the policy server on a free loopback port.
    pub fn start(opts: &AgentOptions, url: &str, bundle: &TokenizerBundle, grpo: &super::GrpoOptions, model: &Model, run_id: String) -> Result<Self> {
        let registry = Arc::new(RolloutRegistry {
            adapter: lora_models::DEFAULT_ADAPTER.to_string(),
            temperature: grpo.temperature,
            top_k: grpo.top_k,
            top_p: grpo.top_p,
            max_tokens: grpo.max_completion_length,
            rollouts: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = mpsc::channel();
        let max_model_len = model.config().max_position_embeddings;
        let state = Arc::new(AppState {
            jobs: tx,
            bundle: bundle.clone(),
            template: crate::chat::template_for(bundle)?,
            // The agent's tool calls come back parsed, as from `serve` with its default.
            tool_calls: crate::serve::tool_calls::ToolCallFormat::detect(bundle.chat_template.as_deref()),
            models: Models::Agent(registry.clone()),
            api_key: None,
            limits: Limits { max_model_len, max_tokens: grpo.max_completion_length, max_n: 1, max_body_bytes: 16 << 20 },
            next_row: AtomicU64::new(0),
            created: crate::serve::unix_seconds(),
        });
        let server = HttpServer::start(state, "127.0.0.1", 0, false)?;
        let base_url = format!("http://{}/v1", server.addr);
        tracing::info!("serving the policy to the agent at {base_url}");
        let rows = (opts.agent_concurrency * 2).max(8);
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            timeout: Duration::from_secs_f64(opts.agent_timeout),
            concurrency: opts.agent_concurrency,
            run_id,
            server,
            scheduler: Scheduler::new(rx, bundle.clone(), rows).with_prefix_cache(AGENT_PREFIX_CACHE_BYTES),
            registry,
            base_url,
            dropped_total: 0,
        })
    }

    /// The rollouts of cycle `index` for the prompts `chosen`, G each, through the agent.
    pub fn run_cycle(&mut self, inp: &CycleInputs, index: usize, chosen: &[usize]) -> Result<Cycle> {
        let started = Instant::now();
        // The policy's weights changed since the last cycle: its kept prompt blocks are stale.
        self.scheduler.forget_prefixes(&self.registry.adapter);
        let g = inp.params.group;
        let mut jobs = VecDeque::new();
        let mut ids = Vec::new();
        for (k, &p) in chosen.iter().enumerate() {
            let seed = prompt_seed(inp.seed, index, p);
            for gi in 0..g {
                let rollout_id = format!("{}-c{index}-p{p}-g{gi}", self.run_id);
                self.registry.rollouts.lock().unwrap_or_else(|e| e.into_inner()).insert(rollout_id.clone(), RolloutCalls { seed: row_seed(seed, gi), calls: Vec::new() });
                let prompt = &inp.prompts[p];
                let init = json!({
                    "rollout_id": rollout_id, "model": rollout_id, "model_base_url": self.base_url,
                    "messages": prompt.messages, "tools": prompt.tools,
                    "metadata": {"run_id": self.run_id, "row_id": p, "rollout_id": rollout_id, "step": index},
                });
                jobs.push_back(Job { slot: k * g + gi, rollout_id: rollout_id.clone(), init });
                ids.push(rollout_id);
            }
        }
        let total = jobs.len();
        let outcomes = self.drive(inp.model, jobs, total);
        let rollout_s = started.elapsed().as_secs_f64();

        // Each rollout's calls, and its reward (the agent's, or the evaluators').
        let started = Instant::now();
        let mut calls: Vec<Vec<CallRecord>> = {
            let mut reg = self.registry.rollouts.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter().map(|id| reg.remove(id).map(|r| r.calls).unwrap_or_default()).collect()
        };
        let (mut timed_out, mut failed, mut no_calls) = (0usize, 0usize, 0usize);
        let mut finals: Vec<Option<(Option<f64>, String)>> = Vec::with_capacity(total);
        for (slot, outcome) in outcomes.into_iter().enumerate() {
            let id = &ids[slot];
            let kept = match outcome {
                Outcome::TimedOut => {
                    timed_out += 1;
                    tracing::warn!("rollout {id}: the agent did not terminate within {:?}; dropped", self.timeout);
                    None
                }
                Outcome::Failed(e) => {
                    failed += 1;
                    tracing::warn!("rollout {id}: {e}; dropped");
                    None
                }
                Outcome::Done(_) if calls[slot].iter().all(|c| c.tokens.is_empty()) => {
                    no_calls += 1;
                    tracing::warn!("rollout {id}: the agent never called the model (nothing to train); dropped");
                    None
                }
                Outcome::Done(status) => {
                    let reward = status.get("reward").and_then(Value::as_f64).filter(|r| r.is_finite());
                    let answer = final_answer(&status).map_or_else(|| inp.bundle.decode(&calls[slot].last().map(|c| c.tokens.clone()).unwrap_or_default(), true), Ok)?;
                    Some((reward, answer))
                }
            };
            finals.push(kept);
        }
        // The evaluators score the rollouts the agent gave no reward.
        let to_score: Vec<usize> = (0..total).filter(|&s| matches!(&finals[s], Some((None, _)))).collect();
        let failures_before = inp.evaluators.failure_count();
        let samples: Vec<_> = to_score
            .iter()
            .map(|&s| inp.prompts[chosen[s / g]].sample(format!("{index}-{}-{}", chosen[s / g], s % g), finals[s].as_ref().map(|f| f.1.clone()).unwrap_or_default()))
            .collect();
        let scores = inp.evaluators.score_batch(&samples);
        let mut rewards: Vec<Option<f64>> = finals.iter().map(|f| f.as_ref().and_then(|f| f.0)).collect();
        for (&s, r) in to_score.iter().zip(&scores.rewards) {
            rewards[s] = *r;
        }
        // A dropped rollout has no reward: it is left out of its group's mean and std.
        let adv = advantages(&rewards, g, inp.scale_rewards);
        let mut rows = Vec::new();
        for slot in 0..total {
            if finals[slot].is_none() {
                continue;
            }
            for call in std::mem::take(&mut calls[slot]).into_iter().filter(|c| !c.tokens.is_empty()) {
                let text = inp.bundle.decode(&call.tokens, true)?;
                rows.push(Rollout {
                    prompt: chosen[slot / g],
                    g: slot % g,
                    tokens: call.tokens,
                    logprobs: call.logprobs,
                    stopped: call.stopped,
                    reward: rewards[slot],
                    advantage: adv.values[slot],
                    text,
                    prompt_ids: Some(call.prompt),
                });
            }
        }
        let scoring_s = started.elapsed().as_secs_f64();
        let dropped = timed_out + failed + no_calls;
        self.dropped_total += dropped;
        let kept_rewards: Vec<Option<f64>> = rewards.iter().copied().filter(Option::is_some).collect();
        let mut m = cycle_metrics(inp.evaluators, &kept_rewards, &scores.per_evaluator, adv.frac_reward_zero_std, &rows);
        m.insert("evaluator_failures".into(), (inp.evaluators.failure_count() - failures_before) as f64);
        m.insert("agent_rollouts".into(), (total - dropped) as f64);
        m.insert("agent_rollouts_dropped".into(), dropped as f64);
        m.insert("agent_rollouts_timed_out".into(), timed_out as f64);
        m.insert("agent_rollouts_dropped_total".into(), self.dropped_total as f64);
        m.insert("agent_model_calls".into(), rows.len() as f64);
        m.insert("time_rollout_s".into(), rollout_s);
        m.insert("time_scoring_s".into(), scoring_s);
        if dropped == total {
            tracing::warn!("rollout batch {index}: every one of its {total} rollouts was dropped; this step trains nothing");
        }
        let groups_without_signal = super::signal::groups_without_signal(&rewards, g);
        Ok(Cycle { index, rollouts: rows, metrics: m, groups: chosen.len(), groups_without_signal })
    }

    /// Run the jobs on `concurrency` worker threads while this thread decodes every
    /// model call they cause; one outcome per job slot.
    fn drive(&mut self, model: &Model, jobs: VecDeque<Job>, total: usize) -> Vec<Outcome> {
        let queue = Mutex::new(jobs);
        let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
        let mut outcomes: Vec<Option<Outcome>> = (0..total).map(|_| None).collect();
        let (url, timeout) = (self.url.as_str(), self.timeout);
        std::thread::scope(|scope| {
            for _ in 0..self.concurrency.min(total) {
                let (queue, tx) = (&queue, tx.clone());
                scope.spawn(move || loop {
                    let Some(job) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else { break };
                    let outcome = run_one(url, timeout, &job);
                    if tx.send((job.slot, outcome)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            let mut done = 0;
            let mut last_report = Instant::now();
            while done < total {
                for control in self.scheduler.tick(model, Duration::from_millis(5)) {
                    refuse(control);
                }
                while let Ok((slot, outcome)) = rx.try_recv() {
                    outcomes[slot] = Some(outcome);
                    done += 1;
                }
                if last_report.elapsed() > Duration::from_secs(30) {
                    eprintln!("agent rollouts: {done}/{total} done");
                    last_report = Instant::now();
                }
            }
        });
        outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Failed("no outcome".into()))).collect()
    }
}

impl Drop for AgentRollouts {
    fn drop(&mut self) {
        self.server.stop();
    }
}

fn refuse(control: Control) {
    let message = "adapters cannot be loaded or unloaded while training".to_string();
    match control {
        Control::Load { reply, .. } | Control::Unload { reply, .. } => {
            let _ = reply.send(Err(message));
        }
    }
}

/// The last assistant message of a status reply's `messages`, when it has them.
fn final_answer(status: &Value) -> Option<String> {
    let messages = status.get("messages")?.as_array()?;
    let last = messages.iter().rev().find(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))?;
    match last.get("content")? {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// One rollout on the agent: /init, then /status until terminated or the deadline.
fn run_one(url: &str, timeout: Duration, job: &Job) -> Outcome {
    let deadline = Instant::now() + timeout;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(timeout.min(Duration::from_secs(60)))).build().into();
    let init = agent.post(format!("{url}/init")).send_json(&job.init);
    match init {
        Ok(mut r) if !r.status().is_success() => {
            let body = r.body_mut().read_to_string().unwrap_or_default();
            return Outcome::Failed(format!("POST {url}/init answered {}: {}", r.status(), body.chars().take(300).collect::<String>()));
        }
        Ok(_) => {}
        Err(e) => return Outcome::Failed(format!("POST {url}/init failed: {e}")),
    }
    let mut wait = Duration::from_millis(20);
    loop {
        if Instant::now() >= deadline {
            return Outcome::TimedOut;
        }
        std::thread::sleep(wait.min(deadline.saturating_duration_since(Instant::now())));
        wait = (wait * 2).min(Duration::from_millis(500));
        let reply = agent.get(format!("{url}/status")).query("rollout_id", &job.rollout_id).call();
        let status: Value = match reply {
            Ok(mut r) if r.status().is_success() => match r.body_mut().read_json() {
                Ok(v) => v,
                Err(e) => return Outcome::Failed(format!("GET {url}/status: not JSON: {e}")),
            },
            Ok(r) => return Outcome::Failed(format!("GET {url}/status answered {}", r.status())),
            Err(e) => return Outcome::Failed(format!("GET {url}/status failed: {e}")),
        };
        if let Some(e) = status.get("error").filter(|e| !e.is_null()) {
            return Outcome::Failed(format!("the agent reported an error: {}", e.as_str().map_or_else(|| e.to_string(), str::to_string)));
        }
        if status.get("terminated").and_then(Value::as_bool) == Some(true) {
            return Outcome::Done(status);
        }
    }
}

/// Context for the error of a run whose agent is unreachable before the first step.
pub fn check_reachable(url: &str) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(10))).build().into();
    agent.get(format!("{}/status", url.trim_end_matches('/'))).query("rollout_id", "probe").call().map(|_| ()).with_context(|| format!("--agent-url {url}: the agent does not answer"))
}
