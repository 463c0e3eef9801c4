//! The routes: `/health`, `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
//! `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`. Every failure is an OpenAI-form
//! error body with a 4xx/5xx status, never a crash or a dropped connection.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lora_models::rng::mix64;
use lora_models::rollout::row_seed;
use lora_models::RowSpec;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{self, ApiError, ChatRequest, CompletionRequest, LoadAdapterRequest, Sampling, UnloadAdapterRequest};
use super::scheduler::{Control, Event, Finish, GenJob, Job, TokenInfo};
use super::{AppState, CallRecord, Models};

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .fallback(|req: Request| async move { ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path()), None).with_code("not_found") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), refuse_oversized))
        .layer(middleware::from_fn_with_state(state.clone(), check_api_key))
        .with_state(state)
}

/// Oversized bodies this size or smaller are read (and dropped) before the 413 goes out.
const DRAIN_CAP: u64 = 64 << 20;

/// A body whose Content-Length is over `--max-body-bytes` gets the 413 only after the
/// server has read it (up to [`DRAIN_CAP`]): answering while the client is still
/// sending makes the server close the connection under it, and the client sees a
/// broken pipe instead of the 413 (seen in the serve test under load). Bodies without
/// a length are still cut by `DefaultBodyLimit` as they stream.
async fn refuse_oversized(State(st): St, req: Request, next: Next) -> Response {
    let limit = st.limits.max_body_bytes as u64;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => {
            if n <= DRAIN_CAP {
                let _ = axum::body::to_bytes(req.into_body(), DRAIN_CAP as usize).await;
            }
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!("the request body has {n} bytes, more than this server's limit of {limit} (--max-body-bytes)"),
                kind: "invalid_request_error",
                param: None,
                code: None,
            }
            .into_response()
        }
        _ => next.run(req).await,
    }
}

/// `--api-key`: every route but `/health` needs `Authorization: Bearer KEY`.
async fn check_api_key(State(st): St, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if req.uri().path() != "/health" && given.map(str::trim) != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// The body as JSON of type T, or the OpenAI error saying why not.
fn parse_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        ApiError { status, message: format!("cannot read the request body: {}", e.body_text()), kind: "invalid_request_error", param: None, code: None }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))
}

async fn list_models(State(st): St) -> Json<Value> {
    let card = |id: &str, root: &str, parent: Option<&str>| {
        json!({"id": id, "object": "model", "created": st.created, "owned_by": "lora-train", "root": root, "parent": parent})
    };
    let data: Vec<Value> = match &st.models {
        Models::Serve { base, adapters } => {
            let adapters = adapters.read().unwrap_or_else(|e| e.into_inner());
            std::iter::once(card(base, base, None)).chain(adapters.iter().map(|(name, dir)| card(name, dir, Some(base)))).collect()
        }
        Models::Agent(reg) => {
            let rollouts = reg.rollouts.lock().unwrap_or_else(|e| e.into_inner());
            rollouts.keys().map(|id| card(id, &reg.adapter, None)).collect()
        }
    };
    Json(json!({"object": "list", "data": data}))
}

/// What a request's `model` names: the adapter its rows go through, and the rollout
/// whose calls it joins (agent mode).
struct Target {
    adapter: Option<String>,
    rollout: Option<String>,
}

