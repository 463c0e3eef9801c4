//! `lora-train serve` end to end: the binary on a free loopback port, driven by a real
//! HTTP client. The OpenAI routes, streaming, n, logprobs, stop strings, adapters loaded
//! and unloaded at run time, 4xx answers with OpenAI error bodies, the API key, a client
//! that leaves mid-stream, and 32 concurrent greedy requests over three adapters that
//! answer exactly what each request answers alone.
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use lora_models::LoraConfig;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::*;

pub const KEY: &str = "sk-test-key";

/// A running `serve`; killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
    /// Everything the server wrote on stderr (its log) so far.
    pub log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Start `serve` with `args` on a free port; waits for its "listening on" line.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(bin())
            .arg("serve")
            .args(["--port", "0", "--device", "cpu"])
            .args(args)
            .env("LORA_TRAIN_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lora-train serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("lora-train serve: listening on ") {
                        break addr.trim().to_string();
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                _ => panic!("serve exited before listening:\n{seen}"),
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        let log = Arc::new(Mutex::new(seen));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Server { child, url, log }
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into()
}

/// POST `body` as JSON (with the test key); (status, JSON body).
pub fn post(url: &str, body: &Value) -> (u16, Value) {
    let mut r = agent().post(url).header("Authorization", format!("Bearer {KEY}")).send_json(body).expect("request");
    let status = r.status().as_u16();
    (status, r.body_mut().read_json::<Value>().unwrap_or(Value::Null))
}

pub fn get(url: &str) -> (u16, Value) {
    let mut r = agent().get(url).header("Authorization", format!("Bearer {KEY}")).call().expect("request");
    let status = r.status().as_u16();
    (status, r.body_mut().read_json::<Value>().unwrap_or(Value::Null))
}

/// Save three adapters of the tiny Llama with random B (so each answers differently).
pub fn write_adapters(dir: &Path) -> Vec<String> {
    let model_dir = tiny("llama");
    let mut loaded = lora_models::load_model_mixed(&model_dir, &Device::Cpu, DType::F32, DType::F32).unwrap();
    let mut out = Vec::new();
    for (k, name) in ["a", "b", "c"].iter().enumerate() {
        let cfg = LoraConfig { rank: 4, alpha: 16.0, ..Default::default() };
        loaded.model.add_adapter(name, &cfg, k as u64).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7 + k as u64);
        for (key, var) in loaded.model.adapter_parameters(name).unwrap() {
            if key.contains("lora_B") {
                let v: Vec<f32> = (0..var.elem_count()).map(|_| rng.random_range(-0.3..0.3)).collect();
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap()).unwrap();
            }
        }
        let path = dir.join(name);
        std::fs::create_dir_all(&path).unwrap();
        loaded.model.save_named_adapter(name, &path, &model_dir).unwrap();
        out.push(path.display().to_string());
    }
    out
}

pub fn start_with_adapters(tmp: &Path, extra: &[&str]) -> (Server, String) {
    let dirs = write_adapters(tmp);
    let model = tiny("llama");
    let specs: Vec<String> = ["a", "b", "c"].iter().zip(&dirs).map(|(n, d)| format!("{n}={d}")).collect();
    let mut args: Vec<&str> = vec!["--model", &model, "--api-key", KEY, "--max-model-len", "200", "--max-tokens-limit", "150"];
    for s in &specs {
        args.extend(["--adapter", s.as_str()]);
    }
    args.extend_from_slice(extra);
    (Server::start(&args), model)
}

pub fn chat_body(model: &str, user: &str, max_tokens: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": user}], "max_tokens": max_tokens, "temperature": 0})
}

