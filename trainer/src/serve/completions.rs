//! The two generation routes, `/v1/chat/completions` and `/v1/completions`: a checked
//! request becomes scheduler rows (`http::submit`), and what comes back becomes OpenAI's
//! response, whole or as server-sent events.
//!
//! Choice `i` of a request is row `i`; with a list of prompts (text completions) the
//! choices are prompt-major, as OpenAI numbers them: prompt `p`'s `n` choices are
//! `p*n .. p*n+n`.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{self, ApiError, ChatRequest, CompletionRequest, RequestId};
use super::request::{parse_body, plan, resolve, submit, Target};
use super::scheduler::{Event, Finish, TokenInfo};
use super::tool_calls::{ToolCall, ToolCallFormat};
use super::{AppState, CallRecord, Models};

type St = State<Arc<AppState>>;

/// Most prompts in one text-completions request, and most choices (prompts x n).
const MAX_PROMPTS: usize = 64;
const MAX_CHOICES: usize = 128;

/// What one choice has produced so far.
#[derive(Default, Clone)]
pub(super) struct Choice {
    text: String,
    tokens: Vec<TokenInfo>,
    finish: Option<Finish>,
    /// Prompt tokens the server's prefix cache held.
    cached_prompt_tokens: usize,
}

/// Apply one event to the choices; the index of the choice it changed, or Err (with the
/// detail for the log) when the request failed.
fn absorb(choices: &mut [Choice], event: Event) -> Result<(usize, Vec<TokenInfo>), ApiError> {
    match event {
        Event::Delta { choice, text, tokens, finish } => {
            let count = choices.len();
            let c = choices.get_mut(choice).ok_or_else(|| ApiError::internal(format!("an event for choice {choice} of {count}")))?;
            c.text.push_str(&text);
            c.tokens.extend(tokens.iter().cloned());
            c.finish = finish.or(c.finish);
            Ok((choice, tokens))
        }
        Event::Error(m) => Err(ApiError::internal(m)),
        Event::Prefilled { choice, cached_tokens } => {
            let count = choices.len();
            let c = choices.get_mut(choice).ok_or_else(|| ApiError::internal(format!("an event for choice {choice} of {count}")))?;
            c.cached_prompt_tokens = cached_tokens;
            Ok((choice, Vec::new()))
        }
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

/// The rollout's record of this call (agent mode).
fn record(st: &AppState, target: &Target, prompt: &[u32], choice: &Choice) {
    let (Models::Agent(reg), Some(rollout)) = (&st.models, &target.rollout) else { return };
    let stopped = choice.finish == Some(Finish::Stop);
    let call = CallRecord { prompt: prompt.to_vec(), tokens: choice.tokens.iter().map(|t| t.id).collect(), logprobs: choice.tokens.iter().map(|t| t.logprob).collect(), stopped };
    if let Some(r) = reg.rollouts.lock().unwrap_or_else(|e| e.into_inner()).get_mut(rollout) {
        r.calls.push(call);
    }
}

fn token_text(st: &AppState, id: u32) -> String {
    st.bundle.decode(&[id], false).unwrap_or_default()
}

/// Chat-form log-probs of some tokens (OpenAI's `choices[].logprobs`).
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
    json!({"content": content, "refusal": null})
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

/// OpenAI's usage object; `prompt_tokens_details.cached_tokens` counts the prompt tokens
/// whose keys came from the prefix cache (the n choices of a prompt share one prefill,
/// so each prompt counts once).
fn usage(prompts: &[Vec<u32>], choices: &[Choice]) -> Value {
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
    let per_prompt = (choices.len() / prompts.len().max(1)).max(1);
    let cached: usize = choices.chunks(per_prompt).map(|c| c[0].cached_prompt_tokens).sum();
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached}})
}

/// OpenAI's `tool_calls` entries; `first` numbers them within the choice.
fn tool_calls_json(calls: &[ToolCall], id_prefix: &str, choice: usize, streamed: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let mut v = json!({"id": format!("call-{id_prefix}-{choice}-{k}"), "type": "function", "function": {"name": c.name, "arguments": c.arguments}});
            if streamed {
                v["index"] = json!(k);
            }
            v
        })
        .collect()
}