fn resolve(st: &AppState, model: &str) -> Result<Target, ApiError> {
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
struct Plan {
    temperature: f64,
    top_k: usize,
    top_p: f64,
    max_tokens: usize,
    n: usize,
    seed: u64,
    stop: Vec<String>,
    top_logprobs: usize,
}

fn plan(st: &AppState, s: &Sampling, prompt_len: usize, top_logprobs: usize, target: &Target) -> Result<Plan, ApiError> {
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

/// Send the request's rows to the scheduler; the receiver of its events.
fn submit(st: &AppState, prompt: &[u32], adapter: &Option<String>, p: &Plan) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = unbounded_channel();
    let rows = (0..p.n)
        .map(|i| RowSpec {
            id: st.next_row.fetch_add(1, Ordering::Relaxed),
            prompt: prompt.to_vec(),
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

/// What one choice has produced so far.
#[derive(Default, Clone)]
struct Choice {
    text: String,
    tokens: Vec<TokenInfo>,
    finish: Option<Finish>,
}

/// Apply one event to the choices; Err when the request failed.
fn absorb(choices: &mut [Choice], event: Event) -> Result<(usize, String, Vec<TokenInfo>, Option<Finish>), ApiError> {
    match event {
        Event::Delta { choice, text, tokens, finish } => {
            let c = choices.get_mut(choice).ok_or_else(|| ApiError::internal("an event for an unknown choice"))?;
            c.text.push_str(&text);
            c.tokens.extend(tokens.iter().cloned());
            c.finish = finish.or(c.finish);
            Ok((choice, text, tokens, finish))
        }
        Event::Error(m) => Err(ApiError::internal(m)),
    }
}

/// The rollout's record of this call (agent mode).
fn record(st: &AppState, target: &Target, prompt: &[u32], choice: &Choice) {
    let (Models::Agent(reg), Some(rollout)) = (&st.models, &target.rollout) else { return };
    let stopped = choice.finish == Some(Finish::Stop);
    let call = CallRecord { prompt: prompt.to_vec(), tokens: choice.tokens.iter().map(|t| t.id).collect(), logprobs: choice.tokens.iter().map(|t| t.logprob).collect(), stopped };
    if let Some(r) = reg.rollouts.lock().unwrap_or_else(|e| e.into_inner()).get_mut(rollout) {
        r.calls.push(call);
    }
}

/// Wait for every choice to finish.
async fn collect(mut rx: UnboundedReceiver<Event>, n: usize) -> Result<Vec<Choice>, ApiError> {
    let mut choices = vec![Choice::default(); n];
    while choices.iter().any(|c| c.finish.is_none()) {
        let event = rx.recv().await.ok_or_else(|| ApiError::internal("the generation thread has stopped"))?;
        absorb(&mut choices, event)?;
    }
    Ok(choices)
}

fn token_text(st: &AppState, id: u32) -> String {
    st.bundle.decode(&[id], false).unwrap_or_default()
}

/// Chat-form log-probs of some tokens.
fn chat_logprobs(st: &AppState, tokens: &[TokenInfo]) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = token_text(st, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content})
}

/// Legacy completions log-probs (`text_offset` from `offset`).
fn completion_logprobs(st: &AppState, tokens: &[TokenInfo], offset: usize) -> Value {
    let mut at = offset;
    let (mut texts, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for t in tokens {
        let s = token_text(st, t.id);
        offsets.push(at);
        at += s.len();
        texts.push(s);
        lps.push(t.logprob);
        let top: serde_json::Map<String, Value> = t.top.iter().map(|&(id, lp)| (token_text(st, id), json!(lp))).collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

fn usage(prompt: usize, choices: &[Choice]) -> Value {
    let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn chat(State(st): St, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(body)?;
    let target = resolve(&st, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty", Some("messages")));
    }
    let messages = req.messages.iter().enumerate().map(|(i, m)| api::parse_message(i, m)).collect::<Result<Vec<_>, _>>()?;
    let text = st.template.render(&messages, true, req.tools.as_ref()).map_err(|e| ApiError::bad_request(format!("cannot render the chat template: {e:#}"), Some("messages")))?;
    let prompt = st.bundle.encode(&text).map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e:#}"), Some("messages")))?;
    let top = if req.logprobs { req.top_logprobs.unwrap_or(0) } else { 0 };
    let p = plan(&st, &req.sampling, prompt.len(), top, &target)?;
    let rx = submit(&st, &prompt, &target.adapter, &p)?;
    let id = format!("chatcmpl-{}", st.next_row.fetch_add(1, Ordering::Relaxed));
    let created = super::unix_seconds();
    if req.sampling.stream {
        let include_usage = req.sampling.include_usage();
        let head: Vec<String> = (0..p.n)
            .map(|i| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]}).to_string())
            .collect();
        let (st2, model, logprobs) = (st.clone(), req.model.clone(), req.logprobs);
        let chunk = move |st: &AppState, i: usize, text: String, tokens: &[TokenInfo], finish: Option<Finish>| {
            let delta = if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) };
            let lp = if logprobs { chat_logprobs(st, tokens) } else { Value::Null };
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish.map(Finish::as_str)}]})
        };
        let usage_chunk = move |u: Value| json!({"id": format!("chatcmpl-usage-{created}"), "object": "chat.completion.chunk", "created": created, "choices": [], "usage": u});
        return Ok(stream_response(st2, rx, p.n, head, prompt, target, chunk, include_usage.then_some(usage_chunk)));
    }
    let choices = collect(rx, p.n).await?;
    record(&st, &target, &prompt, &choices[0]);
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": if req.logprobs { chat_logprobs(&st, &c.tokens) } else { Value::Null },
                "finish_reason": c.finish.map(Finish::as_str)})
        })
        .collect();
    Ok(Json(json!({"id": id, "object": "chat.completion", "created": created, "model": req.model, "choices": out, "usage": usage(prompt.len(), &choices)})).into_response())
}

