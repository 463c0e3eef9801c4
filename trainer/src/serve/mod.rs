//! `lora-train serve`: an OpenAI-compatible server over one base model and many
//! adapters, and the same router in-process for `grpo --agent-url`.
//!
//! - `http.rs`: the axum router (tokio threads), the checks every request goes through
//!   (size, API key, request id, internal errors kept from the client), the sampling plan.
//! - `completions.rs`: the chat and text completion handlers: render the chat template,
//!   tokenize, hand the rows to the scheduler; stream or collect what comes back.
//! - `scheduler.rs`: the thread that owns the model runs one continuous batch
//!   (`lora_models::DecodeBatch`) over every running request, whatever adapter each uses.
//! - `api.rs`: request bodies, the OpenAI error body, request ids.
//! - `tool_calls.rs`: tool calls read from what the model writes (hermes, llama3_json).
//!
//! The model is used from one thread only (the scheduler's); handlers talk to it through
//! channels, so a slow or vanished client never blocks decoding.
pub mod api;
mod completions;
pub mod http;
mod request;
pub mod scheduler;
pub mod tool_calls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use lora_datasets::ChatTemplate;
use lora_models::TokenizerBundle;

pub use scheduler::{Control, Job, Scheduler};

/// Request limits (`--max-model-len`, `--max-tokens-limit`, ...).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Prompt plus completion tokens of one choice.
    pub max_model_len: usize,
    /// The largest `max_tokens` accepted (and the default, bounded by the context).
    pub max_tokens: usize,
    /// The largest `n`.
    pub max_n: usize,
    /// Request bodies larger than this are refused (413).
    pub max_body_bytes: usize,
}

/// One model call of an agent's rollout, as the trainer needs it.
#[derive(Clone, Debug, Default)]
pub struct CallRecord {
    /// The prompt exactly as the policy saw it (rendered and tokenized here).
    pub prompt: Vec<u32>,
    /// What the policy generated, the stop token included when it stopped on one.
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Ended on a stop token or a stop string (false: cut at max_tokens).
    pub stopped: bool,
}

/// The rollouts an agent may call the policy for: `model` names a rollout id.
pub struct RolloutRegistry {
    /// The policy's adapter.
    pub adapter: String,
    /// Sampling is the trainer's, whatever the agent asks (the loss needs the log-probs
    /// of the distribution the tokens came from).
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub max_tokens: usize,
    pub rollouts: Mutex<HashMap<String, RolloutCalls>>,
}

#[derive(Default)]
pub struct RolloutCalls {
    pub seed: u64,
    pub calls: Vec<CallRecord>,
}

/// Which names the `model` field may take.
pub enum Models {
    /// `serve`: the base (by its `--model` reference) and the loaded adapters (name, dir).
    Serve { base: String, adapters: RwLock<Vec<(String, String)>> },
    /// `grpo --agent-url`: the rollouts in flight.
    Agent(Arc<RolloutRegistry>),
}

pub struct AppState {
    pub jobs: std::sync::mpsc::Sender<Job>,
    pub bundle: TokenizerBundle,
    pub template: ChatTemplate,
    /// How chat answers are read for tool calls (None: requests with `tools` are refused).
    pub tool_calls: Option<tool_calls::ToolCallFormat>,
    pub models: Models,
    pub api_key: Option<String>,
    pub limits: Limits,
    pub next_row: AtomicU64,
    pub created: u64,
}

/// A running HTTP server on its own tokio runtime (a background thread).
pub struct HttpServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Bind `host:port` (port 0 = any free port) and serve `state` until
    /// [`HttpServer::stop`] or Ctrl-C (`ctrl_c` true, the `serve` command).
    pub fn start(state: Arc<AppState>, host: &str, port: u16, ctrl_c: bool) -> Result<Self> {
        Self::start_router(http::router(state), host, port, ctrl_c)
    }

    /// [`HttpServer::start`] for any router (the dashboard's).
    pub fn start_router(app: axum::Router, host: &str, port: u16, ctrl_c: bool) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("serve-http")
            .enable_all()
            .build()
            .context("starting the HTTP runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((host, port)))
            .with_context(|| format!("cannot listen on {host}:{port}"))?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("serve-http".into()).spawn(move || {
            runtime.block_on(async move {
                let stop = async move {
                    if ctrl_c {
                        tokio::select! {
                            _ = rx => {}
                            _ = tokio::signal::ctrl_c() => eprintln!("lora-train: stopping (Ctrl-C)"),
                        }
                    } else {
                        let _ = rx.await;
                    }
                };
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                    tracing::error!("HTTP server failed: {e}");
                }
            });
        })?;
        Ok(Self { addr, shutdown: Some(tx), thread: Some(thread) })
    }

    /// Stop accepting requests. The thread is not joined: a client still holding a
    /// stream open must not keep the caller waiting (it ends with the process).
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.thread.take();
    }

    /// Serve until the server stops (Ctrl-C).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Seconds since the epoch (the `created` fields).
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The message of a caught panic (`panic!` with a string literal or a formatted one).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic without a message".into())
}