/// Whether and how a chat request's answers are read for tool calls.
fn tool_format(st: &AppState, req: &ChatRequest) -> Result<Option<ToolCallFormat>, ApiError> {
    let has_tools = match &req.tools {
        None | Some(Value::Null) => false,
        Some(Value::Array(t)) => !t.is_empty(),
        Some(_) => return Err(ApiError::bad_request("tools must be a list of {\"type\": \"function\", \"function\": {...}}", Some("tools"))),
    };
    match req.tool_choice.as_ref() {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "auto" => {}
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(other) => {
            return Err(ApiError::bad_request(format!("tool_choice {other} is not supported (\"auto\" or \"none\": this server cannot force a call)"), Some("tool_choice")));
        }
    }
    if req.parallel_tool_calls == Some(false) {
        return Err(ApiError::bad_request("parallel_tool_calls: false is not supported (every call the model writes is returned)", Some("parallel_tool_calls")));
    }
    if !has_tools {
        return Ok(None);
    }
    match st.tool_calls {
        Some(f) => Ok(Some(f)),
        None => Err(ApiError::bad_request(
            "this model's chat template writes tool calls in no format this server parses; start serve with --tool-call-parser hermes or llama3_json",
            Some("tools"),
        )),
    }
}

/// A finished chat choice as OpenAI's `message` and `finish_reason`.
fn chat_choice(c: &Choice, tools: Option<ToolCallFormat>, id_prefix: &str, i: usize) -> (Value, Option<&'static str>) {
    let finish = c.finish.map(Finish::as_str);
    if let Some(f) = tools {
        let e = f.extract(&c.text);
        if !e.calls.is_empty() {
            return (json!({"role": "assistant", "content": e.content, "tool_calls": tool_calls_json(&e.calls, id_prefix, i, false)}), Some("tool_calls"));
        }
    }
    (json!({"role": "assistant", "content": c.text}), finish)
}

pub(super) async fn chat(State(st): St, Extension(rid): Extension<RequestId>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(body)?;
    api::refuse_unknown_fields(&req.other)?;
    let target = resolve(&st, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty", Some("messages")));
    }
    match req.response_format.as_ref().map(|f| f.get("type").and_then(Value::as_str)) {
        None | Some(Some("text")) => {}
        Some(_) => return Err(ApiError::bad_request("response_format: only {\"type\": \"text\"} is supported", Some("response_format"))),
    }
    if req.top_logprobs.is_some_and(|k| k > 0) && !req.logprobs {
        return Err(ApiError::bad_request("top_logprobs needs logprobs: true", Some("top_logprobs")));
    }
    let tools = tool_format(&st, &req)?;
    let messages = req.messages.iter().enumerate().map(|(i, m)| api::parse_message(i, m)).collect::<Result<Vec<_>, _>>()?;
    // tool_choice "none": the tools are not shown to the model either (as vLLM does).
    let shown_tools = if req.tool_choice.as_ref().and_then(Value::as_str) == Some("none") { None } else { req.tools.as_ref() };
    let text = st.template.render(&messages, true, shown_tools).map_err(|e| ApiError::bad_request(format!("cannot render the chat template: {e:#}"), Some("messages")))?;
    let prompt = st.bundle.encode(&text).map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e:#}"), Some("messages")))?;
    let top = if req.logprobs { req.top_logprobs.unwrap_or(0) } else { 0 };
    let p = plan(&st, &req.sampling, prompt.len(), top, &target)?;
    let prompts = vec![prompt];
    let rx = submit(&st, &prompts, &target.adapter, &p)?;
    let id = format!("chatcmpl-{}", st.next_row.fetch_add(1, Ordering::Relaxed));
    let created = super::unix_seconds();
    if req.sampling.stream {
        let head: Vec<String> = (0..p.n)
            .map(|i| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]})
                .to_string()
            })
            .collect();
        let (model, logprobs) = (req.model.clone(), req.logprobs);
        let chunk = Box::new(move |st: &AppState, i: usize, piece: Piece, tokens: &[TokenInfo], finish: Option<&'static str>| {
            let mut delta = json!({});
            if !piece.text.is_empty() || (finish.is_none() && piece.calls.is_empty()) {
                delta["content"] = json!(piece.text);
            }
            if !piece.calls.is_empty() {
                delta["tool_calls"] = json!(tool_calls_json(&piece.calls, &id, i, true));
            }
            let lp = if logprobs { chat_logprobs(st, tokens) } else { Value::Null };
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]})
        });
        let usage_chunk = move |u: Value| json!({"id": format!("chatcmpl-usage-{created}"), "object": "chat.completion.chunk", "created": created, "choices": [], "usage": u});
        let out = StreamOut { n: p.n, head, tools, prompts, target, chunk, usage_chunk: req.sampling.include_usage().then(|| Box::new(usage_chunk) as UsageChunk) };
        return Ok(stream_response(st.clone(), rid, rx, out));
    }
    let choices = collect(rx, p.n).await?;
    record(&st, &target, &prompts[0], &choices[0]);
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (message, finish) = chat_choice(c, tools, &id, i);
            json!({"index": i, "message": message, "logprobs": if req.logprobs { chat_logprobs(&st, &c.tokens) } else { Value::Null }, "finish_reason": finish})
        })
        .collect();
    Ok(Json(json!({"id": id, "object": "chat.completion", "created": created, "model": req.model, "choices": out, "usage": usage(&prompts, &choices)})).into_response())
}

