//! The OpenAI request bodies `serve` accepts and the error body it answers with
//! (`{"error": {"message", "type", "param", "code"}}`, as the OpenAI API and vLLM write it).
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lora_datasets::{Message, Role};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error answered to the client: never a crash, always an OpenAI-form body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param, code: None }
    }
    pub fn not_found(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into(), kind: "invalid_request_error", param, code: Some("model_not_found") }
    }
    pub fn unauthorized() -> Self {
        Self { status: StatusCode::UNAUTHORIZED, message: "invalid or missing API key (Authorization: Bearer KEY)".into(), kind: "invalid_request_error", param: None, code: Some("invalid_api_key") }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, code: None }
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
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
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Value,
    /// Legacy completions: how many alternatives to report with each token.
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub sampling: Sampling,
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
