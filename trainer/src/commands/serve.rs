//! `lora-train serve`: an OpenAI-compatible server over one base model and any number of
//! adapters (see `serve/mod.rs`).
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::model_args::PlacementArgs;
use crate::serve::tool_calls::ToolCallFormat;
use crate::serve::{scheduler::Scheduler, AppState, Control, HttpServer, Limits, Models};

#[derive(clap::Args, Debug)]
#[command(after_help = "The request's `model` field names the base (its --model reference) or an adapter (vLLM's convention). \
Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/load_lora_adapter \
{\"lora_name\", \"lora_path\"}, POST /v1/unload_lora_adapter {\"lora_name\"}.")]
pub struct Args {
    /// Base model: a Hugging Face model directory, a .gguf file, or a hub id in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// An adapter to serve, as NAME=DIR (a PEFT adapter directory). Repeat for several.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// Address to listen on (loopback by default: nothing outside this machine can connect).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 = any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "LORA_TRAIN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Prompt + completion tokens of one request [default: the model's max_position_embeddings].
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Largest `max_tokens` a request may ask for (also the default).
    #[arg(long, default_value_t = 1024)]
    pub max_tokens_limit: usize,
    /// Largest `n` (choices per request).
    #[arg(long, default_value_t = 16)]
    pub max_n: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Most rows decoded together; later requests wait for room.
    #[arg(long, default_value_t = 64)]
    pub max_batch_rows: usize,
    /// MiB of prompt keys and values kept across requests, so that prompts beginning with
    /// the same tokens (a shared system prompt, few-shot examples) prefill that part once
    /// (16-token blocks per adapter, least recently used evicted first; 0 = off). What a
    /// request found is its usage's `prompt_tokens_details.cached_tokens`.
    #[arg(long, default_value_t = 1024)]
    pub prefix_cache_mb: usize,
    /// How chat answers are read for tool calls: `hermes` (`<tool_call>{json}</tool_call>`,
    /// Qwen2.5/Qwen3), `llama3_json` (Llama 3.1 JSON), `none`, or `auto` (from the chat
    /// template; a template with neither refuses requests with `tools`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "hermes", "llama3_json", "none"])]
    pub tool_call_parser: String,
}

/// `NAME=DIR` of `--adapter`.
fn parse_adapter(spec: &str) -> Result<(String, PathBuf)> {
    match spec.split_once('=') {
        Some((name, dir)) if !name.trim().is_empty() && !dir.is_empty() => Ok((name.trim().to_string(), PathBuf::from(dir))),
        _ => bail!("--adapter {spec}: expected NAME=DIR"),
    }
}

pub fn run(args: Args) -> Result<()> {
    let adapters = args.adapters.iter().map(|s| parse_adapter(s)).collect::<Result<Vec<_>>>()?;
    for (i, (name, _)) in adapters.iter().enumerate() {
        if *name == args.model || adapters[..i].iter().any(|(n, _)| n == name) {
            bail!("--adapter {name}: the name is used twice (or names the base model)");
        }
    }
    let loaded = args.placement.load(&args.model)?;
    let (mut model, bundle) = (loaded.model, loaded.tokenizer);
    for (name, dir) in &adapters {
        model.load_named_adapter(name, dir).with_context(|| format!("loading adapter {name} from {}", dir.display()))?;
        tracing::info!("adapter {name} loaded from {}", dir.display());
    }
    let max_model_len = args.max_model_len.unwrap_or(model.config().max_position_embeddings);
    if max_model_len < 2 {
        bail!("--max-model-len must be at least 2");
    }
    let tool_calls = match args.tool_call_parser.as_str() {
        "auto" => ToolCallFormat::detect(bundle.chat_template.as_deref()),
        "none" => None,
        name => ToolCallFormat::from_name(name),
    };
    tracing::info!("tool calls: {}", tool_calls.map_or("not parsed (requests with `tools` are refused)", ToolCallFormat::name));
    let (tx, rx) = std::sync::mpsc::channel();
    let state = Arc::new(AppState {
        jobs: tx,
        template: crate::chat::template_for(&bundle)?,
        bundle: bundle.clone(),
        tool_calls,
        models: Models::Serve {
            base: args.model.clone(),
            adapters: RwLock::new(adapters.iter().map(|(n, d)| (n.clone(), d.display().to_string())).collect()),
        },
        api_key: args.api_key.clone(),
        limits: Limits { max_model_len, max_tokens: args.max_tokens_limit.max(1), max_n: args.max_n.max(1), max_body_bytes: args.max_body_bytes },
        next_row: AtomicU64::new(0),
        created: crate::serve::unix_seconds(),
    });
    let server = HttpServer::start(state, &args.host, args.port, true)?;
    // Tests and scripts read the address (with --port 0) from this line.
    eprintln!("lora-train serve: listening on http://{}", server.addr);
    let mut scheduler = Scheduler::new(rx, bundle, args.max_batch_rows).with_prefix_cache(args.prefix_cache_mb << 20);
    // The model lives on this thread: decoding steps here, adapter loads between steps.
    while !scheduler.finished() {
        for control in scheduler.tick(&model, Duration::from_millis(200)) {
            match control {
                Control::Load { name, path, reply } => {
                    scheduler.forget_prefixes(&name);
                    let result = model.load_named_adapter(&name, std::path::Path::new(&path)).map(|_| ()).map_err(|e| format!("cannot load adapter `{name}` from {path}: {e:#}"));
                    if result.is_ok() {
                        tracing::info!("adapter {name} loaded from {path}");
                    }
                    let _ = reply.send(result);
                }
                Control::Unload { name, reply } => {
                    let busy = scheduler.uses_adapter(&name);
                    let result = if busy > 0 {
                        Err(format!("adapter `{name}` is in use by {busy} running or waiting requests; retry when they finish"))
                    } else {
                        scheduler.forget_prefixes(&name);
                        model.remove_named_adapter(&name).map_err(|e| format!("{e:#}"))
                    };
                    let _ = reply.send(result);
                }
            }
        }
    }
    if let Some(s) = scheduler.prefix_stats() {
        tracing::info!("prefix cache: {} of {} prompt tokens came from it ({} of {} requests), {} blocks ({:.1} MiB) held, {} evicted", s.cached_tokens, s.prompt_tokens, s.hits, s.lookups, s.blocks, s.bytes as f64 / (1 << 20) as f64, s.evicted_blocks);
    }
    drop(server);
    Ok(())
}