/// The prompts of a completions `prompt` (token ids and text each): a string, a list of
/// strings, a list of token ids, or a list of token-id lists.
fn completion_prompts(st: &AppState, prompt: &Value) -> Result<Vec<(Vec<u32>, String)>, ApiError> {
    let bad = |m: String| ApiError::bad_request(m, Some("prompt"));
    let vocab = st.bundle.tokenizer.get_vocab_size(true) as u64;
    let text = |s: &str| -> Result<(Vec<u32>, String), ApiError> { Ok((st.bundle.encode(s).map_err(|e| bad(format!("cannot tokenize the prompt: {e:#}")))?, s.to_string())) };
    let ids = |items: &[Value]| {
        let ids: Vec<u32> = items.iter().filter_map(Value::as_u64).filter(|&i| i < vocab).map(|i| i as u32).collect();
        if ids.len() != items.len() || ids.is_empty() {
            return Err(bad(format!("a token-id prompt must be a non-empty list of integers below the vocabulary size {vocab}")));
        }
        let text = st.bundle.decode(&ids, false).unwrap_or_default();
        Ok((ids, text))
    };
    let shape = "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists";
    let prompts = match prompt {
        Value::String(s) => vec![text(s)?],
        Value::Array(items) if items.is_empty() => return Err(bad(shape.into())),
        Value::Array(items) if items.iter().all(Value::is_string) => items.iter().map(|s| text(s.as_str().unwrap_or_default())).collect::<Result<_, _>>()?,
        Value::Array(items) if items.iter().all(Value::is_number) => vec![ids(items)?],
        Value::Array(items) if items.iter().all(Value::is_array) => items.iter().map(|l| ids(l.as_array().map(Vec::as_slice).unwrap_or_default())).collect::<Result<_, _>>()?,
        _ => return Err(bad(shape.into())),
    };
    if prompts.len() > MAX_PROMPTS {
        return Err(bad(format!("at most {MAX_PROMPTS} prompts per request, got {}", prompts.len())));
    }
    Ok(prompts)
}

