//! The routes: `/health`, `/v1/models`, `/v1/chat/completions`, `/v1/completions`
//! (`completions.rs`), `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`; the checks
//! every request goes through (body size, API key, request id); a generation request's
//! checks are `request.rs`. Every failure is an OpenAI-form error body with a
//! 4xx/5xx status, never a crash or a dropped connection; a 5xx tells the client only
//! "internal error" and a request id, and the log line with that id has the detail.
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::FutureExt;
use serde_json::{json, Value};

use super::api::{ApiError, InternalDetail, LoadAdapterRequest, RequestId, UnloadAdapterRequest};
use super::completions::{chat, completions};
use super::request::parse_body;
use super::scheduler::{Control, Job};
use super::{AppState, Models};

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
        .layer(middleware::from_fn(with_request_id))
        .with_state(state)
}

/// Every response gets an `x-request-id`. A 5xx's detail (an [`InternalDetail`] on the
/// response, or a handler's panic) is logged under that id and replaced by
/// [`super::api::internal_error_body`]: a client learns nothing of the server's internals.
async fn with_request_id(mut req: Request, next: Next) -> Response {
    let id = RequestId::new();
    req.extensions_mut().insert(id.clone());
    let mut response = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => ApiError::internal(format!("the handler panicked: {}", super::panic_message(panic.as_ref()))).into_response(),
    };
    if let Some(InternalDetail(detail)) = response.extensions_mut().remove::<InternalDetail>() {
        let status = response.status();
        response = (status, Json(id.internal_error(&detail))).into_response();
    }
    if let Ok(v) = HeaderValue::from_str(&id.0) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
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
