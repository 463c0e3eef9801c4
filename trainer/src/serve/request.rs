//! A generation request, checked: its body parsed, its `model` resolved to an adapter
//! (or an agent's rollout), its sampling settings checked into a [`Plan`], and its rows
//! handed to the scheduler. Used by the completion handlers (`completions.rs`), which the
//! routes (`http.rs`) serve.
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use lora_models::rng::mix64;
use lora_models::rollout::row_seed;
use lora_models::RowSpec;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{ApiError, Sampling};
use super::scheduler::{Event, GenJob, Job};
use super::{AppState, Models};

/// The body as JSON of type T, or the OpenAI error saying why not.
pub(super) fn parse_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        ApiError { status, message: format!("cannot read the request body: {}", e.body_text()), kind: "invalid_request_error", param: None, code: None }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))
}

/// What a request's `model` names: the adapter its rows go through, and the rollout
/// whose calls it joins (agent mode).
pub(super) struct Target {
    pub adapter: Option<String>,
    pub rollout: Option<String>,
}

pub(super) fn resolve(st: &AppState, model: &str) -> Result<Target, ApiError> {
    match &st.models {
        Models::Serve { base, adapters } => {
            if model == base {
                return Ok(Target { adapter: None, rollout: None });
            }
            let adapters = adapters.read().unwrap_or_else(|e| e.into_inner());
            if adapters.iter().any(|(n, _)| n == model) {
                return Ok(Target { adapter: Some(model.to_string()), rollout: None });
            }
            let names: Vec<&str> = std::iter::once(base.as_str()).chain(adapters.iter().map(|(n, _)| n.as_str())).collect();
            Err(ApiError::not_found(format!("the model `{model}` does not exist (served: {})", names.join(", ")), Some("model")))
        }
        Models::Agent(reg) => {
            if reg.rollouts.lock().unwrap_or_else(|e| e.into_inner()).contains_key(model) {
                Ok(Target { adapter: Some(reg.adapter.clone()), rollout: Some(model.to_string()) })
            } else {
                Err(ApiError::not_found(format!("the model `{model}` is not a rollout in flight (use the `model` the trainer sent to /init)"), Some("model")))
            }
        }
    }
}

/// Checked sampling settings of one request.
pub(super) struct Plan {
    temperature: f64,
    top_k: usize,
    top_p: f64,
    max_tokens: usize,
    pub n: usize,
    seed: u64,
    stop: Vec<String>,
    top_logprobs: usize,
}

/// `prompt_len`: the longest prompt's tokens.
pub(super) fn plan(st: &AppState, s: &Sampling, prompt_len: usize, top_logprobs: usize, target: &Target) -> Result<Plan, ApiError> {
    let l = &st.limits;
    if prompt_len == 0 {
        return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
    }
    if prompt_len >= l.max_model_len {
        return Err(ApiError::bad_request(
            format!("the prompt has {prompt_len} tokens; this server's context is {} tokens (--max-model-len)", l.max_model_len),
            Some("messages"),
        )
        .with_code("context_length_exceeded"));
    }
    let room = l.max_model_len - prompt_len;
    let mut asked = s.max_completion_tokens.or(s.max_tokens);
    if let Models::Agent(reg) = &st.models {
        // A rollout's call gets at most the trainer's --max-completion-length (and what
        // the context has room for) whatever the agent asks: capped, not refused.
        asked = Some(asked.unwrap_or(usize::MAX).min(reg.max_tokens).min(room).max(1));
    }
    let max_tokens = match asked {
        Some(0) => return Err(ApiError::bad_request("max_tokens must be at least 1", Some("max_tokens"))),
        Some(m) if m > l.max_tokens => {
            return Err(ApiError::bad_request(format!("max_tokens {m} is over this server's limit of {} (--max-tokens-limit)", l.max_tokens), Some("max_tokens")))
        }
        Some(m) if m > room => {
            return Err(ApiError::bad_request(
                format!("{prompt_len} prompt tokens + max_tokens {m} exceed this server's context of {} tokens", l.max_model_len),
                Some("max_tokens"),
            )
            .with_code("context_length_exceeded"))
        }
        Some(m) => m,
        None => l.max_tokens.min(room),
    };
    for (name, v) in [("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad_request(format!("{name} is not supported by this server (leave it at 0)"), Some(name)));
        }
    }
    if s.logit_bias.as_ref().is_some_and(|b| b.as_object().is_some_and(|o| !o.is_empty())) {
        return Err(ApiError::bad_request("logit_bias is not supported by this server", Some("logit_bias")));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=100.0).contains(&temperature)) {
        return Err(ApiError::bad_request(format!("temperature must be between 0 and 100, got {temperature}"), Some("temperature")));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!("top_p must be in (0, 1], got {top_p}"), Some("top_p")));
    }
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::bad_request(format!("top_k must be -1, 0 (off) or positive, got {k}"), Some("top_k"))),
    };
    let n = s.n.unwrap_or(1);
    if n == 0 || n > l.max_n {
        return Err(ApiError::bad_request(format!("n must be between 1 and {}, got {n}", l.max_n), Some("n")));
    }
    if top_logprobs > 20 {
        return Err(ApiError::bad_request(format!("at most 20 top log-probs, got {top_logprobs}"), Some("top_logprobs")));
    }
    let stop = s.stop.strings();
    if stop.len() > 16 {
        return Err(ApiError::bad_request("at most 16 stop strings", Some("stop")));
    }
    let counter = st.next_row.load(Ordering::Relaxed);
    let seed = s.seed.unwrap_or_else(|| mix64(super::unix_seconds() ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ std::process::id() as u64));
    let mut p = Plan { temperature, top_k, top_p, max_tokens, n, seed, stop, top_logprobs };
    if let (Models::Agent(reg), Some(rollout)) = (&st.models, &target.rollout) {
        // The trainer's sampling, so the recorded log-probs are the policy's.
        if n != 1 {
            return Err(ApiError::bad_request("n must be 1 for a rollout's calls", Some("n")));
        }
        let rollouts = reg.rollouts.lock().unwrap_or_else(|e| e.into_inner());
        let calls = rollouts.get(rollout).map_or((0, 0), |r| (r.seed, r.calls.len()));
        p.temperature = reg.temperature;
        p.top_k = reg.top_k;
        p.top_p = reg.top_p;
        p.seed = mix64(calls.0 ^ (calls.1 as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    }
    Ok(p)
}

/// Send the request's rows to the scheduler (`n` per prompt, prompt-major); the
/// receiver of its events.
pub(super) fn submit(st: &AppState, prompts: &[Vec<u32>], adapter: &Option<String>, p: &Plan) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = unbounded_channel();
    let rows = prompts
        .iter()
        .flat_map(|prompt| std::iter::repeat_n(prompt, p.n))
        .enumerate()
        .map(|(i, prompt)| RowSpec {
            id: st.next_row.fetch_add(1, Ordering::Relaxed),
            prompt: prompt.clone(),
            adapter: adapter.clone(),
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            seed: row_seed(p.seed, i),
            max_new_tokens: p.max_tokens,
            stop_ids: st.bundle.eos_token_ids.clone(),
            top_logprobs: p.top_logprobs,
        })
        .collect();
    st.jobs
        .send(Job::Generate(GenJob { rows, stop: p.stop.clone(), events: tx }))
        .map_err(|_| ApiError::internal("the generation thread has stopped"))?;
    Ok(rx)
}