pub(super) async fn completions(State(st): St, Extension(rid): Extension<RequestId>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(body)?;
    api::refuse_unknown_fields(&req.other)?;
    let target = resolve(&st, &req.model)?;
    let (prompts, texts): (Vec<Vec<u32>>, Vec<String>) = completion_prompts(&st, &req.prompt)?.into_iter().unzip();
    if req.echo && req.logprobs.is_some() {
        return Err(ApiError::bad_request("echo with logprobs (the prompt's log-probs) is not supported", Some("echo")));
    }
    if prompts.len() > 1 && target.rollout.is_some() {
        return Err(ApiError::bad_request("a rollout's call takes one prompt", Some("prompt")));
    }
    let top = req.logprobs.unwrap_or(0);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
    let p = plan(&st, &req.sampling, if shortest == 0 { 0 } else { longest }, top, &target)?;
    if prompts.len() * p.n > MAX_CHOICES {
        return Err(ApiError::bad_request(format!("{} prompts x n = {} choices, more than {MAX_CHOICES}", prompts.len(), p.n), Some("prompt")));
    }
    let rx = submit(&st, &prompts, &target.adapter, &p)?;
    let id = format!("cmpl-{}", st.next_row.fetch_add(1, Ordering::Relaxed));
    let created = super::unix_seconds();
    let n = prompts.len() * p.n;
    let echo: Vec<String> = (0..n).map(|i| if req.echo { texts[i / p.n].clone() } else { String::new() }).collect();
    let want_logprobs = req.logprobs.is_some();
    if req.sampling.stream {
        let head: Vec<String> = (0..n)
            .filter(|&i| !echo[i].is_empty())
            .map(|i| {
                json!({"id": id, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": i, "text": echo[i], "logprobs": null, "finish_reason": null}]})
                .to_string()
            })
            .collect();
        let model = req.model.clone();
        let chunk = Box::new(move |st: &AppState, i: usize, piece: Piece, tokens: &[TokenInfo], finish: Option<&'static str>| {
            let lp = if want_logprobs { completion_logprobs(st, tokens, 0) } else { Value::Null };
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": piece.text, "logprobs": lp, "finish_reason": finish}]})
        });
        let usage_chunk = move |u: Value| json!({"id": format!("cmpl-usage-{created}"), "object": "text_completion", "created": created, "choices": [], "usage": u});
        let out = StreamOut { n, head, tools: None, prompts, target, chunk, usage_chunk: req.sampling.include_usage().then(|| Box::new(usage_chunk) as UsageChunk) };
        return Ok(stream_response(st.clone(), rid, rx, out));
    }
    let choices = collect(rx, n).await?;
    record(&st, &target, &prompts[0], &choices[0]);
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "text": format!("{}{}", echo[i], c.text),
                "logprobs": if want_logprobs { completion_logprobs(&st, &c.tokens, echo[i].len()) } else { Value::Null },
                "finish_reason": c.finish.map(Finish::as_str)})
        })
        .collect();
    Ok(Json(json!({"id": id, "object": "text_completion", "created": created, "model": req.model, "choices": out, "usage": usage(&prompts, &choices)})).into_response())
}

/// What one streamed chunk of a choice carries: new text, and the tool calls at its end.
struct Piece {
    text: String,
    calls: Vec<ToolCall>,
}

/// The text of choice `c` not streamed yet (`shown` bytes were), with text that may
/// start a tool call held back until the choice ends; then its calls and finish reason.
fn next_piece(tools: Option<ToolCallFormat>, c: &Choice, shown: &mut usize) -> (Piece, Option<&'static str>) {
    let full = c.text.as_str();
    let from = (*shown).min(full.len());
    let (upto, calls, finish) = match (tools, c.finish) {
        (Some(f), None) => (f.held_from(full).unwrap_or(full.len()).max(from), Vec::new(), None),
        (Some(f), Some(finish)) => {
            let e = f.extract(full);
            if e.calls.is_empty() {
                (full.len(), e.calls, Some(finish.as_str()))
            } else {
                // Content before the calls that was held back (a partial `<tool_call>`).
                let content_end = e.content.as_deref().map_or(0, str::len).max(from);
                *shown = full.len();
                let text = full.get(from..content_end).unwrap_or_default().to_string();
                return (Piece { text, calls: e.calls }, Some("tool_calls"));
            }
        }
        (None, finish) => (full.len(), Vec::new(), finish.map(Finish::as_str)),
    };
    *shown = upto;
    (Piece { text: full.get(from..upto).unwrap_or_default().to_string(), calls }, finish)
}

