//! The OpenAI request bodies `serve` accepts and the error body it answers with
//! (`{"error": {"message", "type", "param", "code"}}`, as the OpenAI API and vLLM write it).
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lora_datasets::{Message, Role};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};

/// An error answered to the client: never a crash, always an OpenAI-form body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// For a 5xx: the detail for the server's log, never sent (see [`InternalDetail`]).
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: param.map(str::to_string), code: None }
    }
    pub fn not_found(message: impl Into<String>, param: Option<&str>) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into(), kind: "invalid_request_error", param: param.map(str::to_string), code: Some("model_not_found") }
    }
    pub fn unauthorized() -> Self {
        Self { status: StatusCode::UNAUTHORIZED, message: "invalid or missing API key (Authorization: Bearer KEY)".into(), kind: "invalid_request_error", param: None, code: Some("invalid_api_key") }
    }
    /// A failure of the server itself; `detail` goes to the log only.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: detail.into(), kind: "server_error", param: None, code: Some("internal_error") }
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    /// The body of a 4xx (a 5xx's body is [`internal_error_body`]).
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// The id of one HTTP request: the `x-request-id` header of its response, the
/// `request_id` of an internal error's body, and the key of the log line with the detail.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

impl RequestId {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Unique within the process (the counter) and unlikely to repeat across restarts.
        Self(format!("req-{:016x}", lora_models::rng::mix64(n ^ super::unix_seconds().rotate_left(32) ^ ((std::process::id() as u64) << 20))))
    }

    /// Log an internal failure's detail under this id; the body the client gets instead.
    pub fn internal_error(&self, detail: &str) -> Value {
        tracing::error!(request_id = %self.0, "internal error: {detail}");
        internal_error_body(&self.0)
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

/// What a client learns of an internal failure: that it happened, and the id to quote.
pub fn internal_error_body(request_id: &str) -> Value {
    json!({"error": {"message": "internal error", "type": "server_error", "param": null, "code": "internal_error", "request_id": request_id}})
}

/// The detail of a 5xx, carried on the response to the request-id middleware
/// (`http::with_request_id`), which logs it and sends [`internal_error_body`] instead.
#[derive(Clone, Debug)]
pub struct InternalDetail(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            let mut r = (self.status, axum::Json(internal_error_body(""))).into_response();
            r.extensions_mut().insert(InternalDetail(self.message));
            return r;
        }
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `stop`: a string or a list of strings.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(untagged)]
pub enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn strings(&self) -> Vec<String> {
        match self {
            Stop::None => vec![],
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// The sampling fields chat and text completions share.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens` in chat requests.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Stop,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<Value>,
    /// Not implemented: refused when non-zero rather than ignored.
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
}

impl Sampling {
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false)
    }
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    /// `"auto"` (the default with tools) or `"none"`; forcing a call is not supported.
    pub tool_choice: Option<Value>,
    /// Several calls in one answer are parsed whatever this says; `false` is refused.
    pub parallel_tool_calls: Option<bool>,
    /// Only `{"type": "text"}` (no constrained decoding).
    pub response_format: Option<Value>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Every field not named above (or in [`Sampling`]): see [`refuse_unknown_fields`].
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub model: String,
    /// A string, a list of strings, a list of token ids, or a list of token-id lists.
    pub prompt: Value,
    /// Legacy completions: how many alternatives to report with each token.
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// Fields that change nothing this server computes, accepted as OpenAI accepts them.
const INERT_FIELDS: &[&str] = &["user", "metadata", "store", "service_tier"];

/// A field this server does not implement is refused by name (a 400), never ignored:
/// a client that asks for `best_of`, `suffix` or `min_p` must not get an answer that
/// silently lacks it.
pub fn refuse_unknown_fields(other: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    match other.keys().find(|k| !INERT_FIELDS.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_request(format!("`{k}` is not supported by this server"), Some(k.as_str()))),
        None => Ok(()),
    }
}

#[derive(Deserialize, Debug)]
pub struct LoadAdapterRequest {
    pub lora_name: String,
    pub lora_path: String,
}

#[derive(Deserialize, Debug)]
pub struct UnloadAdapterRequest {
    pub lora_name: String,
}

/// An OpenAI chat message as our chat template takes it. `content` may be a string,
/// a list of `{"type": "text", "text"}` parts, or null (an assistant turn that only
/// calls tools).
pub fn parse_message(i: usize, v: &Value) -> Result<Message, ApiError> {
    let bad = |what: String| ApiError::bad_request(format!("messages[{i}]: {what}"), Some("messages"));
    let role = v.get("role").and_then(Value::as_str).ok_or_else(|| bad("missing `role`".into()))?;
    // OpenAI's newer name for system instructions.
    let role = if role == "developer" { "system" } else { role };
    let role = Role::parse(role).ok_or_else(|| bad(format!("unknown role `{role}` (system, developer, user, assistant, tool)")))?;
    let content = match v.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err(bad(format!("content[{j}]: only text parts are supported"))),
                }
            }
            text
        }
        Some(_) => return Err(bad("`content` must be a string, a list of text parts, or null".into())),
    };
    let tool_calls = v.get("tool_calls").filter(|t| !t.is_null()).cloned();
    let string = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Ok(Message { role, content, weight: None, tool_calls, tool_call_id: string("tool_call_id"), name: string("name") })
}