/// The token ids of a completions `prompt`: a string, a one-string list, or token ids.
fn completion_prompt(st: &AppState, prompt: &Value) -> Result<(Vec<u32>, String), ApiError> {
    let bad = |m: &str| ApiError::bad_request(m.to_string(), Some("prompt"));
    match prompt {
        Value::String(s) => Ok((st.bundle.encode(s).map_err(|e| bad(&format!("cannot tokenize the prompt: {e:#}")))?, s.clone())),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => completion_prompt(st, &items[0]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            let vocab = st.bundle.tokenizer.get_vocab_size(true) as u64;
            let ids: Vec<u32> = items.iter().filter_map(Value::as_u64).filter(|&i| i < vocab).map(|i| i as u32).collect();
            if ids.len() != items.len() {
                return Err(bad(&format!("token ids must be below the vocabulary size {vocab}")));
            }
            let text = st.bundle.decode(&ids, false).unwrap_or_default();
            Ok((ids, text))
        }
        _ => Err(bad("prompt must be a string, a list of one string, or a list of token ids (one prompt per request)")),
    }
}

async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(body)?;
    let target = resolve(&st, &req.model)?;
    let (prompt, prompt_text) = completion_prompt(&st, &req.prompt)?;
    let top = req.logprobs.unwrap_or(0);
    let p = plan(&st, &req.sampling, prompt.len(), top, &target)?;
    let rx = submit(&st, &prompt, &target.adapter, &p)?;
    let id = format!("cmpl-{}", st.next_row.fetch_add(1, Ordering::Relaxed));
    let created = super::unix_seconds();
    let echo = if req.echo { prompt_text } else { String::new() };
    let want_logprobs = req.logprobs.is_some();
    if req.sampling.stream {
        let include_usage = req.sampling.include_usage();
        let head: Vec<String> = if echo.is_empty() {
            vec![]
        } else {
            (0..p.n).map(|i| json!({"id": id, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": i, "text": echo, "logprobs": null, "finish_reason": null}]}).to_string()).collect()
        };
        let (st2, model) = (st.clone(), req.model.clone());
        let chunk = move |st: &AppState, i: usize, text: String, tokens: &[TokenInfo], finish: Option<Finish>| {
            let lp = if want_logprobs { completion_logprobs(st, tokens, 0) } else { Value::Null };
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish.map(Finish::as_str)}]})
        };
        let usage_chunk = move |u: Value| json!({"id": format!("cmpl-usage-{created}"), "object": "text_completion", "created": created, "choices": [], "usage": u});
        return Ok(stream_response(st2, rx, p.n, head, prompt, target, chunk, include_usage.then_some(usage_chunk)));
    }
    let choices = collect(rx, p.n).await?;
    record(&st, &target, &prompt, &choices[0]);
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "text": format!("{echo}{}", c.text),
                "logprobs": if want_logprobs { completion_logprobs(&st, &c.tokens, echo.len()) } else { Value::Null },
                "finish_reason": c.finish.map(Finish::as_str)})
        })
        .collect();
    Ok(Json(json!({"id": id, "object": "text_completion", "created": created, "model": req.model, "choices": out, "usage": usage(prompt.len(), &choices)})).into_response())
}