type ChunkFn = Box<dyn Fn(&AppState, usize, Piece, &[TokenInfo], Option<&'static str>) -> Value + Send>;
type UsageChunk = Box<dyn Fn(Value) -> Value + Send>;

/// How a streamed request's events become chunks.
struct StreamOut {
    /// Choices.
    n: usize,
    /// Chunks sent before any token (the role, echoed prompts).
    head: Vec<String>,
    tools: Option<ToolCallFormat>,
    prompts: Vec<Vec<u32>>,
    target: Target,
    chunk: ChunkFn,
    usage_chunk: Option<UsageChunk>,
}

/// Server-sent events: the head chunks, one chunk per delta, the usage chunk when asked,
/// then `[DONE]`. A failure mid-stream sends the internal-error body (the detail goes to
/// the log under `rid`). Dropping the stream (the client left) drops the receiver, which
/// the scheduler notices at its next step and frees the rows.
fn stream_response(st: Arc<AppState>, rid: RequestId, rx: UnboundedReceiver<Event>, out: StreamOut) -> Response {
    struct S {
        st: Arc<AppState>,
        rid: RequestId,
        rx: UnboundedReceiver<Event>,
        choices: Vec<Choice>,
        shown: Vec<usize>,
        queue: VecDeque<String>,
        done: bool,
        out: StreamOut,
    }
    let (n, mut out) = (out.n, out);
    let queue = std::mem::take(&mut out.head).into();
    let state = S { st, rid, rx, choices: vec![Choice::default(); n], shown: vec![0; n], queue, done: false, out };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.queue.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s));
            }
            if s.done {
                return None;
            }
            let failure = match s.rx.recv().await {
                Some(event) => match absorb(&mut s.choices, event) {
                    Ok((i, tokens)) => {
                        let (piece, finish) = next_piece(s.out.tools, &s.choices[i], &mut s.shown[i]);
                        if !piece.text.is_empty() || !piece.calls.is_empty() || finish.is_some() || !tokens.is_empty() {
                            s.queue.push_back((s.out.chunk)(&s.st, i, piece, &tokens, finish).to_string());
                        }
                        if s.choices.iter().all(|c| c.finish.is_some()) {
                            record(&s.st, &s.out.target, &s.out.prompts[0], &s.choices[0]);
                            if let Some(u) = &s.out.usage_chunk {
                                s.queue.push_back(u(usage(&s.out.prompts, &s.choices)).to_string());
                            }
                            s.queue.push_back("[DONE]".into());
                            s.done = true;
                        }
                        None
                    }
                    Err(e) => Some(e.message),
                },
                None => Some("the generation thread has stopped".to_string()),
            };
            if let Some(detail) = failure {
                s.queue.push_back(s.rid.internal_error(&detail).to_string());
                s.queue.push_back("[DONE]".into());
                s.done = true;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::scheduler::{GenJob, Job};
    use crate::serve::{HttpServer, Limits};

    /// The router over a stand-in for the scheduler that answers every row with `script`
    /// (one delta per piece): what a model that writes tool calls would send.
    fn scripted_server(script: &'static [&'static str]) -> HttpServer {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for job in rx {
                let Job::Generate(GenJob { rows, events, .. }) = job else { continue };
                for choice in 0..rows.len() {
                    for (k, piece) in script.iter().enumerate() {
                        let finish = (k + 1 == script.len()).then_some(Finish::Stop);
                        let _ = events.send(Event::Delta { choice, text: piece.to_string(), tokens: Vec::new(), finish });
                    }
                }
            }
        });
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/models/qwen2-tiny");
        let state = Arc::new(AppState {
            jobs: tx,
            bundle: lora_models::load_tokenizer_bundle(model.to_str().unwrap()).unwrap(),
            template: lora_datasets::ChatTemplate::chatml(),
            tool_calls: Some(ToolCallFormat::Hermes),
            models: Models::Serve { base: "m".into(), adapters: std::sync::RwLock::new(Vec::new()) },
            api_key: None,
            limits: Limits { max_model_len: 256, max_tokens: 16, max_n: 4, max_body_bytes: 1 << 20 },
            next_row: std::sync::atomic::AtomicU64::new(0),
            created: 0,
        });
        HttpServer::start(state, "127.0.0.1", 0, false).unwrap()
    }

    #[test]
    fn tool_calls_the_model_writes_come_back_as_tool_calls_whole_and_streamed() {
        let server = scripted_server(&["Let me check. ", "<tool", "_call>{\"name\": \"weather\", ", "\"arguments\": {\"city\": \"Paris\"}}</tool_call>"]);
        let url = format!("http://{}/v1/chat/completions", server.addr);
        let tools = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]);
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools, "n": 2});
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let v: Value = agent.post(&url).send_json(&body).unwrap().body_mut().read_json().unwrap();
        for (i, c) in v["choices"].as_array().unwrap().iter().enumerate() {
            assert_eq!(c["index"], i);
            assert_eq!(c["finish_reason"], "tool_calls", "{v}");
            assert_eq!(c["message"]["content"], "Let me check. ");
            let call = &c["message"]["tool_calls"][0];
            assert_eq!((call["type"].as_str(), call["function"]["name"].as_str()), (Some("function"), Some("weather")));
            assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
        }
        body["stream"] = json!(true);
        let text = agent.post(&url).send_json(&body).unwrap().into_body().read_to_string().unwrap();
        let chunks: Vec<Value> = text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
        for i in 0..2 {
            let mine: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]).filter(|c| c["index"] == i).collect();
            let content: String = mine.iter().filter_map(|c| c["delta"]["content"].as_str()).collect();
            assert_eq!(content, "Let me check. ", "{text}");
            let calls: Vec<&Value> = mine.iter().filter_map(|c| c["delta"]["tool_calls"].as_array()).flatten().collect();
            assert_eq!(calls.len(), 1, "{text}");
            assert_eq!((calls[0]["index"].as_u64(), calls[0]["function"]["name"].as_str()), (Some(0), Some("weather")));
            assert_eq!(mine.last().unwrap()["finish_reason"], "tool_calls");
        }
        // Without tools the same words are plain content.
        body["stream"] = json!(false);
        body.as_object_mut().unwrap().remove("tools");
        let v: Value = agent.post(&url).send_json(&body).unwrap().body_mut().read_json().unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v["choices"][0]["message"]["content"].as_str().unwrap().contains("<tool_call>"));
    }

    fn choice(text: &str, finish: Option<Finish>) -> Choice {
        Choice { text: text.into(), finish, ..Default::default() }
    }

    #[test]
    fn a_streamed_tool_call_is_held_back_and_sent_whole_at_the_end() {
        let f = Some(ToolCallFormat::Hermes);
        let mut shown = 0;
        let (p, fin) = next_piece(f, &choice("Checking <tool", None), &mut shown);
        assert_eq!((p.text.as_str(), fin), ("Checking ", None));
        let (p, _) = next_piece(f, &choice("Checking <tool_call>{\"name\": \"f\"", None), &mut shown);
        assert_eq!(p.text, "");
        let (p, fin) = next_piece(f, &choice("Checking <tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>", Some(Finish::Stop)), &mut shown);
        assert_eq!((p.text.as_str(), p.calls.len(), fin), ("", 1, Some("tool_calls")));
        // Held text that turns out not to be a call is sent when it ends.
        let mut shown = 0;
        let (p, _) = next_piece(f, &choice("a <tool_c", None), &mut shown);
        assert_eq!(p.text, "a ");
        let (p, fin) = next_piece(f, &choice("a <tool_c!", Some(Finish::Length)), &mut shown);
        assert_eq!((p.text.as_str(), fin), ("<tool_c!", Some("length")));
    }
}