/// The data lines of an SSE body, `[DONE]` included.
pub fn sse_events(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

pub fn text_of(v: &Value) -> String {
    v["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("no content in {v}")).to_string()
}

#[test]
fn serve_answers_the_openai_routes_and_refuses_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, base) = start_with_adapters(tmp.path(), &["--max-body-bytes", "100000"]);
    let u = |p: &str| format!("{}{p}", server.url);

    // /health needs no key; everything else does.
    let r = agent().get(&u("/health")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut r = agent().get(&u("/v1/models")).call().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.body_mut().read_json().unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    let r = agent().get(&u("/v1/models")).header("Authorization", "Bearer wrong").call().unwrap();
    assert_eq!(r.status().as_u16(), 401);

    let (s, models) = get(&u("/v1/models"));
    assert_eq!(s, 200);
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![base.as_str(), "a", "b", "c"]);

    // Chat, greedy: deterministic, with usage; the adapters answer differently.
    let (s, first) = post(&u("/v1/chat/completions"), &chat_body("a", "Tell me a story", 12));
    assert_eq!(s, 200, "{first}");
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["choices"][0]["finish_reason"], "length");
    assert_eq!(first["usage"]["completion_tokens"], 12);
    let (_, again) = post(&u("/v1/chat/completions"), &chat_body("a", "Tell me a story", 12));
    assert_eq!(text_of(&first), text_of(&again));
    let answers: Vec<String> = [base.as_str(), "a", "b", "c"].iter().map(|m| text_of(&post(&u("/v1/chat/completions"), &chat_body(m, "Tell me a story", 12)).1)).collect();
    assert!(answers.windows(2).any(|w| w[0] != w[1]), "every adapter answered the same: {answers:?}");

    // Streaming: the same text, chunk by chunk, then [DONE].
    let mut body = chat_body("a", "Tell me a story", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = agent().post(&u("/v1/chat/completions")).header("Authorization", format!("Bearer {KEY}")).send_json(&body).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("content-type").unwrap().to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_events(&r.into_body().read_to_string().unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"].get(0)).filter_map(|c| c["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text_of(&first));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 12);
    assert!(chunks.iter().any(|c| c["choices"].get(0).is_some_and(|c| c["finish_reason"] == "length")));

    // Text completions, n > 1 with a seed (reproducible, choices differ), logprobs.
    let body = json!({"model": "b", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 3, "logprobs": 2});
    let (s, c1) = post(&u("/v1/completions"), &body);
    assert_eq!(s, 200, "{c1}");
    let (_, c2) = post(&u("/v1/completions"), &body);
    let texts = |v: &Value| v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(texts(&c1).len(), 3);
    assert_eq!(texts(&c1), texts(&c2), "the same seed gives the same choices");
    assert!(texts(&c1)[0] != texts(&c1)[1] || texts(&c1)[1] != texts(&c1)[2], "each choice draws its own stream");
    let lp = &c1["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 8);
    // Keyed by token text: two ids that decode alike (partial UTF-8) share a key.
    assert!((1..=2).contains(&lp["top_logprobs"][0].as_object().unwrap().len()));
    assert!(lp["token_logprobs"].as_array().unwrap().iter().all(|x| x.as_f64().unwrap() <= 0.0));

    // Chat logprobs: the chosen token's log-prob is the best of the top ones when greedy.
    let mut body = chat_body("c", "Hello", 5);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (_, v) = post(&u("/v1/chat/completions"), &body);
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for t in content {
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 3);
        assert_eq!(t["logprob"], t["top_logprobs"][0]["logprob"], "{t}");
    }

    // A stop string cuts the text before it and ends the choice with "stop".
    let full = text_of(&post(&u("/v1/chat/completions"), &chat_body("a", "Tell me a story", 40)).1);
    let chars: Vec<char> = full.chars().collect();
    if let Some(i) = (3..chars.len().saturating_sub(2)).find(|&i| chars[i..i + 2].iter().all(|c| !c.is_whitespace() && *c != '\u{FFFD}')) {
        let stop: String = chars[i..i + 2].iter().collect();
        let cut = full.find(&stop).unwrap();
        let mut body = chat_body("a", "Tell me a story", 40);
        body["stop"] = json!([stop]);
        let (_, v) = post(&u("/v1/chat/completions"), &body);
        assert_eq!(text_of(&v), full[..cut], "stop {stop:?} in {full:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    // Bad requests: a 4xx and an OpenAI error body, and the server goes on.
    let bad = agent().post(&u("/v1/chat/completions")).header("Authorization", format!("Bearer {KEY}")).content_type("application/json").send("{not json");
    let mut bad = bad.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let e: Value = bad.body_mut().read_json().unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("invalid request body"), "{e}");
    let (s, e) = post(&u("/v1/chat/completions"), &chat_body("nope", "hi", 4));
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("model_not_found")), "{e}");
    let long = "word ".repeat(400);
    let (s, e) = post(&u("/v1/chat/completions"), &chat_body("a", &long, 4));
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("context_length_exceeded")), "{e}");
    let (s, e) = post(&u("/v1/chat/completions"), &chat_body("a", "hi", 151));
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("max_tokens")), "{e}");
    let (s, e) = post(&u("/v1/chat/completions"), &json!({"model": "a", "messages": [{"role": "wizard", "content": "x"}]}));
    assert_eq!(s, 400, "{e}");
    let (s, e) = post(&u("/v1/completions"), &json!({"model": "a", "prompt": "x", "top_p": 0}));
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("top_p")), "{e}");
    let (s, e) = post(&u("/v1/chat/completions"), &chat_body("a", &"x".repeat(200_000), 4));
    assert_eq!(s, 413, "{e}");
    assert!(e["error"]["message"].is_string(), "{e}");
    let (s, e) = post(&u("/v1/completions"), &json!({"model": "a", "prompt": "x", "frequency_penalty": 0.5}));
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("frequency_penalty")), "{e}");
    let (s, e) = post(&u("/v1/nowhere"), &json!({}));
    assert_eq!(s, 404, "{e}");
    assert!(e["error"]["message"].is_string());

    // Adapters loaded and unloaded at run time.
    let (s, e) = post(&u("/v1/load_lora_adapter"), &json!({"lora_name": "d", "lora_path": tmp.path().join("b").display().to_string()}));
    assert_eq!(s, 200, "{e}");
    let (_, v) = post(&u("/v1/chat/completions"), &chat_body("d", "Tell me a story", 12));
    let (_, vb) = post(&u("/v1/chat/completions"), &chat_body("b", "Tell me a story", 12));
    assert_eq!(text_of(&v), text_of(&vb), "d is a copy of b");
    let (s, e) = post(&u("/v1/load_lora_adapter"), &json!({"lora_name": "e", "lora_path": "/no/such/dir"}));
    assert_eq!(s, 400, "{e}");
    let (s, _) = post(&u("/v1/unload_lora_adapter"), &json!({"lora_name": "d"}));
    assert_eq!(s, 200);
    let (s, _) = post(&u("/v1/chat/completions"), &chat_body("d", "hi", 4));
    assert_eq!(s, 404);
    let (_, models) = get(&u("/v1/models"));
    assert_eq!(models["data"].as_array().unwrap().len(), 4);

    // The prefix cache: a prompt seen before finds its 16-token blocks (the usage says how
    // many tokens) and answers the same; an adapter unloaded and loaded again under the
    // same name answers with its new weights, not with blocks kept from the old ones.
    let story = "Tell me a story about a dragon who lived in a castle by the sea and read books all day long";
    let (s, e) = post(&u("/v1/load_lora_adapter"), &json!({"lora_name": "d", "lora_path": tmp.path().join("b").display().to_string()}));
    assert_eq!(s, 200, "{e}");
    let (_, fresh) = post(&u("/v1/chat/completions"), &chat_body("d", story, 8));
    assert_eq!(fresh["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{fresh}");
    let (_, kept) = post(&u("/v1/chat/completions"), &chat_body("d", story, 8));
    let prompt_tokens = kept["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 16, "{kept}");
    assert_eq!(kept["usage"]["prompt_tokens_details"]["cached_tokens"], (prompt_tokens - 1) / 16 * 16, "{kept}");
    assert_eq!(text_of(&kept), text_of(&fresh));
    assert_eq!(post(&u("/v1/unload_lora_adapter"), &json!({"lora_name": "d"})).0, 200);
    let (s, e) = post(&u("/v1/load_lora_adapter"), &json!({"lora_name": "d", "lora_path": tmp.path().join("c").display().to_string()}));
    assert_eq!(s, 200, "{e}");
    let (_, as_c) = post(&u("/v1/chat/completions"), &chat_body("d", story, 8));
    assert_eq!(as_c["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{as_c}");
    assert_eq!(text_of(&as_c), text_of(&post(&u("/v1/chat/completions"), &chat_body("c", story, 8)).1));
    assert_eq!(post(&u("/v1/unload_lora_adapter"), &json!({"lora_name": "d"})).0, 200);

    // b still answers as before (the unload shifted adapter indices, not names).
    let (_, vb2) = post(&u("/v1/chat/completions"), &chat_body("b", "Tell me a story", 12));
    assert_eq!(text_of(&vb), text_of(&vb2));
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_row() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _) = start_with_adapters(tmp.path(), &["--max-model-len", "256", "--max-tokens-limit", "220"]);
    let u = |p: &str| format!("{}{p}", server.url);
    // Greedy, so it is known to run all 220 tokens (a sampled row may stop early on EOS);
    // n = 8 rows make each step slower, leaving the unload below time to arrive mid-stream.
    let mut body = chat_body("c", "Tell me a long story", 220);
    body["n"] = json!(8);
    let (_, whole) = post(&u("/v1/chat/completions"), &body);
    assert_eq!(whole["choices"][0]["finish_reason"], "length", "{whole}");
    body["stream"] = json!(true);
    let r = agent().post(&u("/v1/chat/completions")).header("Authorization", format!("Bearer {KEY}")).send_json(&body).unwrap();
    let mut reader = r.into_body().into_reader();
    let mut first = [0u8; 64];
    let n = reader.read(&mut first).unwrap();
    assert!(n > 0 && String::from_utf8_lossy(&first[..n]).starts_with("data: "));
    // The adapter cannot be unloaded while the stream runs...
    let (s, e) = post(&u("/v1/unload_lora_adapter"), &json!({"lora_name": "c"}));
    assert_eq!(s, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("in use"), "{e}");
    drop(reader);
    // ...and can once the client has gone (the row left the batch).
    let start = Instant::now();
    loop {
        let (s, e) = post(&u("/v1/unload_lora_adapter"), &json!({"lora_name": "c"}));
        if s == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the row of a closed stream is still running: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, _) = get(&u("/health"));
    assert_eq!(s, 200);
}

#[test]
fn thirty_two_concurrent_requests_over_three_adapters_equal_their_answers_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, base) = start_with_adapters(tmp.path(), &[]);
    let url = format!("{}/v1/chat/completions", server.url);
    let models = [base.as_str(), "a", "b", "c"];
    let requests: Vec<Value> = (0..32)
        .map(|i| {
            let prompt = format!("Question {i}: {}", ["tell me a story", "what is two plus two", "name a color", "hello there friend"][i % 4]);
            let mut b = chat_body(models[(i * 3 + 1) % 4], &prompt, 6 + i % 11);
            if i % 5 == 0 {
                b = json!({"model": models[i % 4], "prompt": prompt, "max_tokens": 9, "temperature": 0});
            }
            b
        })
        .collect();
    let endpoint = |b: &Value| if b.get("prompt").is_some() { url.replace("chat/completions", "completions") } else { url.clone() };
    let answer = |v: &Value| {
        let c = &v["choices"][0];
        c["message"]["content"].as_str().or(c["text"].as_str()).unwrap_or_else(|| panic!("{v}")).to_string()
    };
    let alone: Vec<String> = requests.iter().map(|b| answer(&post(&endpoint(b), b).1)).collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = requests.iter().map(|b| s.spawn(|| answer(&post(&endpoint(b), b).1))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} ({}) answered differently in the concurrent batch", requests[i]["model"]);
    }
}