/// Server-sent events: `head` chunks, one chunk per delta (`chunk`), the usage chunk
/// when asked, then `[DONE]`. Dropping the stream (the client left) drops the
/// receiver, which the scheduler notices at its next step and frees the rows.
#[allow(clippy::too_many_arguments)]
fn stream_response<C, U>(st: Arc<AppState>, rx: UnboundedReceiver<Event>, n: usize, head: Vec<String>, prompt: Vec<u32>, target: Target, chunk: C, usage_chunk: Option<U>) -> Response
where
    C: Fn(&AppState, usize, String, &[TokenInfo], Option<Finish>) -> Value + Send + 'static,
    U: Fn(Value) -> Value + Send + 'static,
{
    struct S<C, U> {
        st: Arc<AppState>,
        rx: UnboundedReceiver<Event>,
        choices: Vec<Choice>,
        queue: VecDeque<String>,
        done: bool,
        prompt: Vec<u32>,
        target: Target,
        chunk: C,
        usage_chunk: Option<U>,
    }
    let state = S { st, rx, choices: vec![Choice::default(); n], queue: head.into(), done: false, prompt, target, chunk, usage_chunk };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.queue.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s));
            }
            if s.done {
                return None;
            }
            match s.rx.recv().await {
                Some(event) => match absorb(&mut s.choices, event) {
                    Ok((i, text, tokens, finish)) => {
                        if !text.is_empty() || finish.is_some() || !tokens.is_empty() {
                            s.queue.push_back((s.chunk)(&s.st, i, text, &tokens, finish).to_string());
                        }
                        if s.choices.iter().all(|c| c.finish.is_some()) {
                            record(&s.st, &s.target, &s.prompt, &s.choices[0]);
                            if let Some(u) = &s.usage_chunk {
                                s.queue.push_back(u(usage(s.prompt.len(), &s.choices)).to_string());
                            }
                            s.queue.push_back("[DONE]".into());
                            s.done = true;
                        }
                    }
                    Err(e) => {
                        s.queue.push_back(e.body().to_string());
                        s.queue.push_back("[DONE]".into());
                        s.done = true;
                    }
                },
                None => {
                    s.queue.push_back(ApiError::internal("the generation thread has stopped").body().to_string());
                    s.done = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// Ask the model's owner to load or unload an adapter; wait for its answer.
async fn control(st: &AppState, make: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), String>>) -> Control) -> Result<(), ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    st.jobs.send(Job::Control(make(tx))).map_err(|_| ApiError::internal("the generation thread has stopped"))?;
    rx.await.map_err(|_| ApiError::internal("the generation thread has stopped"))?.map_err(|m| ApiError::bad_request(m, None))
}

async fn load_adapter(State(st): St, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: LoadAdapterRequest = parse_body(body)?;
    let Models::Serve { base, adapters } = &st.models else {
        return Err(ApiError::bad_request("adapters cannot be loaded into a training run's policy server", None));
    };
    let name = req.lora_name.trim().to_string();
    if name.is_empty() || name == *base {
        return Err(ApiError::bad_request(format!("lora_name `{name}` is empty or names the base model"), Some("lora_name")));
    }
    if adapters.read().unwrap_or_else(|e| e.into_inner()).iter().any(|(n, _)| *n == name) {
        return Err(ApiError::bad_request(format!("an adapter named `{name}` is already loaded"), Some("lora_name")));
    }
    let path = req.lora_path.clone();
    control(&st, |reply| Control::Load { name: name.clone(), path: path.clone(), reply }).await?;
    adapters.write().unwrap_or_else(|e| e.into_inner()).push((name.clone(), path));
    Ok((StatusCode::OK, format!("Success: LoRA adapter '{name}' added successfully.")).into_response())
}

async fn unload_adapter(State(st): St, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: UnloadAdapterRequest = parse_body(body)?;
    let Models::Serve { adapters, .. } = &st.models else {
        return Err(ApiError::bad_request("adapters cannot be unloaded from a training run's policy server", None));
    };
    let name = req.lora_name;
    if !adapters.read().unwrap_or_else(|e| e.into_inner()).iter().any(|(n, _)| *n == name) {
        return Err(ApiError::not_found(format!("no adapter named `{name}` is loaded"), Some("lora_name")));
    }
    control(&st, |reply| Control::Unload { name: name.clone(), reply }).await?;
    adapters.write().unwrap_or_else(|e| e.into_inner()).retain(|(n, _)| *n != name);
    Ok((StatusCode::OK, format!("Success: LoRA adapter '{name}' removed successfully.")).into_response())
}
